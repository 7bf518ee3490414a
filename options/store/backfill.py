"""Backfill of past sessions (``ingest_daily --from/--to``): what is stored, one durable unit at
a time, so a killed backfill resumes where it stopped and a finished one is not redone.

The units, each one transaction:

1. **A session's listing** of one underlying: its contracts (``listed_contracts``) with the
   ``daily_listings`` row that says the listing was read to its end.
2. **A contract's bars** over the sessions it was listed on: its ``contract_days`` rows
   (``bar_source = 'bars'``; a row whose bar came from snapshots keeps it) and a ``bar_checks``
   row per session asked for, bar or no bar.
3. **A session's coverage**: complete once its listing is stored and every contract of it has
   its bar checked (``daily_coverage.source = 'bars'``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, Final

import asyncpg

from options.ops.market import NEW_YORK
from options.store.runs import Run, count_committed

NO_LISTING: Final = "past listing not read yet (backfill)"
BARS_MISSING: Final = "daily bars not fetched yet for {count} of its contracts (backfill)"


async def sessions_to_backfill(
    conn: asyncpg.Connection, underlying: str, sessions: Sequence[dt.date]
) -> list[dt.date]:
    """Those of ``sessions`` whose daily coverage is not complete and that have no complete
    snapshot slot of ``underlying`` (a session with one is built from its snapshots, open
    interest included; a session whose every slot failed is backfilled like one before
    collection). An archived session is backfilled too: its daily tables are copies in the
    archive, written again by the next archive run (``archive_pending``)."""
    done = {
        row["session"]
        for row in await conn.fetch(
            """
            SELECT s AS session FROM unnest($2::date[]) AS s
            WHERE EXISTS (SELECT 1 FROM daily_coverage c
                          WHERE c.underlying_ticker = $1 AND c.session = s AND c.complete)
               OR EXISTS (SELECT 1 FROM snapshot_coverage c
                          WHERE c.underlying_ticker = $1 AND c.complete
                            AND c.captured_at >= (s::timestamp AT TIME ZONE 'America/New_York')
                            AND c.captured_at < ((s + 1)::timestamp
                                                 AT TIME ZONE 'America/New_York'))
            """,
            underlying,
            list(sessions),
        )
    }
    return [day for day in sessions if day not in done]


async def listed_sessions(
    conn: asyncpg.Connection, underlying: str, sessions: Sequence[dt.date]
) -> set[dt.date]:
    """Those of ``sessions`` whose listing is stored."""
    rows = await conn.fetch(
        "SELECT session FROM daily_listings WHERE underlying_ticker = $1 "
        "AND session = ANY($2::date[])",
        underlying,
        list(sessions),
    )
    return {row["session"] for row in rows}


async def store_listing(
    conn: asyncpg.Connection, run: Run, underlying: str, session: dt.date, tickers: Iterable[str]
) -> int:
    """Unit 1: the session's listing, whole."""
    listed = sorted(set(tickers))
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO listed_contracts (underlying_ticker, session, ticker) "
            "SELECT $1, $2, t FROM unnest($3::text[]) AS t ON CONFLICT DO NOTHING",
            underlying,
            session,
            listed,
        )
        await conn.execute(
            "INSERT INTO daily_listings (underlying_ticker, session, contracts, listed_at) "
            "VALUES ($1, $2, $3, now()) ON CONFLICT (underlying_ticker, session) DO NOTHING",
            underlying,
            session,
            len(listed),
        )
        await count_committed(conn, run, {"rows_fetched": len(listed)})
    return len(listed)


async def contracts_without_bars(
    conn: asyncpg.Connection, underlying: str, sessions: Sequence[dt.date]
) -> list[tuple[str, list[dt.date]]]:
    """The contracts listed on ``sessions`` with sessions whose bar is not checked yet, each
    with those sessions, in ticker order."""
    rows = await conn.fetch(
        """
        SELECT l.ticker, array_agg(l.session ORDER BY l.session) AS sessions
        FROM listed_contracts l
        WHERE l.underlying_ticker = $1 AND l.session = ANY($2::date[])
          AND NOT EXISTS (
              SELECT 1 FROM bar_checks b WHERE b.ticker = l.ticker AND b.session = l.session)
        GROUP BY l.ticker ORDER BY l.ticker COLLATE "C"
        """,
        underlying,
        list(sessions),
    )
    return [(row["ticker"], list(row["sessions"])) for row in rows]


def bar_session(bar: dict[str, Any]) -> dt.date | None:
    """The New York day a daily bar's ``t`` (Unix ms, 00:00 New York) starts."""
    start = bar.get("t")
    if not isinstance(start, int | float) or isinstance(start, bool):
        return None
    return dt.datetime.fromtimestamp(start / 1000, dt.UTC).astimezone(NEW_YORK).date()


