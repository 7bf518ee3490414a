"""``computed_greeks``: IV and greeks computed for a slot's snapshots the API left without them
(:mod:`options.jobs.greeks` does the arithmetic)."""

from __future__ import annotations

import datetime as dt
from typing import Final

import asyncpg
import numpy as np

from options.jobs.greeks import compute, years_to_expiry

MODEL: Final = "black-scholes-merton"

# The slot's rows missing IV or delta, with what the model needs
_MISSING = """
SELECT s.ticker, s.bid, s.ask, s.underlying_price, c.strike_price::float8 AS strike,
       c.contract_type, c.expiration_date
FROM option_snapshots s
LEFT JOIN option_contracts c ON c.ticker = s.ticker
WHERE s.captured_at = $1 AND (s.implied_volatility IS NULL OR s.delta IS NULL)
  AND NOT EXISTS (
      SELECT 1 FROM computed_greeks g WHERE g.ticker = s.ticker AND g.captured_at = s.captured_at)
"""


async def compute_slot_greeks(
    conn: asyncpg.Connection, captured_at: dt.datetime, *, rate: float, dividend: float
) -> tuple[int, int]:
    """Compute and store the slot's missing IV and greeks (rows done before are skipped).

    Returns:
        The rows computed, and those stored with a reason instead.
    """
    rows = await conn.fetch(_MISSING, captured_at)
    if not rows:
        return 0, 0
    n = len(rows)
    nan = float("nan")
    bid = np.array([r["bid"] if r["bid"] is not None else nan for r in rows], dtype=np.float64)
    ask = np.array([r["ask"] if r["ask"] is not None else nan for r in rows], dtype=np.float64)
    spot = np.array(
        [r["underlying_price"] if r["underlying_price"] is not None else nan for r in rows],
        dtype=np.float64,
    )
    known = [r["contract_type"] in ("call", "put") and r["expiration_date"] is not None
             for r in rows]  # fmt: skip
    strike = np.array(
        [
            r["strike"] if ok and r["strike"] is not None else nan
            for r, ok in zip(rows, known, strict=True)
        ],
        dtype=np.float64,
    )
    years = np.array(
        [
            years_to_expiry(r["expiration_date"], captured_at) if ok else nan
            for r, ok in zip(rows, known, strict=True)
        ],
        dtype=np.float64,
    )
    is_call = np.array([r["contract_type"] == "call" for r in rows], dtype=np.bool_)
    result = compute(bid, ask, spot, strike, years, is_call, rate=rate, dividend=dividend)
    now = dt.datetime.now(dt.UTC)

    def value(array: np.ndarray, i: int) -> float | None:
        v = float(array[i])
        return None if np.isnan(v) else v

    records = [
        (
            rows[i]["ticker"],
            captured_at,
            value(result.implied_volatility, i),
            value(result.delta, i),
            value(result.gamma, i),
            value(result.theta, i),
            value(result.vega, i),
            result.reason[i],
            MODEL,
            rate,
            dividend,
            value(years, i),
            now,
        )
        for i in range(n)
    ]
    await conn.copy_records_to_table(
        "computed_greeks",
        records=records,
        columns=[
            "ticker", "captured_at", "implied_volatility", "delta", "gamma", "theta", "vega",
            "reason", "model", "rate", "dividend_yield", "years", "computed_at",
        ],
    )  # fmt: skip
    failed = sum(r is not None for r in result.reason)
    return n - failed, failed
