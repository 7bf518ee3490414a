"""The run ledger (``ingest_runs``): a run, its counts, and how a transaction commits them.

The counts that say what a run stored are not bookkeeping on the side: each job adds them
with :func:`count_committed` inside the transaction that stores the rows, which also checks
that the run still holds its lease. Whenever a run stops, its row says exactly what it
committed, and a run that lost its lease can commit nothing more.

The lease that keeps one copy of each job running is in :mod:`options.store.runs_lease`;
:func:`~options.store.runs_recording.recorded_run` wraps a job from its first row to its final
status (:mod:`options.store.runs_recording`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from options.errors import ExitCode, LeaseLostError
from options.store.rejects import RejectBudget

MAX_ERROR_TEXT = 4000

STATUS_EXIT_CODES = {
    "succeeded": ExitCode.OK,
    "partial": ExitCode.PARTIAL,
    "failed": ExitCode.FAILED,
    "interrupted": ExitCode.INTERRUPTED,
}

# the counts only a committing transaction may add to (see count_committed)
COMMITTED_COUNTS = (
    "underlyings_succeeded",
    "underlyings_failed",
    "rows_written",
    "rows_rejected",
    "contracts_deactivated",
)


@dataclass
class RunStats:
    """A run's counts as this process knows them (the database row is the record).

    The committed counts are added after each transaction that stored them commits; the
    others (requested, fetched, API requests) are progress, written by the heartbeat and at
    the end.
    """

    underlyings_requested: int = 0
    underlyings_succeeded: int = 0
    underlyings_failed: int = 0
    rows_fetched: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    contracts_deactivated: int = 0
    api_requests: int = 0

    def add(self, counts: Mapping[str, int]) -> None:
        """Add committed counts (after their transaction committed)."""
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + value)


@dataclass(frozen=True)
class RunSummary:
    """How a run ended, as its ``ingest_runs`` row says (``recorded``), or as this process saw
    it when the row could not be written."""

    job: str
    run_id: int
    status: str
    exit_code: int
    started_at: datetime
    finished_at: datetime | None
    underlyings_requested: int
    underlyings_succeeded: int
    underlyings_failed: int
    rows_fetched: int
    rows_written: int
    rows_rejected: int
    contracts_deactivated: int
    api_requests: int
    error: str | None
    last_success_at: datetime | None
    recorded: bool

    @property
    def seconds(self) -> float | None:
        """The run's duration."""
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    def as_dict(self) -> dict[str, object]:
        """The summary as JSON-ready values (timestamps ISO 8601)."""
        data = dataclasses.asdict(self)
        for key in ("started_at", "finished_at", "last_success_at"):
            moment = data[key]
            data[key] = moment.isoformat() if moment is not None else None
        data["seconds"] = self.seconds
        return data


@dataclass
class Run:
    """A job run in progress: its ledger id, its start time, its counts.

    Attributes:
        resumed: the run completes a snapshot slot an earlier run planned.
        keep: how many more rejected records the run may keep in ``rejected_rows``.
        application_name: what every session of this process's pool is called, recorded with
            the lease (``None`` when the pool's name is not unique to it).
        lease_lost: another copy took the run over; it may write nothing more.
    """

    id: int
    job: str
    started_at: datetime
    stats: RunStats = field(default_factory=RunStats)
    status: str = "running"
    resumed: bool = False
    keep: RejectBudget = field(default_factory=RejectBudget)
    summary: RunSummary | None = None
    application_name: str | None = None
    lease_lost: bool = False


async def count_committed(
    conn: asyncpg.Connection,
    run: Run,
    counts: Mapping[str, int],
    failures: Sequence[str] = (),
    *,
    before: str = "",
    before_args: Sequence[object] = (),
) -> None:
    """Inside the transaction that stores them, add ``counts`` (and the reasons of
    ``failures``, to the run's error text) to the run's row.

    Also the lease check of that transaction: if another copy has closed this run (found it
    dead), nothing may be committed any more.

    Args:
        before: ``WITH`` queries to run in the same statement (saving a round trip per
            commit); their parameters are ``$1`` onwards, ``before_args``.

    Raises:
        LeaseLostError: the run is no longer ``running``; roll the transaction back.
    """
    first = len(before_args) + 1
    run_id, failure, limit = (f"${first + i}" for i in range(3))
    sets = "".join(
        f"{name} = {name} + ${first + 3 + i}, " for i, name in enumerate(COMMITTED_COUNTS)
    )
    found = await conn.fetchval(
        f"""
        {before}
        UPDATE ingest_runs SET {sets}
            error = CASE WHEN {failure}::text IS NULL THEN error
                         ELSE left(concat_ws('; ', error, {failure}::text), {limit}) END
        WHERE id = {run_id} AND status = 'running' RETURNING id
        """,
        *before_args,
        run.id,
        "; ".join(failures) or None,
        MAX_ERROR_TEXT,
        *(int(counts.get(name, 0)) for name in COMMITTED_COUNTS),
    )
    if found is None:
        run.lease_lost = True
        raise LeaseLostError(run_lost_message(run))


def run_lost_message(run: Run) -> str:
    """The error of a run another copy closed as dead."""
    return (
        f"run {run.id} of ingest_{run.job} lost its lease: another copy found it silent and "
        "closed it; this copy stops (what it committed before stays)"
    )
