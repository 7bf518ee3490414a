"""Recording a job run: :func:`recorded_run` wraps a job, :func:`close_run` writes how it ended.

:func:`recorded_run` opens the run (taking the lease, :mod:`options.store.runs_lease`), keeps the
heartbeat going, and writes the final status on a fresh connection, whatever way the job ends
(the original error is logged before anything else is tried).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

import asyncpg

from options.errors import DatabaseError, OptionsError, RunInterrupted
from options.store.reconnect import (
    CONNECT_TIMEOUT,
    DB_ERRORS,
    connect_timeout,
    describe_db_error,
    reconnecting,
)
from options.store.runs import MAX_ERROR_TEXT, STATUS_EXIT_CODES, Run, RunSummary
from options.store.runs_lease import LEASE_SECONDS, Heartbeat, heartbeat_interval, open_run

logger = logging.getLogger(__name__)

# The final status waits for a database that went away as the job does (DB_RECONNECT_SECONDS,
# counted from when it went away); once the job has given up on it, it is tried this long more.
FINAL_WRITE_GRACE = 1.0
COMPLETED = "completed"  # close_run: the job ran to its end; the row's counts decide the status


@asynccontextmanager
async def recorded_run(
    pool: asyncpg.Pool,
    job: str,
    *,
    dsn: str,
    lease_seconds: float = LEASE_SECONDS,
    resumed: bool = False,
    on_end: Callable[[RunSummary], None] | None = None,
) -> AsyncIterator[Run]:
    """Hold the job's lease and its ``ingest_runs`` row for the duration of the block.

    On a normal exit the status follows the committed counts in the row (see
    :func:`close_run`); :class:`RunInterrupted` or a cancellation (a second signal) ends it
    ``interrupted``; any other exception ends it ``failed``. The exception, if any, is logged
    first and re-raised after the row is written, or after the row could not be written (that
    is logged: the exception is the real cause). The final row is written on a new
    connection (the pool may be what failed).

    Args:
        lease_seconds: the run's lease (``RUN_LEASE_SECONDS``): recorded with the run, and
            renewed four times within it (every 5 s at most).

    Raises:
        AlreadyRunningError: a live copy of this job holds the lease.
        LeaseLostError: another copy found this run dead and closed it; nothing more was
            committed after that.
        DatabaseError: the ledger cannot be written.
    """
    run = await open_run(pool, job, lease_seconds=lease_seconds, resumed=resumed)
    heartbeat = Heartbeat(pool, run, interval=heartbeat_interval(lease_seconds))
    heartbeat.start()
    try:
        yield run
    except BaseException as exc:
        lost = heartbeat.lost
        await heartbeat.stop()
        if lost is not None:
            if isinstance(exc, asyncio.CancelledError):
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
            logger.error("%s", lost)
            if isinstance(exc, asyncio.CancelledError):
                raise lost from None  # the heartbeat cancelled the run: say why
            raise lost from exc
        status, error = _outcome(exc)
        if status == "failed":
            logger.error("Run %d of ingest_%s failed: %s", run.id, job, error)
        try:
            await close_run(dsn, run, status, error)
        except DatabaseError as unrecorded:
            logger.error("%s", unrecorded)  # the job's own error says what went wrong first
        finally:
            _report(run, on_end)
        raise
    else:
        await heartbeat.stop()
        try:
            await close_run(dsn, run, COMPLETED, None)
        finally:
            _report(run, on_end)


def _report(run: Run, on_end: Callable[[RunSummary], None] | None) -> None:
    """Hand the summary on; a failing observer (a full disk under the metrics file) is logged,
    it does not change how the run ended."""
    if on_end is None or run.summary is None:
        return
    try:
        on_end(run.summary)
    except Exception:
        logger.exception("Reporting the end of run %d failed", run.id)


def _outcome(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, asyncio.CancelledError):
        return "interrupted", "cancelled by a second signal"
    if isinstance(exc, RunInterrupted):
        return "interrupted", str(exc)
    if isinstance(exc, OptionsError):
        return "failed", str(exc)
    if isinstance(exc, DB_ERRORS):
        return "failed", describe_db_error(exc)
    return "failed", f"{type(exc).__name__}: {exc}"


async def close_run(dsn: str, run: Run, status: str, error: str | None) -> None:
    """Write the run's final status on a new connection, retrying while the database is away.

    ``status`` :data:`COMPLETED` (the job ran to its end) is decided from the committed counts
    in the row, not from this process's view of them: ``succeeded`` when every requested
    underlying succeeded, ``partial`` when something was stored, ``failed`` otherwise. The
    run's :attr:`Run.status` is set to what was written. ``error`` (the run's own error) goes
    before the failures already in the row. Only the progress counts are written here; the
    committed counts are already in the row. Shielded: a second signal does not stop the
    final row from being written.

    Raises:
        DatabaseError: the row could not be written while the job waits for its database
            (``DB_RECONNECT_SECONDS`` since it went away, and :data:`FINAL_WRITE_GRACE` more).
    """
    if error and len(error) > MAX_ERROR_TEXT:
        error = error[: MAX_ERROR_TEXT - 1] + "…"
    run.status = "failed" if status == COMPLETED else status  # unless the row says otherwise
    run.summary = _unrecorded(run, error)
    try:
        row = await asyncio.shield(_write_final(dsn, run, status, error))
    except DB_ERRORS as exc:
        raise DatabaseError(
            f"cannot record the end of run {run.id} ({status}): {describe_db_error(exc)}; "
            "the next run will close it"
        ) from exc
    if row is None:
        logger.warning(
            "Run %d was already closed by another copy; its row is left as it is", run.id
        )
        return
    run.status = row["status"]
    run.summary = RunSummary(
        job=run.job,
        run_id=run.id,
        exit_code=int(STATUS_EXIT_CODES[row["status"]]),
        recorded=True,
        **{name: row[name] for name in _SUMMARY_COLUMNS},
    )
    logger.info("Run %d of ingest_%s ended %s", run.id, run.job, run.status)


_SUMMARY_COLUMNS = (
    "status",
    "started_at",
    "finished_at",
    "underlyings_requested",
    "underlyings_succeeded",
    "underlyings_failed",
    "rows_fetched",
    "rows_written",
    "rows_rejected",
    "contracts_deactivated",
    "api_requests",
    "error",
    "last_success_at",
)


def _unrecorded(run: Run, error: str | None) -> RunSummary:
    stats = run.stats
    return RunSummary(
        job=run.job,
        run_id=run.id,
        status=run.status,
        exit_code=int(STATUS_EXIT_CODES[run.status]),
        started_at=run.started_at,
        finished_at=None,
        underlyings_requested=stats.underlyings_requested,
        underlyings_succeeded=stats.underlyings_succeeded,
        underlyings_failed=stats.underlyings_failed,
        rows_fetched=stats.rows_fetched,
        rows_written=stats.rows_written,
        rows_rejected=stats.rows_rejected,
        contracts_deactivated=stats.contracts_deactivated,
        api_requests=stats.api_requests,
        error=error,
        last_success_at=None,
        recorded=False,
    )


async def _write_final(dsn: str, run: Run, status: str, error: str | None) -> asyncpg.Record | None:
    stats = run.stats
    # any database error is worth another try here: a database that refuses connections for
    # a while (a restart, a failover) must not leave the run 'running'
    async for attempt in reconnecting(
        what=f"recording the end of run {run.id}", on=DB_ERRORS, grace=FINAL_WRITE_GRACE
    ):
        with attempt:
            conn = await asyncpg.connect(
                dsn,
                timeout=connect_timeout(),
                # the run's own sessions' name: a copy that takes the run over ends this one too
                server_settings={"application_name": run.application_name or "options-history"},
            )
            try:
                written: asyncpg.Record | None = await conn.fetchrow(
                    """
                    UPDATE ingest_runs SET finished_at = clock_timestamp(),
                        status = CASE
                            WHEN $2 <> 'completed' THEN $2
                            WHEN underlyings_succeeded >= $6 THEN 'succeeded'
                            WHEN underlyings_succeeded > 0 OR rows_written > 0 THEN 'partial'
                            ELSE 'failed' END,
                        error = left(concat_ws('; ', $3::text, error), $7),
                        rows_fetched = $4, api_requests = $5, underlyings_requested = $6
                    WHERE id = $1 AND status = 'running'
                    RETURNING *, CASE WHEN status = 'succeeded' THEN finished_at ELSE
                        (SELECT max(r.finished_at) FROM ingest_runs r
                         WHERE r.job = ingest_runs.job AND r.status = 'succeeded')
                        END AS last_success_at
                    """,
                    run.id,
                    status,
                    error,
                    stats.rows_fetched,
                    stats.api_requests,
                    stats.underlyings_requested,
                    MAX_ERROR_TEXT,
                    timeout=CONNECT_TIMEOUT,
                )
            finally:
                with suppress(*DB_ERRORS):
                    await conn.close(timeout=2)
            return written
    raise AssertionError("unreachable: reconnecting() returns or raises")
