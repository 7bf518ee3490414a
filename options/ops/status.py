"""``ingest_admin status``: whether the history is whole and fresh, read from the database alone.

:func:`collect_status` reads, in one read-only snapshot of the database, the last runs of each
job, per underlying its last complete snapshot and contract sync, the snapshot slots of the
last trading days that have no complete coverage (with the cause when it is known), the
data-quality counts of those days and the size of each table; it also judges freshness. The
moment it judges for, ``now``, is a parameter (the CLI passes the clock). It needs
``DATABASE_URL`` only, never the API.

**Which underlyings**: the enabled tracked ones, plus any named with ``-u`` (tracked or not,
enabled or not). Only the enabled tracked ones are judged for freshness.

**Slots and gaps**: the slots are those of the timer (:mod:`options.ops.calendar`): every
``every`` minutes from 09:30 through 16:00 New York time on the last ``days`` sessions of the
XNYS calendar that have opened by ``now``, through the close on early-close days; holidays and
weekends have none. A slot is covered for an underlying when one of its coverage rows with
``complete`` true has ``captured_at`` within ``[slot, slot + every)``. An uncovered slot is a gap,
except a slot before the underlying was tracked (``added_at``), a slot after ``now``, and the
slot whose window is still open while nothing has ended in it yet (its run may still come or
be working). The cause of a gap, from the latest coverage row or run in the window:

- ``run failed`` / ``run interrupted``: a run planned the chain and ended so before storing it,
  or ended so before it planned the slot at all; ``detail`` is the run's error;
- ``incomplete: <error>``: the chain was stored incomplete, or left unstored by a run that
  ended otherwise (the coverage row's error);
- ``run in progress``: its run is still ``running`` (listed once the slot's window has passed);
- ``not in the run``: a run planned the slot without this underlying (a ``-u`` run, or the
  underlying was not enabled then); ``detail`` names the run;
- ``no run``: no run started in the window (the timer did not fire, or the machine was down).

**Freshness** (:attr:`Status.problems`, the exit status of the command):

- ``snapshots_stale``: an enabled tracked underlying's last complete snapshot (or, if it has
  none, the time it was tracked) lies more than ``max_age`` of *market time* before the latest
  slot the timer has fired. Market time counts only session time, so nights, weekends and
  holidays add nothing and a Saturday or a Monday at 09:30 is not stale.
- ``contracts_stale``: its last successful contract sync (or the time it was tracked) is more
  than ``max_sync_age`` of wall time before ``now`` (the contracts job runs every day).
- ``run_stuck``: a run is ``running`` with a heartbeat older than the lease
  (:data:`options.store.runs_lease.LEASE_SECONDS`), or none: its process is frozen or gone.

**JSON** (:meth:`Status.as_dict`; timestamps ISO 8601 in UTC with their offset, durations in
seconds; every key is always present, ``null`` when unknown)::

    now                       the moment judged
    fresh                     no problem
    problems[]                kind (snapshots_stale | contracts_stale | run_stuck), subject
                              (a ticker, or the job), message (the line printed on stderr)
    settings                  days, every_minutes, max_age_seconds, max_sync_age_seconds,
                              underlyings (the -u tickers)
    calendar                  name (XNYS), latest_slot, sessions[]: date, open, close,
                              early_close, slots (how many)
    runs.options[], runs.snapshots[]
                              the last runs, newest first, and any run still running: id, job,
                              status, started_at, finished_at, duration_seconds, heartbeat_at,
                              heartbeat_age_seconds, captured_at, resumed,
                              underlyings_requested, underlyings_succeeded, underlyings_failed,
                              rows_fetched, rows_written, rows_rejected, contracts_deactivated,
                              api_requests, error
    underlyings[]             ticker, underlying (as the data names it: I:SPX -> SPX), tracked,
                              enabled, added_at, last_complete_snapshot_at,
                              snapshot_age_seconds (market time before the latest slot),
                              last_contract_sync_at, contract_sync_age_seconds, last_error,
                              last_error_at, gaps (how many)
    gaps[]                    ticker, date (New York), slot, cause, detail, run_id
    quality[]                 ticker, chains (coverage rows stored), crossed_quotes,
                              negative_prices, iv_out_of_range, negative_open_interest,
                              stale_quotes, greeks_missing, rows_rejected: sums over the
                              coverage rows of the days shown (from the first one's midnight)
    storage                   tables[]: table, bytes (pg_total_relation_size: data, indexes,
                              TOAST; a partitioned table summed over its partitions),
                              partitions (null if not partitioned); total_bytes;
                              snapshot_rows, snapshot_rows_source ("estimate": pg_class.reltuples
                              of every partition; "estimate+count": partitions never analyzed
                              counted with count(*); "count": all counted), bytes_per_snapshot
                              (the bytes of both tiers, option_snapshots and snapshot_rows,
                              and of the ids, SNAPSHOT_TABLES, / snapshot_rows; null without
                              rows)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from options.config import Settings
from options.ops.calendar import CALENDAR, Session, latest_slot, market_seconds, recent_sessions
from options.ops.gaps import Gap, find_gaps, run_moment
from options.ops.market import NEW_YORK
from options.ops.status_reads import JOBS, QUALITY_COUNTS, read_observed
from options.ops.units import DEFAULT_SNAPSHOT_EVERY
from options.store.daily import CLOSE_GRACE
from options.store.db import Limits, looking_pool
from options.store.runs_lease import LEASE_SECONDS

DEFAULT_DAYS: Final = 5
DEFAULT_EVERY: Final = DEFAULT_SNAPSHOT_EVERY
DEFAULT_MAX_AGE: Final = 30 * 60.0  # market time before the latest slot
DEFAULT_MAX_SYNC_AGE: Final = 26 * 3600.0  # a daily job, with two hours to spare


@dataclass(frozen=True)
class RunInfo:
    """One run of a job, as ``status`` shows it."""

    id: int
    job: str
    status: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    duration_seconds: float
    heartbeat_at: dt.datetime | None
    heartbeat_age_seconds: float | None
    captured_at: dt.datetime | None
    resumed: bool
    underlyings_requested: int
    underlyings_succeeded: int
    underlyings_failed: int
    rows_fetched: int
    rows_written: int
    rows_rejected: int
    contracts_deactivated: int
    api_requests: int
    error: str | None


@dataclass(frozen=True)
class UnderlyingInfo:
    """One underlying: its last complete snapshot and contract sync, their ages, its gaps."""

    ticker: str
    underlying: str
    tracked: bool
    enabled: bool
    added_at: dt.datetime | None
    last_complete_snapshot_at: dt.datetime | None
    snapshot_age_seconds: float | None
    last_contract_sync_at: dt.datetime | None
    contract_sync_age_seconds: float | None
    last_error: str | None
    last_error_at: dt.datetime | None
    gaps: int


@dataclass(frozen=True)
class Quality:
    """Data-quality counts of one underlying, summed over its coverage rows of the days shown."""

    ticker: str
    chains: int
    crossed_quotes: int
    negative_prices: int
    iv_out_of_range: int
    negative_open_interest: int
    stale_quotes: int
    greeks_missing: int
    rows_rejected: int


@dataclass(frozen=True)
class TableSize:
    """One table's size on disk."""

    table: str
    bytes: int
    partitions: int | None


