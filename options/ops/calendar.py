"""The NYSE trading calendar as the snapshot timer meets it: sessions, slots and market time.

The sessions come from ``exchange_calendars``' ``XNYS`` calendar (holidays, early closes and late
opens are its business, no rule is written here). A slot is a time the ``ingest_snapshots``
timer fires on a session: every ``every`` minutes from 09:30 through 16:00 New York time (the
grid of :func:`options.ops.units.snapshot_calendar`), kept when it falls within the session, so
an early-close day (13:00) has no afternoon slots and a holiday or a weekend has none at all.

"Market time" between two moments is how much of it lies within sessions: from a Friday's close
to the Monday open it is zero, so an age measured in it does not grow over weekends, nights
and holidays.

Everything here is pure once the calendar is loaded; the schedule of a year range is loaded
once per process (:func:`sessions_between`).
"""

from __future__ import annotations

import datetime as dt
import functools
import warnings
from dataclasses import dataclass
from typing import Final

from options.ops.market import NEW_YORK, REGULAR_CLOSE, REGULAR_OPEN

CALENDAR: Final = "XNYS"
FIRST_SLOT: Final = REGULAR_OPEN  # the timer's first slot of a day, New York time
LAST_SLOT: Final = REGULAR_CLOSE  # and its last
# Far enough back to find any number of sessions asked for: no closure of the exchange since
# 1900 lasted this long.
_LOOKBACK_DAYS_PER_SESSION: Final = 2
_LOOKBACK_MARGIN: Final = dt.timedelta(days=14)


@dataclass(frozen=True)
class Session:
    """One trading day of the exchange.

    Attributes:
        day: the session's date (New York).
        open: the open, UTC.
        close: the close, UTC (13:00 New York time on an early-close day).
    """

    day: dt.date
    open: dt.datetime
    close: dt.datetime

    @property
    def early_close(self) -> bool:
        """The session closes before the regular 16:00."""
        return self.close.astimezone(NEW_YORK).time() < REGULAR_CLOSE

    def slots(self, every: int) -> list[dt.datetime]:
        """The timer's slots of this session (UTC): 09:30, 09:30 + ``every`` minutes, ...
        through 16:00 New York time, those from the open through the close."""
        first = dt.datetime.combine(self.day, FIRST_SLOT, tzinfo=NEW_YORK)
        last = dt.datetime.combine(self.day, LAST_SLOT, tzinfo=NEW_YORK)
        found = []
        moment = first
        while moment <= last:
            if self.open <= moment <= self.close:
                found.append(moment.astimezone(dt.UTC))
            # wall-clock steps in New York: the day of a DST change keeps its 09:30 grid
            moment = moment + dt.timedelta(minutes=every)
        return found


def sessions_between(first: dt.date, last: dt.date) -> list[Session]:
    """The sessions from ``first`` through ``last`` (dates, inclusive), in order."""
    loaded = _sessions_of_years(first.year, last.year)
    return [s for s in loaded if first <= s.day <= last]


@functools.lru_cache(maxsize=8)
def _sessions_of_years(first_year: int, last_year: int) -> tuple[Session, ...]:
    import exchange_calendars  # pandas: a second or two to import, so only when needed

    with warnings.catch_warnings():
        # exchange_calendars 4.x trips pandas' deprecation warnings; they are its business
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        calendar = exchange_calendars.get_calendar(
            CALENDAR, start=f"{first_year}-01-01", end=f"{last_year}-12-31"
        )
        schedule = calendar.schedule
        return tuple(
            Session(
                day=day.date(),
                open=opened.to_pydatetime().astimezone(dt.UTC),
                close=closed.to_pydatetime().astimezone(dt.UTC),
            )
            for day, opened, closed in zip(
                schedule.index, schedule["open"], schedule["close"], strict=True
            )
        )


def recent_sessions(now: dt.datetime, count: int) -> list[Session]:
    """The last ``count`` sessions that have opened by ``now`` (today's once it is open)."""
    today = now.astimezone(NEW_YORK).date()
    since = today - dt.timedelta(days=count * _LOOKBACK_DAYS_PER_SESSION) - _LOOKBACK_MARGIN
    opened = [s for s in sessions_between(since, today) if s.open <= now]
    return opened[-count:] if count > 0 else []


def latest_slot(now: dt.datetime, every: int) -> dt.datetime | None:
    """The last slot the timer has fired by ``now`` on a session (UTC), or ``None``."""
    for session in reversed(recent_sessions(now, 3)):
        passed = [slot for slot in session.slots(every) if slot <= now]
        if passed:
            return passed[-1]
    return None


def market_seconds(start: dt.datetime, end: dt.datetime) -> float:
    """Seconds of session time in ``(start, end]``; 0 when ``end`` is not after ``start``."""
    if end <= start:
        return 0.0
    first = start.astimezone(NEW_YORK).date() - dt.timedelta(days=1)
    last = end.astimezone(NEW_YORK).date() + dt.timedelta(days=1)
    total = 0.0
    for session in sessions_between(first, last):
        overlap = min(end, session.close) - max(start, session.open)
        total += max(overlap.total_seconds(), 0.0)
    return total
