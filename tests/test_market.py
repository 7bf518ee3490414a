"""The snapshot job's market-hours decision: holidays, early closes, weekends, hours, DST, failures.

The calendar entries below have the shape of ``/v1/marketstatus/upcoming`` (one entry per
exchange, early-close times in UTC) and carry the NYSE's published 2026 and 2027 holidays.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from options.api.polygon import PolygonClient
from options.ops.market import (
    NEW_YORK,
    SessionDecision,
    decide_session,
    market_session,
)
from options.simulator import SimulatorConfig, create_app, start_server

KEY = "market-key"

# (date, name, early close): the NYSE's published full-day closures and 13:00 early closes.
NYSE_CALENDAR: tuple[tuple[str, str, bool], ...] = (
    ("2026-01-01", "New Years Day", False),
    ("2026-01-19", "Martin Luther King, Jr. Day", False),
    ("2026-02-16", "Washington's Birthday", False),
    ("2026-04-03", "Good Friday", False),
    ("2026-05-25", "Memorial Day", False),
    ("2026-06-19", "Juneteenth", False),
    ("2026-07-03", "Independence Day", False),
    ("2026-09-07", "Labor Day", False),
    ("2026-11-26", "Thanksgiving", False),
    ("2026-11-27", "Thanksgiving", True),
    ("2026-12-24", "Christmas", True),
    ("2026-12-25", "Christmas", False),
    ("2027-01-01", "New Years Day", False),
    ("2027-01-18", "Martin Luther King, Jr. Day", False),
    ("2027-02-15", "Washington's Birthday", False),
    ("2027-03-26", "Good Friday", False),
    ("2027-05-31", "Memorial Day", False),
    ("2027-06-18", "Juneteenth", False),
    ("2027-07-05", "Independence Day", False),
    ("2027-09-06", "Labor Day", False),
    ("2027-11-25", "Thanksgiving", False),
    ("2027-11-26", "Thanksgiving", True),
    ("2027-12-24", "Christmas", False),
)


def utc_stamp(day: str, hour: int, minute: int = 0) -> str:
    """The API's spelling of a New York wall time on ``day``: UTC with milliseconds and a Z."""
    local = dt.datetime.combine(dt.date.fromisoformat(day), dt.time(hour, minute), NEW_YORK)
    return local.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def calendar_entry(day: str, name: str, early: bool, exchange: str) -> dict[str, Any]:
    """One ``/v1/marketstatus/upcoming`` entry, as the API shapes it."""
    entry: dict[str, Any] = {"date": day, "exchange": exchange, "name": name}
    if early:
        entry.update(open=utc_stamp(day, 9, 30), close=utc_stamp(day, 13), status="early-close")
    else:
        entry["status"] = "closed"
    return entry


def upcoming(as_of: str = "2026-01-01") -> list[dict[str, Any]]:
    """The list the API would answer on ``as_of``: entries from that date on, three exchanges."""
    return [
        calendar_entry(day, name, early, exchange)
        for day, name, early in NYSE_CALENDAR
        if day >= as_of
        for exchange in ("NASDAQ", "NYSE", "OTC")
    ]


def new_york(day: str, hour: int, minute: int = 0) -> dt.datetime:
    """An aware datetime at a New York wall time."""
    return dt.datetime.combine(dt.date.fromisoformat(day), dt.time(hour, minute), NEW_YORK)


