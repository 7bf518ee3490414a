"""The ``ingest_snapshots`` pipeline: a snapshot of every active contract, streamed into COPY.

Extract: chains are read with ``/v3/snapshot/options/{underlying}`` at 250 rows a page, many
underlyings side by side; a large chain is split into independent slices by expiration date so
its pages do not all wait in line. Normalize: :func:`options.api.normalize.snapshot_row` for pages
msgspec decoded and type-checked, :func:`options.api.normalize.normalize_snapshot` for a page it
refused. Load: pages flow through a bounded queue into batched COPYs into the day's partition
while other pages are still being fetched, so memory is bounded by the queue, not by the
universe.

Every underlying gets a ``snapshot_coverage`` row saying how much of its chain was stored and
whether it was read to the end. A chain that breaks part-way keeps the rows already fetched and
is marked ``complete = false``; the run then ends ``partial``.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from opentelemetry import trace

from options.api.normalize import (
    SNAPSHOT_COLUMNS,
    ContractRow,
    Rejected,
    SnapshotResult,
    SnapshotRow,
    check_snapshot_row,
    decode_chain_page,
    epoch_microseconds,
    normalize_snapshot,
    snapshot_contract,
    snapshot_row,
)
from options.api.polygon import PolygonClient
from options.config import Settings
from options.errors import ApiError, DatabaseError, KeyRejectedError, RunInterrupted
from options.jobs.contracts import UPSERT_NEW_CONTRACTS
from options.jobs.filters import ListingScope, contract_underlying, listing_scope, market_today
from options.ops.logs import StatusReporter
from options.store.db import (
    ACQUIRE_TIMEOUT,
    DB_ERRORS,
    bounded_db_connection,
    bounded_db_connection_gen,
    describe_db_error,
    epoch_microsecond_timestamps,
)
from options.store.runs import Run

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

SLICE_CONTRACTS = 2_500  # a known chain larger than this (10 pages) is split by expiration
COPY_BATCH_ROWS = 10_000
QUEUE_PAGES = 64  # pages waiting for the writer: bounds memory at ~16,000 rows
WRITERS = 2


@dataclass
class Chain:
    """One underlying's snapshot in progress: what is known, seen, stored, and how it ended."""

    underlying: str
    key: str
    expected: set[str] = field(default_factory=set)
    known: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)
    slices: int = 1
    slices_done: int = 0
    slices_ended: int = 0
    pages: int = 0
    stored: int = 0
    rejected: int = 0
    active: int = 0
    missing: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Read to the end: every slice's last page had no ``next_url`` and every page parsed."""
        return not self.errors and self.slices_done == self.slices

    def end_slice(self, *, done: bool) -> None:
        """Count one slice as ended; when the last one ends, keep the counts, free the sets."""
        self.slices_ended += 1
        self.slices_done += done
        if self.slices_ended >= self.slices:
            self.settle()

    def settle(self) -> None:
        """Turn the ticker sets into counts, so a finished chain holds no per-contract memory."""
        self.active = len(self.expected)
        self.missing = len(self.expected - self.seen)
        self.expected, self.known, self.seen = set(), set(), set()


@dataclass(frozen=True)
class Slice:
    """One independent query of a chain: the whole chain, or a range of expiration dates."""

    chain: Chain
    scope: ListingScope
    first_expiration: dt.date | None = None
    last_expiration: dt.date | None = None

    def api_params(self) -> dict[str, str]:
        """The chain query's filters: the configured scope, narrowed to this slice's dates."""
        params = self.scope.api_params()
        last = self.last_expiration
        if self.scope.max_expiration is not None:
            last = (
                self.scope.max_expiration if last is None else min(last, self.scope.max_expiration)
            )
        if self.first_expiration is not None:
            params["expiration_date.gte"] = self.first_expiration.isoformat()
        if last is not None:
            params["expiration_date.lte"] = last.isoformat()
        return params