@dataclass(frozen=True)
class Storage:
    """The database's tables and what a stored snapshot costs."""

    tables: list[TableSize]
    total_bytes: int
    snapshot_rows: int
    snapshot_rows_source: str
    bytes_per_snapshot: float | None


@dataclass(frozen=True)
class Problem:
    """Something stale or stuck: one line for monitoring."""

    kind: str
    subject: str
    message: str


@dataclass(frozen=True)
class DailyGap:
    """A closed session of the days shown whose daily rows are not complete: ``reason`` is the
    coverage row's, or that no build has covered it yet."""

    ticker: str
    session: dt.date
    reason: str


@dataclass(frozen=True)
class Status:
    """Everything ``ingest_admin status`` shows, as of :attr:`now`."""

    now: dt.datetime
    days: int
    every: int
    max_age: float
    max_sync_age: float
    requested: tuple[str, ...]
    sessions: list[Session]
    latest_slot: dt.datetime | None
    runs: dict[str, list[RunInfo]]
    underlyings: list[UnderlyingInfo]
    gaps: list[Gap]
    quality: list[Quality]
    storage: Storage
    problems: list[Problem]
    daily_gaps: list[DailyGap]

    @property
    def fresh(self) -> bool:
        """Nothing is stale or stuck."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """The status as JSON-ready values (see the module docstring for the keys)."""
        return {
            "now": _iso(self.now),
            "fresh": self.fresh,
            "problems": [_plain(p) for p in self.problems],
            "settings": {
                "days": self.days,
                "every_minutes": self.every,
                "max_age_seconds": self.max_age,
                "max_sync_age_seconds": self.max_sync_age,
                "underlyings": list(self.requested),
            },
            "calendar": {
                "name": CALENDAR,
                "latest_slot": _iso(self.latest_slot),
                "sessions": [
                    {
                        "date": s.day.isoformat(),
                        "open": _iso(s.open),
                        "close": _iso(s.close),
                        "early_close": s.early_close,
                        "slots": len(s.slots(self.every)),
                    }
                    for s in self.sessions
                ],
            },
            "runs": {job: [_plain(r) for r in self.runs.get(job, [])] for job in JOBS},
            "underlyings": [_plain(u) for u in self.underlyings],
            "gaps": [_plain(g) for g in self.gaps],
            "daily_gaps": [_plain(g) for g in self.daily_gaps],
            "quality": [_plain(q) for q in self.quality],
            "storage": _plain(self.storage),
        }

    def to_json(self) -> str:
        """:meth:`as_dict` as indented JSON text."""
        return json.dumps(self.as_dict(), indent=2)


async def read_status(
    settings: Settings,
    *,
    now: dt.datetime,
    days: int = DEFAULT_DAYS,
    every: int = DEFAULT_EVERY,
    max_age: float = DEFAULT_MAX_AGE,
    max_sync_age: float = DEFAULT_MAX_SYNC_AGE,
    underlyings: Sequence[str] = (),
) -> Status:
    """Open a small pool on ``DATABASE_URL``, :func:`collect_status`, close it.

    Raises:
        ConfigError: ``DATABASE_URL`` is not set.
        DatabaseError: the database cannot be read, or its schema is older than this code.
    """
    async with looking_pool(
        settings.require_database_url(),
        location=settings.database_location(),
        limits=Limits(settings.db_statement_timeout, settings.db_lock_timeout),
        application_name="ingest_admin status",
    ) as pool:
        return await collect_status(
            pool,
            now=now,
            days=days,
            every=every,
            max_age=max_age,
            max_sync_age=max_sync_age,
            underlyings=underlyings,
        )


async def collect_status(
    pool: asyncpg.Pool,
    *,
    now: dt.datetime,
    days: int = DEFAULT_DAYS,
    every: int = DEFAULT_EVERY,
    max_age: float = DEFAULT_MAX_AGE,
    max_sync_age: float = DEFAULT_MAX_SYNC_AGE,
    underlyings: Sequence[str] = (),
) -> Status:
    """The status as of ``now`` (an aware datetime).

    Args:
        days: how many trading days (XNYS sessions opened by ``now``) to look for gaps in.
        every: the snapshot timer's period in minutes (5, 10 or 15).
        max_age: seconds of market time a last complete snapshot may lie before the latest
            slot.
        max_sync_age: seconds a last contract sync may lie before ``now``.
        underlyings: tickers to show besides the enabled tracked ones (validated).

    Raises:
        ValueError: ``now`` is naive.
        DatabaseError: the database cannot be read, or its schema is older than this code.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(dt.UTC)
    sessions = recent_sessions(now, days)
    latest = latest_slot(now, every)
    since = (
        dt.datetime.combine(sessions[0].day, dt.time(0), tzinfo=NEW_YORK).astimezone(dt.UTC)
        if sessions
        else now
    )
    data = await read_observed(pool, now=now, since=since, requested=list(underlyings))
    period = dt.timedelta(minutes=every)
    runs_by_id = {r["id"]: r for r in data.window_runs}
    window_runs = sorted(data.window_runs, key=run_moment)
    slots = [slot for session in sessions for slot in session.slots(every)]

    shown, gaps, quality, daily_gaps = [], [], [], []
    for subject in data.subjects:
        key = subject["underlying"]
        rows = data.coverage.get(key, [])
        daily_gaps.extend(_daily_gaps(subject["ticker"], sessions, rows, data.daily[key], now))
        found = find_gaps(
            subject["ticker"],
            slots,
            period,
            now=now,
            since=subject["added_at"],
            coverage=rows,
            runs=window_runs,
            runs_by_id=runs_by_id,
        )
        gaps.extend(found)
        quality.append(_quality(subject["ticker"], rows))
        complete = _latest(
            max((r["captured_at"] for r in rows if r["complete"]), default=None),
            _until(subject["last_complete_snapshot_at"], now),
            data.last_complete.get(key),
        )
        synced = _latest(_until(subject["last_contract_sync_at"], now), data.last_sync.get(key))
        shown.append(
            UnderlyingInfo(
                ticker=subject["ticker"],
                underlying=key,
                tracked=subject["tracked"],
                enabled=subject["enabled"],
                added_at=subject["added_at"],
                last_complete_snapshot_at=complete,
                snapshot_age_seconds=(
                    market_seconds(complete, latest) if complete and latest else None
                ),
                last_contract_sync_at=synced,
                contract_sync_age_seconds=(now - synced).total_seconds() if synced else None,
                last_error=subject["last_error"],
                last_error_at=subject["last_error_at"],
                gaps=len(found),
            )
        )
    runs = {job: [_run_info(r, now) for r in data.runs.get(job, [])] for job in JOBS}
    return Status(
        now=now,
        days=days,
        every=every,
        max_age=max_age,
        max_sync_age=max_sync_age,
        requested=tuple(underlyings),
        sessions=sessions,
        latest_slot=latest,
        runs=runs,
        underlyings=shown,
        gaps=gaps,
        quality=quality,
        storage=_storage(data.tables, data.partitions),
        problems=judge(
            runs, shown, now=now, latest=latest, max_age=max_age, max_sync_age=max_sync_age
        ),
        daily_gaps=daily_gaps,
    )