def utc(text: str) -> dt.datetime:
    """An aware UTC datetime from ``YYYY-MM-DDTHH:MM``."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        pytest.param(
            new_york("2026-11-26", 10), "NYSE holiday: Thanksgiving (2026-11-26)", id="thanksgiving"
        ),
        pytest.param(
            new_york("2026-12-25", 13), "NYSE holiday: Christmas (2026-12-25)", id="christmas"
        ),
        pytest.param(
            new_york("2026-04-03", 9, 30),
            "NYSE holiday: Good Friday (2026-04-03)",
            id="good-friday",
        ),
        pytest.param(
            new_york("2026-07-03", 16),
            "NYSE holiday: Independence Day (2026-07-03)",
            id="independence-observed-friday",
        ),
        pytest.param(
            new_york("2027-06-18", 11),
            "NYSE holiday: Juneteenth (2027-06-18)",
            id="juneteenth-observed-friday",
        ),
        pytest.param(
            new_york("2027-12-24", 10), "NYSE holiday: Christmas (2027-12-24)", id="christmas-2027"
        ),
    ],
)
def test_full_day_closure_is_closed(now: dt.datetime, reason: str) -> None:
    """A NYSE full-day closure skips at any hour, naming the holiday and the date."""
    decision = decide_session(now, upcoming())
    assert decision == SessionDecision(open=False, reason=reason, day=now.date())


@pytest.mark.parametrize(
    ("now", "is_open"),
    [
        pytest.param(new_york("2026-11-27", 9, 30), True, id="0930"),
        pytest.param(new_york("2026-11-27", 12, 50), True, id="1250"),
        pytest.param(new_york("2026-11-27", 13, 0), True, id="1300-slot-runs"),
        pytest.param(new_york("2026-11-27", 13, 2), True, id="1302-within-grace"),
        pytest.param(new_york("2026-11-27", 13, 5), False, id="1305-slot-skips"),
        pytest.param(new_york("2026-11-27", 13, 10), False, id="1310-slot-skips"),
        pytest.param(new_york("2026-11-27", 13, 40), False, id="1340"),
        pytest.param(new_york("2026-11-27", 16, 0), False, id="1600"),
        pytest.param(new_york("2026-12-24", 12, 30), True, id="christmas-eve-1230"),
        pytest.param(new_york("2026-12-24", 14, 0), False, id="christmas-eve-1400"),
        pytest.param(new_york("2027-11-26", 13, 0), True, id="2027-1300"),
        pytest.param(new_york("2027-11-26", 13, 20), False, id="2027-1320"),
    ],
)
def test_early_close_runs_until_the_close_plus_grace(now: dt.datetime, is_open: bool) -> None:
    """On an early-close day the 13:00 slot runs and every later slot skips."""
    assert decide_session(now, upcoming()).open is is_open


def test_early_close_reason_names_the_close_and_the_time() -> None:
    """A skip after an early close says when the market closed and what time it is."""
    decision = decide_session(new_york("2026-11-27", 13, 40), upcoming())
    assert decision.reason == (
        "early close at 13:00 New York time (Thanksgiving, 2026-11-27); it is 13:40"
    )
    assert decision.close_time == new_york("2026-11-27", 13)


def test_early_close_time_is_read_from_the_entry() -> None:
    """The close time the calendar gives wins over the usual 13:00."""
    entry = calendar_entry("2026-12-24", "Christmas", True, "NYSE")
    entry["close"] = utc_stamp("2026-12-24", 14)
    assert decide_session(new_york("2026-12-24", 13, 30), [entry]).open
    assert not decide_session(new_york("2026-12-24", 14, 5), [entry]).open


@pytest.mark.parametrize(
    "close",
    [
        pytest.param(None, id="absent"),
        pytest.param("soon", id="unreadable"),
        pytest.param("2026-12-23T18:00:00.000Z", id="another-day"),
    ],
)
def test_early_close_without_a_usable_close_time_closes_at_1300(close: str | None) -> None:
    """An early-close entry whose close time is missing or unusable closes at 13:00."""
    entry: dict[str, Any] = {
        "date": "2026-12-24",
        "exchange": "NYSE",
        "name": "Christmas",
        "status": "early-close",
    }
    if close is not None:
        entry["close"] = close
    assert decide_session(new_york("2026-12-24", 13), [entry]).open
    decision = decide_session(new_york("2026-12-24", 13, 10), [entry])
    assert not decision.open
    assert decision.close_time == new_york("2026-12-24", 13)


def test_summer_early_close_converts_utc_in_daylight_time() -> None:
    """An early close sent as 17:00Z in July is 13:00 EDT, not 12:00."""
    entry = {
        "close": "2025-07-03T17:00:00.000Z",
        "date": "2025-07-03",
        "exchange": "NYSE",
        "name": "Independence Day",
        "open": "2025-07-03T13:30:00.000Z",
        "status": "early-close",
    }
    assert decide_session(utc("2025-07-03T16:45"), [entry]).open
    assert decide_session(utc("2025-07-03T17:00"), [entry]).open
    assert not decide_session(utc("2025-07-03T17:30"), [entry]).open


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        pytest.param(new_york("2026-11-28", 10), "weekend (Saturday 2026-11-28)", id="saturday"),
        pytest.param(new_york("2026-03-08", 12), "weekend (Sunday 2026-03-08)", id="sunday-dst"),
        pytest.param(
            new_york("2026-12-26", 10), "weekend (Saturday 2026-12-26)", id="saturday-after-xmas"
        ),
    ],
)
def test_weekend_is_closed(now: dt.datetime, reason: str) -> None:
    """Saturdays and Sundays skip, whatever the calendar says."""
    decision = decide_session(now, upcoming())
    assert (decision.open, decision.reason) == (False, reason)


@pytest.mark.parametrize(
    ("now", "is_open"),
    [
        pytest.param(new_york("2026-03-10", 9, 0), False, id="0900"),
        pytest.param(new_york("2026-03-10", 9, 27), True, id="0927-tolerance"),
        pytest.param(new_york("2026-03-10", 9, 30), True, id="0930"),
        pytest.param(new_york("2026-03-10", 12, 0), True, id="1200"),
        pytest.param(new_york("2026-03-10", 16, 0), True, id="1600-close-slot"),
        pytest.param(new_york("2026-03-10", 16, 2), True, id="1602-grace"),
        pytest.param(new_york("2026-03-10", 16, 20), False, id="1620"),
        pytest.param(new_york("2026-03-10", 20, 0), False, id="2000"),
    ],
)
def test_regular_day_hours(now: dt.datetime, is_open: bool) -> None:
    """A regular day is in session from 09:30 (less a tolerance) to 16:00 plus grace."""
    assert decide_session(now, upcoming()).open is is_open


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        pytest.param(
            new_york("2026-03-10", 9, 10),
            "before the open (09:30 New York time); it is 09:10",
            id="before",
        ),
        pytest.param(
            new_york("2026-03-10", 16, 20),
            "after the close (16:00 New York time); it is 16:20",
            id="after",
        ),
        pytest.param(
            new_york("2026-03-10", 10, 40),
            "regular session 09:30-16:00 New York time; it is 10:40",
            id="during",
        ),
    ],
)
def test_regular_day_reasons(now: dt.datetime, reason: str) -> None:
    """The reason says which side of the session the time is on."""
    assert decide_session(now, upcoming()).reason == reason


@pytest.mark.parametrize(
    ("now", "is_open"),
    [
        # 2026-03-08 starts daylight time: 13:35Z is 08:35 EST on Friday, 09:35 EDT on Monday.
        pytest.param(utc("2026-03-06T13:35"), False, id="spring-friday-est-0835"),
        pytest.param(utc("2026-03-09T13:35"), True, id="spring-monday-edt-0935"),
        pytest.param(utc("2026-03-09T20:05"), False, id="spring-monday-edt-1605"),
        # 2026-11-01 ends it: 20:05Z is 16:05 EDT on Friday, 15:05 EST on Monday.
        pytest.param(utc("2026-10-30T20:05"), False, id="fall-friday-edt-1605"),
        pytest.param(utc("2026-11-02T20:05"), True, id="fall-monday-est-1505"),
        pytest.param(utc("2026-11-02T14:20"), False, id="fall-monday-est-0920"),
        pytest.param(utc("2026-11-02T14:30"), True, id="fall-monday-est-0930"),
    ],
)
def test_hours_follow_new_york_daylight_saving(now: dt.datetime, is_open: bool) -> None:
    """The session is 09:30-16:00 New York wall time on both sides of a DST change."""
    assert decide_session(now, upcoming()).open is is_open


def test_day_missing_from_the_list_is_a_regular_session() -> None:
    """A day the forward-looking list no longer (or never) mentions is taken for a trading day."""
    decision = decide_session(new_york("2026-11-26", 10), upcoming(as_of="2026-11-27"))
    assert decision.open
    assert decision.reason == "regular session 09:30-16:00 New York time; it is 10:00"


def test_other_days_entries_do_not_count() -> None:
    """Yesterday's and tomorrow's entries do not close today."""
    around = [e for e in upcoming("2026-11-01") if e["date"] in ("2026-11-26", "2026-11-27")]
    assert decide_session(new_york("2026-11-25", 11), around).open


@pytest.mark.parametrize(
    ("exchanges", "expected"),
    [
        pytest.param(("NASDAQ",), False, id="nasdaq-only-counts"),
        pytest.param(("OTC",), True, id="otc-only-ignored"),
    ],
)
def test_calendar_exchanges(exchanges: tuple[str, ...], expected: bool) -> None:
    """NYSE decides, NASDAQ stands in when NYSE is absent, other venues are ignored."""
    entries = [calendar_entry("2026-11-26", "Thanksgiving", False, ex) for ex in exchanges]
    assert decide_session(new_york("2026-11-26", 10), entries).open is expected


def test_nyse_entry_wins_over_nasdaq() -> None:
    """When both list today differently, the NYSE entry decides."""
    entries = [
        calendar_entry("2026-11-27", "Thanksgiving", False, "NASDAQ"),
        calendar_entry("2026-11-27", "Thanksgiving", True, "NYSE"),
    ]
    assert decide_session(new_york("2026-11-27", 12), entries).open


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param({"date": "2026-11-26"}, id="no-status"),
        pytest.param(
            {"date": "2026-11-26", "exchange": "NYSE", "status": "open"}, id="status-open"
        ),
        pytest.param({"exchange": "NYSE", "status": "closed"}, id="no-date"),
        pytest.param("closed", id="not-an-object"),
    ],
)
def test_unusable_entries_are_ignored(entry: Any) -> None:
    """An entry that cannot be read leaves the day a regular session."""
    assert decide_session(new_york("2026-11-26", 10), [entry]).open


def test_naive_time_is_refused() -> None:
    """A naive datetime is refused: its time zone would be a guess."""
    with pytest.raises(ValueError, match="timezone-aware"):
        decide_session(dt.datetime(2026, 11, 26, 10), upcoming())


@asynccontextmanager
async def api(**knobs: Any) -> AsyncIterator[PolygonClient]:
    """A real client on an in-process simulator with ``knobs``; no retries, no rate limit."""
    config = SimulatorConfig(underlyings=("AAA",), contracts_per_underlying=1, api_key=KEY, **knobs)
    async with await start_server(create_app(config)) as server:
        async with PolygonClient(
            base_url=server.base_url, api_key=KEY, max_retries=0, rate_limit=None, timeout=10.0
        ) as client:
            yield client


async def test_session_through_the_simulator_calendar() -> None:
    """The real client's upcoming list closes a listed holiday and an early close's afternoon."""
    async with api() as client:
        holidays = await client.market_holidays()
        closed = next(e for e in holidays if e["exchange"] == "NYSE" and e["status"] == "closed")
        early = next(
            e for e in holidays if e["exchange"] == "NYSE" and e["status"] == "early-close"
        )
        holiday = await market_session(client, new_york(closed["date"], 11))
        before = await market_session(client, new_york(early["date"], 12, 50))
        after = await market_session(client, new_york(early["date"], 13, 40))
    assert (holiday.open, holiday.reason, holiday.calendar_ok) == (
        False,
        f"NYSE holiday: {closed['name']} ({closed['date']})",
        True,
    )
    assert before.open
    assert not after.open
    assert after.reason.startswith("early close at 13:00 New York time")


async def test_calendar_failure_fails_open() -> None:
    """An API answering 5xx does not skip a snapshot: open, and the reason says why."""
    async with api(error_rate=1.0) as client:
        decision = await market_session(client, new_york("2026-11-26", 10))
    assert decision.open
    assert not decision.calendar_ok
    assert decision.reason.startswith("market calendar could not be read (")
    assert "answered HTTP 50" in decision.reason


async def test_calendar_failure_still_skips_weekends() -> None:
    """Without a calendar the weekend still skips; it needs none."""
    async with api(error_rate=1.0) as client:
        decision = await market_session(client, new_york("2026-11-28", 10))
    assert not decision.open
    assert not decision.calendar_ok
    assert decision.reason.startswith("weekend (Saturday 2026-11-28); market calendar could not")


async def test_slow_calendar_fails_open() -> None:
    """A calendar that does not answer within the timeout is treated like a failed one."""
    async with api(latency=0.5) as client:
        decision = await market_session(client, new_york("2026-11-26", 10), calendar_timeout=0.05)
    assert decision.open
    assert not decision.calendar_ok
    assert "no answer in 0.05s" in decision.reason