async def select_underlyings(
    settings: Settings, pool: asyncpg.Pool, *, explicit: bool
) -> list[str]:
    """The underlyings to snapshot.

    ``--underlying`` alone when given (even with no known contracts); otherwise
    ``UNDERLYINGS`` together with every underlying that has active contracts. An index known
    as ``SPX`` in ``option_contracts`` is asked for as ``I:SPX`` when configured that way.
    """
    if explicit:
        return list(settings.underlyings)
    chosen = {contract_underlying(u): u for u in settings.underlyings}
    async for underlying in active_underlyings(pool):
        chosen.setdefault(underlying, underlying)
    return list(chosen.values())


@bounded_db_connection_gen
async def active_underlyings(conn: asyncpg.Connection) -> AsyncIterator[str]:
    """Stream the underlyings that have active contracts, in order (thousands are fine)."""
    async with conn.transaction():
        async for row in conn.cursor(
            "SELECT DISTINCT underlying_ticker FROM option_contracts WHERE active "
            "ORDER BY underlying_ticker"
        ):
            yield row["underlying_ticker"]


class SnapshotRun:
    """Fetchers, the bounded queue and the COPY writers of one run."""

    def __init__(
        self,
        settings: Settings,
        client: PolygonClient,
        pool: asyncpg.Pool,
        run: Run,
        *,
        captured_at: dt.datetime,
        partition: str,
        progress: StatusReporter | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.pool = pool
        self.run = run
        self.captured_at = captured_at
        self.captured_at_us = epoch_microseconds(captured_at)  # as the rows carry it
        self.partition = partition
        self.today = market_today()
        # last in, first out: a planned chain's slices are fetched before the next chain is
        # planned, so only the chains in flight hold their ticker sets (memory flat in universe)
        self.work: asyncio.LifoQueue[Chain | Slice] = asyncio.LifoQueue()
        self.pages: asyncio.Queue[tuple[Chain, list[SnapshotRow]] | None] = asyncio.Queue(
            QUEUE_PAGES
        )
        self.chains: list[Chain] = []
        self.progress = progress

    async def execute(self, underlyings: Sequence[str], stop: asyncio.Event) -> list[Chain]:
        """Snapshot ``underlyings``; on ``stop``, flush what was fetched and raise RunInterrupted.

        Raises:
            RunInterrupted: ``stop`` was set before every chain was read.
            KeyRejectedError: the API refused the key; what was fetched is stored.
            DatabaseError: PostgreSQL failed.
        """
        self.chains = [Chain(u, contract_underlying(u)) for u in underlyings]
        for chain in reversed(self.chains):
            self.work.put_nowait(chain)
        # each writer holds a connection for the whole run; one stays with the run ledger and
        # one must stay free for the fetchers' short queries
        count = max(1, min(WRITERS, self.pool.get_max_size() - 2))
        writers = [asyncio.create_task(self._write()) for _ in range(count)]
        # fetchers hold no database connection, so HTTP_CONCURRENCY is their only bound
        fetchers = [
            asyncio.create_task(self._fetch()) for _ in range(self.settings.http_concurrency)
        ]
        finished = asyncio.create_task(self.work.join())
        stopped = asyncio.create_task(stop.wait())
        watched = {finished, stopped, *fetchers, *writers}
        refused: KeyRejectedError | None = None
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            for task in done & {*fetchers, *writers}:
                task.result()  # a fetcher or writer died: raise its error
        except KeyRejectedError as exc:
            refused = exc  # store what was fetched and the coverage, then end the run
        finally:
            for task in (*fetchers, finished, stopped):
                task.cancel()
            await asyncio.gather(*fetchers, finished, stopped, return_exceptions=True)
            # whatever was fetched is stored, even when the run is being stopped
            await self._close_queue(writers)
            results = await asyncio.gather(*writers, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        await self._record_coverage()
        if self.progress is not None:
            self.progress.flush()
        if refused is not None:
            raise refused
        if stop.is_set():
            raise RunInterrupted("stopped before every chain was read; what was fetched is stored")
        return self.chains

    async def _close_queue(self, writers: Sequence[asyncio.Task[None]]) -> None:
        """Send each writer its end mark once the queue has room, unless every writer died.

        A plain ``await put()`` would wait forever on a full queue whose writers are gone
        (PostgreSQL went away): the run must fail, not hang.
        """
        for _ in writers:
            while not all(writer.done() for writer in writers):
                try:
                    self.pages.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    await asyncio.sleep(0.01)

    async def _fetch(self) -> None:
        while True:
            item = await self.work.get()
            try:
                if isinstance(item, Chain):
                    await self._plan(item)
                else:
                    await self._fetch_slice(item)
            finally:
                self.work.task_done()

    async def _plan(self, chain: Chain) -> None:
        """Learn what the database knows of the chain, then queue its slices."""
        try:
            scope = await listing_scope(
                self.settings, self.client, chain.underlying, today=self.today
            )
        except ApiError as exc:
            self._fail(chain, exc)
            return
        rows = await _known_contracts(self.pool, chain.key, self.today, scope)
        chain.known = {row[0] for row in rows}
        chain.expected = {row[0] for row in rows if row[1]}
        slices = plan_slices(chain, [row[2] for row in rows if row[3]], scope)
        chain.slices = len(slices)
        for part in slices:
            self.work.put_nowait(part)

    async def _fetch_slice(self, part: Slice) -> None:
        chain = part.chain
        try:
            async for page in self.client.chain_snapshot(
                chain.underlying, part.api_params(), decoder=decode_chain_page
            ):
                chain.pages += 1
                await self._accept(chain, page.results)
        except ApiError as exc:
            self._fail(chain, exc)
        else:
            chain.end_slice(done=True)

    async def _accept(self, chain: Chain, results: list[Any]) -> None:
        rows: list[SnapshotRow] = []
        new_contracts: list[ContractRow] = []
        seen, known, key, captured_at = chain.seen, chain.known, chain.key, self.captured_at_us
        # typed results (the decoder's fast path) or dicts (a page the decoder refused)
        build = (
            snapshot_row if results and type(results[0]) is SnapshotResult else normalize_snapshot
        )
        for raw in results:
            try:
                row = build(raw, underlying=key, captured_at=captured_at)
                ticker = row[0]
                if ticker in seen:
                    continue  # a row repeated across pages must not break the batch's COPY
                if ticker not in known:
                    new_contracts.append(snapshot_contract(raw, underlying=key))
                    known.add(ticker)
            except Rejected as exc:
                chain.rejected += 1
                if chain.rejected == 1:
                    logger.warning("%s: rejected a snapshot: %s", chain.underlying, exc)
                continue
            seen.add(ticker)
            rows.append(row)
        self.run.stats.rows_fetched += len(results)
        if new_contracts:
            await _add_contracts(self.pool, new_contracts, self.captured_at)
            logger.info(
                "%s: %d contracts not yet in option_contracts were added",
                chain.underlying,
                len(new_contracts),
            )
        if rows:
            await self.pages.put((chain, rows))

    async def _write(self) -> None:
        """Take pages off the queue and COPY them in batches into the day's partition."""
        conn = await self.pool.acquire(timeout=ACQUIRE_TIMEOUT)
        try:
            async with epoch_microsecond_timestamps(conn):
                await self._write_batches(conn)
        except DB_ERRORS as exc:
            raise DatabaseError(f"storing snapshots: {describe_db_error(exc)}") from exc
        finally:
            await self.pool.release(conn)

    async def _write_batches(self, conn: asyncpg.Connection) -> None:
        batch: list[SnapshotRow] = []
        counts: dict[str, tuple[Chain, int]] = {}
        done = False
        while not done:
            item = await self.pages.get()
            if item is None:
                done = True
            else:
                chain, rows = item
                batch.extend(rows)
                previous = counts.get(chain.key, (chain, 0))[1]
                counts[chain.key] = (chain, previous + len(rows))
            if batch and (done or len(batch) >= COPY_BATCH_ROWS or self.pages.empty()):
                await self._copy(conn, batch, counts)
                batch = []
                counts = {}

    async def _copy(
        self,
        conn: asyncpg.Connection,
        batch: list[SnapshotRow],
        counts: dict[str, tuple[Chain, int]],
    ) -> None:
        """COPY one batch; if a value is refused, check the rows one by one and COPY the good."""
        try:
            await self._copy_rows(conn, batch, counts)
        except (TypeError, ValueError, OverflowError, asyncpg.DataError):
            # the COPY failed as a whole, so nothing of this batch is stored yet
            good = []
            for row in batch:
                try:
                    good.append(check_snapshot_row(row))
                except Rejected as exc:
                    chain, count = counts[row[1]]
                    counts[row[1]] = (chain, count - 1)
                    chain.rejected += 1
                    logger.warning("%s: rejected a snapshot: %s", chain.underlying, exc)
            await self._copy_rows(conn, good, counts)
        stored = 0
        for chain, count in counts.values():
            chain.stored += count
            stored += count
        self.run.stats.rows_written += stored
        if self.progress is not None:
            settled = sum(c.slices_ended >= c.slices for c in self.chains)
            self.progress.update(
                f"{settled}/{len(self.chains)} chains read, "
                f"{self.run.stats.rows_written:,} snapshots stored"
            )

    async def _copy_rows(
        self,
        conn: asyncpg.Connection,
        rows: list[SnapshotRow],
        counts: dict[str, tuple[Chain, int]],
    ) -> None:
        """COPY ``rows`` into the partition, keeping the first snapshot of a contract that
        another chain of this run already stored (an adjusted contract can be listed under two
        underlyings); ``counts`` is set to what each chain really stored."""
        try:
            await conn.copy_records_to_table(self.partition, records=rows, columns=SNAPSHOT_COLUMNS)
            return
        except asyncpg.UniqueViolationError:
            pass  # nothing of this COPY is stored: store it again, skipping what exists
        columns = ", ".join(SNAPSHOT_COLUMNS)
        async with conn.transaction():
            await conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS snapshot_batch "
                "(LIKE option_snapshots) ON COMMIT DELETE ROWS"
            )
            await conn.copy_records_to_table(
                "snapshot_batch", records=rows, columns=SNAPSHOT_COLUMNS
            )
            inserted = await conn.fetch(
                f"INSERT INTO {self.partition} ({columns}) SELECT {columns} FROM snapshot_batch "
                "ON CONFLICT DO NOTHING RETURNING underlying_ticker"
            )
        stored = collections.Counter(row[0] for row in inserted)
        for key, (chain, count) in counts.items():
            skipped = count - stored[key]
            if skipped:
                logger.warning(
                    "%s: %d snapshots skipped, of contracts another underlying's chain "
                    "already returned in this run",
                    chain.underlying,
                    skipped,
                )
            counts[key] = (chain, stored[key])

    def _fail(self, chain: Chain, exc: ApiError) -> None:
        """End a slice of ``chain`` as not read to the end; a rejected key ends the run."""
        chain.errors.append(str(exc))
        logger.error(
            "%s: chain not read to the end, %d rows kept: %s",
            chain.underlying,
            len(chain.seen),
            exc,
        )
        chain.end_slice(done=False)
        if isinstance(exc, KeyRejectedError):
            raise exc  # every chain would fail the same way

    async def _record_coverage(self) -> None:
        for chain in self.chains:
            if chain.slices_ended < chain.slices:
                chain.settle()  # stopped part-way: count what was seen so far
        stats = self.run.stats
        stats.underlyings_requested = len(self.chains)
        stats.underlyings_succeeded = sum(c.complete for c in self.chains)
        stats.underlyings_failed = len(self.chains) - stats.underlyings_succeeded
        stats.rows_rejected = sum(c.rejected for c in self.chains)
        stats.api_requests = self.client.requests_sent
        stats.failures = [f"{c.underlying}: {'; '.join(c.errors)}" for c in self.chains if c.errors]
        stats.failures += [
            f"{c.underlying}: not read to the end"
            for c in self.chains
            if not c.errors and not c.complete
        ]
        for chain in self.chains:
            if chain.complete and chain.pages and not (chain.stored or chain.rejected):
                logger.warning(
                    "%s: the API returned an empty chain%s",
                    chain.underlying,
                    f"; {chain.missing} active contracts known here are missing"
                    if chain.missing
                    else ": no options are listed for it (a misspelled ticker?)",
                )
        await _write_coverage(self.pool, self.chains, self.captured_at, self.run.id)
        logger.info(
            "Stored %d snapshots of %d underlyings (%d complete), %d active contracts missing",
            stats.rows_written,
            len(self.chains),
            stats.underlyings_succeeded,
            sum(c.missing for c in self.chains),
        )


def plan_slices(chain: Chain, expirations: Sequence[dt.date], scope: ListingScope) -> list[Slice]:
    """Split a chain into expiration ranges of about SLICE_CONTRACTS known contracts each.

    The ranges tile the whole date line (the first is open below, the last open above), so a
    contract with an expiration the database has never seen is still inside exactly one slice.
    """
    if len(expirations) <= SLICE_CONTRACTS:
        return [Slice(chain, scope)]
    counts: dict[dt.date, int] = {}
    for day in expirations:
        counts[day] = counts.get(day, 0) + 1
    bounds: list[dt.date] = []  # last expiration of each slice but the last
    running = 0
    for day in sorted(counts):
        running += counts[day]
        if running >= SLICE_CONTRACTS:
            bounds.append(day)
            running = 0
    if bounds and bounds[-1] == max(counts):
        bounds.pop()  # the last slice must not be empty by construction
    slices = []
    first: dt.date | None = None
    for last in bounds:
        slices.append(Slice(chain, scope, first, last))
        first = last + dt.timedelta(days=1)
    slices.append(Slice(chain, scope, first, None))
    if scope.max_expiration is not None:
        slices = [
            s
            for s in slices
            if s.first_expiration is None or s.first_expiration <= scope.max_expiration
        ]
    return slices


@bounded_db_connection
async def _known_contracts(
    conn: asyncpg.Connection, underlying: str, today: dt.date, scope: ListingScope
) -> list[asyncpg.Record]:
    """The unexpired contracts of an underlying: (ticker, expected, expiration, active).

    ``expected``: active and inside the filters, so the chain should return it.
    """
    return await conn.fetch(
        """
        SELECT ticker,
               active AND ($3::text IS NULL OR contract_type = $3)
                      AND ($4::date IS NULL OR expiration_date <= $4)
                      AND ($5::numeric IS NULL OR strike_price >= $5)
                      AND ($6::numeric IS NULL OR strike_price <= $6),
               expiration_date,
               active
        FROM option_contracts
        WHERE underlying_ticker = $1 AND (expiration_date >= $2 OR expiration_date IS NULL)
        """,
        underlying,
        today,
        scope.contract_type,
        scope.max_expiration,
        scope.min_strike,
        scope.max_strike,
    )


@bounded_db_connection
async def _add_contracts(
    conn: asyncpg.Connection, rows: list[ContractRow], seen_at: dt.datetime
) -> None:
    await conn.execute(UPSERT_NEW_CONTRACTS, *zip(*rows, strict=True), seen_at)


@bounded_db_connection
async def _write_coverage(
    conn: asyncpg.Connection, chains: Sequence[Chain], captured_at: dt.datetime, run_id: int
) -> None:
    await conn.executemany(
        """
        INSERT INTO snapshot_coverage (captured_at, underlying_ticker, run_id, contracts_active,
            snapshots_stored, contracts_missing, complete, pages, error)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        """,
        [
            (
                captured_at,
                c.key,
                run_id,
                c.active,
                c.stored,
                c.missing,
                c.complete,
                c.pages,
                "; ".join(c.errors) or None,
            )
            for c in chains
        ],
    )
