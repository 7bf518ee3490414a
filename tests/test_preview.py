"""--dry-run: both jobs read from the API and show what they would store, writing nothing."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import asyncpg

from options.errors import ExitCode
from tests.conftest import SIM_KEY

BIN = Path(sys.executable).parent


async def dry_run(job: str, base_url: str, database_url: str, *args: str) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "POLYGON_BASE_URL": base_url,
        "POLYGON_API_KEY": SIM_KEY,
        "POLYGON_RATE_LIMIT": "off",
        "UNDERLYINGS": "AAA,BBB",
    }
    child = await asyncio.create_subprocess_exec(
        str(BIN / job),
        "--dry-run",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def tables(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT relname, n_tup_ins FROM pg_stat_user_tables ORDER BY relname")
    return {r[0]: r[1] for r in rows}


async def test_snapshot_dry_run_shows_rows_and_stores_nothing(
    simulator, pool, database_url: str
) -> None:
    """ingest_snapshots --dry-run --output json prints the rows it would store (at most
    --limit), counts per underlying on stderr, exits 0 and writes no row anywhere."""
    before = await tables(pool)
    async with simulator(underlyings=("AAA", "BBB"), contracts_per_underlying=300) as api:
        code, out, err = await dry_run(
            "ingest_snapshots",
            api.base_url,
            database_url,
            "-u",
            "AAA",
            "--output",
            "json",
            "--limit",
            "7",
        )
    assert code == ExitCode.OK, err
    rows = json.loads(out)
    assert len(rows) == 7
    assert all(r["underlying_ticker"] == "AAA" and r["ticker"].startswith("O:AAA") for r in rows)
    assert {"bid", "ask", "delta", "open_interest", "quote_updated_at"} <= rows[0].keys()
    assert "AAA: 300 rows would be stored" in err
    assert await tables(pool) == before
    assert await pool.fetchval("SELECT count(*) FROM ingest_runs") == 0


async def test_dry_run_table_and_compact_output(simulator, database_url: str) -> None:
    """The table has a header and one line per row; compact is one line per contract."""
    async with simulator(underlyings=("AAA", "BBB"), contracts_per_underlying=50) as api:
        code, table, _ = await dry_run(
            "ingest_snapshots", api.base_url, database_url, "--limit", "3"
        )
        assert code == ExitCode.OK
        lines = table.splitlines()
        assert lines[0].split()[:4] == ["ticker", "bid", "ask", "last_price"]
        assert len(lines) == 4
        code, compact, err = await dry_run(
            "ingest_options", api.base_url, database_url, "--output", "compact", "--limit", "0"
        )
    assert code == ExitCode.OK
    assert len(compact.splitlines()) == 100
    assert all(line.startswith("O:") and "contract_type=" in line for line in compact.splitlines())
    assert "AAA: 50 rows would be stored" in err and "BBB: 50 rows would be stored" in err


async def test_dry_run_refuses_options_that_record_a_run(simulator, database_url: str) -> None:
    """--dry-run with --resume or --metrics-textfile is refused in one line (exit 2)."""
    async with simulator(underlyings=("AAA",), contracts_per_underlying=10) as api:
        code, _, err = await dry_run("ingest_snapshots", api.base_url, database_url, "--resume")
    assert code == ExitCode.USAGE
    assert err.strip().splitlines() == [
        "error: --dry-run stores nothing: it does not go with --resume"
    ]
