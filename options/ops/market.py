"""Whether the US options market is in session: the snapshot job's reason to run or to skip.

systemd timers can say "every 10 minutes from 09:30 to 16:00 New York time on weekdays", but not
"except on NYSE holidays, and only until 13:00 on early-close days". ``ingest_snapshots`` asks
:func:`market_session` before it fetches anything.

The calendar is the API's ``/v1/marketstatus/upcoming`` list, the maintained source; no holiday
rule is written here. Its entries look like::

    {"date": "2026-11-26", "exchange": "NYSE", "name": "Thanksgiving", "status": "closed"}
    {"date": "2026-11-27", "exchange": "NYSE", "name": "Thanksgiving", "status": "early-close",
     "open": "2026-11-27T14:30:00.000Z", "close": "2026-11-27T18:00:00.000Z"}

The list is forward-looking, so it may or may not still hold today's entry. A day it does not
mention is taken for a regular session, and so is any day when the calendar cannot be read: a
missed snapshot of a trading day is lost for good, while an extra snapshot on a holiday costs one
run. Only the weekend and the regular hours, which need no calendar, skip without one.

:func:`decide_session` is the pure rule (time and calendar in, decision out); :func:`market_session`
fetches the calendar and applies it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol
from zoneinfo import ZoneInfo

from options.errors import ApiError

__all__ = [
    "CALENDAR_EXCHANGES",
    "DEFAULT_CALENDAR_TIMEOUT",
    "DEFAULT_GRACE",
    "DEFAULT_OPEN_TOLERANCE",
    "NEW_YORK",
    "HolidaySource",
    "SessionDecision",
    "decide_session",
    "market_session",
]

NEW_YORK: Final = ZoneInfo("America/New_York")
REGULAR_OPEN: Final = dt.time(9, 30)
REGULAR_CLOSE: Final = dt.time(16, 0)
# Used only when an early-close entry carries no readable close time.
EARLY_CLOSE: Final = dt.time(13, 0)
# Listed options follow the primary equity exchanges; OTC and other venues do not decide.
CALENDAR_EXCHANGES: Final = ("NYSE", "NASDAQ")
# Absorbs timer accuracy (AccuracySec= is 1 minute by default) and clock skew so the slot at the
# close still runs, while staying below the shortest cadence (5 minutes) so that the first slot
# after an early close (13:05 or 13:10) does not.
DEFAULT_GRACE: Final = dt.timedelta(minutes=3)
# A run that starts a little before 09:30 (clock skew, a manual start) belongs to the session.
DEFAULT_OPEN_TOLERANCE: Final = dt.timedelta(minutes=5)
# The calendar check must not eat the snapshot's time budget when the API is slow.
DEFAULT_CALENDAR_TIMEOUT: Final = 20.0

_WEEKEND: Final = 5  # date.weekday() of Saturday


@dataclass(frozen=True)
class SessionDecision:
    """Whether a snapshot should be taken now, and why, in one human line.

    Attributes:
        open: take the snapshot.
        reason: one line for the log, e.g. ``"NYSE holiday: Thanksgiving (2026-11-26)"``.
        day: the New York date the decision is about.
        open_time: today's open in New York time, or ``None`` on a weekend or holiday.
        close_time: today's close in New York time (13:00 on an early-close day), or ``None``
            on a weekend or holiday.
        calendar_ok: the holiday calendar was read; ``False`` means the decision assumed a
            regular day and the caller should log a warning.
    """

    open: bool
    reason: str
    day: dt.date
    open_time: dt.datetime | None = None
    close_time: dt.datetime | None = None
    calendar_ok: bool = True


class HolidaySource(Protocol):
    """What :func:`market_session` needs of the client
    (:class:`~options.api.polygon.PolygonClient`)."""

    async def market_holidays(self) -> list[dict[str, Any]]:
        """Return the ``/v1/marketstatus/upcoming`` entries."""
        ...


def decide_session(
    now: dt.datetime,
    holidays: Sequence[Mapping[str, Any]],
    *,
    grace: dt.timedelta = DEFAULT_GRACE,
    open_tolerance: dt.timedelta = DEFAULT_OPEN_TOLERANCE,
) -> SessionDecision:
    """Decide whether the market is in session at ``now``, from the upcoming-holidays list.

    Args:
        now: an aware datetime, in any time zone.
        holidays: ``/v1/marketstatus/upcoming`` entries; only today's NYSE entry (else NASDAQ)
            matters, and malformed entries are ignored.
        grace: how long after the close a run still counts as in session.
        open_tolerance: how long before the open a run already counts as in session.

    Returns:
        Closed on weekends, on full-day closures, before the open less ``open_tolerance``, and
        from the close plus ``grace`` (the early close on an early-close day); open otherwise.

    Raises:
        ValueError: ``now`` is naive.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    local = now.astimezone(NEW_YORK)
    day = local.date()
    clock = f"{local:%H:%M}"
    if day.weekday() >= _WEEKEND:
        return SessionDecision(open=False, reason=f"weekend ({local:%A} {day})", day=day)

    open_time = dt.datetime.combine(day, REGULAR_OPEN, tzinfo=NEW_YORK)
    close_time = dt.datetime.combine(day, REGULAR_CLOSE, tzinfo=NEW_YORK)
    early_close: str | None = None
    entry = _entry_for(day, holidays)
    if entry is not None:
        if entry.status == "closed":
            reason = f"{entry.exchange} holiday: {entry.name} ({day})"
            return SessionDecision(open=False, reason=reason, day=day)
        open_time = entry.open_time or open_time
        close_time = entry.close_time or dt.datetime.combine(day, EARLY_CLOSE, tzinfo=NEW_YORK)
        early_close = entry.name

    hours = f"{open_time:%H:%M}-{close_time:%H:%M} New York time"
    if local < open_time - open_tolerance:
        reason = f"before the open ({open_time:%H:%M} New York time); it is {clock}"
        return SessionDecision(False, reason, day, open_time, close_time)
    if local >= close_time + grace:
        if early_close is not None:
            reason = (
                f"early close at {close_time:%H:%M} New York time ({early_close}, {day});"
                f" it is {clock}"
            )
        else:
            reason = f"after the close ({close_time:%H:%M} New York time); it is {clock}"
        return SessionDecision(False, reason, day, open_time, close_time)
    if early_close is not None:
        reason = f"early-close day ({early_close}): in session {hours}; it is {clock}"
    else:
        reason = f"regular session {hours}; it is {clock}"
    return SessionDecision(True, reason, day, open_time, close_time)


