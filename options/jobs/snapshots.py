"""The ``ingest_snapshots`` pipeline: a snapshot of every planned chain, each stored whole.

Extract: chains are read with ``/v3/snapshot/options/{underlying}`` at 250 rows a page, many
underlyings side by side; a large chain is split into independent slices by expiration date so
its pages do not all wait in line (:mod:`options.jobs.snapshot_plan`). Normalize:
:func:`options.api.normalize.snapshot_row` for pages msgspec decoded and type-checked,
:func:`options.api.normalize.normalize_snapshot` for a page it refused
(:mod:`options.jobs.snapshot_fetcher`). Load: a chain whose every slice has ended goes to a
bounded queue, and writers store each chain in one transaction with its coverage row
(:func:`options.store.slots.commit_chains`), several small chains to a transaction, while other
chains are still being fetched (:mod:`options.jobs.snapshot_writer`). Memory is bounded by the
chains in flight and the queue, never by the universe.

The durable unit is the chain: its rows, its ``snapshot_coverage`` row and the run's counts
commit together, so a chain is stored whole, or stored in part and marked incomplete (its
reason in the coverage row), or visibly not stored (its coverage row still says so). A stop
(signal, deadline, a refused key) ends the slices in flight after their current page; the
chains read so far are stored, marked incomplete where they were cut short.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

import asyncpg

from options.api.polygon import PolygonClient
from options.config import Settings
from options.errors import RunInterrupted
from options.jobs.snapshot_fetcher import ChainFetcher
from options.jobs.snapshot_plan import Chain, Slice
from options.jobs.snapshot_writer import ChainWriter
from options.ops.progress import Progress
from options.store.runs import Run
from options.store.slots import PlannedChain

logger = logging.getLogger(__name__)

READY_CHAINS = 8  # chains read and waiting for a writer: bounds memory with the chains in flight
WRITERS = 2


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
        self.run = run
        # last in, first out: a planned chain's slices are fetched before the next chain is
        # planned, so only the chains in flight hold their rows (memory flat in the universe)
        self.work: asyncio.LifoQueue[Chain | Slice] = asyncio.LifoQueue()
        self.ready: asyncio.Queue[Chain | None] = asyncio.Queue(READY_CHAINS)
        self.halt = asyncio.Event()  # stop starting work: a signal, the deadline, a refused key
        self.chains: list[Chain] = []
        self.progress = progress
        self.fetcher = ChainFetcher(
            settings,
            client,
            pool,
            run,
            work=self.work,
            ready=self.ready,
            halt=self.halt,
            captured_at=captured_at,
        )
        self.writer = ChainWriter(
            pool, run, self.ready, captured_at=captured_at, partition=partition, progress=progress
        )

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
        writers = [asyncio.create_task(self.writer.write()) for _ in range(WRITERS)]
        fetchers = [
            asyncio.create_task(self.fetcher.fetch()) for _ in range(self.settings.http_concurrency)
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
        if self.fetcher.refused is not None:
            raise self.fetcher.refused
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
