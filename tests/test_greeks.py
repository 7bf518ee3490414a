"""Computed implied volatility and greeks: the round trip through the price, the reasons a row
gets none, and the values against the simulator's own where it gives them."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import asyncpg
import numpy as np
import pytest

from options.config import Settings
from options.errors import ExitCode
from options.jobs.greeks import (
    ABOVE_MAXIMUM,
    BELOW_INTRINSIC,
    CROSSED,
    EXPIRED,
    NO_CONTRACT,
    NO_QUOTE,
    NO_UNDERLYING,
    REASONS,
    bsm_price,
    compute,
    greeks,
    implied_volatility,
    years_to_expiry,
)
from options.jobs.wiring import greeks_command, run_options_job, run_snapshots_job
from options.simulator import RunningSimulator


def grid(n: int = 20_000, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "spot": np.full(n, 100.0),
        "strike": rng.uniform(50.0, 150.0, n),
        "years": rng.uniform(2 / 365, 2.0, n),
        "vol": rng.uniform(0.05, 2.0, n),
        "is_call": rng.random(n) < 0.5,
    }


@pytest.mark.parametrize(("rate", "dividend"), [(0.0, 0.0), (0.045, 0.0), (0.045, 0.02)])
def test_the_volatility_comes_back_from_its_price(rate: float, dividend: float) -> None:
    g = grid()
    price = bsm_price(g["spot"], g["strike"], g["years"], g["vol"], g["is_call"], rate, dividend)
    # where a price moves with the volatility at all (a far option's does not, in doubles)
    vega = greeks(g["spot"], g["strike"], g["years"], g["vol"], g["is_call"], rate, dividend)[3]
    sensitive = vega * 100 > 1e-6 * np.maximum(price, 1e-12)
    iv = implied_volatility(price, g["spot"], g["strike"], g["years"], g["is_call"], rate, dividend)
    assert sensitive.sum() > 0.8 * len(price)
    error = np.abs(iv[sensitive] - g["vol"][sensitive])
    assert np.nanmax(error) < 1e-4
    assert not np.isnan(iv[sensitive]).any()


def test_greeks_match_finite_differences() -> None:
    g = grid(2_000)
    args = (g["spot"], g["strike"], g["years"], g["vol"], g["is_call"], 0.03, 0.01)
    delta, gamma, theta, vega = greeks(*args)
    h = 1e-3
    up = bsm_price(g["spot"] + h, *args[1:])
    down = bsm_price(g["spot"] - h, *args[1:])
    mid = bsm_price(*args)
    assert np.allclose(delta, (up - down) / (2 * h), atol=1e-5)
    assert np.allclose(gamma, (up - 2 * mid + down) / (h * h), atol=1e-3)
    vol_up = bsm_price(
        g["spot"], g["strike"], g["years"], g["vol"] + 1e-5, g["is_call"], 0.03, 0.01
    )
    assert np.allclose(vega, (vol_up - mid) / 1e-5 / 100, atol=1e-4)
    day = 1 / 365
    later = bsm_price(
        g["spot"], g["strike"], g["years"] - day / 100, g["vol"], g["is_call"], 0.03, 0.01
    )
    assert np.allclose(theta, (later - mid) * 100, atol=1e-3)


def test_rows_without_a_value_say_why() -> None:
    nan = np.nan
    rows = [
        # bid, ask, spot, strike, years, call, reason
        (nan, 1.0, 100.0, 100.0, 0.5, True, NO_QUOTE),
        (0.0, 1.0, 100.0, 100.0, 0.5, True, NO_QUOTE),
        (1.2, 1.0, 100.0, 100.0, 0.5, True, CROSSED),
        (1.0, 1.2, nan, 100.0, 0.5, True, NO_UNDERLYING),
        (1.0, 1.2, 100.0, nan, 0.5, True, NO_CONTRACT),
        (1.0, 1.2, 100.0, 100.0, -0.01, True, EXPIRED),
        (5.0, 5.2, 120.0, 100.0, 0.5, True, BELOW_INTRINSIC),  # worth 20 at least
        (5.0, 5.2, 80.0, 100.0, 0.5, False, BELOW_INTRINSIC),
        (101.0, 102.0, 100.0, 100.0, 0.5, True, ABOVE_MAXIMUM),  # a call above its underlying
        (4.0, 4.2, 100.0, 100.0, 0.5, True, None),
        (4.0, 4.2, 100.0, 100.0, 0.5, False, None),
    ]
    bid, ask, spot, strike, years = (np.array([r[i] for r in rows], float) for i in range(5))
    is_call = np.array([r[5] for r in rows])
    result = compute(bid, ask, spot, strike, years, is_call, rate=0.0, dividend=0.0)
    assert result.reason == [r[6] for r in rows]
    computed = np.array([r is None for r in result.reason])
    assert not np.isnan(result.implied_volatility[computed]).any()
    assert np.isnan(result.implied_volatility[~computed]).all()
    assert np.isnan(result.delta[~computed]).all()
    # the at-the-money call and put at the same price: the same volatility without rates
    iv = result.implied_volatility[computed]
    assert abs(iv[0] - iv[1]) < 1e-9


def test_time_runs_to_the_close_in_new_york_on_the_expiration_day() -> None:
    at = dt.datetime(2026, 12, 18, 14, 30, tzinfo=dt.UTC)  # 09:30 in New York
    assert years_to_expiry(dt.date(2026, 12, 18), at) == pytest.approx(6.5 / 24 / 365)
    assert years_to_expiry(dt.date(2026, 12, 17), at) < 0


async def test_the_step_after_a_snapshot_run_computes_what_the_api_left_out(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> None:
    async with simulator(underlyings=("AAA",), contracts_per_underlying=400) as api:
        # the simulator prices without rates or dividends
        settings = make_settings(api.base_url, ("AAA",), greeks_rate=0.0)
        assert await run_options_job(settings) == ExitCode.OK
        assert await run_snapshots_job(settings, force=True) == ExitCode.OK
    # the snapshot job itself computes nothing: its service runs `ingest_admin greeks` after it
    assert await pool.fetchval("SELECT count(*) FROM computed_greeks") == 0
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    result = await greeks_command(settings, since=since)
    assert result is not None
    slots, done, refused = result
    assert slots == 1
    # once per slot: the next call finds nothing to do
    assert await greeks_command(settings, since=since) == (0, 0, 0)
    off = await greeks_command(dataclasses.replace(settings, compute_greeks=False), since=since)
    assert off is None
    missing = await pool.fetchval(
        "SELECT count(*) FROM option_snapshots WHERE implied_volatility IS NULL OR delta IS NULL"
    )
    assert missing > 0
    rows = await pool.fetch(
        "SELECT g.*, s.implied_volatility AS api_iv, s.delta AS api_delta "
        "FROM computed_greeks g JOIN option_snapshots s USING (ticker, captured_at)"
    )
    assert len(rows) == missing == done + refused  # never a row the API gave values for
    assert all(r["api_iv"] is None or r["api_delta"] is None for r in rows)
    assert all(r["reason"] in REASONS for r in rows if r["implied_volatility"] is None)
    computed = [r for r in rows if r["reason"] is None]
    reasons = Counter(r["reason"] for r in rows)
    assert len(computed) > len(rows) // 2, reasons
    assert all(
        r["model"] == "black-scholes-merton" and (r["rate"], r["dividend_yield"]) == (0.0, 0.0)
        for r in rows
    )
    assert all(0 < r["implied_volatility"] < 10 and r["delta"] is not None for r in computed)
    # the view gives each snapshot's values with their source, the API's first
    sources = {
        r["source"]
        for r in await pool.fetch("SELECT source FROM snapshot_greeks WHERE source IS NOT NULL")
    }
    assert {"snapshot", "computed"} <= sources
    api_delta = await pool.fetchval(
        "SELECT count(*) FROM snapshot_greeks v JOIN option_snapshots s "
        "USING (ticker, captured_at) WHERE s.delta IS NOT NULL AND v.delta IS DISTINCT FROM s.delta"
    )
    assert api_delta == 0

    # for rows whose IV the API gave: the model price at that IV gives it back
    given = await pool.fetch(
        "SELECT s.implied_volatility, s.underlying_price, c.strike_price::float8 AS strike, "
        "c.contract_type, c.expiration_date, s.captured_at FROM option_snapshots s "
        "JOIN option_contracts c USING (ticker) WHERE s.implied_volatility IS NOT NULL"
    )
    vol = np.array([r["implied_volatility"] for r in given])
    spot = np.array([r["underlying_price"] for r in given])
    strike = np.array([r["strike"] for r in given])
    years = np.array([years_to_expiry(r["expiration_date"], r["captured_at"]) for r in given])
    is_call = np.array([r["contract_type"] == "call" for r in given])
    price = bsm_price(spot, strike, years, vol, is_call, 0.04, 0.0)
    back = implied_volatility(price, spot, strike, years, is_call, 0.04, 0.0)
    vega = greeks(spot, strike, years, vol, is_call, 0.04, 0.0)[3]
    sensitive = vega * 100 > 1e-6 * price
    assert sensitive.sum() > 0.75 * len(given)
    assert np.max(np.abs(back[sensitive] - vol[sensitive])) < 1e-4
