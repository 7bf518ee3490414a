"""The simulator's past: the listing as it stood on a past day, and daily bars.

A past day's listing is the chain laid out from that day (:meth:`Universe.chain` with
``as_of``): the contracts then live, their weekly expirations from that week on. A contract's
daily bar for a session is the day bar its snapshot gives at that session's 16:00 close, from
the chain listed that day, so a bar agrees with the snapshots a run on that day would have
stored; a contract without a trade that day has no bar (as the API has none).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo

from options.simulator.config import SimulatorConfig
from options.simulator.market import snapshot_rows
from options.simulator.universe import Chain, Universe

NEW_YORK = ZoneInfo("America/New_York")
CLOSE = dt.time(16, 0)
MAX_BAR_DAYS = 3660  # ten years of calendar days in one request


def listed_then(
    chain: Chain, positions: Sequence[int], *, today: dt.date, expired: bool
) -> list[int]:
    """Of a past day's listing, the contracts expired by ``today`` (``expired``) or not."""
    iso = today.isoformat()
    expirations = chain.expirations
    return [i for i in positions if (expirations[i] < iso) is expired]


def trading_day(day: dt.date) -> bool:
    """A weekday that is not one of the simulator's holidays."""
    return day.weekday() < 5 and day not in holidays(day.year)


def bars_of(
    universe: Universe, ticker: str, start: dt.date, end: dt.date, config: SimulatorConfig
) -> list[dict[str, Any]]:
    """The daily bars of option ``ticker`` from ``start`` to ``end`` (days up to the
    universe's today), oldest first."""
    bars: list[dict[str, Any]] = []
    day = start
    last = min(end, universe.as_of, start + dt.timedelta(days=MAX_BAR_DAYS))
    while day <= last:
        if trading_day(day):
            bar = _bar(universe, ticker, day, config)
            if bar is not None:
                bars.append(bar)
        day += dt.timedelta(days=1)
    return bars


def _bar(
    universe: Universe, ticker: str, day: dt.date, config: SimulatorConfig
) -> dict[str, Any] | None:
    found = universe.locate(ticker, day)
    if found is None:
        return None
    chain, position = found
    close = dt.datetime.combine(day, CLOSE, tzinfo=NEW_YORK)
    (row,) = snapshot_rows(
        chain,
        (position,),
        int(close.timestamp() // 60),
        deep_itm_without_greeks=config.deep_itm_without_greeks,
    )
    bar = row.get("day") or {}
    if not bar:
        return None  # no trade that day: no bar
    midnight = dt.datetime.combine(day, dt.time(0), tzinfo=NEW_YORK)
    return {
        "v": bar["volume"],
        "vw": bar["vwap"],
        "o": bar["open"],
        "c": bar["close"],
        "h": bar["high"],
        "l": bar["low"],
        "t": int(midnight.timestamp() * 1000),
        "n": max(1, bar["volume"] // 7),
    }


def holidays(year: int) -> dict[dt.date, tuple[str, bool]]:
    """Return the fixed-rule US market holidays of ``year`` (no Good Friday); True = early close."""

    def observed(day: dt.date) -> dt.date:
        return (
            day - dt.timedelta(days=1)
            if day.weekday() == 5
            else day + dt.timedelta(days=1 if day.weekday() == 6 else 0)
        )

    def nth_weekday(month: int, weekday: int, n: int) -> dt.date:
        first = dt.date(year, month, 1)
        return first + dt.timedelta(days=(weekday - first.weekday()) % 7 + 7 * (n - 1))

    thanksgiving = nth_weekday(11, 3, 4)
    days = {
        observed(dt.date(year, 1, 1)): ("New Year's Day", False),
        nth_weekday(1, 0, 3): ("Martin Luther King, Jr. Day", False),
        nth_weekday(2, 0, 3): ("Washington's Birthday", False),
        nth_weekday(5, 0, 5) if nth_weekday(5, 0, 5).month == 5 else nth_weekday(5, 0, 4): (
            "Memorial Day",
            False,
        ),
        observed(dt.date(year, 6, 19)): ("Juneteenth", False),
        observed(dt.date(year, 7, 4)): ("Independence Day", False),
        nth_weekday(9, 0, 1): ("Labor Day", False),
        thanksgiving: ("Thanksgiving", False),
        thanksgiving + dt.timedelta(days=1): ("Thanksgiving", True),
        observed(dt.date(year, 12, 25)): ("Christmas", False),
    }
    christmas_eve = dt.date(year, 12, 24)
    if christmas_eve.weekday() < 5 and christmas_eve not in days:
        days[christmas_eve] = ("Christmas", True)
    return {day: entry for day, entry in days.items() if day.year == year}
