"""The demo: the jobs against the built-in simulator, into the demo's own PostgreSQL.

It runs the real console scripts as child processes, exactly as a timer would, then prints what
landed. It writes only into a database meant for it: its own local PostgreSQL, kept in a data
directory (so a second demo adds to the first one's history), or a database given to it
explicitly (``ingest_admin demo --database-url URL``). ``DATABASE_URL`` is never used, and the
jobs it runs read no ``.env`` (``--env-file /dev/null``) and inherit none of the project's
variables from the caller's environment: only the demo's own settings decide what they do.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from options.config import NO_ENV_FILE, Secret, is_known_name, redact_url
from options.dev.localdb import LocalPostgres, start_local_postgres
from options.simulator import SimulatorConfig, SimulatorProcess, make_universe_names

DEMO_UNDERLYINGS = (*make_universe_names(4), "I:SPX")
DEMO_CONTRACTS_PER_UNDERLYING = 2000
SIMULATOR_KEY = "demo-key"


def run_demo(
    *, data_dir: Path, database_url: Secret | None = None, environ: Mapping[str, str]
) -> int:
    """Run the demo and return the exit code of the first job that failed, else 0.

    Args:
        data_dir: where the demo's own PostgreSQL keeps its data (when ``database_url`` is
            ``None``).
        database_url: a database given to the demo explicitly, instead of its own.
        environ: the caller's environment; the jobs get it less every variable the project
            knows (settings, ``PG*``, ``OTEL_*``), plus the demo's settings.

    Raises:
        LocalPostgresError: the demo's own PostgreSQL could not be started.
    """
    if "DATABASE_URL" in environ or Path(".env").is_file():
        print("(the demo never uses DATABASE_URL or ./.env: it has a database of its own)")
    server: LocalPostgres | None = None
    if database_url is None:
        print(f"Starting the demo's own PostgreSQL in {data_dir} (--database-url for another)")
        server = start_local_postgres(data_dir.resolve())
        dsn = server.url
        target = f"the demo's own PostgreSQL ({redact_url(dsn)}, data in {data_dir})"
    else:
        dsn = database_url.get()
        target = f"{redact_url(dsn)} (given with --database-url)"
    print(f"The demo writes into {target}")
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
            env = job_environment(environ, dsn=dsn, base_url=simulator.base_url)
            code = _run_job("ingest_options", env)
            if code:
                return code
            # --force: the demo runs at any hour; the timer's runs respect market hours
            code = _run_job("ingest_snapshots", env, "--force")
            if code:
                return code
        asyncio.run(_print_summary(dsn))
        print(f"\nAll of the above is in {target}.")
        return 0
    finally:
        if server is not None:
            server.stop()


def job_environment(environ: Mapping[str, str], *, dsn: str, base_url: str) -> dict[str, str]:
    """The environment of the demo's jobs: the caller's, less every variable the project knows
    (so an exported UNDERLYINGS or CONTRACT_TYPES changes nothing), plus the demo's settings."""
    return {
        **{name: value for name, value in environ.items() if not is_known_name(name)},
        "DATABASE_URL": dsn,
        "POLYGON_BASE_URL": base_url,
        "POLYGON_API_KEY": SIMULATOR_KEY,
        "UNDERLYINGS": ",".join(DEMO_UNDERLYINGS),
        "POLYGON_RATE_LIMIT": "off",
        "LOG_LEVEL": "WARNING",
    }


def _run_job(name: str, env: dict[str, str], *args: str) -> int:
    executable = Path(sys.executable).parent / name
    # no .env: whatever file the working directory holds, the demo's settings are all there is
    argv = (name, "--env-file", str(NO_ENV_FILE), *args)
    print(f"\n$ {' '.join(argv)}")
    completed = subprocess.run([str(executable), *argv[1:]], env=env, check=False)
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
