"""The demo: the jobs against the built-in simulator, into a local or configured PostgreSQL.

It runs the real console scripts as child processes, exactly as a timer would, then prints what
landed. With no ``DATABASE_URL`` it starts (and afterwards stops) a local PostgreSQL kept in a
data directory, so a second demo adds to the first one's history.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from options.config import Settings
from options.dev.localdb import LocalPostgres, start_local_postgres
from options.simulator import SimulatorConfig, SimulatorProcess, make_universe_names

DEMO_UNDERLYINGS = (*make_universe_names(4), "I:SPX")
DEMO_CONTRACTS_PER_UNDERLYING = 2000
SIMULATOR_KEY = "demo-key"


def run_demo(settings: Settings, *, data_dir: Path) -> int:
    """Run the demo and return the exit code of the first job that failed, else 0."""
    server: LocalPostgres | None = None
    if settings.database_url is None:
        print(f"Starting a local PostgreSQL in {data_dir} (DATABASE_URL is not set)")
        server = start_local_postgres(data_dir.resolve())
        dsn = server.url
    else:
        dsn = settings.require_database_url()
        print(f"Using DATABASE_URL ({settings.database_location()})")
    try:
        config = SimulatorConfig(
            underlyings=DEMO_UNDERLYINGS,
            contracts_per_underlying=DEMO_CONTRACTS_PER_UNDERLYING,
            api_key=SIMULATOR_KEY,
        )
        with SimulatorProcess(config) as simulator:
            print(
                f"Simulated Polygon API at {simulator.base_url}: "
                f"{len(DEMO_UNDERLYINGS)} underlyings x {DEMO_CONTRACTS_PER_UNDERLYING} contracts"
            )
            env = {
                **os.environ,
                "DATABASE_URL": dsn,
                "POLYGON_BASE_URL": simulator.base_url,
                "POLYGON_API_KEY": SIMULATOR_KEY,
                "UNDERLYINGS": ",".join(DEMO_UNDERLYINGS),
                "POLYGON_RATE_LIMIT": "off",
                "LOG_LEVEL": "WARNING",
            }
            code = _run_job("ingest_options", env)
            if code:
                return code
            # --force: the demo runs at any hour; the timer's runs respect market hours
            code = _run_job("ingest_snapshots", env, "--force")
            if code:
                return code
        asyncio.run(_print_summary(dsn))
        return 0
    finally:
        if server is not None:
            server.stop()


def _run_job(name: str, env: dict[str, str], *args: str) -> int:
    executable = Path(sys.executable).parent / name
    print(f"\n$ {' '.join((name, *args))}")
    completed = subprocess.run([str(executable), *args], env=env, check=False)
    if completed.returncode:
        print(f"{name} exited {completed.returncode}", file=sys.stderr)
    return completed.returncode


async def _print_summary(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        print("\nContracts per underlying (option_contracts):")
        _print_table(
            await conn.fetch(
                """
            SELECT underlying_ticker, count(*) FILTER (WHERE active) AS active,
                   count(*) FILTER (WHERE NOT active) AS inactive,
                   min(expiration_date) AS first_expiration, max(expiration_date) AS last_expiration
            FROM option_contracts GROUP BY underlying_ticker ORDER BY underlying_ticker
            """
            )
        )
        print("\nA few contracts:")
        _print_table(
            await conn.fetch(
                """
            SELECT ticker, contract_type, exercise_style, expiration_date, strike_price,
                   shares_per_contract, last_seen_at
            FROM option_contracts ORDER BY ticker LIMIT 5
            """
            )
        )
        print("\nA few snapshots of the latest run (option_snapshots):")
        _print_table(
            await conn.fetch(
                """
                SELECT ticker, bid, ask, last_price, round(implied_volatility::numeric, 4) AS iv,
                       round(delta::numeric, 4) AS delta, open_interest, underlying_price,
                       captured_at
                FROM option_snapshots
                WHERE captured_at = (SELECT max(captured_at) FROM option_snapshots)
                ORDER BY delta IS NULL, ticker LIMIT 6
                """
            )
        )
        print("\nCoverage of the latest snapshot (snapshot_coverage):")
        _print_table(
            await conn.fetch(
                """
                SELECT underlying_ticker, contracts_active, snapshots_stored, contracts_missing,
                       complete, pages
                FROM snapshot_coverage
                WHERE captured_at = (SELECT max(captured_at) FROM snapshot_coverage)
                ORDER BY underlying_ticker
                """
            )
        )
        print("\nLatest runs (ingest_runs):")
        _print_table(
            await conn.fetch(
                """
            SELECT id, job, status, underlyings_succeeded AS ok, underlyings_failed AS failed,
                   rows_written, contracts_deactivated AS deactivated, api_requests,
                   round(extract(epoch FROM finished_at - started_at)::numeric, 2) AS seconds
            FROM ingest_runs ORDER BY id DESC LIMIT 5
            """
            )
        )
    finally:
        await conn.close()


def _print_table(rows: Sequence[asyncpg.Record]) -> None:
    if not rows:
        print("  (none)")
        return
    headers = list(rows[0].keys())
    cells = [[_cell(value) for value in row.values()] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    for line in [headers, *cells]:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if hasattr(value, "isoformat") and hasattr(value, "hour"):
        return value.isoformat(sep=" ", timespec="seconds")
    return str(value)