def _daily_gaps(
    ticker: str,
    sessions: Sequence[Session],
    coverage: Sequence[Mapping[str, Any]],
    daily: Mapping[dt.date, Mapping[str, Any]],
    now: dt.datetime,
) -> list[DailyGap]:
    """The closed sessions with snapshots whose daily rows are not complete."""
    snapshotted = {row["captured_at"].astimezone(NEW_YORK).date() for row in coverage}
    found = []
    for session in sessions:
        if session.close + CLOSE_GRACE > now or session.day not in snapshotted:
            continue
        row = daily.get(session.day)
        if row is None:
            found.append(DailyGap(ticker, session.day, NOT_BUILT))
        elif not row["complete"]:
            found.append(DailyGap(ticker, session.day, row["reason"]))
    return found


def judge(
    runs: Mapping[str, Sequence[RunInfo]],
    underlyings: Sequence[UnderlyingInfo],
    *,
    now: dt.datetime,
    latest: dt.datetime | None,
    max_age: float,
    max_sync_age: float,
) -> list[Problem]:
    """What is stale or stuck, one :class:`Problem` each (see the module docstring)."""
    problems = []
    for job in JOBS:
        for run in runs.get(job, []):
            if run.status != "running":
                continue
            age = run.heartbeat_age_seconds
            if age is None:
                silent = "has never sent a heartbeat"
            elif age > LEASE_SECONDS:
                silent = f"last sent a heartbeat {span(age)} ago"
            else:
                continue
            problems.append(
                Problem(
                    "run_stuck",
                    job,
                    f"ingest_{job} run {run.id} is running but {silent} (the lease is "
                    f"{LEASE_SECONDS:g} s): its process is frozen or gone; the next run "
                    "closes it",
                )
            )
    for u in underlyings:
        if not (u.tracked and u.enabled) or u.added_at is None:
            continue
        if latest is not None and latest >= u.added_at:
            since = u.last_complete_snapshot_at or u.added_at
            age = market_seconds(since, latest)
            if age > max_age:
                what = (
                    f"last complete snapshot {clock(since)}"
                    if u.last_complete_snapshot_at
                    else f"no complete snapshot since it was tracked ({clock(since)})"
                )
                problems.append(
                    Problem(
                        "snapshots_stale",
                        u.ticker,
                        f"{u.ticker}: {what}, {span(age)} of market time before the latest "
                        f"slot {clock(latest)} (max {span(max_age)})",
                    )
                )
        synced = u.last_contract_sync_at or u.added_at
        age = (now - synced).total_seconds()
        if age > max_sync_age:
            what = (
                f"last contract sync {clock(synced)}"
                if u.last_contract_sync_at
                else f"no contract sync since it was tracked ({clock(synced)})"
            )
            problems.append(
                Problem(
                    "contracts_stale",
                    u.ticker,
                    f"{u.ticker}: {what}, {span(age)} ago (max {span(max_sync_age)})",
                )
            )
    return problems


