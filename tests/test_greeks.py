"""Computed implied volatility and greeks: the round trip through the price, the reasons a row
gets none, and the values against the simulator's own where it gives them."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from options.jobs.greeks import (
    ABOVE_MAXIMUM,
    BELOW_INTRINSIC,
    CROSSED,
    EXPIRED,
    NO_CONTRACT,
    NO_QUOTE,
    NO_UNDERLYING,
    bsm_price,
    compute,
    greeks,
    implied_volatility,
    years_to_expiry,
)


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