async def store_bars(
    conn: asyncpg.Connection,
    run: Run,
    underlying: str,
    ticker: str,
    sessions: Sequence[dt.date],
    bars: Sequence[tuple[dt.date, dict[str, Any]]],
) -> int:
    """Unit 2: the contract's bars of ``sessions`` and their checks; the rows written."""
    wanted = set(sessions)
    records = [
        (
            ticker,
            day,
            underlying,
            _number(bar.get("o")),
            _number(bar.get("h")),
            _number(bar.get("l")),
            _number(bar.get("c")),
            _int(bar.get("v")),
            _number(bar.get("vw")),
            _int(bar.get("n")),
        )
        for day, bar in bars
        if day in wanted
    ]
    async with conn.transaction():
        written = 0
        if records:
            status = await conn.execute(
                STORE_BARS,
                *([r[i] for r in records] for i in range(10)),
            )
            written = int(status.split()[-1])
        await conn.execute(
            "INSERT INTO bar_checks (ticker, session) SELECT $1, s FROM unnest($2::date[]) AS s "
            "ON CONFLICT DO NOTHING",
            ticker,
            list(sessions),
        )
        await count_committed(conn, run, {"rows_written": written})
    return written


async def store_backfill_coverage(
    conn: asyncpg.Connection, run: Run, underlying: str, sessions: Sequence[dt.date]
) -> list[tuple[dt.date, str | None]]:
    """Unit 3 for each of ``sessions``: complete, or why not; returns (session, reason)."""
    rows = await conn.fetch(
        """
        SELECT s AS session, d.session IS NOT NULL AS listed,
               (SELECT count(*) FROM listed_contracts l
                WHERE l.underlying_ticker = $1 AND l.session = s) AS contracts,
               (SELECT count(*) FROM listed_contracts l
                WHERE l.underlying_ticker = $1 AND l.session = s
                  AND NOT EXISTS (SELECT 1 FROM bar_checks b
                                  WHERE b.ticker = l.ticker AND b.session = s)) AS unchecked
        FROM unnest($2::date[]) AS s
        LEFT JOIN daily_listings d ON d.underlying_ticker = $1 AND d.session = s
        """,
        underlying,
        list(sessions),
    )
    found = []
    async with conn.transaction():
        for row in rows:
            reason = (
                NO_LISTING
                if not row["listed"]
                else BARS_MISSING.format(count=row["unchecked"])
                if row["unchecked"]
                else None
            )
            await conn.execute(
                STORE_COVERAGE, underlying, row["session"], run.id, row["contracts"], reason
            )
            found.append((row["session"], reason))
    return found


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


# One array per column: ticker, session, underlying, open, high, low, close, volume, vwap,
# trades. A bar from the snapshots is kept; a bar already stored the same changes nothing.
STORE_BARS = """
INSERT INTO contract_days AS d (ticker, session, underlying_ticker, day_open, day_high, day_low,
    day_close, day_volume, day_vwap, day_trades, bar_source, built_at)
SELECT t, s, u, o, h, l, c, v, vw, n, 'bars', now()
FROM unnest($1::text[], $2::date[], $3::text[], $4::float8[], $5::float8[], $6::float8[],
            $7::float8[], $8::bigint[], $9::float8[], $10::int[])
     AS b(t, s, u, o, h, l, c, v, vw, n)
ON CONFLICT (ticker, session) DO UPDATE SET
    day_open = EXCLUDED.day_open, day_high = EXCLUDED.day_high, day_low = EXCLUDED.day_low,
    day_close = EXCLUDED.day_close, day_volume = EXCLUDED.day_volume,
    day_vwap = EXCLUDED.day_vwap, day_trades = EXCLUDED.day_trades, bar_source = 'bars',
    built_at = EXCLUDED.built_at
WHERE d.bar_source IS DISTINCT FROM 'snapshot'
  AND (d.day_open, d.day_high, d.day_low, d.day_close, d.day_volume, d.day_vwap, d.day_trades,
       d.bar_source)
      IS DISTINCT FROM
      (EXCLUDED.day_open, EXCLUDED.day_high, EXCLUDED.day_low, EXCLUDED.day_close,
       EXCLUDED.day_volume, EXCLUDED.day_vwap, EXCLUDED.day_trades, 'bars')
"""

STORE_COVERAGE = """
INSERT INTO daily_coverage AS c (underlying_ticker, session, run_id, contracts, complete, reason,
    source, built_at)
VALUES ($1, $2, $3, $4, $5::text IS NULL, $5::text, 'bars', now())
ON CONFLICT (underlying_ticker, session) DO UPDATE SET
    run_id = EXCLUDED.run_id, contracts = EXCLUDED.contracts, complete = EXCLUDED.complete,
    reason = EXCLUDED.reason, source = 'bars', built_at = EXCLUDED.built_at
WHERE NOT c.complete
  AND (c.contracts, c.reason, c.source)
      IS DISTINCT FROM (EXCLUDED.contracts, EXCLUDED.reason, 'bars')
"""
