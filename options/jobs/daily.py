"""``ingest_daily``: the daily table (``contract_days``) of each tracked underlying, built from
its stored snapshots after each session (:mod:`options.store.daily`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence

import asyncpg

from options.errors import DatabaseError, RunInterrupted
from options.ops.progress import Progress
from options.store.daily import SessionBuild, build_underlying, sessions_to_build
from options.store.db import DB_ERRORS, describe_db_error
from options.store.runs import Run

logger = logging.getLogger(__name__)


async def build_daily(
    pool: asyncpg.Pool,
    run: Run,
    underlyings: Sequence[str],
    *,
    now: dt.datetime,
    stop: asyncio.Event | None = None,
    progress: Progress | None = None,
) -> list[SessionBuild]:
    """Build the sessions not complete yet of each of ``underlyings``, one underlying per
    transaction (with its share of the run's counts).

    Raises:
        DatabaseError: PostgreSQL failed or went away; the underlyings built before stay.
    """
    run.stats.underlyings_requested = len(underlyings)
    builds: list[SessionBuild] = []
    for underlying in underlyings:
        if stop is not None and stop.is_set():
            break
        key = underlying.removeprefix("I:")
        try:
            async with pool.acquire() as conn:
                todo = await sessions_to_build(conn, key, now)
                done = await build_underlying(conn, run, key, todo)
        except DB_ERRORS as exc:
            raise DatabaseError(
                f"building the daily rows of {key}: {describe_db_error(exc)}"
            ) from exc
        run.stats.add({"underlyings_succeeded": 1, "rows_written": sum(b.changed for b in done)})
        builds.extend(done)
        for build in done:
            if build.reason is not None:
                logger.info(
                    "%s %s: %d rows, not complete: %s",
                    key,
                    build.session,
                    build.contracts,
                    build.reason,
                )
        if progress is not None:
            progress.update(
                done=run.stats.underlyings_succeeded, rows=run.stats.rows_written, failed=0
            )
    done_count = run.stats.underlyings_succeeded
    if stop is not None and stop.is_set() and done_count < len(underlyings):
        raise RunInterrupted(
            f"stopped before every underlying was built: {len(underlyings) - done_count} left "
            "untouched (the others are stored)"
        )
    return builds
