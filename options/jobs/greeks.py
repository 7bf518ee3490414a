"""Implied volatility and greeks computed for the snapshot rows the API left without them.

The model is Black-Scholes-Merton (European exercise) with a continuous risk-free rate and
dividend yield (settings ``GREEKS_RATE`` and ``GREEKS_DIVIDEND_YIELD``, stored with each
computed row). Everything is vectorised over NumPy arrays: the implied volatility is found by
Newton steps kept inside a bracket that bisection narrows, so it converges for every price
between the no-arbitrage bounds.

Inputs per row: the mid quote (the option's price), the underlying price, the strike, call or
put, and the time to expiry in years (to 16:00 New York on the expiration day, from the slot).
A row that cannot be computed gets a reason instead (:data:`REASONS`).

Greeks are given as the API gives them: delta and gamma per 1 of the underlying, theta per
calendar day, vega per 1 volatility point (0.01).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy.special import ndtr

from options.ops.market import NEW_YORK, REGULAR_CLOSE

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

YEAR_SECONDS: Final = 365.0 * 86400.0
MIN_VOL: Final = 1e-4
MAX_VOL: Final = 10.0  # 1,000%: the range the data-quality checks accept
TOLERANCE: Final = 1e-10  # in volatility
MAX_STEPS: Final = 100

# Why a row has no computed value (computed_greeks.reason)
NO_QUOTE: Final = "no quote"  # bid or ask missing, or not above zero
CROSSED: Final = "crossed quote"  # bid above ask
NO_UNDERLYING: Final = "no underlying price"
NO_CONTRACT: Final = "contract unknown"  # no strike, type or expiration
EXPIRED: Final = "expired"  # at or after 16:00 New York on the expiration day
BELOW_INTRINSIC: Final = "price below intrinsic value"
ABOVE_MAXIMUM: Final = "price above its maximum"  # above the underlying (call) or strike (put)
REASONS: Final = (
    NO_QUOTE,
    CROSSED,
    NO_UNDERLYING,
    NO_CONTRACT,
    EXPIRED,
    BELOW_INTRINSIC,
    ABOVE_MAXIMUM,
)


@dataclass(frozen=True)
class Computed:
    """Per row: the implied volatility and greeks (NaN where not computed) and the reason
    (``None`` where computed)."""

    implied_volatility: FloatArray
    delta: FloatArray
    gamma: FloatArray
    theta: FloatArray
    vega: FloatArray
    reason: list[str | None]


def years_to_expiry(expiration: dt.date, at: dt.datetime) -> float:
    """Years from ``at`` to 16:00 New York time on ``expiration`` (negative once past)."""
    close = dt.datetime.combine(expiration, REGULAR_CLOSE, tzinfo=NEW_YORK)
    return (close - at).total_seconds() / YEAR_SECONDS


def _d1(
    spot: FloatArray,
    strike: FloatArray,
    years: FloatArray,
    sqrt_t: FloatArray,
    vol: FloatArray,
    rate: float,
    dividend: float,
) -> FloatArray:
    """Black-Scholes-Merton's d1."""
    d1: FloatArray = (np.log(spot / strike) + (rate - dividend + 0.5 * vol * vol) * years) / (
        vol * sqrt_t
    )
    return d1


def bsm_price(
    spot: FloatArray,
    strike: FloatArray,
    years: FloatArray,
    vol: FloatArray,
    is_call: BoolArray,
    rate: float,
    dividend: float,
) -> FloatArray:
    """Black-Scholes-Merton prices."""
    sqrt_t = np.sqrt(years)
    d1 = _d1(spot, strike, years, sqrt_t, vol, rate, dividend)
    d2 = d1 - vol * sqrt_t
    spot_df = spot * np.exp(-dividend * years)
    strike_df = strike * np.exp(-rate * years)
    call = spot_df * ndtr(d1) - strike_df * ndtr(d2)
    put = strike_df * ndtr(-d2) - spot_df * ndtr(-d1)
    return np.asarray(np.where(is_call, call, put), dtype=np.float64)


