"""Benchmark ``ingest_options`` end to end against the simulator.

Runs the real console script as a child process (so the figures include start-up, migrations and
the run ledger) on simulated universes of different sizes, twice each (a first sync that inserts,
then a re-sync that updates every row), and prints contracts/s, API requests and the job's peak
memory. Uses BENCH_DATABASE_URL when set (a database it may drop tables in), else a throwaway
local PostgreSQL.

    .venv/bin/python benchmarks/bench_contracts.py [--sizes 100x1000,1000x1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import asyncpg

from options.localdb import start_local_postgres
from options.simulator import SimulatorConfig, SimulatorProcess, make_universe_names

BIN = Path(sys.executable).parent
KEY = "bench-key"


def run_job(env: dict[str, str]) -> tuple[float, int, int]:
    """Run ingest_options; return (wall seconds, exit code, peak RSS in MB)."""
    started = time.perf_counter()
    child = subprocess.Popen([str(BIN / "ingest_options")], env=env, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, child.returncode, usage.ru_maxrss // 1024


def api_requests(base_url: str) -> int:
    with urllib.request.urlopen(f"{base_url}/_sim/stats") as response:
        return int(json.load(response)["requests"])


async def reset_schema(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS option_contracts, ingest_runs, schema_migrations CASCADE"
        )
    finally:
        await conn.close()


async def stored_contracts(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM option_contracts WHERE active"))
    finally:
        await conn.close()


def bench(dsn: str, underlyings: int, contracts: int) -> None:
    names = make_universe_names(underlyings)
    config = SimulatorConfig(underlyings=names, contracts_per_underlying=contracts, api_key=KEY)
    asyncio.run(reset_schema(dsn))
    with SimulatorProcess(config) as simulator:
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "POLYGON_BASE_URL": simulator.base_url,
            "POLYGON_API_KEY": KEY,
            "UNDERLYINGS": ",".join(names),
            "POLYGON_RATE_LIMIT": "off",
            "LOG_LEVEL": "WARNING",
        }
        for label in ("first sync", "re-sync"):
            before = api_requests(simulator.base_url)
            seconds, code, peak_mb = run_job(env)
            requests = api_requests(simulator.base_url) - before
            stored = asyncio.run(stored_contracts(dsn))
            print(
                f"{underlyings:>5} x {contracts:<5} {label:<10} exit {code}  "
                f"{stored:>9,} contracts in {seconds:6.2f} s = "
                f"{stored / seconds:>9,.0f} contracts/s  "
                f"{requests:>6,} API requests  peak RSS {peak_mb} MB",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="100x1000,1000x1000",
        help="comma-separated UNDERLYINGSxCONTRACTS (default: %(default)s)",
    )
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")]
    dsn = os.environ.get("BENCH_DATABASE_URL")
    server = None
    if not dsn:
        server = start_local_postgres(Path(tempfile.mkdtemp(prefix="bench-pg-")) / "data")
        dsn = server.url
    print(f"ingest_options benchmark on {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    try:
        for underlyings, contracts in sizes:
            bench(dsn, underlyings, contracts)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
