"""The daily table (``contract_days``) built from the stored snapshots, one session of one
underlying at a time, with its ``daily_coverage`` row, in one transaction.

For session *d* of an underlying:

- the **closing values** (quote, IV, greeks, underlying price, day bar) are those of *d*'s last
  complete slot (``snapshot_coverage.complete``, from the open to a little after the close: the
  16:00 slot starts a moment after 16:00);
- the **open interest** is that of the next session's first complete slot: the API's figure is
  the one at the end of the previous trading day.

The session's coverage row is complete when both slots were found; otherwise it says which is
missing, and a later build (after the next session's first slot, say) completes it. A row is
written only where a value changed, so building a session again changes nothing.

The rows are built from whichever tier holds the slots while they are in PostgreSQL (hot,
compact, or being archived). A slot already used is not read again, so a session whose closing
slot has been archived since still gets its open interest from the next session's first slot.
A session that needs a slot whose day has left PostgreSQL (archived, or deleted by retention:
:mod:`options.store.lifecycle`) is not built: its coverage row says so, and it is not tried
again. A session's daily rows are copied into the archive with its day; a change to them
afterwards is written there again by the next archive run (``archive_pending``).

A chain completed into an older slot (a resume) reopens the sessions built around it
(:func:`reopen_sessions`): the next build takes their new closing or open-interest slot.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import asyncpg

from options.ops.calendar import Session, sessions_between
from options.ops.market import NEW_YORK
from options.store.lifecycle import REFUSED_REASONS, tiers, utc_day
from options.store.runs import Run, count_committed

# A slot of the close starts a moment after it (the 16:00 timer): it still closes the session
CLOSE_GRACE: Final = dt.timedelta(minutes=15)

NO_CLOSING_SLOT: Final = "no complete snapshot slot in the session"
NO_OI_SLOT: Final = "no complete snapshot slot in the next session yet (open interest)"
NOT_BUILT: Final = "not built: the day {day} is {why}"
REOPENED: Final = "a slot of the session was completed after it was built: built again next run"


@dataclass(frozen=True)
class SessionBuild:
    """What building one session of one underlying did.

    Attributes:
        contracts: the session's rows (closing values or open interest known).
        changed: the rows written or changed by this build (0 on a rebuild).
        reason: why the session is not complete (``None``: complete).
    """

    underlying: str
    session: dt.date
    contracts: int
    changed: int
    close_captured_at: dt.datetime | None
    oi_captured_at: dt.datetime | None
    reason: str | None

    @property
    def complete(self) -> bool:
        return self.reason is None


async def build_underlying(
    conn: asyncpg.Connection,
    run: Run,
    underlying: str,
    sessions: Sequence[tuple[Session, Session]],
) -> list[SessionBuild]:
    """Build ``underlying``'s rows of each session of ``sessions`` (with its next session, for
    the open interest) and their coverage rows, in one transaction with the rows it wrote in
    the run's counts (the underlying itself is counted by the job, once it is done with it)."""
    builds = []
    async with conn.transaction():
        for session, following in sessions:
            builds.append(await _build_session(conn, run.id, underlying, session, following))
        await count_committed(conn, run, {"rows_written": sum(b.changed for b in builds)})
    return builds


async def _build_session(
    conn: asyncpg.Connection,
    run_id: int,
    underlying: str,
    session: Session,
    following: Session,
) -> SessionBuild:
    """Build ``underlying``'s rows of ``session`` (``following`` is the next session) and its
    coverage row, from the slots the rows were not built from yet, each read from whichever
    tier holds it; a slot whose day has left PostgreSQL is not read (the rows keep what an
    earlier build took from it)."""
    closing = await _slot(conn, underlying, session, last=True)
    oi = await _slot(conn, underlying, following, last=False)
    built = await conn.fetchrow(
        "SELECT close_captured_at, oi_captured_at FROM daily_coverage "
        "WHERE underlying_ticker = $1 AND session = $2",
        underlying,
        session.day,
    )
    # the slots whose values the rows lack (one built from before is there already)
    new_closing = closing if built is None or closing != built["close_captured_at"] else None
    new_oi = oi if built is None or oi != built["oi_captured_at"] else None
    wanted = [slot for slot in (new_closing, new_oi) if slot is not None]
    found = await tiers(conn, [utc_day(slot) for slot in wanted])
    gone = {utc_day(s): found[utc_day(s)] for s in wanted if not found[utc_day(s)].in_postgres}
    changed = 0
    if wanted and not gone:
        status = await conn.execute(BUILD, underlying, session.day, new_closing, new_oi)
        changed = int(status.split()[-1])
    contracts = await conn.fetchval(
        "SELECT count(*) FROM contract_days WHERE underlying_ticker = $1 AND session = $2",
        underlying,
        session.day,
    )
    if gone:
        day = min(gone)
        reason: str | None = NOT_BUILT.format(day=day, why=REFUSED_REASONS[gone[day]])
        # the coverage keeps the slots the rows were built from
        closing = built["close_captured_at"] if built is not None else None
        oi = built["oi_captured_at"] if built is not None else None
    else:
        reason = NO_CLOSING_SLOT if closing is None else NO_OI_SLOT if oi is None else None
    await conn.execute(
        STORE_COVERAGE, underlying, session.day, run_id, closing, oi, contracts, reason
    )
    return SessionBuild(underlying, session.day, contracts, changed, closing, oi, reason)


