"""The load end of ``ingest_snapshots``: each chain read is stored in one transaction.

A :class:`ChainWriter` takes chains from the queue of chains ready and stores each with its
``snapshot_coverage`` row and the run's counts (:func:`options.store.slots.commit_chains`),
several small chains to a transaction, up to :data:`COPY_BATCH_ROWS` rows. A value the table
cannot hold fails the whole batch: its rows are then checked one by one, the bad ones
rejected, and the rest stored. A connection lost mid-commit is replaced and the transaction
done again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging

import asyncpg

from options.api.normalize import (
    SNAPSHOT_COLUMNS,
    Rejected,
    SnapshotRow,
    check_snapshot_row,
    count_quality,
    epoch_microseconds,
)
from options.errors import DatabaseError
from options.jobs.snapshot_plan import Chain
from options.ops.progress import Progress
from options.ops.telemetry import count_rows_rejected, count_rows_written, time_batch
from options.store.db import epoch_microsecond_timestamps
from options.store.reconnect import (
    DB_ERRORS,
    acquire_timeout,
    describe_db_error,
    is_connection_lost,
    reconnecting,
)
from options.store.rejects import Reject
from options.store.runs import Run
from options.store.slots import ChainCommit, commit_chains

logger = logging.getLogger(__name__)

COPY_BATCH_ROWS = 10_000  # small chains ready together are stored in one transaction up to this
# a quote last updated this long before the slot is counted stale (snapshot_coverage.stale_quotes)
STALE_QUOTE_AGE = dt.timedelta(minutes=15)


class ChainWriter:
    """Stores the chains of the ready queue, each with its coverage row, until the end mark.

    Several writers run :meth:`write` side by side on one instance; each ends at a ``None``
    taken from the queue.

    Args:
        pool: the database pool.
        run: the run the chains are stored under (its stats and reject sample).
        ready: chains whose every slice has ended, and one ``None`` per writer at the end.
        captured_at: the slot's time.
        partition: the ``option_snapshots`` partition of the slot's day.
        progress: shown as chains are stored, when given.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        run: Run,
        ready: asyncio.Queue[Chain | None],
        *,
        captured_at: dt.datetime,
        partition: str,
        progress: Progress | None = None,
    ) -> None:
        self.pool = pool
        self.run = run
        self.ready = ready
        self.captured_at_us = epoch_microseconds(captured_at)  # as the rows carry it
        self.stale_before = epoch_microseconds(captured_at - STALE_QUOTE_AGE)
        self.partition = partition
        self.progress = progress

    async def write(self) -> None:
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
                conn = await held.enter_async_context(self.pool.acquire(timeout=acquire_timeout()))
                await held.enter_async_context(epoch_microsecond_timestamps(conn))
            except BaseException:
                await held.aclose()
                raise
            self._held, self._conn = held, conn
        return self._conn

    async def release(self) -> None:
        """Give the connection back to the pool (a broken one is closed on the way).

        A connection lost after its last commit fails the pool's reset on the way back; what it
        stored is committed, and the pool has closed it, so that loss is not an error of the run.
        """
        held, self._held, self._conn = self._held, None, None
        if held is None:
            return
        try:
            await held.aclose()
        except DB_ERRORS as exc:
            if not is_connection_lost(exc):
                raise
            logger.debug("a lost connection was given back: %s", describe_db_error(exc))
