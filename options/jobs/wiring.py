"""Wiring shared by the jobs: open the API client and the pool, migrate, run under the ledger.

The CLI calls one function per job; each returns the process exit code.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import asyncpg
from opentelemetry import trace

from options.api.polygon import PolygonClient
from options.config import Settings
from options.errors import ConfigError, DatabaseError, DayRefusedError, ExitCode, OptionsError
from options.jobs.backfill import backfill, closed_sessions
from options.jobs.contracts import deactivate_expired, sync_contracts
from options.jobs.daily import build_daily, count_underlyings
from options.jobs.filters import market_today
from options.jobs.preview import Preview, preview_contracts, preview_snapshots
from options.jobs.retention import (
    archive_before,
    compact_finished_days,
    require_archive,
    retire_old_days,
)
from options.jobs.snapshot_plan import planned_chains
from options.jobs.snapshots import SnapshotRun
from options.ops.market import market_session
from options.ops.progress import Progress
from options.ops.telemetry import observe_pool
from options.store.db import Limits, apply_migrations, create_pool
from options.store.lifecycle import HOT, find_tier, why_not_writable
from options.store.partitions import ensure_partitions, partition_name
from options.store.reconnect import DB_ERRORS, describe_db_error, wait_for_database
from options.store.runs import STATUS_EXIT_CODES, Run, RunSummary
from options.store.runs_lease import close_dead_runs
from options.store.runs_recording import recorded_run
from options.store.slots import Slot, adopt_slot, close_slot, find_resumable_slot, plan_slot
from options.store.underlyings import (
    Tracked,
    add_tracked,
    list_tracked,
    set_tracked_enabled,
    sync_configured,
)

if TYPE_CHECKING:
    from options.store.archive import ArchiveRun
    from options.store.compaction import DayCompaction

logger = logging.getLogger(__name__)

# How far back ingest_daily computes the greeks the snapshot runs left: a week of slots
GREEKS_CATCH_UP = dt.timedelta(days=7)
tracer = trace.get_tracer(__name__)

POOL_CLOSE_TIMEOUT = 10.0
AHEAD_LOCK_TIMEOUT = 2.0  # partitions of the days ahead: a later run can make them
POOL_STATS_EVERY = 30.0  # seconds between two pool statistics lines in the log


def open_client(settings: Settings) -> PolygonClient:
    """The one API client of a job, configured from the settings (use it with ``async with``)."""
    return PolygonClient(
        base_url=settings.base_url,
        api_key=settings.require_api_key(),
        timeout=settings.http_timeout,
        max_retries=settings.http_max_retries,
        rate_limit=settings.rate_limit,
        concurrency=settings.http_concurrency,
        max_pages=settings.max_pages,
    )


@asynccontextmanager
async def open_database(
    settings: Settings, *, job: str, pool_stats: bool = True
) -> AsyncIterator[asyncpg.Pool]:
    """The job's pool, with the schema migrated; closed on the way out. ``pool_stats``: log
    the pool's statistics every :data:`POOL_STATS_EVERY` seconds and at the end.

    Also sets how long the job's tasks wait for a database that went away
    (``DB_RECONNECT_SECONDS``).
    """
    wait_for_database(settings.db_reconnect_seconds)
    pool = await create_pool(
        settings.require_database_url(),
        max_size=settings.db_pool_size,
        limits=Limits(settings.db_statement_timeout, settings.db_lock_timeout),
        application_name=f"ingest_{job}",
    )
    observe_pool(pool)
    stats = asyncio.create_task(_log_pool_stats(pool)) if pool_stats else None
    try:
        await apply_migrations(pool)
        yield pool
    finally:
        if stats is not None:
            stats.cancel()
            await asyncio.gather(stats, return_exceptions=True)
            log_pool_stats(pool)
        try:
            await asyncio.wait_for(pool.close(), POOL_CLOSE_TIMEOUT)
        except (TimeoutError, asyncio.CancelledError):
            pool.terminate()


def log_pool_stats(pool: asyncpg.Pool) -> None:
    """``Database pool stats - Active: X, Min: Y, Max: Z``: connections lent out now."""
    logger.info(
        "Database pool stats - Active: %d, Min: %d, Max: %d",
        pool.get_size() - pool.get_idle_size(),
        pool.get_min_size(),
        pool.get_max_size(),
    )


async def _log_pool_stats(pool: asyncpg.Pool) -> None:
    while True:
        await asyncio.sleep(POOL_STATS_EVERY)
        log_pool_stats(pool)


async def migrate(settings: Settings) -> list[str]:
    """Apply pending migrations (``ingest_admin migrate``); returns the names applied."""
    pool = await create_pool(settings.require_database_url(), max_size=2)
    try:
        return await apply_migrations(pool)
    finally:
        await pool.close()


async def archive_snapshots(
    settings: Settings,
    *,
    before: dt.date | None = None,
    older_than: int | None = None,
    dry_run: bool = False,
    keep_in_postgres: bool = False,
    stop: asyncio.Event | None = None,
) -> ArchiveRun:
    """``ingest_admin archive``: archive the days before ``before`` (or older than
    ``older_than`` days, or than ``ARCHIVE_AFTER_DAYS``) and drop them from PostgreSQL."""
    from options.store.archive import archive_days  # loads pyarrow: only for this command

    location = require_archive(settings)
    now = dt.datetime.now(dt.UTC)
    first_kept = archive_before(settings, before=before, older_than=older_than, now=now)
    async with open_database(settings, job="admin", pool_stats=False) as pool:
        return await archive_days(
            pool,
            location,
            before=first_kept,
            now=now,
            keep_in_postgres=keep_in_postgres,
            dry_run=dry_run,
            stop=stop,
        )


async def compact_snapshots(
    settings: Settings,
    *,
    before: dt.date | None = None,
    dry_run: bool = False,
    stop: asyncio.Event | None = None,
) -> list[DayCompaction] | None:
    """``ingest_admin compact``: move the finished days (before ``before``) from
    ``option_snapshots`` to the compact tier; ``None`` when another session held the lock."""
    from options.store.compaction import compact_days

    async with open_database(settings, job="admin", pool_stats=False) as pool:
        return await compact_days(
            pool, now=dt.datetime.now(dt.UTC), before=before, dry_run=dry_run, stop=stop
        )


async def greeks_command(
    settings: Settings, *, since: dt.datetime, stop: asyncio.Event | None = None
) -> tuple[int, int, int] | None:
    """``ingest_admin greeks``: :func:`compute_greeks` on its own pool; ``None`` when
    ``COMPUTE_GREEKS`` is off."""
    if not settings.compute_greeks:
        return None
    async with open_database(settings, job="admin", pool_stats=False) as pool:
        return await compute_greeks(settings, pool, since=since, stop=stop)


async def manage_underlyings(settings: Settings, action: str, tickers: Sequence[str]) -> list[str]:
    """``ingest_admin underlyings``: ``list`` the tracked underlyings, or ``add``, ``disable``
    or ``enable`` ``tickers``; returns the lines to print."""
    async with open_database(settings, job="admin", pool_stats=False) as pool:
        if action == "list":
            return format_tracked(await list_tracked(pool))
        lines = []
        for ticker in tickers:
            if action == "add":
                lines.append(await add_tracked(pool, ticker))
            else:
                lines.append(await set_tracked_enabled(pool, ticker, enabled=action == "enable"))
        return lines


def format_tracked(rows: Sequence[Tracked]) -> list[str]:
    """The tracked underlyings as a table."""
    if not rows:
        return ["no underlyings are tracked (set UNDERLYINGS, or ingest_admin underlyings add)"]

    def when(moment: dt.datetime | None) -> str:
        return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if moment else "-"

    table = [
        ("ticker", "status", "origin", "contracts synced", "last complete snapshot", "last error")
    ]
    for row in rows:
        status = "enabled" if row.enabled else f"disabled ({row.disabled_by})"
        error = f"{when(row.last_error_at)}: {row.last_error}" if row.last_error else "-"
        table.append(
            (
                row.ticker,
                status,
                row.origin,
                when(row.last_contract_sync_at),
                when(row.last_complete_snapshot_at),
                error[:120],
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + line[-1]
        for line in table
    ]


async def tracked_underlyings(settings: Settings, pool: asyncpg.Pool) -> list[str]:
    """The enabled tracked underlyings, after mirroring ``UNDERLYINGS`` into the table."""
    tracked = await sync_configured(pool, settings.underlyings)
    if not tracked:
        raise ConfigError(
            "no underlyings are tracked: set UNDERLYINGS (comma-separated, e.g. AAPL,SPY,I:SPX), "
            "run `ingest_admin underlyings add TICKER`, or pass --underlying/-u TICKER for "
            "one run",
            variable="UNDERLYINGS",
        )
    return tracked


async def run_options_job(
    settings: Settings,
    *,
    only: Sequence[str] = (),
    stop: asyncio.Event | None = None,
    progress: Progress | None = None,
    on_end: Callable[[RunSummary], None] | None = None,
) -> ExitCode:
    """``ingest_options``: sync the contracts of every tracked underlying (or of ``only``).

    ``only`` (``--underlying``) syncs just those, this once, without tracking them. ``stop``
    (set by a signal or the deadline) rolls back the underlyings in progress and ends the run
    ``interrupted``. Expired contracts of every underlying are deactivated each run.
    ``on_end`` receives the run's summary once its final row is written.
    """
    settings.require_api_key()
    dsn = settings.require_database_url()
    async with (
        open_client(settings) as client,
        open_database(settings, job="options") as pool,
    ):
        underlyings = list(only) or await tracked_underlyings(settings, pool)
        logger.info(
            "Syncing contracts of %d underlyings into %s",
            len(underlyings),
            settings.database_location(),
        )
        with tracer.start_as_current_span("ingest_options.run") as span:
            async with recorded_run(
                pool,
                "options",
                dsn=dsn,
                lease_seconds=settings.run_lease_seconds,
                on_end=on_end,
            ) as run:
                span.set_attribute("options.run_id", run.id)
                await sync_contracts(
                    settings,
                    client,
                    pool,
                    run,
                    underlyings,
                    seen_at=run.started_at,
                    stop=stop,
                    progress=progress,
                )
                await deactivate_expired(pool, run, today=market_today())
        if not (stop is not None and stop.is_set()):
            await compact_finished_days(pool, now=dt.datetime.now(dt.UTC), stop=stop)
        return STATUS_EXIT_CODES[run.status]


async def run_daily_job(
    settings: Settings,
    *,
    only: Sequence[str] = (),
    stop: asyncio.Event | None = None,
    progress: Progress | None = None,
    now: dt.datetime | None = None,
    backfill_range: tuple[dt.date, dt.date] | None = None,
    budget: int | None = None,
    on_end: Callable[[RunSummary], None] | None = None,
) -> ExitCode:
    """``ingest_daily``: build the daily rows (``contract_days``) of the sessions not complete
    yet, from the stored snapshots, for every tracked underlying (or ``only``); with
    ``backfill_range``, then the past sessions of that range without snapshots, from their
    listings and daily bars (:mod:`options.jobs.backfill`).

    Args:
        now: the moment the closed sessions are taken from (``None``: the clock).
        backfill_range: ``--from`` and ``--to``, New York days.
        budget: at most this many API requests for the backfill (``None``: no bound).
    """
    dsn = settings.require_database_url()
    if backfill_range is not None:
        settings.require_api_key()
    moment = now or dt.datetime.now(dt.UTC)
    async with open_database(settings, job="daily") as pool:
        underlyings = list(only) or await tracked_underlyings(settings, pool)
        with tracer.start_as_current_span("ingest_daily.run") as span:
            async with recorded_run(
                pool, "daily", dsn=dsn, lease_seconds=settings.run_lease_seconds, on_end=on_end
            ) as run:
                span.set_attribute("options.run_id", run.id)
                if settings.compute_greeks:
                    # what the snapshot runs left (a run that ended partial computes none)
                    await compute_greeks(settings, pool, since=moment - GREEKS_CATCH_UP, stop=stop)
                builds = await build_daily(
                    pool, run, underlyings, now=moment, stop=stop, progress=progress
                )
                failures: dict[str, str] = {}
                if backfill_range is not None:
                    sessions = closed_sessions(*backfill_range, moment)
                    async with open_client(settings) as client:
                        failures = await backfill(
                            pool,
                            client,
                            run,
                            underlyings,
                            sessions,
                            budget=budget,
                            stop=stop,
                            progress=progress,
                        )
                    logger.info(
                        "Backfill of %d sessions: %d underlyings with units left for the next run",
                        len(sessions),
                        len(failures),
                    )
                await count_underlyings(
                    pool, run, [u.removeprefix("I:") for u in underlyings], failures
                )
                complete = sum(b.complete for b in builds)
                logger.info(
                    "Daily rows: %d sessions built (%d complete), %d rows written or changed",
                    len(builds),
                    complete,
                    run.stats.rows_written,
                )
        return STATUS_EXIT_CODES[run.status]


async def preview_job(
    settings: Settings, job: str, *, only: Sequence[str] = (), limit: int = 0
) -> Preview:
    """``--dry-run``: what ``job`` (``options`` or ``snapshots``) would store for ``only`` or
    ``UNDERLYINGS``, read from the API now; no database is opened."""
    settings.require_api_key()
    underlyings = list(only) or list(settings.require_underlyings())
    async with open_client(settings) as client:
        read = preview_contracts if job == "options" else preview_snapshots
        return await read(settings, client, underlyings, limit=limit)


async def run_snapshots_job(
    settings: Settings,
    *,
    only: Sequence[str] = (),
    resume: bool = False,
    retain_days: int | None = None,
    stop: asyncio.Event | None = None,
    force: bool = False,
    progress: Progress | None = None,
    now: dt.datetime | None = None,
    on_end: Callable[[RunSummary], None] | None = None,
) -> ExitCode:
    """``ingest_snapshots``: store one snapshot of every tracked underlying's chain, under one
    ``captured_at``, each chain with its coverage row.

    Args:
        settings: the job's settings.
        only: ``--underlying``: snapshot exactly these, this once, without tracking them.
        resume: complete the latest slot that has chains not stored (or not read to the end)
            under its own ``captured_at``, instead of taking a new one. Without it, a run does
            the same by itself when the latest slot is younger than
            ``SNAPSHOT_RESUME_WINDOW``.
        retain_days: days older than this many leave PostgreSQL (``None``: the setting's):
            archived first when ``ARCHIVE_URL`` is set, else deleted only if
            ``SNAPSHOT_DELETE_UNARCHIVED`` asks (see :mod:`options.jobs.retention`).
        stop: set by a signal or the deadline: chains read are stored, the run is
            ``interrupted``.
        force: snapshot even when the market is closed.
        progress: where progress is shown (a bar, log lines, ``systemctl status``).
        now: the moment the market-hours decision is made for (``None``: the clock).
        on_end: receives the run's summary once its final row is written.
    """
    settings.require_api_key()
    settings.require_database_url()
    if resume and only:
        raise ConfigError(
            "--resume completes the chains the interrupted slot planned: it takes no --underlying",
            variable="--resume",
        )
    stop = stop or asyncio.Event()
    async with open_client(settings) as client:
        session = await market_session(client, now)
        if not session.calendar_ok:
            logger.warning("%s", session.reason)
        if not session.open:
            if not force:
                logger.info(
                    "Market closed, no snapshot taken: %s (--force to take one)", session.reason
                )
                return ExitCode.OK
            logger.info("Market closed (%s); taking the snapshot anyway (--force)", session.reason)
        with tracer.start_as_current_span("ingest_snapshots.run"):
            return await _snapshot(
                settings, client, only, resume, retain_days, stop, progress, on_end
            )


async def _snapshot(
    settings: Settings,
    client: PolygonClient,
    only: Sequence[str],
    resume: bool,
    retain_days: int | None,
    stop: asyncio.Event,
    progress: Progress | None,
    on_end: Callable[[RunSummary], None] | None,
) -> ExitCode:
    dsn = settings.require_database_url()
    async with open_database(settings, job="snapshots") as pool:
        underlyings = list(only) or await tracked_underlyings(settings, pool)
        slot = await _slot_to_resume(settings, pool, resume=resume, only=only)
        if slot is not None:
            await _refuse_if_gone(pool, slot.captured_at)
        if resume and slot is None:
            await close_dead_runs(pool, "snapshots")  # what opening a run would have done
            logger.info("Nothing to resume: every chain of the latest slots is stored")
            return ExitCode.OK
        async with recorded_run(
            pool,
            "snapshots",
            dsn=dsn,
            lease_seconds=settings.run_lease_seconds,
            resumed=slot is not None,
            on_end=on_end,
        ) as run:
            trace.get_current_span().set_attribute("options.run_id", run.id)
            if slot is not None:
                captured_at, planned = slot.captured_at, slot.chains
                await adopt_slot(pool, run, slot)
                logger.info(
                    "Resuming the slot of %s: %d chains not stored completely",
                    captured_at.isoformat(),
                    len(planned),
                )
            else:
                captured_at, planned = run.started_at, planned_chains(underlyings)
                await plan_slot(pool, run, captured_at, planned)
                logger.info(
                    "Snapshotting %d underlyings into %s",
                    len(planned),
                    settings.database_location(),
                )
            run.stats.underlyings_requested = len(planned)
            day = captured_at.astimezone(dt.UTC).date()
            partition = partition_name(day)
            hot = await find_tier(pool, day) is HOT  # else the rows merge into the day's tier
            if hot:
                # only the slot's own day before the snapshot (normally it exists: no DDL)
                await ensure_partitions(pool, day, days_ahead=0)
            snapshot = SnapshotRun(
                settings,
                client,
                pool,
                run,
                captured_at=captured_at,
                partition=partition,
                progress=progress,
            )
            try:
                await snapshot.execute(planned, stop)
            finally:
                if not run.lease_lost:  # the copy that took over owns the slot now
                    await _say_why_unstored(pool, run, captured_at)
            # the week ahead after the rows are stored, so nothing waits on partition DDL
            ahead = day if hot else dt.datetime.now(dt.UTC).date()
            await ensure_partitions(pool, ahead, lock_timeout=AHEAD_LOCK_TIMEOUT)
            retain = retain_days if retain_days is not None else settings.snapshot_retain_days
            await retire_old_days(settings, pool, retain_days=retain, now=captured_at, stop=stop)
        return STATUS_EXIT_CODES[run.status]


async def compute_greeks(
    settings: Settings,
    pool: asyncpg.Pool,
    *,
    since: dt.datetime,
    stop: asyncio.Event | None = None,
) -> tuple[int, int, int]:
    """IV and greeks for the rows the API left without them, in the slots from ``since`` on
    not computed yet (``computed_greeks``), a slot per transaction.

    Returns:
        The slots done, the rows computed, and those stored with a reason instead.

    Raises:
        DatabaseError: PostgreSQL failed or went away; the slots done before stay.
    """
    from options.store.greeks import compute_slot_greeks, slots_to_compute  # NumPy, SciPy

    slots = done = failed = 0
    try:
        async with pool.acquire() as conn:
            for slot in await slots_to_compute(conn, since):
                if stop is not None and stop.is_set():
                    break
                started = time.perf_counter()
                try:
                    computed, refused = await compute_slot_greeks(
                        conn,
                        slot,
                        rate=settings.greeks_rate,
                        dividend=settings.greeks_dividend_yield,
                    )
                except DayRefusedError as exc:
                    logger.warning("Slot %s: IV and greeks not computed: %s", slot.isoformat(), exc)
                    continue
                slots, done, failed = slots + 1, done + computed, failed + refused
                logger.info(
                    "Slot %s: IV and greeks computed for %d snapshots the API gave none (%d "
                    "could not be: see computed_greeks.reason) in %.2f s",
                    slot.isoformat(),
                    computed,
                    refused,
                    time.perf_counter() - started,
                )
    except DB_ERRORS as exc:
        raise DatabaseError(f"computing greeks: {describe_db_error(exc)}") from exc
    return slots, done, failed


async def _refuse_if_gone(pool: asyncpg.Pool, captured_at: dt.datetime) -> None:
    """Refuse to resume a slot whose day left PostgreSQL (archived or deleted).

    Raises:
        DayRefusedError: it did.
    """
    day = captured_at.astimezone(dt.UTC).date()
    why = why_not_writable(await find_tier(pool, day))
    if why is not None:
        raise DayRefusedError(
            f"cannot resume the slot of {captured_at.isoformat()}: its day {day} is {why}; a "
            "resume adds only to days still in PostgreSQL",
            day=day,
        )


async def _say_why_unstored(pool: asyncpg.Pool, run: Run, captured_at: dt.datetime) -> None:
    """Mark the chains the run did not store as left by it (their rows say "not stored yet"
    until then); a database that is gone only costs that note."""
    try:
        left = await asyncio.shield(close_slot(pool, run, captured_at))
    except OptionsError as exc:
        logger.warning("Could not note the chains left unstored: %s", exc)
        return
    if left:
        logger.warning("%d chains of the slot were not stored (see snapshot_coverage)", left)


async def _slot_to_resume(
    settings: Settings, pool: asyncpg.Pool, *, resume: bool, only: Sequence[str]
) -> Slot | None:
    """The slot this run completes instead of taking a new one, if any.

    ``--resume``: the latest slot with chains left, at any age. A scheduled run: the latest
    slot, if it has chains left and is younger than ``SNAPSHOT_RESUME_WINDOW`` (an interrupted
    run restarted at once finishes its slot; later, a new slot is worth more than old ones
    filled in with newer prices). A one-off ``--underlying`` run never resumes.
    """
    if resume:
        return await find_resumable_slot(pool, max_age=None, only_latest=False)
    if only or not settings.snapshot_resume_window:
        return None
    return await find_resumable_slot(
        pool, max_age=settings.snapshot_resume_window, only_latest=True
    )