async def reopen_sessions(
    conn: asyncpg.Connection, underlying: str, slot: dt.datetime | int
) -> int:
    """A chain of ``underlying`` stored complete into an older slot (a resume): the sessions
    built around it may have another closing slot (its own session) or open-interest slot (the
    session before) now, so their complete coverage rows are reopened and the next
    ``ingest_daily`` builds them again; in the caller's transaction. Returns how many.

    ``slot`` is in the connection's timestamp form (epoch microseconds on a writer's)."""
    status = await conn.execute(
        """
        UPDATE daily_coverage c SET complete = false, reason = $3
        WHERE c.underlying_ticker = $1 AND c.complete
          AND c.session IN (
              SELECT session FROM daily_coverage
              WHERE underlying_ticker = $1
                AND session <= ($2::timestamptz AT TIME ZONE 'America/New_York')::date
              ORDER BY session DESC LIMIT 2)
          AND NOT EXISTS (SELECT 1 FROM stored_days d
                          WHERE d.day = c.session AND d.tier IN ('archived', 'deleted'))
        """,
        underlying,
        slot,
        REOPENED,
    )
    return int(status.split()[-1])


async def _slot(
    conn: asyncpg.Connection, underlying: str, session: Session, *, last: bool
) -> dt.datetime | None:
    """The session's last (or first) complete slot of ``underlying``."""
    pick = "max" if last else "min"
    found: dt.datetime | None = await conn.fetchval(
        f"SELECT {pick}(captured_at) FROM snapshot_coverage "
        "WHERE underlying_ticker = $1 AND complete AND captured_at >= $2 AND captured_at < $3",
        underlying,
        session.open,
        session.close + CLOSE_GRACE,
    )
    return found


async def sessions_to_build(
    conn: asyncpg.Connection, underlying: str, now: dt.datetime
) -> list[tuple[Session, Session]]:
    """The sessions of ``underlying`` to build at ``now``, each with its next session: from its
    first snapshot slot to the last session closed, those whose coverage row is missing or not
    complete. Empty when it has no snapshot or nothing is left to build."""
    first = await conn.fetchval(
        "SELECT min(captured_at) FROM snapshot_coverage WHERE underlying_ticker = $1", underlying
    )
    if first is None:
        return []
    start = first.astimezone(NEW_YORK).date()
    sessions = sessions_between(start, now.astimezone(NEW_YORK).date() + dt.timedelta(days=10))
    closed = [s for s in sessions if s.close + CLOSE_GRACE <= now]
    # complete, or not built for good: a slot it needs left PostgreSQL
    done = {
        row["session"]
        for row in await conn.fetch(
            """
            SELECT c.session FROM daily_coverage c
            WHERE c.underlying_ticker = $1 AND c.session >= $2
              AND (c.complete OR starts_with(c.reason, 'not built:'))
            """,
            underlying,
            start,
        )
    }
    return [
        (session, sessions[n + 1]) for n, session in enumerate(closed) if session.day not in done
    ]


