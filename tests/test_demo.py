"""The demo writes only into a database meant for it, and nothing of the user's settings
changes what its jobs do."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg

from options.config import redact_url
from options.dev.demo import DEMO_CONTRACTS_PER_UNDERLYING, DEMO_UNDERLYINGS

BIN = Path(sys.executable).parent
# What a user's clone may hold: their own database, their own tickers and filters.
USER_ENV_FILE = "UNDERLYINGS=AAPL,SPY\nCONTRACT_TYPES=call\nMAX_DAYS_TO_EXPIRATION=7\n"


async def run_demo(*args: str, cwd: Path, user_database: str) -> subprocess.CompletedProcess[str]:
    """``ingest_admin demo`` in ``cwd`` (which holds a user's .env naming ``user_database``),
    with the user's DATABASE_URL and a filter exported too."""
    (cwd / ".env").write_text(f"DATABASE_URL={user_database}\n{USER_ENV_FILE}", encoding="utf-8")
    env = {**os.environ, "DATABASE_URL": user_database, "CONTRACT_TYPES": "put"}
    return await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "ingest_admin"), "demo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )


async def contracts_by_underlying(url: str) -> dict[str, tuple[int, int]]:
    """Calls and puts stored per underlying."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT underlying_ticker, count(*) FILTER (WHERE contract_type = 'call') AS calls,"
            " count(*) FILTER (WHERE contract_type = 'put') AS puts"
            " FROM option_contracts GROUP BY 1"
        )
    finally:
        await conn.close()
    return {row[0]: (row[1], row[2]) for row in rows}


async def test_demo_uses_its_own_database_not_database_url(
    database_url: str, tmp_path: Path
) -> None:
    """With DATABASE_URL in the environment and in ./.env, the demo writes into its own local
    PostgreSQL, says so, and the user's database stays empty."""
    result = await run_demo(
        "--data-dir", str(tmp_path / "pgdata"), cwd=tmp_path, user_database=database_url
    )
    assert result.returncode == 0, result.stderr
    assert "The demo writes into the demo's own PostgreSQL (postgresql://127.0.0.1:" in (
        result.stdout
    )
    assert f"data in {tmp_path / 'pgdata'}" in result.stdout
    assert redact_url(database_url) not in result.stdout
    assert "$ ingest_options --env-file /dev/null" in result.stdout
    assert await contracts_by_underlying(database_url) == {}
    # every demo underlying, calls and puts, whatever CONTRACT_TYPES the user set
    for name in DEMO_UNDERLYINGS:
        row = next(
            line
            for line in result.stdout.splitlines()
            if line.split()[:1] == [name.removeprefix("I:")]
        )
        assert row.split()[1] == str(DEMO_CONTRACTS_PER_UNDERLYING), row


async def test_demo_writes_into_a_database_given_to_it(database_url: str, tmp_path: Path) -> None:
    """--database-url is the one way to point the demo at another database; its jobs still read
    no .env and none of the user's exported settings."""
    result = await run_demo(
        "--database-url", database_url, cwd=tmp_path, user_database=database_url
    )
    assert result.returncode == 0, result.stderr
    assert f"The demo writes into {redact_url(database_url)} (given with --database-url)" in (
        result.stdout
    )
    assert not (tmp_path / ".local").exists()  # no local server was started
    half = DEMO_CONTRACTS_PER_UNDERLYING // 2
    expected = {name.removeprefix("I:"): (half, half) for name in DEMO_UNDERLYINGS}
    assert await contracts_by_underlying(database_url) == expected


def test_demo_refuses_a_data_dir_with_a_database_url(tmp_path: Path) -> None:
    """--data-dir (the demo's own database) with --database-url (another one) is refused in
    one line, before anything starts."""
    result = subprocess.run(
        [
            str(BIN / "ingest_admin"),
            "demo",
            *("--data-dir", str(tmp_path / "pg")),
            *("--database-url", "postgresql://demo@127.0.0.1:1/demo"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: --data-dir is where the demo's own database lives: it does not go with "
        "--database-url\n"
    )
    assert list(tmp_path.iterdir()) == []
