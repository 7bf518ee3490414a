"""Wiring shared by the jobs: open the API client and the pool, migrate, run under the ledger.

The CLI calls one function per job; each returns the process exit code.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from options.api.polygon import PolygonClient
from options.config import Settings
from options.errors import ConfigError, ExitCode
from options.jobs.contracts import sync_contracts
from options.jobs.snapshots import SnapshotRun, select_underlyings
from options.ops.logs import StatusReporter
from options.ops.market import market_session
from options.store.db import apply_migrations, create_pool
from options.store.partitions import create_next_partition, drop_old_partitions, ensure_partition
from options.store.runs import STATUS_EXIT_CODES, RunStats, recorded_run

logger = logging.getLogger(__name__)

POOL_CLOSE_TIMEOUT = 10.0


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
async def open_database(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """The job's pool, with the schema migrated; closed on the way out."""
    pool = await create_pool(settings.require_database_url(), max_size=settings.db_pool_size)
    try:
        await apply_migrations(pool)
        yield pool
    finally:
        try:
            await asyncio.wait_for(pool.close(), POOL_CLOSE_TIMEOUT)
        except (TimeoutError, asyncio.CancelledError):
            pool.terminate()


async def migrate(settings: Settings) -> list[str]:
    """Apply pending migrations (``ingest_admin migrate``); returns the names applied."""
    pool = await create_pool(settings.require_database_url(), max_size=2)
    try:
        return await apply_migrations(pool)
    finally:
        await pool.close()


async def run_options_job(
    settings: Settings,
    *,
    dry_run: bool = False,
    stop: asyncio.Event | None = None,
    progress: StatusReporter | None = None,
) -> ExitCode:
    """``ingest_options``: sync the contracts of every configured underlying.

    ``stop`` (set by a signal or the deadline) rolls back the underlyings in progress and ends
    the run ``interrupted``.
    """
    settings.require_underlyings()
    settings.require_api_key()
    if dry_run:
        stats = RunStats()
        async with open_client(settings) as client:
            results = await sync_contracts(
                settings,
                client,
                None,
                stats,
                seen_at=dt.datetime.now(dt.UTC),
                stop=stop,
                progress=progress,
            )
        for result in results:
            outcome = f"failed: {result.error}" if result.error else "complete"
            logger.info(
                "Dry run: %s lists %d contracts (%s)", result.underlying, result.fetched, outcome
            )
        return STATUS_EXIT_CODES[stats.status()]
    settings.require_database_url()
    logger.info(
        "Syncing contracts of %d underlyings into %s",
        len(settings.underlyings),
        settings.database_location(),
    )
    async with open_client(settings) as client, open_database(settings) as pool:
        async with recorded_run(pool, "options") as run:
            await sync_contracts(
                settings,
                client,
                pool,
                run.stats,
                seen_at=run.started_at,
                stop=stop,
                progress=progress,
            )
        return STATUS_EXIT_CODES[run.status]


async def run_snapshots_job(
    settings: Settings,
    *,
    explicit_underlyings: bool = False,
    retain_days: int | None = None,
    stop: asyncio.Event | None = None,
    force: bool = False,
    progress: StatusReporter | None = None,
    now: dt.datetime | None = None,
) -> ExitCode:
    """``ingest_snapshots``: store one snapshot of every active contract, under one timestamp.

    Args:
        settings: the job's settings.
        explicit_underlyings: ``settings.underlyings`` came from ``--underlying``: snapshot
            exactly those, instead of those plus every underlying with active contracts.
        retain_days: drop daily partitions older than this many days (``None``: keep all).
        stop: set by a signal or the deadline: fetched rows are flushed, the run is
            ``interrupted``.
        force: snapshot even when the market is closed.
        now: the moment the market-hours decision is made for (``None``: the clock).
        progress: where progress lines go (``systemctl status``).
    """
    settings.require_api_key()
    settings.require_database_url()
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
        return await _snapshot(settings, client, explicit_underlyings, retain_days, stop, progress)


async def _snapshot(
    settings: Settings,
    client: PolygonClient,
    explicit_underlyings: bool,
    retain_days: int | None,
    stop: asyncio.Event,
    progress: StatusReporter | None,
) -> ExitCode:
    async with open_database(settings) as pool:
        underlyings = await select_underlyings(settings, pool, explicit=explicit_underlyings)
        if not underlyings:
            raise ConfigError(
                "no underlyings to snapshot: set UNDERLYINGS, pass --underlying/-u, or run "
                "ingest_options first",
                variable="UNDERLYINGS",
            )
        logger.info(
            "Snapshotting %d underlyings into %s", len(underlyings), settings.database_location()
        )
        async with recorded_run(pool, "snapshots") as run:
            captured_at = run.started_at
            await pool.execute(
                "UPDATE ingest_runs SET captured_at = $2 WHERE id = $1", run.id, captured_at
            )
            partition = await ensure_partition(pool, captured_at.astimezone(dt.UTC).date())
            snapshot = SnapshotRun(
                settings,
                client,
                pool,
                run,
                captured_at=captured_at,
                partition=partition,
                progress=progress,
            )
            await snapshot.execute(underlyings, stop)
            # maintenance after the rows are stored: a reader's lock cannot delay the snapshot
            await create_next_partition(pool, captured_at)
            retain = retain_days if retain_days is not None else settings.snapshot_retain_days
            if retain is not None:
                await drop_old_partitions(pool, retain_days=retain, now=captured_at)
        return STATUS_EXIT_CODES[run.status]
