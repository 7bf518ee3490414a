"""The lease that keeps one copy of each job running: opening a run, and its heartbeat.

A run holds a lease, not a session lock: its ``ingest_runs`` row is ``running`` and carries a
heartbeat that a background task renews every few seconds on whichever pooled connection is
free, so no connection sits idle for the whole run (``idle_session_timeout``, a NAT or a proxy
could close it). A unique index allows one ``running`` row per job. A new copy that finds one
takes over only if that run is dead: its heartbeat is older than the lease the run recorded
(``RUN_LEASE_SECONDS`` of its own process), or it ran on this host and its process is gone (a
SIGKILL is recognised at once); otherwise it exits 4.

Taking over fences the dead copy first. The run's row records the ``application_name`` every
session of that copy's pool carries (:func:`~options.store.db.pool_application_name`: unique to
the pool, and carried by the sessions it opened after a reconnect too, which recorded backend
pids would miss; a pid can also be reused by an unrelated session). The new copy ends those
sessions (``pg_terminate_backend``) and waits until they are gone before it closes the dead
run: a copy frozen mid-commit (a paused VM, a swap storm) holds an open transaction on rows the
new copy needs, and would otherwise fail it with ``LockNotAvailableError``. Its transaction is
rolled back; woken, the frozen copy finds its connections gone, and the next one it opens
finds the lease lost: it stops, committing nothing.

Commits check the lease too (:func:`~options.store.runs.count_committed`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from options.errors import AlreadyRunningError, DatabaseError, LeaseLostError
from options.store.db import bounded_db_connection, is_pool_application_name
from options.store.reconnect import ACQUIRE_TIMEOUT, DB_ERRORS, describe_db_error
from options.store.runs import Run, run_lost_message

logger = logging.getLogger(__name__)

JOB_LOCK_KEYS = {
    "options": 0x6F7074686973_10,
    "snapshots": 0x6F7074686973_11,
    "daily": 0x6F7074686973_12,
}
LEASE_SECONDS = 60.0  # the default RUN_LEASE_SECONDS: a run silent for longer is dead
HEARTBEAT_SECONDS = 5.0  # at most; a quarter of a shorter lease
FENCE_SECONDS = 10.0  # how long a take-over waits for the dead copy's sessions to end
FENCE_POLL_SECONDS = 0.05


def heartbeat_interval(lease_seconds: float) -> float:
    """How often a run with this lease renews it: four beats a lease, at most every 5 s."""
    return min(HEARTBEAT_SECONDS, lease_seconds / 4)


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

    def judge(self, row: Mapping[str, object]) -> str | None:
        """Why the run in ``row`` is dead, or ``None`` when it may still be running.

        A run is judged by the lease it recorded (its own process's ``RUN_LEASE_SECONDS``,
        which set how often it beats), never by the lease of the copy that looks.
        """
        silent = row["silent_seconds"]
        if row["heartbeat_at"] is None:
            return "it never sent a heartbeat"
        assert isinstance(silent, float | int)
        recorded = row["lease_seconds"]
        lease_seconds = float(recorded) if isinstance(recorded, float | int) else LEASE_SECONDS
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


async def open_run(
    pool: asyncpg.Pool, job: str, *, lease_seconds: float = LEASE_SECONDS, resumed: bool = False
) -> Run:
    """Insert the job's ``running`` row, taking over first a run of the same job that is
    dead (its sessions ended, its row closed ``interrupted``).

    Args:
        lease_seconds: this run's lease (``RUN_LEASE_SECONDS``), recorded with it: another
            copy finds it dead once its heartbeat is older than that.

    Raises:
        AlreadyRunningError: a live copy holds the lease.
        DatabaseError: PostgreSQL failed, or a dead run's sessions could not be ended.
    """
    token = secrets.token_hex(8)  # tells this opening apart from every other, even of this process
    return await _open_run(pool, job, ProcessIdentity.current(), token, lease_seconds, resumed)


@bounded_db_connection("opening a run of ingest_{job} (taking its lease)")
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
                return Run(
                    holder["id"],
                    job,
                    holder["started_at"],
                    resumed=resumed,
                    application_name=holder["application_name"],
                )
            dead = me.judge(holder)
            if dead is None:
                raise AlreadyRunningError(
                    f"another ingest_{job} is running (run {holder['id']}, process "
                    f"{holder['pid']} on {holder['host']}, heartbeat "
                    f"{holder['silent_seconds']:.0f} s ago); this copy exits"
                )
            await _take_over(conn, holder, dead)
        name = await conn.fetchval("SELECT current_setting('application_name')")
        sessions = name if is_pool_application_name(name) else None
        try:
            row = await conn.fetchrow(
                """
                INSERT INTO ingest_runs (job, started_at, heartbeat_at, host, boot_id, pid,
                    pid_started, resumed, lease_token, lease_seconds, application_name)
                VALUES ($1, now(), now(), $2, $3, $4, $5, $6, $7, $8, $9)
                RETURNING id, started_at
                """,
                job,
                me.host,
                me.boot_id,
                me.pid,
                me.started,
                resumed,
                token,
                lease_seconds,
                sessions,
            )
        except asyncpg.UniqueViolationError:
            # ingest_runs_one_running_idx: a copy that does not take turns got there first
            raise AlreadyRunningError(
                f"another ingest_{job} started at the same moment; this copy exits"
            ) from None
    return Run(
        id=row["id"],
        job=job,
        started_at=row["started_at"],
        resumed=resumed,
        application_name=sessions,
    )


@bounded_db_connection("closing the runs of ingest_{job} left by a copy that died")
async def close_dead_runs(conn: asyncpg.Connection, job: str) -> int:
    """Take over the job's runs left ``running`` by a copy that died (a live one is left
    alone): their sessions ended, their rows closed; returns how many. Opening a run does this
    too; this is for a command that opens none."""
    me = ProcessIdentity.current()
    closed = 0
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", JOB_LOCK_KEYS[job])
        for holder in await _running(conn, job):
            dead = me.judge(holder)
            if dead is not None:
                await _take_over(conn, holder, dead)
                closed += 1
    return closed


async def _running(conn: asyncpg.Connection, job: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        SELECT id, started_at, lease_token, host, boot_id, pid, pid_started, heartbeat_at,
               lease_seconds, application_name,
               extract(epoch FROM clock_timestamp() - heartbeat_at)::float8 AS silent_seconds
        FROM ingest_runs WHERE job = $1 AND status = 'running'
        """,
        job,
    )


