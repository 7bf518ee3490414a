"""What the benchmark scripts share: a database to write to, the jobs as child processes,
the simulator's request counter."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg

from options.dev.localdb import start_local_postgres

BIN = Path(sys.executable).parent
KEY = "bench-key"
EMPTY_DIR = tempfile.mkdtemp(prefix="bench-cwd-")


@contextmanager
def benchmark_database() -> Iterator[str]:
    """BENCH_DATABASE_URL when set (a database whose public schema the benchmark may drop),
    else a throwaway local PostgreSQL."""
    dsn = os.environ.get("BENCH_DATABASE_URL")
    if dsn:
        yield dsn
        return
    server = start_local_postgres(Path(tempfile.mkdtemp(prefix="bench-pg-")) / "data")
    try:
        yield server.url
    finally:
        server.stop()


def reset_database(dsn: str) -> None:
    """Drop everything in the database's public schema (the jobs migrate it afresh)."""

    async def reset() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        finally:
            await conn.close()

    asyncio.run(reset())


def job_env(dsn: str, base_url: str, underlyings: tuple[str, ...]) -> dict[str, str]:
    """The environment of a job run against the simulator, with no client-side rate limit."""
    return {
        **os.environ,
        "DATABASE_URL": dsn,
        "POLYGON_BASE_URL": base_url,
        "POLYGON_API_KEY": KEY,
        "UNDERLYINGS": ",".join(underlyings),
        "POLYGON_RATE_LIMIT": "off",
        "LOG_LEVEL": "WARNING",
    }


def run_child(script: str, env: dict[str, str], *args: str) -> tuple[float, int, int]:
    """Run a console script; return (wall seconds, exit code, its peak RSS in MB).

    It runs in an empty directory, so a ``.env`` where the benchmark was started is not read.
    """
    started = time.perf_counter()
    child = subprocess.Popen(
        [str(BIN / script), *args], env=env, stderr=subprocess.DEVNULL, cwd=EMPTY_DIR
    )
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - started
    return elapsed, os.waitstatus_to_exitcode(status), usage.ru_maxrss // 1024


def api_requests(base_url: str) -> int:
    """How many API requests the simulator has answered so far."""
    with urllib.request.urlopen(f"{base_url}/_sim/stats") as response:
        return int(json.load(response)["requests"])


async def fetch_value(dsn: str, query: str) -> Any:
    """One value of one query, on a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def header(job: str) -> str:
    """The first line of a benchmark's output: what ran where."""
    return f"{job} benchmark on {os.cpu_count()} cores, Python {sys.version.split()[0]}"
