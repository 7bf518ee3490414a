"""``ingest_daily --from/--to``: past sessions from the listings and daily bars the simulator
serves; killed at random moments and resumed, bounded by a request budget, and idempotent."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from options.config import Settings
from options.errors import DatabaseError, ExitCode, RunInterrupted
from options.jobs.wiring import run_daily_job
from options.simulator import RunningSimulator, SimulatorConfig
from options.simulator.history import bars_of
from options.simulator.universe import Universe
from tests.conftest import SIM_KEY, black_out

UNDERLYINGS = ("AAA", "BBB", "CCC")
CONTRACTS = 40
SIM_TODAY = dt.date(2026, 11, 27)
FIRST, LAST = dt.date(2026, 11, 10), dt.date(2026, 11, 23)
SESSIONS = [
    FIRST + dt.timedelta(days=n)
    for n in range((LAST - FIRST).days + 1)
    if (FIRST + dt.timedelta(days=n)).weekday() < 5
]
BIN = Path(sys.executable).parent
KILLS = 12  # runs killed at random moments, at most, before one is left to finish


def expected_rows() -> dict[tuple[str, dt.date], dict[str, Any]]:
    """What the simulator serves: each session's listing, and each listed contract's bar."""
    config = SimulatorConfig(
        underlyings=UNDERLYINGS, contracts_per_underlying=CONTRACTS, api_key=SIM_KEY,
        as_of=SIM_TODAY,
    )  # fmt: skip
    universe = Universe(config, SIM_TODAY)
    rows = {}
    for name in UNDERLYINGS:
        for day in SESSIONS:
            chain = universe.chain(name, day)
            for ticker, expiration in zip(chain.tickers, chain.expirations, strict=True):
                if expiration < day.isoformat():
                    continue
                bars = bars_of(universe, ticker, day, day, config)
                if bars:
                    (bar,) = bars
                    rows[(ticker, day)] = {
                        "underlying_ticker": name, "day_open": bar["o"], "day_high": bar["h"],
                        "day_low": bar["l"], "day_close": bar["c"], "day_volume": bar["v"],
                        "day_vwap": bar["vw"], "day_trades": bar["n"], "bar_source": "bars",
                    }  # fmt: skip
    return rows


async def stored_rows(pool: asyncpg.Pool) -> dict[tuple[str, dt.date], dict[str, Any]]:
    return {
        (r["ticker"], r["session"]): {
            name: r[name]
            for name in (
                "underlying_ticker",
                "day_open",
                "day_high",
                "day_low",
                "day_close",
                "day_volume",
                "day_vwap",
                "day_trades",
                "bar_source",
            )
        }
        for r in await pool.fetch("SELECT * FROM contract_days")
    }


async def coverage(pool: asyncpg.Pool) -> dict[tuple[str, dt.date], str | None]:
    return {
        (r["underlying_ticker"], r["session"]): r["reason"]
        for r in await pool.fetch("SELECT * FROM daily_coverage WHERE source = 'bars'")
    }


async def test_a_backfill_killed_at_random_moments_resumes_to_the_same_rows(
    pool: asyncpg.Pool,
    database_url: str,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    rng = random.Random(5)
    async with simulator(
        underlyings=UNDERLYINGS,
        contracts_per_underlying=CONTRACTS,
        as_of=SIM_TODAY,
        latency=0.01,  # about 5 s of requests: time for kills to land
    ) as api:
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "POLYGON_BASE_URL": api.base_url,
            "POLYGON_API_KEY": SIM_KEY,
            "UNDERLYINGS": ",".join(UNDERLYINGS),
            "POLYGON_RATE_LIMIT": "off",
            "LOG_LEVEL": "WARNING",
        }
        argv = [str(BIN / "ingest_daily"), "--from", f"{FIRST}", "--to", f"{LAST}"]
        kills = 0
        for _ in range(KILLS):
            child = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=tmp_path, stderr=asyncio.subprocess.DEVNULL
            )
            try:
                code = await asyncio.wait_for(child.wait(), rng.uniform(0.6, 2.5))
            except TimeoutError:
                child.send_signal(signal.SIGKILL)
                await child.wait()
                kills += 1
                continue
            assert code == ExitCode.OK
            break
        else:
            # a slow machine (start-up alone can take the whole window): one last run, unkilled
            child = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=tmp_path, stderr=asyncio.subprocess.DEVNULL
            )
            assert await child.wait() == ExitCode.OK
        assert kills >= 1, "no kill landed mid-run: the test proves nothing"

        expected = expected_rows()
        assert await stored_rows(pool) == expected  # no duplicate (the key), none missing
        assert await coverage(pool) == {(u, d): None for u in UNDERLYINGS for d in SESSIONS}
        listed = await pool.fetchval("SELECT count(DISTINCT ticker) FROM listed_contracts")
        assert listed > len({t for t, _ in expected})  # some listed contracts had no trade

        # a second backfill changes nothing, and asks the API nothing
        before = await requests_served(api.base_url)
        settings = make_settings(api.base_url, UNDERLYINGS)
        code = await run_daily_job(settings, backfill_range=(FIRST, LAST), budget=100)
        assert code == ExitCode.OK
        assert await stored_rows(pool) == expected
        assert await requests_served(api.base_url) == before
        written = await pool.fetchval(
            "SELECT rows_written FROM ingest_runs WHERE job = 'daily' ORDER BY id DESC LIMIT 1"
        )
        assert written == 0


async def requests_served(base_url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/_sim/stats") as r:
        return int((await r.json())["requests"])


async def test_a_budget_stops_the_backfill_and_the_next_run_goes_on(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> None:
    async with simulator(
        underlyings=UNDERLYINGS[:1], contracts_per_underlying=CONTRACTS, as_of=SIM_TODAY
    ) as api:
        settings = make_settings(api.base_url, UNDERLYINGS[:1])
        with pytest.raises(RunInterrupted, match="request budget"):
            await run_daily_job(settings, backfill_range=(FIRST, LAST), budget=5)
        last = await pool.fetchrow(
            "SELECT status, api_requests FROM ingest_runs ORDER BY id DESC LIMIT 1"
        )
        assert (last["status"], last["api_requests"]) == ("interrupted", 5)
        assert await pool.fetchval("SELECT count(*) FROM daily_listings") == 2  # 2 requests each
        runs = 1
        while True:
            try:
                code = await run_daily_job(settings, backfill_range=(FIRST, LAST), budget=60)
            except RunInterrupted:
                runs += 1
                assert runs < 20
                continue
            break
        assert code == ExitCode.OK and runs > 2
    assert await coverage(pool) == {(UNDERLYINGS[0], d): None for d in SESSIONS}
    expected = {k: v for k, v in expected_rows().items() if v["underlying_ticker"] == "AAA"}
    assert await stored_rows(pool) == expected


async def test_sigterm_ends_the_backfill_interrupted_and_the_next_run_completes_it(
    pool: asyncpg.Pool,
    database_url: str,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    async with simulator(
        underlyings=UNDERLYINGS[:2],
        contracts_per_underlying=CONTRACTS,
        as_of=SIM_TODAY,
        latency=0.01,
    ) as api:
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "POLYGON_BASE_URL": api.base_url,
            "POLYGON_API_KEY": SIM_KEY,
            "UNDERLYINGS": ",".join(UNDERLYINGS[:2]),
            "POLYGON_RATE_LIMIT": "off",
            "LOG_LEVEL": "WARNING",
        }
        child = await asyncio.create_subprocess_exec(
            str(BIN / "ingest_daily"), "--from", f"{FIRST}", "--to", f"{LAST}",
            env=env, cwd=tmp_path, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        # once it is under way: a run row and a listing stored
        for _ in range(200):
            if await pool.fetchval("SELECT count(*) FROM daily_listings"):
                break
            await asyncio.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(child.wait(), 30) == ExitCode.INTERRUPTED
        run = await pool.fetchrow("SELECT status FROM ingest_runs ORDER BY id DESC LIMIT 1")
        assert run["status"] == "interrupted"
        settings = make_settings(api.base_url, UNDERLYINGS[:2])
        assert await run_daily_job(settings, backfill_range=(FIRST, LAST)) == ExitCode.OK
    expected = {k: v for k, v in expected_rows().items() if v["underlying_ticker"] != "CCC"}
    assert await stored_rows(pool) == expected
    assert await coverage(pool) == {(u, d): None for u in UNDERLYINGS[:2] for d in SESSIONS}


async def test_api_faults_and_a_database_outage_cost_no_row(
    pool: asyncpg.Pool,
    database_url: str,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> None:
    """5xx answers are retried; connections lost to an outage are replaced (or, when the
    database refuses new ones, the run fails naming the database); a rerun completes it."""
    async with simulator(
        underlyings=UNDERLYINGS[:2],
        contracts_per_underlying=CONTRACTS,
        as_of=SIM_TODAY,
        latency=0.002,
        error_rate=0.05,
    ) as api:
        settings = make_settings(
            api.base_url, UNDERLYINGS[:2], http_max_retries=6, db_reconnect_seconds=10.0
        )
        outage = asyncio.create_task(black_out(database_url, after=0.5, seconds=1.5))
        try:
            code = await run_daily_job(settings, backfill_range=(FIRST, LAST))
        except DatabaseError as exc:
            assert "database" in str(exc)
            code = None
        await outage
        if code != ExitCode.OK:
            assert await run_daily_job(settings, backfill_range=(FIRST, LAST)) == ExitCode.OK
    expected = {k: v for k, v in expected_rows().items() if v["underlying_ticker"] != "CCC"}
    assert await stored_rows(pool) == expected
    assert await coverage(pool) == {(u, d): None for u in UNDERLYINGS[:2] for d in SESSIONS}


async def test_units_the_api_refused_are_left_and_the_run_ends_partial(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> None:
    """With no retries, 5xx answers fail single listings and contracts' bars: the backfill
    goes on past them, ends partial (exit 3) naming the first, and the next run completes."""
    names = UNDERLYINGS[:2]
    async with simulator(
        underlyings=names, contracts_per_underlying=CONTRACTS, as_of=SIM_TODAY, error_rate=0.1
    ) as api:
        settings = make_settings(api.base_url, names, http_max_retries=0)
        code = await run_daily_job(settings, backfill_range=(FIRST, LAST))
    assert code == ExitCode.PARTIAL
    run = await pool.fetchrow(
        "SELECT status, underlyings_failed, error FROM ingest_runs ORDER BY id DESC LIMIT 1"
    )
    assert run["status"] == "partial" and run["underlyings_failed"] >= 1
    assert (
        "left for the next run" in run["error"]
        or "the bars of" in run["error"]
        or ("the listing of" in run["error"])
    )
    assert any(reason is not None for reason in (await coverage(pool)).values())
    async with simulator(
        underlyings=names, contracts_per_underlying=CONTRACTS, as_of=SIM_TODAY
    ) as api:
        settings = make_settings(api.base_url, names)
        assert await run_daily_job(settings, backfill_range=(FIRST, LAST)) == ExitCode.OK
    expected = {k: v for k, v in expected_rows().items() if v["underlying_ticker"] in names}
    assert await stored_rows(pool) == expected
    assert await coverage(pool) == {(u, d): None for u in names for d in SESSIONS}
