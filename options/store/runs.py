"""The run ledger (``ingest_runs``) and the lease that keeps one copy of each job running.

A run holds a lease, not a session lock: its ``ingest_runs`` row is ``running`` and carries a
heartbeat that a background task renews every few seconds on whichever pooled connection is
free, so no connection sits idle for the whole run (``idle_session_timeout``, a NAT or a proxy
could close it). A unique index allows one ``running`` row per job. A new copy that finds one
takes over only if that run is dead: its heartbeat is older than the lease, or it ran on this
host and its process is gone (a SIGKILL is recognised at once); otherwise it exits 4.

The counts that say what a run stored are not bookkeeping on the side: each job adds them
with :func:`count_committed` inside the transaction that stores the rows, which also checks
that the run still holds its lease. Whenever a run stops, its row says exactly what it
committed, and a run that lost its lease can commit nothing more.

:func:`recorded_run` wraps a job: it opens the run, keeps the heartbeat going, and writes the
final status on a fresh connection, whatever way the job ends (the original error is logged
before anything else is tried).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import asyncpg

from options.errors import (
    AlreadyRunningError,
    DatabaseError,
    ExitCode,
    LeaseLostError,
    OptionsError,
    RunInterrupted,
)
from options.store.db import (
    ACQUIRE_TIMEOUT,
    CONNECT_TIMEOUT,
    DB_ERRORS,
    bounded_db_connection,
    describe_db_error,
    reconnecting,
)
from options.store.rejects import RejectBudget

logger = logging.getLogger(__name__)

JOB_LOCK_KEYS = {"options": 0x6F7074686973_10, "snapshots": 0x6F7074686973_11}
LEASE_SECONDS = 60.0  # a run whose heartbeat is older than this is dead
HEARTBEAT_SECONDS = 5.0
FINAL_WRITE_SECONDS = 30.0  # how long the final status waits for a database that went away
COMPLETED = "completed"  # close_run: the job ran to its end; the row's counts decide the status
MAX_ERROR_TEXT = 4000

STATUS_EXIT_CODES = {
    "succeeded": ExitCode.OK,
    "partial": ExitCode.PARTIAL,
    "failed": ExitCode.FAILED,
    "interrupted": ExitCode.INTERRUPTED,
}

# the counts only a committing transaction may add to (see count_committed)
COMMITTED_COUNTS = (
    "underlyings_succeeded",
    "underlyings_failed",
    "rows_written",
    "rows_rejected",
    "contracts_deactivated",
)


@dataclass
class RunStats:
    """A run's counts as this process knows them (the database row is the record).

    The committed counts are added after each transaction that stored them commits; the
    others (requested, fetched, API requests) are progress, written by the heartbeat and at
    the end.
    """

    underlyings_requested: int = 0
    underlyings_succeeded: int = 0
    underlyings_failed: int = 0
    rows_fetched: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    contracts_deactivated: int = 0
    api_requests: int = 0

    def add(self, counts: Mapping[str, int]) -> None:
        """Add committed counts (after their transaction committed)."""
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + value)


@dataclass(frozen=True)
class RunSummary:
    """How a run ended, as its ``ingest_runs`` row says (``recorded``), or as this process saw
    it when the row could not be written."""

    job: str
    run_id: int
    status: str
    exit_code: int
    started_at: datetime
    finished_at: datetime | None
    underlyings_requested: int
    underlyings_succeeded: int
    underlyings_failed: int
    rows_fetched: int
    rows_written: int
    rows_rejected: int
    contracts_deactivated: int
    api_requests: int
    error: str | None
    last_success_at: datetime | None
    recorded: bool

    @property
    def seconds(self) -> float | None:
        """The run's duration."""
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    def as_dict(self) -> dict[str, object]:
        """The summary as JSON-ready values (timestamps ISO 8601)."""
        data = dataclasses.asdict(self)
        for key in ("started_at", "finished_at", "last_success_at"):
            moment = data[key]
            data[key] = moment.isoformat() if moment is not None else None
        data["seconds"] = self.seconds
        return data


@dataclass
class Run:
    """A job run in progress: its ledger id, its start time, its counts.

    Attributes:
        resumed: the run completes a snapshot slot an earlier run planned.
        keep: how many more rejected records the run may keep in ``rejected_rows``.
    """

    id: int
    job: str
    started_at: datetime
    stats: RunStats = field(default_factory=RunStats)
    status: str = "running"
    resumed: bool = False
    keep: RejectBudget = field(default_factory=RejectBudget)
    summary: RunSummary | None = None