async def market_session(
    client: HolidaySource,
    now: dt.datetime | None = None,
    *,
    grace: dt.timedelta = DEFAULT_GRACE,
    open_tolerance: dt.timedelta = DEFAULT_OPEN_TOLERANCE,
    calendar_timeout: float | None = DEFAULT_CALENDAR_TIMEOUT,
) -> SessionDecision:
    """Fetch the holiday calendar and decide whether the market is in session.

    When the calendar cannot be read (an :class:`~options.errors.ApiError`, or no answer in
    ``calendar_timeout`` seconds), the day is taken for a regular session: the decision is open
    during regular hours, says so in its reason, and has ``calendar_ok=False`` so the caller
    logs a warning. Weekends and hours outside the regular session still skip: they need no
    calendar.

    Args:
        client: the API client; only ``market_holidays()`` is called.
        now: the moment to decide for; ``None`` is the current time.
        grace: see :func:`decide_session`.
        open_tolerance: see :func:`decide_session`.
        calendar_timeout: seconds allowed for the calendar request, retries included; ``None``
            waits as long as the client's own retries take.
    """
    moment = now if now is not None else dt.datetime.now(dt.UTC)
    try:
        async with asyncio.timeout(calendar_timeout):
            holidays = await client.market_holidays()
    except (ApiError, TimeoutError) as exc:
        problem = (
            _first_line(exc) if isinstance(exc, ApiError) else f"no answer in {calendar_timeout}s"
        )
        decision = decide_session(moment, (), grace=grace, open_tolerance=open_tolerance)
        if decision.open:
            reason = f"market calendar could not be read ({problem}); assuming a {decision.reason}"
        else:
            reason = f"{decision.reason}; market calendar could not be read ({problem})"
        return replace(decision, reason=reason, calendar_ok=False)
    return decide_session(moment, holidays, grace=grace, open_tolerance=open_tolerance)


@dataclass(frozen=True)
class _Entry:
    """Today's calendar entry, normalized."""

    exchange: str
    name: str
    status: str
    open_time: dt.datetime | None
    close_time: dt.datetime | None


def _entry_for(day: dt.date, holidays: Sequence[Mapping[str, Any]]) -> _Entry | None:
    """Return today's entry, from NYSE if listed, else from NASDAQ."""
    found: dict[str, _Entry] = {}
    iso = day.isoformat()
    for entry in holidays:
        if not isinstance(entry, Mapping) or entry.get("date") != iso:
            continue
        exchange = str(entry.get("exchange", "")).strip().upper()
        status = _status_of(entry)
        if exchange in CALENDAR_EXCHANGES and status is not None and exchange not in found:
            found[exchange] = _Entry(
                exchange=exchange,
                name=str(entry.get("name") or "unnamed holiday").strip(),
                status=status,
                open_time=_time_on(day, entry.get("open")),
                close_time=_time_on(day, entry.get("close")),
            )
    return next((found[exchange] for exchange in CALENDAR_EXCHANGES if exchange in found), None)


def _status_of(entry: Mapping[str, Any]) -> str | None:
    """Return ``"closed"`` or ``"early-close"``; spelling variants are accepted, others ignored."""
    status = str(entry.get("status", "")).strip().lower().replace("_", "-").replace(" ", "-")
    return status if status in ("closed", "early-close") else None


def _time_on(day: dt.date, value: Any) -> dt.datetime | None:
    """Parse an entry's ISO timestamp (UTC in the API) into New York time, if it is on ``day``."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        # The API sends UTC with a Z; a bare time can only mean the exchange's own clock.
        parsed = parsed.replace(tzinfo=NEW_YORK)
    local = parsed.astimezone(NEW_YORK)
    # An entry whose time is on another day is inconsistent; the default is safer than a guess.
    return local if local.date() == day else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
