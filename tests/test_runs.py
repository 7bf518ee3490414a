"""The run lease and ledger: one live copy per job, dead copies recognised, lost leases obeyed."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from options.errors import AlreadyRunningError, ExitCode, LeaseLostError
from options.jobs.wiring import run_options_job, run_snapshots_job
from options.store.db import create_pool
from options.store.reconnect import DB_ERRORS
from options.store.runs import count_committed
from options.store.runs_lease import open_run
from tests.conftest import SIM_KEY, DatabaseProxy, black_out, wait_for_value

BIN = Path(sys.executable).parent


async def runs(pool: asyncpg.Pool) -> list[tuple[object, ...]]:
    rows = await pool.fetch("SELECT id, job, status, pid FROM ingest_runs ORDER BY id")
    return [tuple(r) for r in rows]


def job_env(database_url: str, base_url: str, underlyings: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "POLYGON_BASE_URL": base_url,
        "POLYGON_API_KEY": SIM_KEY,
        "UNDERLYINGS": underlyings,
        "POLYGON_RATE_LIMIT": "off",
        **extra,
    }


async def test_a_killed_copy_is_recognised_at_once(simulator, pool, database_url) -> None:
    """A copy killed with SIGKILL leaves its run 'running'; the next copy on the same host sees
    its process is gone, closes that run 'interrupted' and runs (no wait for the lease)."""
    names = ",".join(f"U{c}" for c in "ABCDEF")
    async with simulator(
        underlyings=tuple(names.split(",")), contracts_per_underlying=2000, latency=0.5
    ) as api:
        env = job_env(database_url, api.base_url, names)
        child = await asyncio.create_subprocess_exec(
            str(BIN / "ingest_options"), env=env, stderr=asyncio.subprocess.DEVNULL
        )
        await wait_for_value(pool, "SELECT count(*) FROM ingest_runs")
        await asyncio.sleep(0.3)
        child.send_signal(signal.SIGKILL)
        assert await child.wait() == -signal.SIGKILL
        assert await runs(pool) == [(1, "options", "running", child.pid)]
        settings_env = job_env(database_url, api.base_url, names)
        second = await asyncio.create_subprocess_exec(
            str(BIN / "ingest_options"), env=settings_env, stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await asyncio.wait_for(second.communicate(), 60)
    assert second.returncode == ExitCode.OK, stderr.decode()
    rows = await pool.fetch("SELECT status, error FROM ingest_runs ORDER BY id")
    assert [r["status"] for r in rows] == ["interrupted", "succeeded"]
    assert f"its process {child.pid} is gone" in rows[0]["error"]


async def test_a_silent_run_elsewhere_is_taken_over_after_its_lease(
    simulator, pool, make_settings
) -> None:
    """A run on another host whose heartbeat is older than the lease is dead; a younger one is
    alive and the new copy exits 4."""
    await pool.execute(
        "INSERT INTO ingest_runs (job, started_at, heartbeat_at, host, pid) "
        "VALUES ('options', now() - interval '5 min', now() - interval '20 s', 'elsewhere', 1)"
    )
    async with simulator(underlyings=("AAA",), contracts_per_underlying=10) as api:
        settings = make_settings(api.base_url, ("AAA",))
        with pytest.raises(AlreadyRunningError, match="process 1 on elsewhere"):
            await run_options_job(settings)
        await pool.execute("UPDATE ingest_runs SET heartbeat_at = now() - interval '2 min'")
        assert await run_options_job(settings) == ExitCode.OK
    rows = await pool.fetch("SELECT status, error FROM ingest_runs ORDER BY id")
    assert [r["status"] for r in rows] == ["interrupted", "succeeded"]
    assert "no heartbeat for 120 s" in rows[0]["error"]


async def test_a_run_whose_lease_was_taken_stops_and_commits_nothing_more(
    simulator, pool, make_settings
) -> None:
    """When another copy closes a run as dead, the run notices (at its next heartbeat or
    commit), stops with LeaseLostError, and no chain is committed after that moment."""
    names = tuple(f"U{c}" for c in "ABCDEFGH")
    async with simulator(underlyings=names, contracts_per_underlying=1500, latency=0.05) as api:
        settings = make_settings(api.base_url, names, http_concurrency=2)

        async def take_over() -> None:
            await wait_for_value(
                pool, "SELECT count(*) FROM snapshot_coverage WHERE committed_at IS NOT NULL"
            )
            await pool.execute(
                "UPDATE ingest_runs SET status = 'interrupted', finished_at = now(), "
                "error = 'taken over' WHERE status = 'running'"
            )

        taker = asyncio.create_task(take_over())
        with pytest.raises(LeaseLostError):
            await asyncio.wait_for(run_snapshots_job(settings, force=True), 60)
        await taker
        closed_at = await pool.fetchval("SELECT finished_at FROM ingest_runs")
    late = await pool.fetchval(
        "SELECT count(*) FROM snapshot_coverage WHERE committed_at > $1", closed_at
    )
    assert late == 0
    row = await pool.fetchrow("SELECT status, error FROM ingest_runs")
    assert (row["status"], row["error"]) == ("interrupted", "taken over")


async def test_jobs_survive_idle_session_timeout(
    simulator, pool, database_url: str, make_settings
) -> None:
    """With idle_session_timeout = 1 s on the database, sessions idle in the pool are closed
    under the jobs; they reconnect and both jobs succeed, runs recorded."""
    name = database_url.rsplit("/", 1)[1]
    await pool.execute(f"ALTER DATABASE \"{name}\" SET idle_session_timeout = '1s'")
    await pool.expire_connections()
    async with simulator(
        underlyings=("AAA", "BBB"), contracts_per_underlying=600, latency=0.6
    ) as api:
        settings = make_settings(api.base_url, ("AAA", "BBB"), underlying_concurrency=1)
        assert await run_options_job(settings) == ExitCode.OK
        assert await run_snapshots_job(settings, force=True) == ExitCode.OK
    assert [r[2] for r in await runs(pool)] == ["succeeded", "succeeded"]
    assert await pool.fetchval("SELECT bool_and(complete) FROM snapshot_coverage")


async def test_cli_names_the_real_cause_when_the_database_goes_away(
    simulator, pool, database_url: str
) -> None:
    """The process says the database went away (the first error, not "released back to the
    pool"), exits 1, prints no asyncio "never retrieved" tracebacks, and records its run once
    the database is back (within DB_RECONNECT_SECONDS of its going away)."""
    names = ",".join(f"U{c}" for c in "ABCDEF")
    async with simulator(
        underlyings=tuple(names.split(",")), contracts_per_underlying=3000, latency=0.02
    ) as api:
        env = job_env(database_url, api.base_url, names, DB_RECONNECT_SECONDS="5")
        child = await asyncio.create_subprocess_exec(
            str(BIN / "ingest_snapshots"),
            "--force",
            "--log-format",
            "text",
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        await wait_for_value(pool, "SELECT count(*) FROM ingest_runs")
        outage = asyncio.create_task(black_out(database_url, after=0.3, seconds=3.0))
        _, stderr = await asyncio.wait_for(child.communicate(), 60)
        await outage
    log = stderr.decode()
    assert child.returncode == ExitCode.FAILED, log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, log
    assert "connection was lost" in errors[0] or "not currently accepting" in errors[0]
    for noise in ("never retrieved", "released back to the pool", "Traceback"):
        assert noise not in log
    assert (await pool.fetchval("SELECT status FROM ingest_runs")) == "failed"


async def test_a_live_run_refuses_a_second_copy_even_without_its_lock_holder(
    simulator, pool, make_settings
) -> None:
    """Ending the backend that last renewed the lease changes nothing: the run is alive, its
    lease stands, a second copy exits 4."""
    live = await open_run(pool, "snapshots")
    await pool.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    async with simulator(underlyings=("AAA",), contracts_per_underlying=10) as api:
        with pytest.raises(AlreadyRunningError):
            await run_snapshots_job(make_settings(api.base_url, ("AAA",)), force=True)
    assert await runs(pool) == [(live.id, "snapshots", "running", os.getpid())]


async def test_a_take_over_ends_the_sessions_of_a_frozen_holder(
    simulator, pool, database_url: str, make_settings
) -> None:
    """A copy frozen mid-commit (its transaction open, holding its run's row) whose lease has
    run out is fenced: the copy that takes over ends that copy's sessions, waits until they
    are gone and runs; the frozen transaction commits nothing."""
    frozen_pool = await create_pool(database_url, max_size=2, application_name="ingest_snapshots")
    conn = await frozen_pool.acquire()
    try:
        frozen = await open_run(frozen_pool, "snapshots")
        await pool.execute("UPDATE ingest_runs SET heartbeat_at = now() - interval '2 min'")
        commit = conn.transaction()
        await commit.start()
        await count_committed(conn, frozen, {"rows_written": 7})  # the run's row is locked now
        async with simulator(underlyings=("AAA",), contracts_per_underlying=10) as api:
            settings = make_settings(api.base_url, ("AAA",), db_lock_timeout=2.0)
            code = await asyncio.wait_for(run_snapshots_job(settings, force=True), 60)
        assert code == ExitCode.OK
        with pytest.raises(DB_ERRORS):
            await commit.commit()  # its session was ended: nothing of it is committed
    finally:
        frozen_pool.terminate()
    rows = await pool.fetch("SELECT status, rows_written, error FROM ingest_runs ORDER BY id")
    assert [(r["status"], r["rows_written"]) for r in rows[:1]] == [("interrupted", 0)]
    assert [r["status"] for r in rows[1:]] == ["succeeded"]
    assert "no heartbeat for 120 s" in rows[0]["error"]


async def test_a_holders_own_lease_decides_when_it_is_dead(simulator, pool, make_settings) -> None:
    """A run is judged by the lease it recorded (RUN_LEASE_SECONDS of its own process), not by
    the lease of the copy that looks: a long lease silent for less than it is alive, a short
    one silent for longer is dead."""
    await pool.execute(
        "INSERT INTO ingest_runs (job, started_at, heartbeat_at, host, pid, lease_seconds) "
        "VALUES ('options', now() - interval '5 min', now() - interval '90 s', 'elsewhere', 1, "
        "300)"
    )
    async with simulator(underlyings=("AAA",), contracts_per_underlying=10) as api:
        settings = make_settings(api.base_url, ("AAA",))
        with pytest.raises(AlreadyRunningError, match="process 1 on elsewhere"):
            await run_options_job(settings)
        await pool.execute(
            "UPDATE ingest_runs SET lease_seconds = 5, heartbeat_at = now() - interval '8 s'"
        )
        assert await run_options_job(settings) == ExitCode.OK
    rows = await pool.fetch("SELECT status, error FROM ingest_runs ORDER BY id")
    assert [r["status"] for r in rows] == ["interrupted", "succeeded"]
    assert "(the lease is 5 s)" in rows[0]["error"]


RECONNECT_SECONDS = 5


async def test_a_job_gives_up_within_db_reconnect_seconds(
    simulator, pool, db_proxy: DatabaseProxy
) -> None:
    """With DB_RECONNECT_SECONDS=5, a job whose database goes away for good (connections
    reset, new ones refused) exits 1 within the setting and a little more (its final status
    is tried briefly), not the setting plus tens of seconds."""
    names = ",".join(f"U{c}" for c in "ABCDEF")
    async with simulator(
        underlyings=tuple(names.split(",")), contracts_per_underlying=3000, latency=0.1
    ) as api:
        env = job_env(
            db_proxy.url, api.base_url, names, DB_RECONNECT_SECONDS=str(RECONNECT_SECONDS)
        )
        child = await asyncio.create_subprocess_exec(
            str(BIN / "ingest_snapshots"),
            "--force",
            "--log-format",
            "text",
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        await wait_for_value(pool, "SELECT count(*) FROM ingest_runs")
        await asyncio.sleep(0.3)
        await db_proxy.cut()
        cut = time.monotonic()
        _, stderr = await asyncio.wait_for(child.communicate(), 90)
        took = time.monotonic() - cut
    print(f"gave up {took:.2f} s after the database went away (DB_RECONNECT_SECONDS=5)")
    log = stderr.decode()
    assert child.returncode == ExitCode.FAILED, log
    assert took < RECONNECT_SECONDS + 5, f"gave up after {took:.1f} s:\n{log}"


@pytest.mark.parametrize("job", ["snapshots", "options"])
async def test_the_error_line_says_what_was_being_done(
    job: str, simulator, pool, db_proxy: DatabaseProxy
) -> None:
    """The error line of a job whose database goes away says, in words, what the job was
    doing ("storing the chains of UA: the database connection was lost ..."), never the
    name of a Python function."""
    names = ",".join(f"U{c}" for c in "ABCDEF")
    async with simulator(
        underlyings=tuple(names.split(",")), contracts_per_underlying=3000, latency=0.05
    ) as api:
        env = job_env(db_proxy.url, api.base_url, names, DB_RECONNECT_SECONDS="1")
        args = ("--force",) if job == "snapshots" else ()
        child = await asyncio.create_subprocess_exec(
            str(BIN / f"ingest_{job}"),
            *args,
            "--log-format",
            "text",
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        await wait_for_value(pool, "SELECT count(*) FROM ingest_runs")
        await asyncio.sleep(0.3)
        await db_proxy.cut()
        await asyncio.sleep(4.0)  # longer than the job waits; then the final status may land
        await db_proxy.start()
        _, stderr = await asyncio.wait_for(child.communicate(), 90)
    log = stderr.decode()
    assert child.returncode == ExitCode.FAILED, log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, log
    print(errors[0])
    assert not re.search(r"(?<![\w.])_[A-Za-z]\w*", errors[0]), errors[0]
    assert re.match(r"error: [a-z]+ing\b", errors[0]), errors[0]
    assert "the database connection was lost" in errors[0], errors[0]