@dataclass(frozen=True)
class ProcessIdentity:
    """Who holds a run: enough to tell, on the same host, whether that process still lives."""

    host: str
    boot_id: str | None
    pid: int
    started: int | None  # the process's start time in clock ticks since boot (/proc)

    @classmethod
    def current(cls) -> ProcessIdentity:
        """This process."""
        pid = os.getpid()
        return cls(socket.gethostname(), _boot_id(), pid, _process_start(pid))

    def judge(self, row: Mapping[str, object], *, lease_seconds: float) -> str | None:
        """Why the run in ``row`` is dead, or ``None`` when it may still be running."""
        silent = row["silent_seconds"]
        if row["heartbeat_at"] is None:
            return "it never sent a heartbeat"
        assert isinstance(silent, float | int)
        if silent > lease_seconds:
            return f"no heartbeat for {silent:.0f} s (the lease is {lease_seconds:g} s)"
        if row["host"] != self.host:
            return None
        if row["boot_id"] and self.boot_id and row["boot_id"] != self.boot_id:
            return "its host has rebooted since"
        pid = row["pid"]
        if not isinstance(pid, int):
            return None
        if not _process_alive(pid):
            return f"its process {pid} is gone"
        started = _process_start(pid)
        if row["pid_started"] is not None and started is not None and started != row["pid_started"]:
            return f"its process {pid} is gone (the pid now belongs to another process)"
        return None


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
    first and re-raised after the row is written. The final row is written on a new
    connection (the pool may be what failed).

    Raises:
        AlreadyRunningError: a live copy of this job holds the lease.
        LeaseLostError: another copy found this run dead and closed it; nothing more was
            committed after that.
        DatabaseError: the ledger cannot be written.
    """
    run = await open_run(pool, job, lease_seconds=lease_seconds, resumed=resumed)
    heartbeat = Heartbeat(pool, run, interval=min(HEARTBEAT_SECONDS, lease_seconds / 4))
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


async def open_run(
    pool: asyncpg.Pool, job: str, *, lease_seconds: float = LEASE_SECONDS, resumed: bool = False
) -> Run:
    """Insert the job's ``running`` row, closing first a run of the same job that is dead.

    Raises:
        AlreadyRunningError: a live copy holds the lease.
        DatabaseError: PostgreSQL failed.
    """
    token = secrets.token_hex(8)  # tells this opening apart from every other, even of this process
    return await _open_run(pool, job, ProcessIdentity.current(), token, lease_seconds, resumed)


@bounded_db_connection
async def _open_run(
    conn: asyncpg.Connection,
    job: str,
    me: ProcessIdentity,
    token: str,
    lease_seconds: float,
    resumed: bool,
) -> Run:
    async with conn.transaction():
        # starters of one job take turns: the look and the insert below see the same rows
        await conn.execute("SELECT pg_advisory_xact_lock($1)", JOB_LOCK_KEYS[job])
        for holder in await _running(conn, job):
            if holder["lease_token"] == token:
                # this very call inserted it, and the connection was lost before the answer
                return Run(holder["id"], job, holder["started_at"], resumed=resumed)
            dead = me.judge(holder, lease_seconds=lease_seconds)
            if dead is None:
                raise AlreadyRunningError(
                    f"another ingest_{job} is running (run {holder['id']}, process "
                    f"{holder['pid']} on {holder['host']}, heartbeat "
                    f"{holder['silent_seconds']:.0f} s ago); this copy exits"
                )
            await _close_dead(conn, holder["id"], dead)
        try:
            row = await conn.fetchrow(
                """
                INSERT INTO ingest_runs (job, started_at, heartbeat_at, host, boot_id, pid,
                    pid_started, resumed, lease_token)
                VALUES ($1, now(), now(), $2, $3, $4, $5, $6, $7)
                RETURNING id, started_at
                """,
                job,
                me.host,
                me.boot_id,
                me.pid,
                me.started,
                resumed,
                token,
            )
        except asyncpg.UniqueViolationError:
            # ingest_runs_one_running_idx: a copy that does not take turns got there first
            raise AlreadyRunningError(
                f"another ingest_{job} started at the same moment; this copy exits"
            ) from None
    return Run(id=row["id"], job=job, started_at=row["started_at"], resumed=resumed)


@bounded_db_connection
async def close_dead_runs(
    conn: asyncpg.Connection, job: str, *, lease_seconds: float = LEASE_SECONDS
) -> int:
    """Close the job's runs left ``running`` by a copy that died (a live one is left alone);
    returns how many. Opening a run does this too; this is for a command that opens none."""
    me = ProcessIdentity.current()
    closed = 0
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", JOB_LOCK_KEYS[job])
        for holder in await _running(conn, job):
            dead = me.judge(holder, lease_seconds=lease_seconds)
            if dead is not None:
                await _close_dead(conn, holder["id"], dead)
                closed += 1
    return closed


async def _running(conn: asyncpg.Connection, job: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        SELECT id, started_at, lease_token, host, boot_id, pid, pid_started, heartbeat_at,
               extract(epoch FROM clock_timestamp() - heartbeat_at)::float8 AS silent_seconds
        FROM ingest_runs WHERE job = $1 AND status = 'running'
        """,
        job,
    )


