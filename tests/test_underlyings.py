"""The tracked underlyings: mirrored from UNDERLYINGS, managed with ingest_admin underlyings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from options.errors import ConfigError, ExitCode
from options.jobs.wiring import run_options_job, run_snapshots_job
from options.store.underlyings import (
    add_tracked,
    list_tracked,
    set_tracked_enabled,
    sync_configured,
)

BIN = Path(sys.executable).parent


async def tracked(pool: asyncpg.Pool) -> list[tuple[object, ...]]:
    rows = await pool.fetch(
        "SELECT ticker, enabled, origin, disabled_by FROM tracked_underlyings ORDER BY ticker"
    )
    return [tuple(r) for r in rows]


async def test_underlyings_setting_is_mirrored(pool: asyncpg.Pool) -> None:
    """Tickers named in UNDERLYINGS are added; one left out is disabled, and named again is
    enabled again; an operator's own tickers and decisions are left alone."""
    assert await sync_configured(pool, ("AAA", "BBB")) == ["AAA", "BBB"]
    await add_tracked(pool, "CCC")
    await set_tracked_enabled(pool, "BBB", enabled=False)
    assert await sync_configured(pool, ("BBB", "DDD")) == ["CCC", "DDD"]
    assert await tracked(pool) == [
        ("AAA", False, "UNDERLYINGS", "UNDERLYINGS"),
        ("BBB", False, "UNDERLYINGS", "admin"),  # disabled by hand: stays disabled
        ("CCC", True, "admin", None),
        ("DDD", True, "UNDERLYINGS", None),
    ]
    assert await sync_configured(pool, ("AAA", "BBB", "DDD")) == ["AAA", "CCC", "DDD"]


async def test_empty_underlyings_setting_changes_nothing(pool: asyncpg.Pool) -> None:
    """A shell without UNDERLYINGS must not untrack everything."""
    await sync_configured(pool, ("AAA",))
    assert await sync_configured(pool, ()) == ["AAA"]


async def test_index_and_stock_spelling_is_one_underlying(pool: asyncpg.Pool) -> None:
    """SPX becoming I:SPX in UNDERLYINGS renames the row; adding SPX by hand next to I:SPX is
    refused, naming both."""
    await sync_configured(pool, ("SPX",))
    assert await sync_configured(pool, ("I:SPX",)) == ["I:SPX"]
    with pytest.raises(ConfigError, match="I:SPX is tracked already, the same underlying as SPX"):
        await add_tracked(pool, "SPX")
    with pytest.raises(ConfigError, match="ZZZ is not a tracked underlying"):
        await set_tracked_enabled(pool, "ZZZ", enabled=False)


async def test_disabled_underlying_is_neither_synced_nor_snapshotted(
    simulator, pool, make_settings
) -> None:
    """A disabled underlying gets no contract sync and no snapshot; the others do."""
    async with simulator(underlyings=("AAA", "BBB"), contracts_per_underlying=20) as api:
        settings = make_settings(api.base_url, ("AAA", "BBB"))
        await sync_configured(pool, ("AAA", "BBB"))
        await set_tracked_enabled(pool, "BBB", enabled=False)
        assert await run_options_job(settings) == ExitCode.OK
        assert await run_snapshots_job(settings, force=True) == ExitCode.OK
    per_underlying = await pool.fetch(
        "SELECT underlying_ticker, count(*) FROM option_contracts GROUP BY 1 ORDER BY 1"
    )
    assert [tuple(r) for r in per_underlying] == [("AAA", 20)]
    assert [r[0] for r in await pool.fetch("SELECT underlying_ticker FROM snapshot_coverage")] == [
        "AAA"
    ]
    rows = {row.ticker: row for row in await list_tracked(pool)}
    assert rows["AAA"].last_contract_sync_at is not None
    assert rows["AAA"].last_complete_snapshot_at is not None
    assert rows["BBB"].last_contract_sync_at is None


def admin(database_url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "UNDERLYINGS"}
    return subprocess.run(
        [str(BIN / "ingest_admin"), "underlyings", *args],
        env={**env, "DATABASE_URL": database_url},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_admin_commands(database_url: str, tmp_path: Path) -> None:
    """ingest_admin underlyings add, disable, enable and list, with one-line errors."""
    assert admin(database_url, "list", cwd=tmp_path).stdout.startswith("no underlyings")
    added = admin(database_url, "add", "AAPL", "I:SPX", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines() == [
        "AAPL is tracked from now on",
        "I:SPX is tracked from now on",
    ]
    disabled = admin(database_url, "disable", "AAPL", cwd=tmp_path)
    assert disabled.stdout.strip() == "AAPL disabled: no more contract syncs or snapshots"
    listing = admin(database_url, "list", cwd=tmp_path).stdout.splitlines()
    assert listing[0].split()[:3] == ["ticker", "status", "origin"]
    assert [line.split()[:3] for line in listing[1:]] == [
        ["I:SPX", "enabled", "admin"],
        ["AAPL", "disabled", "(admin)"],
    ]
    unknown = admin(database_url, "enable", "MSFT", cwd=tmp_path)
    assert unknown.returncode == ExitCode.USAGE
    assert unknown.stderr.strip().splitlines() == [
        "error: MSFT is not a tracked underlying: see `ingest_admin underlyings list`, or "
        "`ingest_admin underlyings add MSFT`"
    ]
    bad = admin(database_url, "add", "../x", cwd=tmp_path)
    assert bad.returncode == ExitCode.USAGE
    assert len(bad.stderr.strip().splitlines()) == 1