# $1 underlying, $2 session, $3 the closing slot (or NULL), $4 the next session's first slot
# (or NULL). A value changes only where the snapshots give it: a row built before the next
# session keeps its closing values and gains its open interest.
BUILD = """
WITH closing AS (
    SELECT r.*, g.implied_volatility AS g_iv, g.delta AS g_delta, g.gamma AS g_gamma,
           g.theta AS g_theta, g.vega AS g_vega
    FROM snapshot_reads r
    LEFT JOIN computed_greeks g ON g.ticker = r.ticker AND g.captured_at = r.captured_at
    WHERE r.underlying_ticker = $1 AND r.captured_at = $3
), oi AS (
    SELECT ticker, open_interest, captured_at FROM snapshot_reads
    WHERE underlying_ticker = $1 AND captured_at = $4
)
INSERT INTO contract_days AS d (ticker, session, underlying_ticker, open_interest, oi_source,
    oi_captured_at, close_captured_at, bid, ask, midpoint, last_price, last_trade_at,
    implied_volatility, delta, gamma, theta, vega, underlying_price, greeks_source, day_open,
    day_high, day_low, day_close, day_volume, day_vwap, bar_source, built_at)
SELECT coalesce(c.ticker, o.ticker), $2, $1, o.open_interest,
       CASE WHEN o.ticker IS NOT NULL THEN 'snapshot' END, o.captured_at,
       c.captured_at, c.bid, c.ask, c.midpoint, c.last_price, c.last_trade_at,
       coalesce(c.implied_volatility, c.g_iv), coalesce(c.delta, c.g_delta),
       coalesce(c.gamma, c.g_gamma), coalesce(c.theta, c.g_theta), coalesce(c.vega, c.g_vega),
       c.underlying_price,
       -- as the view snapshot_greeks says it: the API's values first, computed ones for the rest
       CASE WHEN c.implied_volatility IS NOT NULL AND c.delta IS NOT NULL THEN 'snapshot'
            WHEN c.g_iv IS NOT NULL
                 THEN CASE WHEN c.implied_volatility IS NULL AND c.delta IS NULL
                           THEN 'computed' ELSE 'snapshot+computed' END
            WHEN c.implied_volatility IS NOT NULL OR c.delta IS NOT NULL THEN 'snapshot' END,
       c.day_open, c.day_high, c.day_low, c.day_close, c.day_volume, c.day_vwap,
       CASE WHEN c.day_close IS NOT NULL THEN 'snapshot' END, now()
FROM closing c
FULL JOIN oi o ON o.ticker = c.ticker
ON CONFLICT (ticker, session) DO UPDATE SET
    open_interest = coalesce(EXCLUDED.open_interest, d.open_interest),
    oi_source = coalesce(EXCLUDED.oi_source, d.oi_source),
    oi_captured_at = coalesce(EXCLUDED.oi_captured_at, d.oi_captured_at),
    close_captured_at = coalesce(EXCLUDED.close_captured_at, d.close_captured_at),
    bid = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.bid ELSE EXCLUDED.bid END,
    ask = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.ask ELSE EXCLUDED.ask END,
    midpoint = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.midpoint
                    ELSE EXCLUDED.midpoint END,
    last_price = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.last_price
                      ELSE EXCLUDED.last_price END,
    last_trade_at = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.last_trade_at
                         ELSE EXCLUDED.last_trade_at END,
    implied_volatility = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.implied_volatility
                              ELSE EXCLUDED.implied_volatility END,
    delta = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.delta ELSE EXCLUDED.delta END,
    gamma = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.gamma ELSE EXCLUDED.gamma END,
    theta = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.theta ELSE EXCLUDED.theta END,
    vega = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.vega ELSE EXCLUDED.vega END,
    underlying_price = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.underlying_price
                            ELSE EXCLUDED.underlying_price END,
    greeks_source = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.greeks_source
                         ELSE EXCLUDED.greeks_source END,
    day_open = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.day_open
                    ELSE EXCLUDED.day_open END,
    day_high = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.day_high
                    ELSE EXCLUDED.day_high END,
    day_low = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.day_low
                   ELSE EXCLUDED.day_low END,
    day_close = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.day_close
                     ELSE EXCLUDED.day_close END,
    day_volume = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.day_volume
                      ELSE EXCLUDED.day_volume END,
    day_vwap = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.day_vwap
                    ELSE EXCLUDED.day_vwap END,
    bar_source = CASE WHEN EXCLUDED.close_captured_at IS NULL THEN d.bar_source
                      ELSE EXCLUDED.bar_source END,
    built_at = EXCLUDED.built_at
WHERE (d.open_interest, d.oi_captured_at, d.close_captured_at)
      IS DISTINCT FROM
      (coalesce(EXCLUDED.open_interest, d.open_interest),
       coalesce(EXCLUDED.oi_captured_at, d.oi_captured_at),
       coalesce(EXCLUDED.close_captured_at, d.close_captured_at))
"""

STORE_COVERAGE = """
INSERT INTO daily_coverage AS c (underlying_ticker, session, run_id, close_captured_at,
    oi_captured_at, contracts, complete, reason, built_at)
VALUES ($1, $2, $3, $4, $5, $6, $7::text IS NULL, $7::text, now())
ON CONFLICT (underlying_ticker, session) DO UPDATE SET
    run_id = EXCLUDED.run_id, close_captured_at = EXCLUDED.close_captured_at,
    oi_captured_at = EXCLUDED.oi_captured_at, contracts = EXCLUDED.contracts,
    complete = EXCLUDED.complete, reason = EXCLUDED.reason, built_at = EXCLUDED.built_at
WHERE (c.close_captured_at, c.oi_captured_at, c.contracts, c.reason)
      IS DISTINCT FROM
      (EXCLUDED.close_captured_at, EXCLUDED.oi_captured_at, EXCLUDED.contracts, EXCLUDED.reason)
"""
