"""The ``ingest_snapshots`` pipeline: a snapshot of every planned chain, each stored whole.

Extract: chains are read with ``/v3/snapshot/options/{underlying}`` at 250 rows a page, many
underlyings side by side; a large chain is split into independent slices by expiration date so
its pages do not all wait in line. Normalize: :func:`options.api.normalize.snapshot_row` for
pages msgspec decoded and type-checked, :func:`options.api.normalize.normalize_snapshot` for a
page it refused. Load: a chain whose every slice has ended goes to a bounded queue, and writers
store each chain in one transaction with its coverage row
(:func:`options.store.slots.commit_chains`), several small chains to a transaction, while other
chains are still being fetched. Memory is bounded by the chains in flight and the queue, never
by the universe.

The durable unit is the chain: its rows, its ``snapshot_coverage`` row and the run's counts
commit together, so a chain is stored whole, or stored in part and marked incomplete (its
reason in the coverage row), or visibly not stored (its coverage row still says so). A stop
(signal, deadline, a refused key) ends the slices in flight after their current page; the
chains read so far are stored, marked incomplete where they were cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Sequence
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
    count_quality,
    decode_chain_page,
    epoch_microseconds,
    normalize_snapshot,
    snapshot_contract,
    snapshot_row,
)
from options.api.polygon import PolygonClient
from options.config import Settings
from options.errors import (
    ApiError,
    DatabaseError,
    KeyRejectedError,
    RunInterrupted,
)
from options.jobs.contracts import UPSERT_NEW_CONTRACTS
from options.jobs.filters import ListingScope, contract_underlying, listing_scope, market_today
from options.ops.progress import Progress
from options.ops.telemetry import count_rows_rejected, count_rows_written, time_batch
from options.store.db import (
    ACQUIRE_TIMEOUT,
    DB_ERRORS,
    bounded_db_connection,
    describe_db_error,
    epoch_microsecond_timestamps,
    is_connection_lost,
    reconnecting,
)
from options.store.rejects import Reject
from options.store.runs import Run
from options.store.slots import ChainCommit, PlannedChain, commit_chains

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

SLICE_CONTRACTS = 2_500  # a known chain larger than this (10 pages) is split by expiration
COPY_BATCH_ROWS = 10_000  # small chains ready together are stored in one transaction up to this
READY_CHAINS = 8  # chains read and waiting for a writer: bounds memory with the chains in flight
WRITERS = 2
# a quote last updated this long before the slot is counted stale (snapshot_coverage.stale_quotes)
STALE_QUOTE_AGE = dt.timedelta(minutes=15)


@dataclass(eq=False)
class Chain:
    """One underlying's snapshot in progress: what is known, fetched, and how it ended."""

    underlying: str
    key: str
    resumed: bool = False
    expected: set[str] = field(default_factory=set)
    known: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)
    rows: list[SnapshotRow] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    rejected: int = 0
    slices: int = 1
    slices_done: int = 0
    slices_ended: int = 0
    pages: int = 0
    errors: list[str] = field(default_factory=list)
    committed: ChainCommit | None = None

    @property
    def read_to_end(self) -> bool:
        """Every slice's last page had no ``next_url`` and every page parsed."""
        return not self.errors and self.slices_done == self.slices

    @property
    def settled(self) -> bool:
        """Every slice has ended, read to the end or not."""
        return self.slices_ended >= self.slices

    def end_slice(self, *, done: bool, error: str | None = None) -> bool:
        """Count one slice as ended; returns whether that was the chain's last."""
        if error is not None:
            self.errors.append(error)
        self.slices_ended += 1
        self.slices_done += done
        return self.settled

    def to_commit(self) -> ChainCommit:
        """What the writer stores; the chain gives up its rows (they are the writer's now)."""
        commit = ChainCommit(
            key=self.key,
            rows=self.rows,
            expected=self.expected,
            rejects=self.rejects,
            rejected=self.rejected,
            pages=self.pages,
            read_to_end=self.read_to_end,
            error="; ".join(self.errors) or None,
            resumed=self.resumed,
        )
        self.rows, self.rejects = [], []
        self.expected, self.known, self.seen = set(), set(), set()
        return commit


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


