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
from options.store.runs import Run, count_committed

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
    built = 0
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
        run.stats.add({"rows_written": sum(b.changed for b in done)})
        built += 1
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
            progress.update(done=built, rows=run.stats.rows_written, failed=0)
    if stop is not None and stop.is_set() and built < len(underlyings):
        raise RunInterrupted(
            f"stopped before every underlying was built: {len(underlyings) - built} left "
            "untouched (the others are stored)"
        )
    return builds


async def count_underlyings(
    pool: asyncpg.Pool, run: Run, underlyings: Sequence[str], failures: dict[str, str]
) -> None:
    """Once the job is done with them: each of ``underlyings`` counted succeeded, or failed
    with its reason from ``failures``, in the run's row.

    Raises:
        DatabaseError: PostgreSQL failed or went away.
    """
    counts = {
        "underlyings_succeeded": len(underlyings) - len(failures),
        "underlyings_failed": len(failures),
    }
    try:
        async with pool.acquire() as conn, conn.transaction():
            await count_committed(
                conn, run, counts, failures=[f"{key}: {why}" for key, why in failures.items()]
            )
    except DB_ERRORS as exc:
        raise DatabaseError(f"counting the run's underlyings: {describe_db_error(exc)}") from exc
    run.stats.add(counts)
