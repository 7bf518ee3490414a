"""The ``ingest_options`` pipeline: list every active contract of each underlying and upsert it.

Extract (the contracts endpoint, page by page), normalize (:mod:`options.api.normalize`), load (one
bulk upsert per page). Each underlying is synced in one transaction: its pages are upserted as
they arrive and, once its listing has been read to the end, the contracts of that underlying
that the listing no longer shows are marked inactive. A listing that fails part-way rolls back,
so a failed underlying keeps its contracts exactly as they were.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass

import asyncpg
from opentelemetry import trace

from options.api.normalize import CONTRACT_COLUMNS, ContractRow, normalize_contracts
from options.api.polygon import PolygonClient
from options.config import Settings
from options.errors import ApiError, DatabaseError, KeyRejectedError
from options.jobs.filters import ListingScope, contract_underlying, listing_scope, market_today
from options.ops.logs import StatusReporter
from options.store.db import ACQUIRE_TIMEOUT, DB_ERRORS, describe_db_error
from options.store.runs import RunStats, until_stopped

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


INSERT_CONTRACTS = f"""
INSERT INTO option_contracts AS c
    ({", ".join(CONTRACT_COLUMNS)}, active, first_seen_at, last_seen_at)
SELECT t.ticker, t.underlying_ticker, t.contract_type, t.exercise_style, t.expiration_date,
       t.strike_price, t.shares_per_contract, t.primary_exchange, t.cfi, t.correction,
       t.additional_underlyings::jsonb, true, $12, $12
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::date[], $6::numeric[],
            $7::numeric[], $8::text[], $9::text[], $10::integer[], $11::text[])
     AS t({", ".join(CONTRACT_COLUMNS)})
"""

UPSERT_CONTRACTS = f"""{INSERT_CONTRACTS}
ON CONFLICT (ticker) DO UPDATE SET
    {", ".join(f"{col} = EXCLUDED.{col}" for col in CONTRACT_COLUMNS[1:])},
    active = true,
    last_seen_at = EXCLUDED.last_seen_at
"""

# Contracts first met in a snapshot: the daily sync owns them from then on.
UPSERT_NEW_CONTRACTS = f"{INSERT_CONTRACTS}\nON CONFLICT (ticker) DO NOTHING\n"

# Contracts of the underlying that this sync did not see, within the part of the chain the
# listing covered (the filters), plus any that have already expired.
DEACTIVATE_CONTRACTS = """
UPDATE option_contracts SET active = false
WHERE underlying_ticker = $1 AND active AND last_seen_at < $2
  AND (expiration_date < $3
       OR ($4 AND ($5::text[] IS NULL OR contract_type = ANY($5))
              AND ($6::date IS NULL OR expiration_date <= $6)
              AND ($7::numeric IS NULL OR strike_price >= $7)
              AND ($8::numeric IS NULL OR strike_price <= $8)))
"""


@dataclass
class UnderlyingResult:
    """What one underlying's sync did."""

    underlying: str
    fetched: int = 0
    written: int = 0
    rejected: int = 0
    deactivated: int = 0
    error: str | None = None


async def sync_contracts(
    settings: Settings,
    client: PolygonClient,
    pool: asyncpg.Pool | None,
    stats: RunStats,
    *,
    seen_at: dt.datetime,
    stop: asyncio.Event | None = None,
    progress: StatusReporter | None = None,
) -> list[UnderlyingResult]:
    """Sync the contracts of every configured underlying, several side by side.

    Args:
        settings: underlyings, filters and concurrency.
        client: the API client.
        pool: the database pool; ``None`` for a dry run, which fetches and counts only.
        stats: the run's counts, updated as underlyings finish.
        seen_at: the run's timestamp, written to ``last_seen_at`` of every contract seen.
        stop: when set (signal, deadline), underlyings in progress roll back and the run stops.
        progress: receives a progress line as underlyings finish (``systemctl status``).

    Returns:
        One result per underlying, in the configured order.

    Raises:
        DatabaseError: PostgreSQL failed; the run stops (API errors only fail their underlying).
        KeyRejectedError: the API refused the key; the run stops.
        RunInterrupted: ``stop`` was set first.
    """
    stop = stop or asyncio.Event()
    underlyings = settings.require_underlyings()
    stats.underlyings_requested = len(underlyings)
    today = market_today()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for underlying in underlyings:
        queue.put_nowait(underlying)
    results: dict[str, UnderlyingResult] = {}
    workers = min(settings.underlying_concurrency, len(underlyings))
    if pool is not None:
        # one connection stays with the run ledger; the others serve the transactions
        workers = max(1, min(workers, pool.get_max_size() - 1))

    async def worker() -> None:
        while not queue.empty():
            underlying = queue.get_nowait()
            result = UnderlyingResult(underlying)
            results[underlying] = result
            try:
                await sync_underlying(
                    settings, client, pool, underlying, result, seen_at=seen_at, today=today
                )
            except KeyRejectedError:
                raise  # every underlying would fail the same way: the run ends
            except ApiError as exc:
                exc.underlying = exc.underlying or underlying
                result.error = str(exc)
                stats.underlyings_failed += 1
                stats.failures.append(f"{underlying}: {exc}")
                logger.error(
                    "Underlying %s failed, its contracts are left untouched: %s", underlying, exc
                )
            else:
                stats.underlyings_succeeded += 1
            finally:
                stats.rows_fetched += result.fetched
                stats.rows_rejected += result.rejected
                stats.rows_written += result.written
                stats.contracts_deactivated += result.deactivated
                stats.api_requests = client.requests_sent
                if progress is not None:
                    finished = stats.underlyings_succeeded + stats.underlyings_failed
                    progress.update(
                        f"{finished}/{len(underlyings)} underlyings, "
                        f"{stats.rows_written:,} contracts stored, "
                        f"{stats.underlyings_failed} failed"
                    )

    async def run_workers() -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(worker())
        except BaseExceptionGroup as failed:
            # one worker's error (database gone, key refused) ended the run and cancelled the
            # others, whose underlyings rolled back: raise that error, not the group
            raise _first_error(failed)  # noqa: B904 (its own cause is kept)

    try:
        await until_stopped(run_workers(), stop)
    finally:
        _log_totals(stats, len(underlyings))
        if progress is not None:
            progress.flush()
    return [results[u] for u in underlyings if u in results]


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


