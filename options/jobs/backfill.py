"""``ingest_daily --from DATE --to DATE``: the daily rows of past sessions, from the contracts
listed on each (``as_of``) and their daily bars, bounded by a request budget; resumable after a
kill at any moment (:mod:`options.store.backfill` has the units)."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncpg

from options.api.normalize import contract_ticker
from options.api.polygon import PolygonClient
from options.errors import ApiError, DatabaseError, KeyRejectedError, RunInterrupted
from options.ops.calendar import sessions_between
from options.ops.progress import Progress
from options.store.backfill import (
    bar_session,
    contracts_without_bars,
    listed_sessions,
    sessions_to_backfill,
    store_backfill_coverage,
    store_bars,
    store_listing,
)
from options.store.reconnect import DB_ERRORS, acquire_timeout, describe_db_error, reconnecting
from options.store.runs import Run

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Contracts whose bars are requested at once (the client's rate limit and connection cap still
# apply); after a stop or a spent budget, the bars already fetched are stored, no more asked
BAR_REQUESTS_IN_FLIGHT = 8


class _BudgetSpent(Exception):
    """The run's request budget is spent."""


def closed_sessions(first: dt.date, last: dt.date, now: dt.datetime) -> list[dt.date]:
    """The exchange's sessions from ``first`` to ``last`` that have closed by ``now``."""
    return [s.day for s in sessions_between(first, last) if s.close <= now]


async def backfill(
    pool: asyncpg.Pool,
    client: PolygonClient,
    run: Run,
    underlyings: Sequence[str],
    sessions: Sequence[dt.date],
    *,
    budget: int | None,
    stop: asyncio.Event | None = None,
    progress: Progress | None = None,
) -> dict[str, str]:
    """Backfill ``sessions`` of each of ``underlyings``.

    An API error on a listing or on a contract's bars (retries spent, or a 4xx) leaves that
    unit for the next run and the backfill goes on; the underlying is then failed.

    Returns:
        The failed underlyings, each with why.

    Raises:
        RunInterrupted: ``stop`` was set, or the request budget was spent, first.
        KeyRejectedError: the API key was refused.
        DatabaseError: PostgreSQL failed or went away; the units stored before stay.
    """
    start = client.requests_sent
    started = 0  # requests let through: with several in flight, more than were sent yet

    def spend(reserve: bool = True) -> None:
        """Before a request (``reserve``: one the backfill sends itself; a next page is sent by
        the pagination, counted once sent)."""
        nonlocal started
        run.stats.api_requests = client.requests_sent - start
        if stop is not None and stop.is_set():
            raise RunInterrupted("stopped: the backfill goes on from here when run again")
        if budget is not None and max(started, client.requests_sent - start) >= budget:
            raise _BudgetSpent
        if reserve:
            started = max(started, client.requests_sent - start) + 1

    failures: dict[str, str] = {}
    try:
        for n, underlying in enumerate(underlyings, 1):
            key = underlying.removeprefix("I:")
            failure = await _backfill_underlying(
                pool, client, run, underlying, key, sessions, spend
            )
            if failure is not None:
                failures[key] = failure
            if progress is not None:
                progress.update(done=n, rows=run.stats.rows_written, failed=len(failures))
    except _BudgetSpent:
        raise RunInterrupted(
            f"the request budget ({budget:,} requests) is spent: the backfill goes on from "
            "here when run again"
        ) from None
    except DB_ERRORS as exc:
        if isinstance(exc, DatabaseError):
            raise
        raise DatabaseError(f"backfilling daily rows: {describe_db_error(exc)}") from exc
    finally:
        run.stats.api_requests = client.requests_sent - start
    return failures


