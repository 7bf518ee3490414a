"""The ``ingest_options`` pipeline: list every active contract of each underlying and upsert it.

Extract (the contracts endpoint, page by page), normalize (:mod:`options.api.normalize`), load
(one bulk upsert per page). Each underlying is synced in one transaction: its pages are upserted
as they arrive and, once its listing has been read to the end, the contracts of that underlying
that the listing no longer shows are marked inactive, behind a guard against mass
deactivation; its rejected rows, its tracked-underlying row and the run's counts commit in the
same transaction. A listing that fails part-way rolls back, so a failed underlying keeps its
contracts exactly as they were. A contract whose row was refused but whose ticker could be read
was listed all the same: it counts as seen. Expired contracts of every underlying are
deactivated once per run (:func:`deactivate_expired`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from opentelemetry import trace

from options.api.normalize import CONTRACT_COLUMNS, ContractRow, normalize_contracts
from options.api.polygon import PolygonClient
from options.config import Settings
from options.errors import (
    ApiError,
    DatabaseError,
    DeactivationRefused,
    KeyRejectedError,
    RunInterrupted,
)
from options.jobs.filters import ListingScope, contract_underlying, listing_scope, market_today
from options.ops.progress import Progress
from options.ops.telemetry import count_rows_rejected, count_rows_written, time_batch
from options.store.reconnect import DB_ERRORS, acquire_timeout, describe_db_error, reconnecting
from options.store.rejects import Reject, keep_rejects
from options.store.runs import Run, RunStats, count_committed
from options.store.syncs import SyncCounts, committed_sync, record_failed_sync, record_sync

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

# The unexpired contracts of the underlying inside the part of the chain the listing covered
# (the filters): $1 underlying, $3 today, $4..$7 the scope's bounds.
_IN_SCOPE = """
underlying_ticker = $1 AND active
  AND (expiration_date >= $3 OR expiration_date IS NULL)
  AND ($4::text[] IS NULL OR contract_type = ANY($4))
  AND ($5::date IS NULL OR expiration_date <= $5)
  AND ($6::numeric IS NULL OR strike_price >= $6)
  AND ($7::numeric IS NULL OR strike_price <= $7)