def _log_totals(stats: RunStats, underlyings: int) -> None:
    logger.info(
        "Total contracts processed: %d (%d stored, %d rejected, %d deactivated) "
        "across %d underlyings, %d failed",
        stats.rows_fetched,
        stats.rows_written,
        stats.rows_rejected,
        stats.contracts_deactivated,
        underlyings,
        stats.underlyings_failed,
    )


async def sync_underlying(
    settings: Settings,
    client: PolygonClient,
    pool: asyncpg.Pool | None,
    underlying: str,
    result: UnderlyingResult,
    *,
    seen_at: dt.datetime,
    today: dt.date,
) -> None:
    """List one underlying's contracts and store them in one transaction.

    Raises:
        ApiError: the listing failed; nothing of this underlying was changed.
        DatabaseError: PostgreSQL failed.
    """
    with tracer.start_as_current_span("contracts.sync_underlying") as span:
        span.set_attribute("polygon.underlying", underlying)
        scope = await listing_scope(settings, client, underlying, today=today)
        conn: asyncpg.Connection | None = None
        transaction: asyncpg.transaction.Transaction | None = None

        async def begin() -> asyncpg.Connection:
            # the connection is taken at the first write, not while the first page is fetched
            nonlocal conn, transaction
            if conn is None:
                assert pool is not None
                conn = await pool.acquire(timeout=ACQUIRE_TIMEOUT)
                transaction = conn.transaction()
                await transaction.start()
            return conn

        try:
            async for page in client.list_contracts(
                contract_underlying(underlying), scope.api_params()
            ):
                rows, rejects = normalize_contracts(page.results, underlying=underlying)
                offset = result.fetched
                result.fetched += len(page.results)
                if rejects:
                    result.rejected += len(rejects)
                    logger.warning(
                        "%s: rejected %d contracts, first: %s", underlying, len(rejects), rejects[0]
                    )
                logger.info(
                    "Retrieved batch at offset %d for %s: %d contracts (page %d)",
                    offset,
                    underlying,
                    len(page.results),
                    page.number,
                )
                if pool is None or not rows:
                    continue
                result.written += await upsert_contracts(await begin(), rows, seen_at=seen_at)
            if pool is None:
                return
            result.deactivated = await deactivate_unseen(
                await begin(),
                underlying,
                scope,
                seen_at=seen_at,
                today=today,
                listing_empty=result.fetched == 0,
            )
            assert transaction is not None
            await transaction.commit()
            transaction = None
        except DB_ERRORS as exc:
            raise DatabaseError(f"{underlying}: {describe_db_error(exc)}") from exc
        finally:
            if conn is not None:
                if transaction is not None:
                    result.written = result.deactivated = 0
                    await _rollback_quietly(transaction)
                await pool.release(conn)  # type: ignore[union-attr]
        span.set_attribute("contracts.fetched", result.fetched)


async def upsert_contracts(
    conn: asyncpg.Connection, rows: list[ContractRow], *, seen_at: dt.datetime
) -> int:
    """Insert or update ``rows`` in one statement; returns how many rows it wrote."""
    columns = list(zip(*rows, strict=True))
    status = await conn.execute(UPSERT_CONTRACTS, *columns, seen_at)
    return int(status.rsplit(" ", 1)[1])


async def deactivate_unseen(
    conn: asyncpg.Connection,
    underlying: str,
    scope: ListingScope,
    *,
    seen_at: dt.datetime,
    today: dt.date,
    listing_empty: bool,
) -> int:
    """Mark inactive the contracts of ``underlying`` within ``scope`` that this sync did not see.

    A complete listing with no contracts at all is not trusted to mean that every contract
    vanished (a plan change or an API fault looks the same); then only contracts whose
    expiration date has passed are deactivated.

    Returns:
        The number of contracts deactivated.
    """
    if listing_empty:
        active = await conn.fetchval(
            "SELECT count(*) FROM option_contracts WHERE underlying_ticker = $1 AND active "
            "AND expiration_date >= $2",
            contract_underlying(underlying),
            today,
        )
        if active:
            logger.warning(
                "%s: the API listed no contracts while %d unexpired ones are active; "
                "only expired contracts are deactivated",
                underlying,
                active,
            )
    status = await conn.execute(
        DEACTIVATE_CONTRACTS,
        contract_underlying(underlying),
        seen_at,
        today,
        not listing_empty,
        [scope.contract_type] if scope.contract_type else None,
        scope.max_expiration,
        scope.min_strike,
        scope.max_strike,
    )
    count = int(status.rsplit(" ", 1)[1])
    if count:
        logger.info("%s: %d contracts no longer listed, marked inactive", underlying, count)
    return count


async def _rollback_quietly(transaction: asyncpg.transaction.Transaction) -> None:
    try:
        await transaction.rollback()
    except DB_ERRORS as exc:
        logger.warning("Rollback failed: %s", describe_db_error(exc))