def implied_volatility(
    price: FloatArray,
    spot: FloatArray,
    strike: FloatArray,
    years: FloatArray,
    is_call: BoolArray,
    rate: float,
    dividend: float,
) -> FloatArray:
    """The volatility at which :func:`bsm_price` gives ``price`` (NaN where no volatility in
    [:data:`MIN_VOL`, :data:`MAX_VOL`] does)."""
    lo = np.full(price.shape, MIN_VOL)
    hi = np.full(price.shape, MAX_VOL)
    p_lo = bsm_price(spot, strike, years, lo, is_call, rate, dividend)
    p_hi = bsm_price(spot, strike, years, hi, is_call, rate, dividend)
    found = (price >= p_lo) & (price <= p_hi)
    vol = np.full(price.shape, 0.3)
    vol = np.clip(vol, lo, hi)
    previous = hi - lo  # the step before last, as rtsafe keeps it
    sqrt_t = np.sqrt(years)
    spot_df = spot * np.exp(-dividend * years)
    active = found.copy()
    converged = np.zeros(price.shape, dtype=np.bool_)
    for _ in range(MAX_STEPS):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        v = vol[idx]
        s_t = sqrt_t[idx]
        p = bsm_price(spot[idx], strike[idx], years[idx], v, is_call[idx], rate, dividend)
        diff = p - price[idx]
        # the bracket: the price rises with the volatility
        above = diff > 0
        hi[idx] = np.where(above, v, hi[idx])
        lo[idx] = np.where(above, lo[idx], v)
        d1 = _d1(spot[idx], strike[idx], years[idx], s_t, v, rate, dividend)
        vega = spot_df[idx] * np.exp(-0.5 * d1 * d1) / np.sqrt(2.0 * np.pi) * s_t
        with np.errstate(divide="ignore", invalid="ignore"):
            step = diff / vega
        target = v - step
        # Newton where it stays inside the bracket and at least halves the step before last;
        # bisection otherwise (Numerical Recipes' rtsafe)
        newton = (
            np.isfinite(target)
            & (target >= lo[idx])
            & (target <= hi[idx])
            & (np.abs(2.0 * step) < np.abs(previous[idx]))
        )
        new = np.where(newton, target, 0.5 * (lo[idx] + hi[idx]))
        new = np.where(diff == 0, v, new)  # exactly the price: this is the volatility
        previous[idx] = np.abs(new - v)
        vol[idx] = new
        done = (np.abs(new - v) < TOLERANCE) | (hi[idx] - lo[idx] < TOLERANCE) | (diff == 0)
        converged[idx[done]] = True
        active[idx[done]] = False
    found &= converged
    return np.where(found, vol, np.nan)


def compute(
    bid: FloatArray,
    ask: FloatArray,
    spot: FloatArray,
    strike: FloatArray,
    years: FloatArray,
    is_call: BoolArray,
    *,
    rate: float,
    dividend: float,
) -> Computed:
    """Implied volatility and greeks from the mid quote, with a reason where there are none.

    Missing inputs are NaN (``is_call`` False where unknown, with a NaN strike).
    """
    n = bid.shape[0]
    reason: list[str | None] = [None] * n
    ok = np.ones(n, dtype=np.bool_)  # no reason yet

    def mark(mask: BoolArray, why: str) -> None:
        chosen = mask & ok
        for i in np.flatnonzero(chosen):
            reason[i] = why
        ok[chosen] = False

    with np.errstate(invalid="ignore"):
        mark(~(bid > 0) | ~(ask > 0), NO_QUOTE)
        mark(bid > ask, CROSSED)
        mark(~(spot > 0), NO_UNDERLYING)
        mark(~(strike > 0) | np.isnan(years), NO_CONTRACT)
        mark(~(years > 0), EXPIRED)
        price = 0.5 * (bid + ask)
        forward_intrinsic = np.where(
            is_call,
            spot * np.exp(-dividend * years) - strike * np.exp(-rate * years),
            strike * np.exp(-rate * years) - spot * np.exp(-dividend * years),
        )
        mark(price <= np.maximum(forward_intrinsic, 0.0), BELOW_INTRINSIC)
        ceiling = np.where(
            is_call, spot * np.exp(-dividend * years), strike * np.exp(-rate * years)
        )
        mark(price >= ceiling, ABOVE_MAXIMUM)
    iv = np.full(n, np.nan)
    if ok.any():
        iv[ok] = implied_volatility(
            price[ok], spot[ok], strike[ok], years[ok], is_call[ok], rate, dividend
        )
    # a price within the bounds whose volatility is beyond the range searched
    mark(ok & np.isnan(iv), ABOVE_MAXIMUM)
    delta, gamma, theta, vega = (np.full(n, np.nan) for _ in range(4))
    if ok.any():
        delta[ok], gamma[ok], theta[ok], vega[ok] = greeks(
            spot[ok], strike[ok], years[ok], iv[ok], is_call[ok], rate, dividend
        )
    return Computed(iv, delta, gamma, theta, vega, reason)


def greeks(
    spot: FloatArray,
    strike: FloatArray,
    years: FloatArray,
    vol: FloatArray,
    is_call: BoolArray,
    rate: float,
    dividend: float,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Delta, gamma, theta (per calendar day) and vega (per volatility point)."""
    sqrt_t = np.sqrt(years)
    d1 = _d1(spot, strike, years, sqrt_t, vol, rate, dividend)
    d2 = d1 - vol * sqrt_t
    q_df = np.exp(-dividend * years)
    r_df = np.exp(-rate * years)
    pdf = np.exp(-0.5 * d1 * d1) / np.sqrt(2.0 * np.pi)
    delta = np.where(is_call, q_df * ndtr(d1), q_df * (ndtr(d1) - 1.0))
    gamma = q_df * pdf / (spot * vol * sqrt_t)
    decay = -spot * q_df * pdf * vol / (2.0 * sqrt_t)
    call_theta = decay - rate * strike * r_df * ndtr(d2) + dividend * spot * q_df * ndtr(d1)
    put_theta = decay + rate * strike * r_df * ndtr(-d2) - dividend * spot * q_df * ndtr(-d1)
    theta = np.where(is_call, call_theta, put_theta) / 365.0
    vega = spot * q_df * pdf * sqrt_t / 100.0
    return delta, gamma, theta, vega
