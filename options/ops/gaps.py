"""Gaps: the snapshot slots of an underlying without a complete chain, and why.

A slot is covered when a coverage row of the underlying with ``complete`` true has its
``captured_at`` within ``[slot, slot + period)``. The cause of a gap comes from the latest
coverage row or snapshot run in that window (the causes are listed in
:mod:`options.ops.status`). Pure: the rows are read by :mod:`options.ops.status_reads`.
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from options.ops.market import NEW_YORK

_ENDED_BADLY: Final = ("failed", "interrupted")


@dataclass(frozen=True)
class Gap:
    """A slot without a complete snapshot of ``ticker``, and why when known."""

    ticker: str
    date: dt.date
    slot: dt.datetime
    cause: str
    detail: str | None
    run_id: int | None


def find_gaps(
    ticker: str,
    slots: Sequence[dt.datetime],
    period: dt.timedelta,
    *,
    now: dt.datetime,
    since: dt.datetime | None,
    coverage: Sequence[Mapping[str, Any]],
    runs: Sequence[Mapping[str, Any]],
    runs_by_id: Mapping[int, Mapping[str, Any]],
) -> list[Gap]:
    """The ``slots`` of one underlying without a complete coverage row, with their causes.

    Args:
        since: when the underlying was tracked; earlier slots are not expected.
        coverage: its coverage rows, by ``captured_at``.
        runs: the snapshot runs of the period, by the moment they captured (or started).
        runs_by_id: the same runs by id, for the runs the coverage rows name.
    """
    times = [row["captured_at"] for row in coverage]
    run_times = [run_moment(run) for run in runs]
    gaps = []
    for slot in slots:
        if slot > now or (since is not None and slot < since):
            continue
        end = slot + period
        rows = coverage[bisect.bisect_left(times, slot) : bisect.bisect_left(times, end)]
        if any(row["complete"] for row in rows):
            continue
        in_window = runs[bisect.bisect_left(run_times, slot) : bisect.bisect_left(run_times, end)]
        cause, detail, run_id, settled = _cause(rows, in_window, runs_by_id)
        if end > now and not settled:
            continue  # the slot's run may still come, or is still working
        gaps.append(Gap(ticker, slot.astimezone(NEW_YORK).date(), slot, cause, detail, run_id))
    return gaps


def _cause(
    rows: Sequence[Mapping[str, Any]],
    runs: Sequence[Mapping[str, Any]],
    runs_by_id: Mapping[int, Mapping[str, Any]],
) -> tuple[str, str | None, int | None, bool]:
    """Why a slot window has no complete row: (cause, detail, run id, whether it is settled)."""
    if rows:
        row = rows[-1]
        run = runs_by_id.get(row["run_id"])
        status = run["status"] if run is not None else None
        if row["committed_at"] is None and run is not None:
            if status == "running":
                return "run in progress", None, row["run_id"], False
            if status in _ENDED_BADLY:
                return f"run {status}", _first_line(run["error"]), row["run_id"], True
        return (
            f"incomplete: {_first_line(row['error']) or 'not complete'}",
            None,
            row["run_id"],
            True,
        )
    if runs:
        run = runs[-1]
        if run["captured_at"] is None:  # it ended (or is) before planning the slot
            if run["status"] == "running":
                return "run in progress", None, run["id"], False
            if run["status"] in _ENDED_BADLY:
                return f"run {run['status']}", _first_line(run["error"]), run["id"], True
        # the slot was planned (with its coverage rows, in one transaction) without this one
        return "not in the run", f"run {run['id']} ({run['status']})", run["id"], True
    return "no run", None, None, False


def run_moment(run: Mapping[str, Any]) -> dt.datetime:
    """The moment a snapshot run's slot is judged by: what it captured, else its start."""
    moment: dt.datetime = run["captured_at"] or run["started_at"]
    return moment


def _first_line(text: str | None) -> str | None:
    if not text:
        return None
    return text.strip().splitlines()[0] if text.strip() else None