async def _take_over(conn: asyncpg.Connection, holder: asyncpg.Record, why: str) -> None:
    """Fence the dead run (end its sessions), then close its row."""
    await _end_sessions(conn, holder)
    await _close_dead(conn, holder["id"], why)


async def _end_sessions(conn: asyncpg.Connection, holder: asyncpg.Record) -> None:
    """End every session of the dead run's pool and wait until none is left.

    A copy that stopped answering (frozen, partitioned) may still have sessions, one of them
    in a transaction that holds rows this copy is about to need (the run's row among them).
    Its backends are not frozen: ``pg_terminate_backend`` rolls their transactions back at
    once, and the copy, if it wakes, finds its connections gone.

    Raises:
        DatabaseError: sessions were left after :data:`FENCE_SECONDS`, or this role may not
            end them (it needs to be the same role, or a member of ``pg_signal_backend``).
    """
    name = holder["application_name"]
    if not is_pool_application_name(name):
        return  # a run recorded before its sessions were named: nothing to find them by
    if name == await conn.fetchval("SELECT current_setting('application_name')"):
        return  # this very pool's run (one process opening a second): its sessions are ours
    deadline = time.monotonic() + FENCE_SECONDS
    ended: set[int] = set()
    while True:
        # pg_stat_activity is read once per transaction unless told to look again
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        pids = [
            r["pid"]
            for r in await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = $1 AND pid <> pg_backend_pid()",
                name,
            )
        ]
        if not pids:
            break
        if time.monotonic() > deadline:
            raise DatabaseError(
                f"run {holder['id']} is dead, but its sessions (backends "
                f"{', '.join(map(str, pids))}, {name}) did not end within {FENCE_SECONDS:g} s; "
                "this copy exits: end them with pg_terminate_backend and start it again"
            )
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids
            )
        except asyncpg.InsufficientPrivilegeError as exc:
            raise DatabaseError(
                f"run {holder['id']} is dead, but this role may not end its sessions (backends "
                f"{', '.join(map(str, pids))}): run every job as one role, or grant it "
                f"pg_signal_backend ({describe_db_error(exc)})"
            ) from exc
        ended.update(pids)
        await asyncio.sleep(FENCE_POLL_SECONDS)
    if ended:
        logger.warning(
            "Ended %d sessions of run %d (%s), whose copy stopped answering: its open "
            "transactions are rolled back",
            len(ended),
            holder["id"],
            name,
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
                self.run.lease_lost = True
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