async def _backfill_underlying(
    pool: asyncpg.Pool,
    client: PolygonClient,
    run: Run,
    underlying: str,
    key: str,
    sessions: Sequence[dt.date],
    check: Callable[..., None],
) -> str | None:
    """One underlying's sessions: listings, then bars, then coverage; ``check`` is called
    before each request (it raises when the run must stop). Returns why it failed, if it
    did: the first API error, and how many units it left."""

    async def read_state(conn: asyncpg.Connection) -> tuple[list[dt.date], set[dt.date]]:
        todo = await sessions_to_backfill(conn, key, sessions)
        return todo, (await listed_sessions(conn, key, todo) if todo else set())

    todo, listed = await _unit(pool, f"{key}: reading the backfill's state", read_state)
    if not todo:
        return None
    errors: list[str] = []
    for day in todo:
        if day in listed:
            continue
        try:
            tickers = await _listing(client, underlying, day, check)
        except ApiError as exc:
            if isinstance(exc, KeyRejectedError):
                raise
            logger.warning("%s %s: listing not read: %s", key, day, exc)
            errors.append(f"the listing of {day}: {exc}")
            continue
        count = await _unit(
            pool,
            f"{key} {day}: storing the listing",
            functools.partial(store_listing, run=run, underlying=key, session=day, tickers=tickers),
        )
        logger.info("%s %s: %d contracts listed", key, day, count)
    pending = await _unit(
        pool,
        f"{key}: reading the contracts without bars",
        lambda conn: contracts_without_bars(conn, key, todo),
    )
    gate = asyncio.Semaphore(BAR_REQUESTS_IN_FLIGHT)
    halted: list[BaseException] = []  # a stop or a spent budget: no new request

    async def contract_bars(ticker: str, days: list[dt.date]) -> None:
        async with gate:
            if halted:
                return
            try:
                check()
            except (RunInterrupted, _BudgetSpent) as exc:
                halted.append(exc)
                return
            try:
                bars, _ = await client.daily_bars(ticker, days[0], days[-1])
            except ApiError as exc:
                if isinstance(exc, KeyRejectedError):
                    raise
                logger.warning("%s: daily bars not read: %s", ticker, exc)
                errors.append(f"the bars of {ticker}: {exc}")
                return
        dated = [(when, bar) for bar in bars if (when := bar_session(bar)) is not None]
        await _unit(
            pool,
            f"{ticker}: storing its bars",
            functools.partial(
                store_bars, run=run, underlying=key, ticker=ticker, sessions=days, bars=dated
            ),
        )

    try:
        async with asyncio.TaskGroup() as group:
            for ticker, days in pending:
                group.create_task(contract_bars(ticker, days))
    except BaseExceptionGroup as failed:
        raise _first_cause(failed) from None
    if halted:
        raise halted[0]  # after the bars fetched before it were stored
    found = await _unit(
        pool,
        f"{key}: storing the coverage",
        lambda conn: store_backfill_coverage(conn, run, key, todo),
    )
    incomplete = [(day, reason) for day, reason in found if reason is not None]
    for day, reason in incomplete:
        logger.warning("%s %s: not complete: %s", key, day, reason)
    if not errors:
        return None
    more = f" (and {len(errors) - 1} more units left for the next run)" if len(errors) > 1 else ""
    return errors[0] + more


async def _listing(
    client: PolygonClient, underlying: str, day: dt.date, check: Callable[..., None]
) -> set[str]:
    """The contracts listed on ``day``: live now, and expired since."""
    tickers: set[str] = set()
    for expired in ("false", "true"):
        check()
        params: dict[str, str | int] = {
            "as_of": day.isoformat(),
            "expired": expired,
            "expiration_date.gte": day.isoformat(),
        }
        async for page in client.list_contracts(underlying, params):
            tickers.update(t for r in page.results if (t := contract_ticker(r)) is not None)
            check(False)  # before the next page, if there is one
    return tickers


def _first_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a failed group of requests stands for: a stop first (the others were
    cancelled by it), else the first error."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    for kind in (RunInterrupted, _BudgetSpent):
        for error in leaves:
            if isinstance(error, kind):
                return error
    return leaves[0]


async def _unit(
    pool: asyncpg.Pool, what: str, work: Callable[[asyncpg.Connection], Awaitable[T]]
) -> T:
    """Run one unit (a read, or a transaction that stores what is not there yet) on a
    connection of the pool, again on a new one while the connection keeps being lost."""
    async for attempt in reconnecting(what=what):
        with attempt:
            async with pool.acquire(timeout=acquire_timeout()) as conn:
                return await work(conn)
    raise AssertionError("unreachable: reconnecting() returns or raises")
