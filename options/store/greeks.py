"""``computed_greeks``: IV and greeks computed for a slot's snapshots the API left without them
(:mod:`options.jobs.greeks` does the arithmetic). The rows go to NumPy and back as whole
columns (one array per column, both ways), not row by row.

A slot is computed from whichever tier holds it (``snapshot_reads``: hot or compact), in a
transaction that holds its day ``FOR SHARE`` (:func:`options.store.lifecycle.lock_for_write`),
so the day cannot leave PostgreSQL half computed. A slot whose day has left PostgreSQL (archived,
or deleted) is recorded in ``greeks_slots`` as not computed, with the reason: never as done."""

from __future__ import annotations

import datetime as dt
from typing import Final

import asyncpg
import numpy as np

from options.errors import DayRefusedError
from options.jobs.greeks import YEAR_SECONDS, compute
from options.store.lifecycle import lock_for_write, utc_day

MODEL: Final = "black-scholes-merton"

# The slot's rows missing IV or delta, as columns, with what the model needs; the time to
# expiry runs to 16:00 New York time on the expiration day (NULL for an unknown contract)
_MISSING = f"""
SELECT array_agg(s.ticker) AS ticker,
       array_agg(coalesce(s.bid, 'NaN')) AS bid,
       array_agg(coalesce(s.ask, 'NaN')) AS ask,
       array_agg(coalesce(s.underlying_price, 'NaN')) AS spot,
       array_agg(CASE WHEN s.contract_type IN ('call', 'put') AND s.expiration_date IS NOT NULL
                      THEN coalesce(s.strike_price::float8, 'NaN') ELSE 'NaN' END) AS strike,
       array_agg(coalesce(extract(epoch FROM (s.expiration_date + time '16:00')
                                             AT TIME ZONE 'America/New_York' - $1)::float8
                          / {YEAR_SECONDS}, 'NaN')) AS years,
       array_agg(s.contract_type = 'call') AS is_call
FROM snapshot_reads s
WHERE s.captured_at = $1 AND (s.implied_volatility IS NULL OR s.delta IS NULL)
  AND NOT EXISTS (
      SELECT 1 FROM computed_greeks g WHERE g.ticker = s.ticker AND g.captured_at = s.captured_at)
"""

_STORE = """
INSERT INTO computed_greeks (ticker, captured_at, implied_volatility, delta, gamma, theta, vega,
    reason, model, rate, dividend_yield, years, computed_at)
SELECT t, $2, nullif(iv, 'NaN'), nullif(d, 'NaN'), nullif(g, 'NaN'), nullif(th, 'NaN'),
       nullif(v, 'NaN'), r, $9, $10, $11, nullif(y, 'NaN'), now()
FROM unnest($1::text[], $3::float8[], $4::float8[], $5::float8[], $6::float8[], $7::float8[],
            $8::text[], $12::float8[]) AS u(t, iv, d, g, th, v, r, y)
ON CONFLICT (ticker, captured_at) DO NOTHING
"""


async def slots_to_compute(conn: asyncpg.Connection, since: dt.datetime) -> list[dt.datetime]:
    """The slots from ``since`` on with chains committed, not computed yet (nor refused) or
    with chains committed since they were."""
    rows = await conn.fetch(
        """
        SELECT c.captured_at FROM snapshot_coverage c
        LEFT JOIN greeks_slots g USING (captured_at)
        WHERE c.captured_at >= $1 AND c.committed_at IS NOT NULL
        GROUP BY c.captured_at, g.computed_at
        HAVING g.computed_at IS NULL OR max(c.committed_at) > g.computed_at
        ORDER BY c.captured_at
        """,
        since,
    )
    return [row["captured_at"] for row in rows]


async def compute_slot_greeks(
    conn: asyncpg.Connection, captured_at: dt.datetime, *, rate: float, dividend: float
) -> tuple[int, int]:
    """Compute and store the slot's missing IV and greeks (rows done before are skipped), and
    its ``greeks_slots`` row, in one transaction.

    Returns:
        The rows computed, and those stored with a reason instead.

    Raises:
        DayRefusedError: the slot's day has left PostgreSQL (nothing was computed, and the
            slot is recorded so, with the reason, in ``greeks_slots``) or is being archived
            (nothing recorded: it is tried again).
    """
    try:
        async with conn.transaction():
            await lock_for_write(conn, utc_day(captured_at))
            done, failed = await _compute(conn, captured_at, rate, dividend)
            await conn.execute(
                "INSERT INTO greeks_slots (captured_at, computed, not_computed, computed_at) "
                "VALUES ($1, $2, $3, now()) ON CONFLICT (captured_at) DO UPDATE SET "
                "computed = greeks_slots.computed + $2, "
                "not_computed = greeks_slots.not_computed + $3, computed_at = now(), "
                "reason = NULL",
                captured_at,
                done,
                failed,
            )
    except DayRefusedError as exc:
        if not exc.final:
            raise  # being archived: the slot is tried again later
        await conn.execute(
            "INSERT INTO greeks_slots (captured_at, computed, not_computed, computed_at, reason) "
            "VALUES ($1, 0, 0, now(), $2) ON CONFLICT (captured_at) DO UPDATE SET "
            "computed_at = now(), reason = $2",
            captured_at,
            f"not computed: {exc}",
        )
        raise
    return done, failed


async def _compute(
    conn: asyncpg.Connection, captured_at: dt.datetime, rate: float, dividend: float
) -> tuple[int, int]:
    columns = await conn.fetchrow(_MISSING, captured_at)
    if columns is None or columns["ticker"] is None:
        return 0, 0
    years = np.array(columns["years"], dtype=np.float64)
    result = compute(
        np.array(columns["bid"], dtype=np.float64),
        np.array(columns["ask"], dtype=np.float64),
        np.array(columns["spot"], dtype=np.float64),
        np.array(columns["strike"], dtype=np.float64),
        years,
        np.array([flag is True for flag in columns["is_call"]], dtype=np.bool_),
        rate=rate,
        dividend=dividend,
    )
    await conn.execute(
        _STORE,
        columns["ticker"],
        captured_at,
        result.implied_volatility.tolist(),
        result.delta.tolist(),
        result.gamma.tolist(),
        result.theta.tolist(),
        result.vega.tolist(),
        result.reason,
        MODEL,
        rate,
        dividend,
        years.tolist(),
    )
    failed = sum(reason is not None for reason in result.reason)
    return len(result.reason) - failed, failed