class SnapshotRun:
    """Fetchers, the queue of chains read and the writers of one slot."""

    def __init__(
        self,
        settings: Settings,
        client: PolygonClient,
        pool: asyncpg.Pool,
        run: Run,
        *,
        captured_at: dt.datetime,
        partition: str,
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.pool = pool
        self.run = run
        self.captured_at = captured_at
        self.captured_at_us = epoch_microseconds(captured_at)  # as the rows carry it
        self.stale_before = epoch_microseconds(captured_at - STALE_QUOTE_AGE)
        self.partition = partition
        self.today = market_today()
        # last in, first out: a planned chain's slices are fetched before the next chain is
        # planned, so only the chains in flight hold their rows (memory flat in the universe)
        self.work: asyncio.LifoQueue[Chain | Slice] = asyncio.LifoQueue()
        self.ready: asyncio.Queue[Chain | None] = asyncio.Queue(READY_CHAINS)
        self.halt = asyncio.Event()  # stop starting work: a signal, the deadline, a refused key
        self.refused: KeyRejectedError | None = None
        self.chains: list[Chain] = []
        self.progress = progress

    async def execute(self, planned: Sequence[PlannedChain], stop: asyncio.Event) -> list[Chain]:
        """Snapshot the ``planned`` chains; on ``stop``, store what was read and raise
        RunInterrupted.

        Raises:
            RunInterrupted: ``stop`` was set before every chain was read.
            KeyRejectedError: the API refused the key; what was read is stored.
            DatabaseError: PostgreSQL failed (after waiting for it to come back).
            LeaseLostError: another copy closed this run as dead.
        """
        self.chains = [Chain(p.requested, p.key, resumed=self.run.resumed) for p in planned]
        for chain in reversed(self.chains):
            self.work.put_nowait(chain)
        if self.progress is not None:
            self.progress.start(len(self.chains), "chains")
        # writers hold a connection only while storing; fetchers hold none between queries
        writers = [asyncio.create_task(self._write()) for _ in range(WRITERS)]
        fetchers = [
            asyncio.create_task(self._fetch()) for _ in range(self.settings.http_concurrency)
        ]
        finished = asyncio.create_task(self.work.join())
        halted = asyncio.create_task(self.halt.wait())
        stopped = asyncio.create_task(stop.wait())
        try:
            while not finished.done():
                watched: set[asyncio.Future[Any]] = {finished, *fetchers, *writers}
                if not halted.done():
                    watched |= {halted, stopped}
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                for task in done & {*fetchers, *writers}:
                    task.result()  # a fetcher or writer died: raise its error
                    raise AssertionError("fetchers and writers run until cancelled")
                if stopped in done:
                    self.halt.set()  # fetchers end their slices after the current page
            for _ in writers:
                await self._put_ready(None, writers)
            await asyncio.gather(*writers)
        finally:
            for task in (*fetchers, *writers, finished, halted, stopped):
                task.cancel()
            await asyncio.gather(
                *fetchers, *writers, finished, halted, stopped, return_exceptions=True
            )
        self._log_totals()
        if self.refused is not None:
            raise self.refused
        if stop.is_set() and any(
            c.committed is None or not c.committed.read_to_end for c in self.chains
        ):
            raise RunInterrupted("stopped before every chain was read; what was read is stored")
        return self.chains

    async def _put_ready(self, chain: Chain | None, writers: Sequence[asyncio.Task[None]]) -> None:
        """Queue ``chain`` for the writers once there is room, unless every writer died (a
        plain ``put`` would wait forever on a full queue whose writers are gone)."""
        while True:
            try:
                self.ready.put_nowait(chain)
                return
            except asyncio.QueueFull:
                if all(writer.done() for writer in writers):
                    return
                await asyncio.sleep(0.01)

    # -- extract and normalize --------------------------------------------------------------

    async def _fetch(self) -> None:
        while True:
            item = await self.work.get()
            try:
                chain = item if isinstance(item, Chain) else item.chain
                try:
                    if isinstance(item, Chain):
                        await self._plan(item)
                    else:
                        await self._fetch_slice(item)
                except (DatabaseError, asyncio.CancelledError):
                    raise
                except KeyRejectedError as exc:
                    self.refused = exc  # every chain would fail the same way: end the run
                    self.halt.set()
                    await self._end_slice(chain, done=False, error=str(exc))
                except ApiError as exc:
                    await self._end_slice(chain, done=False, error=str(exc))
                except Exception as exc:  # one chain's surprise must not stop the others
                    logger.exception(
                        "%s: unexpected error while reading the chain", chain.underlying
                    )
                    await self._end_slice(
                        chain, done=False, error=f"unexpected {type(exc).__name__}: {exc}"
                    )
            finally:
                self.work.task_done()

    async def _plan(self, chain: Chain) -> None:
        """Learn what the database knows of the chain, then queue its slices."""
        if self.halt.is_set():
            chain.slices = chain.slices_ended = 0  # never started: its coverage says so
            return
        scope = await listing_scope(self.settings, self.client, chain.underlying, today=self.today)
        rows = await _known_contracts(self.pool, chain.key, self.today, scope)
        chain.known = {row[0] for row in rows}
        chain.expected = {row[0] for row in rows if row[1]}
        slices = plan_slices(chain, [row[2] for row in rows if row[3]], scope)
        chain.slices = len(slices)
        for part in slices:
            self.work.put_nowait(part)

    async def _fetch_slice(self, part: Slice) -> None:
        chain = part.chain
        if self.halt.is_set():
            await self._end_slice(chain, done=False, error=STOPPED)
            return
        with tracer.start_as_current_span("snapshots.slice") as span:
            span.set_attribute("polygon.underlying", chain.underlying)
            pages = self.client.chain_snapshot(
                chain.underlying, part.api_params(), decoder=decode_chain_page
            )
            try:
                async for page in pages:
                    chain.pages += 1
                    await self._accept(chain, page.results)
                    if self.halt.is_set() and page.has_next:
                        await self._end_slice(chain, done=False, error=STOPPED)
                        return
            finally:
                await pages.aclose()
        await self._end_slice(chain, done=True)

    async def _end_slice(self, chain: Chain, *, done: bool, error: str | None = None) -> None:
        if error is not None and error != STOPPED:
            logger.error(
                "%s: chain not read to the end, %d rows kept: %s",
                chain.underlying,
                len(chain.rows),
                error,
            )
        if chain.end_slice(done=done, error=error):
            if (
                chain.pages == 0
                and not chain.read_to_end
                and chain.errors == [STOPPED] * len(chain.errors)
            ):
                return  # stopped before its first page: left as not stored
            await self.ready.put(chain)

    async def _accept(self, chain: Chain, results: list[Any]) -> None:
        rows = chain.rows
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
                    continue  # a row repeated across pages is stored once
                if ticker not in known:
                    new_contracts.append(snapshot_contract(raw, underlying=key))
                    known.add(ticker)
            except Rejected as exc:
                self._reject(chain, raw, str(exc))
                continue
            seen.add(ticker)
            rows.append(row)
        self.run.stats.rows_fetched += len(results)
        self.run.stats.api_requests = self.client.requests_sent
        if new_contracts:
            await _add_contracts(self.pool, new_contracts, self.captured_at)
            logger.info(
                "%s: %d contracts not yet in option_contracts were added",
                chain.underlying,
                len(new_contracts),
            )

    def _reject(self, chain: Chain, raw: Any, reason: str) -> None:
        chain.rejected += 1
        if chain.rejected == 1:
            logger.warning("%s: rejected a snapshot: %s", chain.underlying, reason)
        if self.run.keep.take_one():
            chain.rejects.append(Reject.of(raw, reason, ticker=_readable_ticker(raw)))

    # -- load -------------------------------------------------------------------------------

    async def _write(self) -> None:
        """Take chains read to their end (or cut short) and store each with its coverage.

        A writer holds a connection while chains keep coming and gives it back when the queue
        runs dry, so a slow run leaves no connection idle in its hands.
        """
        while True:
            chain = await self.ready.get()
            if chain is None:
                return
            writer = _WriterConnection(self.pool)
            try:
                while chain is not None:
                    await self._store(self._batch(chain), writer)
                    if self.ready.empty():
                        break
                    chain = self.ready.get_nowait()
                if chain is None:
                    self.ready.put_nowait(None)  # the end mark: for the loop above
            finally:
                await writer.release()

    def _batch(self, first: Chain) -> list[Chain]:
        """``first`` and the chains ready behind it, up to COPY_BATCH_ROWS rows."""
        batch = [first]
        rows = len(first.rows)
        while rows < COPY_BATCH_ROWS and not self.ready.empty():
            more = self.ready.get_nowait()
            if more is None:
                self.ready.put_nowait(None)  # a writer's end mark: leave it for the loop
                break
            batch.append(more)
            rows += len(more.rows)
        return batch

    async def _store(self, batch: list[Chain], writer: _WriterConnection) -> None:
        commits = [chain.to_commit() for chain in batch]
        for chain, commit in zip(batch, commits, strict=True):
            chain.committed = commit
            commit.quality = count_quality(commit.rows, quoted_after=self.stale_before)
        try:
            done = await self._commit(commits, writer)
        except (TypeError, ValueError, OverflowError, asyncpg.DataError):
            # a value the table cannot hold: nothing was stored; check row by row, store the rest
            for commit in commits:
                commit.rows = self._checked(commit)
                commit.quality = count_quality(commit.rows, quoted_after=self.stale_before)
            done = await self._commit(commits, writer)
        stats = self.run.stats
        for commit in done:
            commit.release()
            stats.rows_written += commit.stored_now
            stats.rows_rejected += commit.rejected
            count_rows_written("option_snapshots", commit.stored_now)
            count_rows_rejected("option_snapshots", commit.rejected)
            if commit.complete:
                stats.underlyings_succeeded += 1
            else:
                stats.underlyings_failed += 1
        if self.progress is not None:
            self.progress.update(
                done=stats.underlyings_succeeded + stats.underlyings_failed,
                rows=stats.rows_written,
                failed=stats.underlyings_failed,
            )

    def _checked(self, commit: ChainCommit) -> list[SnapshotRow]:
        good = []
        for row in commit.rows:
            try:
                good.append(check_snapshot_row(row))
            except Rejected as exc:
                commit.rejected += 1
                logger.warning("%s: rejected a snapshot: %s", commit.key, exc)
                if self.run.keep.take_one():
                    commit.rejects.append(Reject.of(row, str(exc), ticker=row[0]))
        return good

    async def _commit(
        self, commits: list[ChainCommit], writer: _WriterConnection
    ) -> list[ChainCommit]:
        """One transaction for the batch; a lost connection is replaced and the transaction
        done again (it skips what an attempt whose answer was lost stored)."""
        keys = ", ".join(c.key for c in commits)
        try:
            async for attempt in reconnecting(what=f"storing the chains of {keys}"):
                with attempt:
                    conn = await writer.get()
                    try:
                        with time_batch("option_snapshots"):
                            return await commit_chains(
                                conn,
                                self.run,
                                commits,
                                partition=self.partition,
                                columns=SNAPSHOT_COLUMNS,
                                captured_at=self.captured_at_us,
                                now=epoch_microseconds(dt.datetime.now(dt.UTC)),
                                retry=attempt.retry_state.attempt_number > 1,
                            )
                    except BaseException as exc:
                        if is_connection_lost(exc):
                            await writer.release()
                        raise
        except asyncpg.DataError:
            raise  # a value the table cannot hold: the caller checks the rows
        except DB_ERRORS as exc:
            raise DatabaseError(f"storing the chains of {keys}: {describe_db_error(exc)}") from exc
        raise AssertionError("unreachable: reconnecting() returns or raises")

    def _log_totals(self) -> None:
        stats = self.run.stats
        stored = [c.committed for c in self.chains if c.committed is not None]
        for chain in self.chains:
            commit = chain.committed
            if (
                commit is not None
                and commit.read_to_end
                and chain.pages
                and not (commit.stored or commit.rejected)
            ):
                logger.warning(
                    "%s: the API returned an empty chain%s",
                    chain.underlying,
                    f"; {commit.missing} active contracts known here are missing"
                    if commit.missing
                    else ": no options are listed for it (a misspelled ticker?)",
                )
        logger.info(
            "Stored %d snapshots of %d of %d underlyings (%d complete), %d active contracts "
            "missing",
            stats.rows_written,
            len(stored),
            len(self.chains),
            sum(c.complete for c in stored),
            sum(c.missing for c in stored),
        )


STOPPED = "stopped (signal, deadline or refused key) before the chain was read to the end"


class _WriterConnection:
    """A writer's connection, taken when first needed, with ``timestamptz`` as epoch
    microseconds (the rows' form), given back by :meth:`release` (also when it was lost)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._held: contextlib.AsyncExitStack | None = None
        self._conn: asyncpg.Connection | None = None

    async def get(self) -> asyncpg.Connection:
        """The held connection, or a new one from the pool."""
        if self._conn is not None and self._conn.is_closed():
            await self.release()
        if self._conn is None:
            held = contextlib.AsyncExitStack()
            try:
                conn = await held.enter_async_context(self.pool.acquire(timeout=ACQUIRE_TIMEOUT))
                await held.enter_async_context(epoch_microsecond_timestamps(conn))
            except BaseException:
                await held.aclose()
                raise
            self._held, self._conn = held, conn
        return self._conn

    async def release(self) -> None:
        """Give the connection back to the pool (a broken one is closed on the way)."""
        held, self._held, self._conn = self._held, None, None
        if held is not None:
            await held.aclose()


def _readable_ticker(raw: Any) -> str | None:
    """The contract ticker of a refused result, when it can be read."""
    if isinstance(raw, SnapshotResult):
        ticker: object = raw.details.ticker
    elif isinstance(raw, dict) and isinstance(raw.get("details"), dict):
        ticker = raw["details"].get("ticker")
    else:
        return None
    return ticker if isinstance(ticker, str) and "\x00" not in ticker else None


def plan_slices(
    chain: Chain, expirations: Sequence[dt.date | None], scope: ListingScope
) -> list[Slice]:
    """Split a chain into expiration ranges of about SLICE_CONTRACTS known contracts each.

    The ranges tile the whole date line (the first is open below, the last open above), so a
    contract with an expiration the database has never seen, or none at all, is still inside
    exactly one slice (the API is asked with the dates it has).
    """
    dated = [day for day in expirations if day is not None]
    if len(expirations) <= SLICE_CONTRACTS or not dated:
        return [Slice(chain, scope)]
    counts: dict[dt.date, int] = {}
    for day in dated:
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


def planned_chains(underlyings: Sequence[str]) -> list[PlannedChain]:
    """The chains of a new slot, one per underlying (an index is asked for as ``I:SPX``)."""
    return [PlannedChain(u, contract_underlying(u)) for u in underlyings]
