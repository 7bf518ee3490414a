"""The extract and normalize end of ``ingest_snapshots``: chains read page by page into rows.

A :class:`ChainFetcher` takes work from the run's queue: a
:class:`~options.jobs.snapshot_plan.Chain` to plan into slices, or a
:class:`~options.jobs.snapshot_plan.Slice` to page through with
``/v3/snapshot/options/{underlying}``. Rows are built by
:func:`options.api.normalize.snapshot_row` for pages msgspec decoded and type-checked, and by
:func:`options.api.normalize.normalize_snapshot` for a page it refused; a row that cannot be
built is rejected (counted, and kept while the run's reject sample has room). A contract the
chain returns that ``option_contracts`` does not hold yet is added there. A chain whose every
slice has ended goes to the queue of chains ready for the writers
(:mod:`options.jobs.snapshot_writer`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

import asyncpg
from opentelemetry import trace

from options.api.normalize import (
    ContractRow,
    Rejected,
    SnapshotResult,
    decode_chain_page,
    epoch_microseconds,
    normalize_snapshot,
    snapshot_contract,
    snapshot_row,
)
from options.api.polygon import PolygonClient
from options.config import Settings
from options.errors import ApiError, DatabaseError, KeyRejectedError
from options.jobs.contracts import UPSERT_NEW_CONTRACTS
from options.jobs.filters import market_today
from options.jobs.snapshot_plan import Chain, Slice, plan_chain
from options.store.db import bounded_db_connection
from options.store.rejects import Reject
from options.store.runs import Run

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

STOPPED = "stopped (signal, deadline or refused key) before the chain was read to the end"


class ChainFetcher:
    """Plans chains, fetches their slices and hands each settled chain to the writers.

    Several fetchers run :meth:`fetch` side by side on one instance.

    Args:
        settings: the job's settings (the listing scope of each chain).
        client: the open API client.
        pool: the database pool (known contracts, new contracts).
        run: the run the rows are fetched for (its stats and reject sample).
        work: chains to plan and slices to fetch; planned slices are put back on it.
        ready: chains whose every slice has ended, for the writers.
        halt: once set, no new page is asked for.
        captured_at: the slot's time, as the rows carry it.

    Attributes:
        refused: the error of the API refusing the key, once it did.
    """

    def __init__(
        self,
        settings: Settings,
        client: PolygonClient,
        pool: asyncpg.Pool,
        run: Run,
        *,
        work: asyncio.LifoQueue[Chain | Slice],
        ready: asyncio.Queue[Chain | None],
        halt: asyncio.Event,
        captured_at: dt.datetime,
    ) -> None:
        self.settings = settings
        self.client = client
        self.pool = pool
        self.run = run
        self.work = work
        self.ready = ready
        self.halt = halt
        self.captured_at = captured_at
        self.captured_at_us = epoch_microseconds(captured_at)  # as the rows carry it
        self.today = market_today()
        self.refused: KeyRejectedError | None = None

    async def fetch(self) -> None:
        """Take work from the queue until cancelled; one chain's error ends only that chain."""
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
        slices = await plan_chain(self.settings, self.client, self.pool, chain, today=self.today)
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
            await _add_contracts(
                self.pool, new_contracts, self.captured_at, underlying=chain.underlying
            )
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


def _readable_ticker(raw: Any) -> str | None:
    """The contract ticker of a refused result, when it can be read."""
    if isinstance(raw, SnapshotResult):
        ticker: object = raw.details.ticker
    elif isinstance(raw, dict) and isinstance(raw.get("details"), dict):
        ticker = raw["details"].get("ticker")
    else:
        return None
    return ticker if isinstance(ticker, str) and "\x00" not in ticker else None


@bounded_db_connection("adding the newly listed contracts of {underlying} to option_contracts")
async def _add_contracts(
    conn: asyncpg.Connection, rows: list[ContractRow], seen_at: dt.datetime, *, underlying: str
) -> None:
    await conn.execute(UPSERT_NEW_CONTRACTS, *zip(*rows, strict=True), seen_at)
