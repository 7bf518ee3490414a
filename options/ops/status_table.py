"""``ingest_admin status --format table``: the status as aligned plain-text tables.

Times are New York time, as the market keeps them; consecutive gap slots of one underlying,
day and cause are shown as one range.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Final

from options.ops.calendar import CALENDAR
from options.ops.gaps import Gap
from options.ops.market import NEW_YORK
from options.ops.status import RunInfo, Status, clock, span
from options.ops.status_reads import JOBS

ERROR_WIDTH: Final = 60  # characters of an error shown in a table cell
_RIGHT: Final = ">"  # marks a right-aligned (numeric) column heading


def format_status(status: Status) -> str:
    """The whole status as text for a terminal: a heading, then one table per section."""
    sections = [
        _heading(status),
        _section("Runs", _runs(status)),
        _section("Underlyings", _underlyings(status)),
        _section(
            f"Gaps: slots without a complete snapshot, last {len(status.sessions)} trading days",
            _gaps(status),
        ),
        _section("Daily rows: closed sessions not complete, same days", _daily_gaps(status)),
        _section("Data quality: sums over the same days' coverage rows", _quality(status)),
        _section("Storage", _storage(status)),
    ]
    return "\n\n".join(sections)


def _heading(status: Status) -> str:
    verdict = (
        "fresh"
        if status.fresh
        else f"STALE: {len(status.problems)} problem{'s' if len(status.problems) > 1 else ''} "
        "(one line each on stderr)"
    )
    days = ", ".join(
        f"{s.day:%a %m-%d}"
        + (f" (early close {s.close.astimezone(NEW_YORK):%H:%M})" if s.early_close else "")
        for s in status.sessions
    )
    latest = clock(status.latest_slot) if status.latest_slot else "none"
    return "\n".join(
        [
            f"Status at {clock(status.now)}: {verdict}",
            f"Trading days ({CALENDAR}): {days or 'none'}",
            f"Snapshot slots every {status.every} min, 09:30-16:00 New York time; latest {latest}",
            f"Max age: snapshots {span(status.max_age)} of market time, contract syncs "
            f"{span(status.max_sync_age)}",
        ]
    )


def _runs(status: Status) -> list[list[str]]:
    table = [
        [
            "job",
            _RIGHT + "id",
            "status",
            "started",
            _RIGHT + "duration",
            "underlyings",
            _RIGHT + "written",
            _RIGHT + "rejected",
            _RIGHT + "deactivated",
            _RIGHT + "requests",
            "error",
        ]
    ]
    for job in JOBS:
        for run in status.runs.get(job, []):
            table.append(
                [
                    f"ingest_{job}",
                    str(run.id),
                    _run_state(run),
                    _local(run.started_at, seconds=True),
                    span(run.duration_seconds),
                    _underlyings_done(run),
                    f"{run.rows_written:,}",
                    f"{run.rows_rejected:,}",
                    f"{run.contracts_deactivated:,}" if job == "options" else "-",
                    f"{run.api_requests:,}",
                    _short(run.error),
                ]
            )
    return table


def _run_state(run: RunInfo) -> str:
    if run.status != "running":
        return run.status + (" (resumed)" if run.resumed else "")
    if run.heartbeat_age_seconds is None:
        return "running, no heartbeat"
    return f"running, heartbeat {span(run.heartbeat_age_seconds)} ago"


def _underlyings_done(run: RunInfo) -> str:
    done = f"{run.underlyings_succeeded} of {run.underlyings_requested}"
    return done + (f", {run.underlyings_failed} failed" if run.underlyings_failed else "")


def _underlyings(status: Status) -> list[list[str]]:
    table = [
        [
            "ticker",
            "tracked since",
            "last complete snapshot",
            _RIGHT + "market age",
            "last contract sync",
            _RIGHT + "age",
            _RIGHT + "gaps",
            "last error",
        ]
    ]
    for u in status.underlyings:
        since = _local(u.added_at) if u.tracked else "not tracked"
        if u.tracked and not u.enabled:
            since += " (disabled)"
        error = f"{_local(u.last_error_at)} {u.last_error}" if u.last_error else None
        table.append(
            [
                u.ticker,
                since,
                _local(u.last_complete_snapshot_at),
                _span_or_dash(u.snapshot_age_seconds),
                _local(u.last_contract_sync_at),
                _span_or_dash(u.contract_sync_age_seconds),
                str(u.gaps),
                _short(error),
            ]
        )
    return table


def _gaps(status: Status) -> list[list[str]] | str:
    if not status.gaps:
        return "no gaps"
    table = [["ticker", "day", "slots", _RIGHT + "count", "cause"]]
    for ticker, day, first, last, count, cause in collapse(
        status.gaps, dt.timedelta(minutes=status.every)
    ):
        local = [moment.astimezone(NEW_YORK) for moment in (first, last)]
        slots = f"{local[0]:%H:%M}" + (f"-{local[1]:%H:%M}" if count > 1 else "")
        table.append([ticker, f"{day:%a %Y-%m-%d}", slots, str(count), _short(cause, 90)])
    return table


def _daily_gaps(status: Status) -> list[list[str]] | str:
    if not status.daily_gaps:
        return "every closed session is complete"
    table = [["ticker", "session", "reason"]]
    for gap in status.daily_gaps:
        table.append([gap.ticker, f"{gap.session:%a %Y-%m-%d}", _short(gap.reason, 90)])
    return table


def collapse(
    gaps: Sequence[Gap], period: dt.timedelta
) -> list[tuple[str, dt.date, dt.datetime, dt.datetime, int, str]]:
    """Runs of consecutive gap slots (same ticker, day and cause) as ranges:
    (ticker, day, first slot, last slot, count, cause with its detail)."""
    ranges: list[tuple[str, dt.date, dt.datetime, dt.datetime, int, str]] = []
    for gap in gaps:
        cause = gap.cause + (f": {gap.detail}" if gap.detail else "")
        if ranges:
            ticker, day, first, last, count, previous = ranges[-1]
            if (ticker, day, previous) == (gap.ticker, gap.date, cause) and (
                gap.slot - last == period
            ):
                ranges[-1] = (ticker, day, first, gap.slot, count + 1, cause)
                continue
        ranges.append((gap.ticker, gap.date, gap.slot, gap.slot, 1, cause))
    return ranges


def _quality(status: Status) -> list[list[str]]:
    table = [
        [
            "ticker",
            _RIGHT + "chains",
            _RIGHT + "crossed quotes",
            _RIGHT + "negative prices",
            _RIGHT + "IV out of range",
            _RIGHT + "negative OI",
            _RIGHT + "stale quotes",
            _RIGHT + "greeks missing",
            _RIGHT + "rows rejected",
        ]
    ]
    for q in status.quality:
        counts = (
            q.chains,
            q.crossed_quotes,
            q.negative_prices,
            q.iv_out_of_range,
            q.negative_open_interest,
            q.stale_quotes,
            q.greeks_missing,
            q.rows_rejected,
        )
        table.append([q.ticker, *(f"{n:,}" for n in counts)])
    return table


def _storage(status: Status) -> str:
    storage = status.storage
    table = [["table", _RIGHT + "size", _RIGHT + "partitions"]]
    for t in storage.tables:
        table.append(
            [t.table, size(t.bytes), str(t.partitions) if t.partitions is not None else ""]
        )
    table.append(["total", size(storage.total_bytes), ""])
    source = {
        "estimate": "estimated from the statistics",
        "count": "counted",
        "estimate+count": "estimated; partitions never analyzed counted",
    }[storage.snapshot_rows_source]
    per_row = (
        f"{storage.bytes_per_snapshot:,.0f} bytes per stored snapshot"
        if storage.bytes_per_snapshot is not None
        else "no snapshot stored"
    )
    return (
        _align(table) + f"\nsnapshots (option_snapshots, snapshot_rows and their ids): "
        f"{storage.snapshot_rows:,} rows ({source}), {per_row}"
    )


def size(count: int) -> str:
    """Bytes for people, in powers of 1024 as PostgreSQL's ``pg_size_pretty`` counts."""
    value = float(count)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "bytes" else f"{value:,.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _section(title: str, body: list[list[str]] | str) -> str:
    text = body if isinstance(body, str) else _align(body)
    return f"{title}\n{text}"


def _align(table: list[list[str]]) -> str:
    """Columns padded to their widest cell; headings marked :data:`_RIGHT` align right."""
    right = [heading.startswith(_RIGHT) for heading in table[0]]
    rows = [[cell.removeprefix(_RIGHT) for cell in table[0]], *table[1:]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(right))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if flush else cell.ljust(width)
            for cell, width, flush in zip(row, widths, right, strict=True)
        ).rstrip()
        for row in rows
    )


def _local(moment: dt.datetime | None, *, seconds: bool = False) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(NEW_YORK).strftime(
        "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"
    )


def _span_or_dash(seconds: float | None) -> str:
    return span(seconds) if seconds is not None else "-"


def _short(text: str | None, width: int = ERROR_WIDTH) -> str:
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"