async def _close_dead(conn: asyncpg.Connection, run_id: int, why: str) -> None:
    await conn.execute(
        """
        UPDATE ingest_runs SET status = 'interrupted', finished_at = clock_timestamp(), error = $2
        WHERE id = $1
        """,
        run_id,
        f"the run stopped without recording a result: {why}",
    )
    logger.warning("Closed run %d left running by a copy that died: %s", run_id, why)


async def count_committed(
    conn: asyncpg.Connection,
    run: Run,
    counts: Mapping[str, int],
    failures: Sequence[str] = (),
    *,
    before: str = "",
    before_args: Sequence[object] = (),
) -> None:
    """Inside the transaction that stores them, add ``counts`` (and the reasons of
    ``failures``, to the run's error text) to the run's row.

    Also the lease check of that transaction: if another copy has closed this run (found it
    dead), nothing may be committed any more.

    Args:
        before: ``WITH`` queries to run in the same statement (saving a round trip per
            commit); their parameters are ``$1`` onwards, ``before_args``.

    Raises:
        LeaseLostError: the run is no longer ``running``; roll the transaction back.
    """
    first = len(before_args) + 1
    run_id, failure, limit = (f"${first + i}" for i in range(3))
    sets = "".join(
        f"{name} = {name} + ${first + 3 + i}, " for i, name in enumerate(COMMITTED_COUNTS)
    )
    found = await conn.fetchval(
        f"""
        {before}
        UPDATE ingest_runs SET {sets}
            error = CASE WHEN {failure}::text IS NULL THEN error
                         ELSE left(concat_ws('; ', error, {failure}::text), {limit}) END
        WHERE id = {run_id} AND status = 'running' RETURNING id
        """,
        *before_args,
        run.id,
        "; ".join(failures) or None,
        MAX_ERROR_TEXT,
        *(int(counts.get(name, 0)) for name in COMMITTED_COUNTS),
    )
    if found is None:
        raise LeaseLostError(run_lost_message(run))


def run_lost_message(run: Run) -> str:
    """The error of a run another copy closed as dead."""
    return (
        f"run {run.id} of ingest_{run.job} lost its lease: another copy found it silent and "
        "closed it; this copy stops (what it committed before stays)"
    )


class Heartbeat:
    """Renews a run's lease every ``interval`` seconds and writes its progress counts.

    If the row is no longer ``running`` (another copy closed it as dead), the lease is lost:
    the run's task is cancelled and :attr:`lost` says why. A database that does not answer is
    logged and tried again at the next beat: the lease only expires after
    :data:`LEASE_SECONDS`, and commits check it anyway.
    """

    def __init__(self, pool: asyncpg.Pool, run: Run, *, interval: float) -> None:
        self.pool = pool
        self.run = run
        self.interval = interval
        self.lost: LeaseLostError | None = None
        self._task: asyncio.Task[None] | None = None
        self._owner: asyncio.Task[object] | None = None

    def start(self) -> None:
        """Start beating for the current task."""
        self._owner = asyncio.current_task()
        self._task = asyncio.create_task(self._beat())

    async def stop(self) -> None:
        """Stop beating (the final status is written next)."""
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _beat(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                alive = await self._renew()
            except DB_ERRORS as exc:
                if not failing:
                    logger.warning("Run heartbeat failed, retrying: %s", describe_db_error(exc))
                failing = True
                continue
            failing = False
            if not alive:
                self.lost = LeaseLostError(run_lost_message(self.run))
                if self._owner is not None:
                    self._owner.cancel()
                return

    async def _renew(self) -> bool:
        stats = self.run.stats
        async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
            found = await conn.fetchval(
                """
                UPDATE ingest_runs SET heartbeat_at = now(), rows_fetched = $2, api_requests = $3,
                    underlyings_requested = $4
                WHERE id = $1 AND status = 'running' RETURNING id
                """,
                self.run.id,
                stats.rows_fetched,
                stats.api_requests,
                stats.underlyings_requested,
                timeout=self.interval * 2,
            )
        return found is not None


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
        DatabaseError: the row could not be written within :data:`FINAL_WRITE_SECONDS`.
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
        seconds=FINAL_WRITE_SECONDS, what="recording the run", on=DB_ERRORS
    ):
        with attempt:
            conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
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


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot, or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