"""

# Mark inactive the contracts in scope this sync did not see ($2: the sync's timestamp), unless
# the guard refuses: nothing stored or seen ($8) while some are active, or more than $10 percent
# of them and more than $9. Returns the unseen and total counts, the verdict, how many went.
DEACTIVATE_UNSEEN = f"""
WITH scope AS (
    SELECT ticker, last_seen_at < $2 AS unseen FROM option_contracts WHERE {_IN_SCOPE}
), counted AS (
    SELECT count(*) FILTER (WHERE unseen) AS unseen, count(*) AS total FROM scope
), verdict AS (
    SELECT unseen, total,
           NOT ($8::bool AND unseen > 0)
           AND NOT (unseen > $9::bigint AND unseen * 100 > $10::float8 * total) AS allowed
    FROM counted
), gone AS (
    UPDATE option_contracts c SET active = false FROM scope, verdict
    WHERE verdict.allowed AND scope.unseen AND c.ticker = scope.ticker
    RETURNING 1
)
SELECT unseen, total, allowed, (SELECT count(*) FROM gone) FROM verdict
"""

# A contract listed in a row that was refused is still listed: it must not be deactivated.
MARK_SEEN = """
UPDATE option_contracts SET last_seen_at = $2, active = true
WHERE ticker = ANY($1::text[]) AND last_seen_at < $2
"""

DEACTIVATE_EXPIRED = """
UPDATE option_contracts SET active = false WHERE active AND expiration_date < $1
"""

# Whatever the share, this many unseen contracts may always go (a small chain's churn).
DEACTIVATION_GUARD_FLOOR = 10


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
    pool: asyncpg.Pool,
    run: Run,
    underlyings: Sequence[str],
    *,
    seen_at: dt.datetime,
    stop: asyncio.Event | None = None,
    progress: Progress | None = None,
) -> list[UnderlyingResult]:
    """Sync the contracts of ``underlyings``, several side by side, each in one transaction.

    Args:
        settings: filters, concurrency and the deactivation guard.
        client: the API client.
        pool: the database pool.
        run: the run whose lease and counts each transaction checks and adds to.
        underlyings: the tickers to sync.
        seen_at: the run's timestamp, written to ``last_seen_at`` of every contract seen.
        stop: when set (signal, deadline), underlyings in progress roll back and the run stops.
        progress: receives the counts as underlyings finish.

    Returns:
        One result per underlying synced or failed, in the given order.

    Raises:
        DatabaseError: PostgreSQL failed (after waiting for it to come back); the run stops.
        KeyRejectedError: the API refused the key; the run stops.
        RunInterrupted: ``stop`` was set first.
    """
    stop = stop or asyncio.Event()
    stats = run.stats
    stats.underlyings_requested = len(underlyings)
    today = market_today()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for underlying in underlyings:
        queue.put_nowait(underlying)
    results: dict[str, UnderlyingResult] = {}
    workers = min(settings.underlying_concurrency, len(underlyings))
    if pool is not None:
        # a connection stays free for the heartbeat and the failures' records
        workers = max(1, min(workers, pool.get_max_size() - 1))
    halt = asyncio.Event()
    if progress is not None:
        progress.start(len(underlyings), "underlyings")

    async def worker() -> None:
        while not queue.empty() and not halt.is_set() and not stop.is_set():
            underlying = queue.get_nowait()
            result = UnderlyingResult(underlying)
            results[underlying] = result
            try:
                await sync_underlying(
                    settings,
                    client,
                    pool,
                    run,
                    underlying,
                    result,
                    seen_at=seen_at,
                    today=today,
                    stop=stop,
                )
            except (KeyRejectedError, DatabaseError):
                halt.set()  # every underlying would fail the same way: the run ends
                raise
            except (ApiError, DeactivationRefused) as exc:
                result.error = str(exc)
                logger.error(
                    "Underlying %s failed, its contracts are left untouched: %s", underlying, exc
                )
                await _record_failure(pool, run, result)
                stats.underlyings_failed += 1
            except RunInterrupted:
                del results[underlying]  # rolled back: as if never started
                return
            else:
                if result.error is None:
                    stats.underlyings_succeeded += 1
                else:
                    stats.underlyings_failed += 1
            finally:
                stats.rows_fetched += result.fetched
                stats.api_requests = client.requests_sent
                if progress is not None:
                    progress.update(
                        done=stats.underlyings_succeeded + stats.underlyings_failed,
                        rows=stats.rows_written,
                        failed=stats.underlyings_failed,
                    )

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(workers):
                group.create_task(worker())
    except BaseExceptionGroup as failed:
        # one worker's error (database gone, key refused) ended the run and stopped the
        # others, whose underlyings rolled back: raise that error, not the group
        raise _first_error(failed)  # noqa: B904 (its own cause is kept)
    finally:
        _log_totals(stats, len(underlyings))
    if stop.is_set() and len(results) < len(underlyings):
        raise RunInterrupted(
            f"stopped before every underlying was synced: {len(underlyings) - len(results)} "
            "left untouched (the others are stored)"
        )
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
    pool: asyncpg.Pool,
    run: Run,
    underlying: str,
    result: UnderlyingResult,
    *,
    seen_at: dt.datetime,
    today: dt.date,
    stop: asyncio.Event,
) -> None:
    """List one underlying's contracts and store them in one transaction.

    A connection lost mid-way rolls the transaction back and the underlying is listed again on
    a new connection (for up to ``DB_RECONNECT_SECONDS``).

    Raises:
        ApiError: the listing failed; nothing of this underlying was changed.
        DeactivationRefused: the listing would deactivate too much; nothing was changed.
        RunInterrupted: ``stop`` was set mid-listing; nothing was changed.
        DatabaseError: PostgreSQL failed.
    """
    with tracer.start_as_current_span("contracts.sync_underlying") as span:
        span.set_attribute("polygon.underlying", underlying)
        scope = await listing_scope(settings, client, underlying, today=today)
        fresh = result
        try:
            async for attempt in reconnecting(what=f"syncing the contracts of {underlying}"):
                with attempt:
                    fresh = UnderlyingResult(underlying)  # a rolled-back attempt counts nothing
                    await _sync_once(
                        settings,
                        client,
                        pool,
                        run,
                        underlying,
                        fresh,
                        scope,
                        seen_at=seen_at,
                        today=today,
                        stop=stop,
                        retry=attempt.retry_state.attempt_number > 1,
                    )
        except DB_ERRORS as exc:
            raise DatabaseError(
                f"syncing the contracts of {underlying}: {describe_db_error(exc)}"
            ) from exc
        finally:
            # what was fetched and refused counts either way; what was written only if kept
            result.fetched, result.rejected = fresh.fetched, fresh.rejected
            result.error = fresh.error
        result.written, result.deactivated = fresh.written, fresh.deactivated
        span.set_attribute("contracts.fetched", result.fetched)


async def _sync_once(
    settings: Settings,
    client: PolygonClient,
    pool: asyncpg.Pool,
    run: Run,
    underlying: str,
    result: UnderlyingResult,
    scope: ListingScope,
    *,
    seen_at: dt.datetime,
    today: dt.date,
    stop: asyncio.Event,
    retry: bool,
) -> None:
    key = contract_underlying(underlying)
    if retry:
        async with pool.acquire(timeout=acquire_timeout()) as lookup:
            done = await committed_sync(lookup, run, key)
        if done is not None:  # the earlier attempt committed; only its answer was lost
            result.fetched, result.written = done.listed, done.written
            result.rejected, result.deactivated = done.rejected, done.deactivated
            result.error = done.error
            _count_locally(run, result)
            return
    seen_rejected: set[str] = set()
    rejects: list[Reject] = []
    async with contextlib.AsyncExitStack() as stack:
        conn: asyncpg.Connection | None = None

        async def begin() -> asyncpg.Connection:
            # the connection is taken at the first write, not while the first page is fetched
            nonlocal conn
            if conn is None:
                acquired = await stack.enter_async_context(pool.acquire(timeout=acquire_timeout()))
                await stack.enter_async_context(acquired.transaction())
                conn = acquired
            return conn

        pages = client.list_contracts(key, scope.api_params())
        stack.push_async_callback(pages.aclose)
        async for page in pages:
            rows, refused = normalize_contracts(page.results, underlying=underlying)
            offset = result.fetched
            result.fetched += len(page.results)
            if refused:
                result.rejected += len(refused)
                logger.warning(
                    "%s: rejected %d contracts, first: %s",
                    underlying,
                    len(refused),
                    refused[0].reason,
                )
                seen_rejected.update(r.ticker for r in refused if r.ticker is not None)
                rejects.extend(
                    Reject.of(r.raw, r.reason, ticker=r.ticker)
                    for r in refused
                    if run.keep.take_one()
                )
            logger.info(
                "Retrieved batch at offset %d for %s: %d contracts (page %d)",
                offset,
                underlying,
                len(page.results),
                page.number,
            )
            if stop.is_set() and page.has_next:
                raise RunInterrupted(f"{underlying}: stopped mid-listing, left untouched")
            if not rows:
                continue
            with time_batch("option_contracts"):
                result.written += await upsert_contracts(await begin(), rows, seen_at=seen_at)
        if result.fetched == 0:
            logger.warning(
                "%s: the API lists no option contracts for it (a misspelled ticker, or a "
                "ticker without listed options?)",
                underlying,
            )
        conn = await begin()
        if seen_rejected:
            await conn.execute(MARK_SEEN, list(seen_rejected), seen_at)
        result.deactivated = await deactivate_unseen(
            conn,
            underlying,
            scope,
            seen_at=seen_at,
            today=today,
            listing_empty=result.written == 0 and not seen_rejected,
            max_percent=settings.max_deactivation_percent,
        )
        if result.rejected and not result.written:
            result.error = (
                f"all {result.rejected} contracts of the listing were rejected; nothing stored "
                "(see rejected_rows)"
            )
        await keep_rejects(conn, run.id, rejects, underlying=key)
        await record_sync(conn, run, key, _counts(result), seen_at=seen_at)
    # the transaction committed when the stack closed
    _count_locally(run, result)


def _counts(result: UnderlyingResult) -> SyncCounts:
    return SyncCounts(
        result.fetched, result.written, result.rejected, result.deactivated, result.error
    )


def _count_locally(run: Run, result: UnderlyingResult) -> None:
    """Mirror committed counts in the run's stats (the database row has them already) and in
    the metrics."""
    count_rows_written("option_contracts", result.written)
    count_rows_rejected("option_contracts", result.rejected)
    run.stats.add(
        {
            "rows_written": result.written,
            "rows_rejected": result.rejected,
            "contracts_deactivated": result.deactivated,
        }
    )


async def _record_failure(pool: asyncpg.Pool, run: Run, result: UnderlyingResult) -> None:
    """Record a failed underlying that stored nothing, once even if the answer is lost."""
    counts = SyncCounts(result.fetched, 0, result.rejected, 0, result.error)
    key = contract_underlying(result.underlying)
    try:
        async for attempt in reconnecting(what=f"recording the failure of {result.underlying}"):
            with attempt:
                async with pool.acquire(timeout=acquire_timeout()) as conn:
                    await record_failed_sync(conn, run, key, counts)
    except DB_ERRORS as exc:
        raise DatabaseError(
            f"recording the failure of {result.underlying}: {describe_db_error(exc)}"
        ) from exc


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
    max_percent: float,
) -> int:
    """Mark inactive the unexpired contracts of ``underlying`` within ``scope`` that this sync
    did not see, unless that is more than the guard allows.

    A complete listing that stored nothing is not trusted to mean that every contract vanished
    (a plan change or an API fault looks the same), nor is one that would take more than
    ``max_percent`` of the unexpired active contracts in scope (and more than
    :data:`DEACTIVATION_GUARD_FLOOR`): the underlying fails instead, loudly, and nothing of it
    changes. Expired contracts are deactivated for every underlying by
    :func:`deactivate_expired`.

    Returns:
        The number of contracts deactivated.

    Raises:
        DeactivationRefused: the guard refused; roll the underlying back.
    """
    unseen, total, allowed, count = await conn.fetchrow(
        DEACTIVATE_UNSEEN,
        contract_underlying(underlying),
        seen_at,
        today,
        [scope.contract_type] if scope.contract_type else None,
        scope.max_expiration,
        scope.min_strike,
        scope.max_strike,
        listing_empty,
        DEACTIVATION_GUARD_FLOOR,
        max_percent,
    )
    if not allowed and listing_empty:
        raise DeactivationRefused(
            f"{underlying}: the API listed no contracts while {total} unexpired ones are active "
            "here; nothing deactivated (if its options are gone for good: ingest_admin "
            f"underlyings disable {underlying})",
            underlying=underlying,
        )
    if not allowed:
        raise DeactivationRefused(
            f"{underlying}: the listing would deactivate {unseen} of {total} unexpired active "
            f"contracts, more than MAX_DEACTIVATION_PERCENT={max_percent:g}; nothing changed "
            "(if the listing is right, run once with a higher MAX_DEACTIVATION_PERCENT)",
            underlying=underlying,
        )
    if count:
        logger.info("%s: %d contracts no longer listed, marked inactive", underlying, count)
    return int(count)


async def deactivate_expired(pool: asyncpg.Pool, run: Run, *, today: dt.date) -> int:
    """Mark inactive every contract, of any underlying, whose expiration date has passed."""
    try:
        async for attempt in reconnecting(what="deactivating expired contracts"):
            with attempt:
                async with pool.acquire(timeout=acquire_timeout()) as conn, conn.transaction():
                    status = await conn.execute(DEACTIVATE_EXPIRED, today)
                    count = int(status.rsplit(" ", 1)[1])
                    await count_committed(conn, run, {"contracts_deactivated": count})
    except DB_ERRORS as exc:
        raise DatabaseError(f"deactivating expired contracts: {describe_db_error(exc)}") from exc
    run.stats.add({"contracts_deactivated": count})
    if count:
        logger.info("%d expired contracts marked inactive", count)
    return count
