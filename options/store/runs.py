"""The run ledger (``ingest_runs``) and the lock that keeps one copy of each job running.

:func:`recorded_run` wraps a job: it takes the job's advisory lock (or raises
:class:`AlreadyRunningError`), closes rows left ``running`` by a copy that died, writes the
``running`` row, and always writes a final status, whatever way the job ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

import asyncpg

from options.errors import (
    AlreadyRunningError,
    DatabaseError,
    ExitCode,
    OptionsError,
    RunInterrupted,
)
from options.store.db import ACQUIRE_TIMEOUT, DB_ERRORS, describe_db_error

logger = logging.getLogger(__name__)

T = TypeVar("T")

JOB_LOCK_KEYS = {"options": 0x6F7074686973_10, "snapshots": 0x6F7074686973_11}
MAX_ERROR_TEXT = 4000

STATUS_EXIT_CODES = {
    "succeeded": ExitCode.OK,
    "partial": ExitCode.PARTIAL,
    "failed": ExitCode.FAILED,
    "interrupted": ExitCode.INTERRUPTED,
}


@dataclass
class RunStats:
    """Counts a job adds up while it runs; written to ``ingest_runs`` at the end."""

    underlyings_requested: int = 0
    underlyings_succeeded: int = 0
    underlyings_failed: int = 0
    rows_fetched: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    contracts_deactivated: int = 0
    api_requests: int = 0
    failures: list[str] = field(default_factory=list)

    def status(self) -> str:
        """The final status these counts call for when the job ran to its end."""
        if self.underlyings_failed == 0:
            return "succeeded"
        return "partial" if self.underlyings_succeeded else "failed"


@dataclass
class Run:
    """A job run in progress: its ledger id, its start time and its counts."""

    id: int
    job: str
    started_at: datetime
    stats: RunStats = field(default_factory=RunStats)
    status: str = "running"


@asynccontextmanager
async def recorded_run(pool: asyncpg.Pool, job: str) -> AsyncIterator[Run]:
    """Hold the job's lock and its ``ingest_runs`` row for the duration of the block.

    On a normal exit the status follows :meth:`RunStats.status`; an :class:`OptionsError` or
    any other exception ends it ``failed``; cancellation (a signal) ends it ``interrupted``.
    The exception, if any, is re-raised after the row is written.

    Raises:
        AlreadyRunningError: another copy of this job holds the lock.
        DatabaseError: the ledger cannot be written.
    """
    key = JOB_LOCK_KEYS[job]
    try:
        conn = await pool.acquire(timeout=ACQUIRE_TIMEOUT)
    except DB_ERRORS as exc:
        raise DatabaseError(f"cannot start the run: {describe_db_error(exc)}") from exc
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            raise AlreadyRunningError(
                f"another ingest_{job} is running (it holds the run lock); this copy exits"
            )
        try:
            run = await _open_run(conn, job)
            try:
                yield run
            except asyncio.CancelledError:
                await _close_run(conn, run, "interrupted", "cancelled by a second signal")
                raise
            except RunInterrupted as exc:
                await _close_run(conn, run, "interrupted", str(exc))
                raise
            except OptionsError as exc:
                await _close_run(conn, run, "failed", str(exc))
                raise
            except Exception as exc:
                await _close_run(conn, run, "failed", f"{type(exc).__name__}: {exc}")
                raise
            else:
                error = "; ".join(run.stats.failures) or None
                await _close_run(conn, run, run.stats.status(), error)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", key)
    except DB_ERRORS as exc:
        raise DatabaseError(f"run ledger: {describe_db_error(exc)}") from exc
    finally:
        await pool.release(conn)


async def until_stopped(awaitable: Awaitable[T], stop: asyncio.Event) -> T:
    """Await ``awaitable``; if ``stop`` is set first, cancel it and raise RunInterrupted.

    ``stop`` is set by SIGINT/SIGTERM or by the ``--deadline``: the job stops starting new work,
    lets the cancelled work clean up (roll back, flush), and the run is recorded ``interrupted``.
    """
    work = asyncio.ensure_future(awaitable)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise RunInterrupted("stopped before the work was done; unfinished underlyings untouched")
    return work.result()


async def _open_run(conn: asyncpg.Connection, job: str) -> Run:
    stale = await conn.execute(
        """
        UPDATE ingest_runs
        SET status = 'interrupted', finished_at = now(),
            error = 'the process ended without recording a result'
        WHERE job = $1 AND status = 'running'
        """,
        job,
    )
    if stale != "UPDATE 0":
        logger.warning("Closed %s left running by an earlier copy", stale.split()[-1] + " run(s)")
    row = await conn.fetchrow(
        "INSERT INTO ingest_runs (job, started_at) VALUES ($1, now()) RETURNING id, started_at",
        job,
    )
    return Run(id=row["id"], job=job, started_at=row["started_at"])


async def _close_run(conn: asyncpg.Connection, run: Run, status: str, error: str | None) -> None:
    run.status = status
    stats = dataclasses.asdict(run.stats)
    stats.pop("failures")
    if error and len(error) > MAX_ERROR_TEXT:
        error = error[: MAX_ERROR_TEXT - 1] + "…"
    # shield: a cancelled job must still get its final row written
    await asyncio.shield(
        conn.execute(
            """
            UPDATE ingest_runs SET status = $2, finished_at = clock_timestamp(), error = $3,
                underlyings_requested = $4, underlyings_succeeded = $5, underlyings_failed = $6,
                rows_fetched = $7, rows_written = $8, rows_rejected = $9,
                contracts_deactivated = $10, api_requests = $11
            WHERE id = $1
            """,
            run.id,
            status,
            error,
            *stats.values(),
        )
    )
    logger.info("Run %d of ingest_%s ended %s", run.id, run.job, status)