def clock(moment: dt.datetime) -> str:
    """``2026-11-27 13:00 EST``: a moment in New York time, for people."""
    return moment.astimezone(NEW_YORK).strftime("%Y-%m-%d %H:%M %Z")


def span(seconds: float) -> str:
    """A duration for people: ``45s``, ``10m``, ``1h05m``, ``26h``, ``2d03h``."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, _ = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h" if hours else f"{days}d"


def _run_info(row: Mapping[str, Any], now: dt.datetime) -> RunInfo:
    ended = row["finished_at"] or now
    heartbeat = row["heartbeat_at"]
    return RunInfo(
        duration_seconds=max((ended - row["started_at"]).total_seconds(), 0.0),
        heartbeat_age_seconds=(
            (now - heartbeat).total_seconds()
            if heartbeat is not None and row["status"] == "running"
            else None
        ),
        **{name: row[name] for name in _RUN_FIELDS},
    )


NOT_BUILT: Final = "not built yet: ingest_daily has not run since the close"

# What stored snapshots take: both tiers, and the ids the compact one refers to
SNAPSHOT_TABLES: Final = (
    "option_snapshots",
    "snapshot_rows",
    "snapshot_tickers",
    "snapshot_underlyings",
)

_RUN_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(RunInfo)
    if f.name not in ("duration_seconds", "heartbeat_age_seconds")
)


def _quality(ticker: str, rows: Sequence[Mapping[str, Any]]) -> Quality:
    sums = {name: sum(row[name] for row in rows) for name in QUALITY_COUNTS}
    chains = sum(1 for row in rows if row["committed_at"] is not None)
    return Quality(ticker=ticker, chains=chains, **sums)


def _storage(
    tables: Sequence[Mapping[str, Any]], partitions: Sequence[Mapping[str, Any]]
) -> Storage:
    sizes = [TableSize(row["table"], int(row["bytes"]), row["partitions"]) for row in tables]
    estimated = [p["estimate"] for p in partitions if p["estimate"] is not None]
    counted = [p["count"] for p in partitions if p["count"] is not None]
    rows = sum(estimated) + sum(counted)
    if counted and estimated:
        source = "estimate+count"
    elif counted:
        source = "count"
    else:
        source = "estimate"
    snapshot_bytes = sum(t.bytes for t in sizes if t.table in SNAPSHOT_TABLES)
    return Storage(
        tables=sizes,
        total_bytes=sum(t.bytes for t in sizes),
        snapshot_rows=rows,
        snapshot_rows_source=source,
        bytes_per_snapshot=snapshot_bytes / rows if rows else None,
    )


def _until(moment: dt.datetime | None, now: dt.datetime) -> dt.datetime | None:
    return moment if moment is not None and moment <= now else None


def _latest(*moments: dt.datetime | None) -> dt.datetime | None:
    return max((m for m in moments if m is not None), default=None)


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.astimezone(dt.UTC).isoformat() if moment is not None else None


def _plain(obj: Any) -> Any:
    """A dataclass (or a value in one) as JSON-ready values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [_plain(item) for item in obj]
    if isinstance(obj, dt.datetime):
        return _iso(obj)
    if isinstance(obj, dt.date):
        return obj.isoformat()
    return obj
