"""The lease that keeps one copy of each job running: opening a run, and its heartbeat.

A run holds a lease, not a session lock: its ``ingest_runs`` row is ``running`` and carries a
heartbeat that a background task renews every few seconds on whichever pooled connection is
free, so no connection sits idle for the whole run (``idle_session_timeout``, a NAT or a proxy
could close it). A unique index allows one ``running`` row per job. A new copy that finds one
takes over only if that run is dead: its heartbeat is older than the lease, or it ran on this
host and its process is gone (a SIGKILL is recognised at once); otherwise it exits 4.

Commits check the lease too (:func:`~options.store.runs.count_committed`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from options.errors import AlreadyRunningError, LeaseLostError
from options.store.db import ACQUIRE_TIMEOUT, DB_ERRORS, bounded_db_connection, describe_db_error
from options.store.runs import Run, run_lost_message

logger = logging.getLogger(__name__)

JOB_LOCK_KEYS = {
    "options": 0x6F7074686973_10,
    "snapshots": 0x6F7074686973_11,
    "daily": 0x6F7074686973_12,
}
LEASE_SECONDS = 60.0  # a run whose heartbeat is older than this is dead
HEARTBEAT_SECONDS = 5.0


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
