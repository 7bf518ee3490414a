"""The chaos suite's fixtures, its invariants and its summary table.

One PostgreSQL cluster of the suite's own (cases stop and restart it), one simulator process
per configuration, and a fresh database per job and case, cloned from a migrated template
(``cases.py`` runs the cases). The invariants below are checked after the victims of every
case and again after its follow-up; each returns its violations, so a case reports them all.
Every case adds one row per job to the table printed at the end of the session.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack

import asyncpg
import pytest

from options.errors import ExitCode
from options.simulator import SimulatorProcess

from .cases import Chaos, Invariants, Summary, SummaryRow
from .harness import (
    NOTHING_TO_RESUME,
    PLANNED_KEYS,
    Child,
    Cluster,
    Expect,
    Schedule,
    SimulatorSpec,
    simulator_specs,
)

SUMMARY = pytest.StashKey[Summary]()
LOST_LEASE = "lost its lease"  # what a job says when another copy took its run over


# -- the invariants ---------------------------------------------------------------------------


def _rows(records: Sequence[asyncpg.Record], limit: int = 5) -> str:
    shown = "; ".join(str(tuple(r.values())) for r in records[:limit])
    return shown + (f"; ... ({len(records)} in all)" if len(records) > limit else "")


async def duplicate_snapshots(conn: asyncpg.Connection) -> list[str]:
    """No (ticker, captured_at) is stored twice."""
    found = await conn.fetch(
        "SELECT ticker, captured_at, count(*) FROM option_snapshots GROUP BY 1, 2 "
        "HAVING count(*) > 1"
    )
    return [f"snapshots stored twice: {_rows(found)}"] if found else []


async def coverage_disagreeing_with_rows(conn: asyncpg.Connection) -> list[str]:
    """Every (slot, underlying) with rows has a coverage row whose snapshots_stored counts
    exactly those rows."""
    found = await conn.fetch(
        """
        SELECT coalesce(c.captured_at, s.captured_at), coalesce(c.underlying_ticker,
               s.underlying_ticker), c.snapshots_stored AS coverage_says, coalesce(s.n, 0) AS rows
        FROM snapshot_coverage c
        FULL JOIN (SELECT captured_at, underlying_ticker, count(*) AS n
                   FROM option_snapshots GROUP BY 1, 2) s
          ON s.captured_at = c.captured_at AND s.underlying_ticker = c.underlying_ticker
        WHERE c.snapshots_stored IS DISTINCT FROM coalesce(s.n, 0)
        """
    )
    return [f"coverage disagrees with the rows stored: {_rows(found)}"] if found else []


async def slots_not_as_planned(conn: asyncpg.Connection) -> list[str]:
    """A slot's coverage rows are the chains its run planned: one per tracked underlying,
    ``underlyings_requested`` of them; a run resuming the slot takes some of them; no slot
    exists without the run that planned it."""
    found = await conn.fetch(
        """
        SELECT r.id, r.captured_at, r.underlyings_requested,
               array(SELECT underlying_ticker FROM snapshot_coverage c
                     WHERE c.captured_at = r.captured_at ORDER BY 1) AS planned
        FROM ingest_runs r
        WHERE r.job = 'snapshots' AND r.captured_at IS NOT NULL AND NOT r.resumed
        """
    )
    problems = [
        f"run {r['id']} planned {r['underlyings_requested']} chains of slot {r['captured_at']} "
        f"but its coverage rows are {r['planned']}"
        for r in found
        if r["planned"] != PLANNED_KEYS or r["underlyings_requested"] != len(PLANNED_KEYS)
    ]
    resumed = await conn.fetch(
        """
        SELECT r.id, r.captured_at, r.underlyings_requested,
               (SELECT count(*) FROM snapshot_coverage c WHERE c.captured_at = r.captured_at)
        FROM ingest_runs r
        WHERE r.job = 'snapshots' AND r.captured_at IS NOT NULL AND r.resumed
        """
    )
    problems += [
        f"run {r['id']} resumed {r['underlyings_requested']} chains of slot {r['captured_at']}, "
        f"which planned {r['count']}"
        for r in resumed
        if not 0 < r["underlyings_requested"] <= r["count"]
    ]
    orphans = await conn.fetch(
        """
        SELECT DISTINCT c.captured_at FROM snapshot_coverage c
        WHERE NOT EXISTS (SELECT 1 FROM ingest_runs r WHERE r.job = 'snapshots'
                          AND r.captured_at = c.captured_at AND NOT r.resumed)
        """
    )
    if orphans:
        problems.append(f"coverage rows of slots no run planned: {_rows(orphans)}")
    return problems


async def false_completes(conn: asyncpg.Connection) -> list[str]:
    """``complete`` only where every active contract of the underlying that existed at that
    slot (and had not expired) has a row in it."""
    found = await conn.fetch(
        """
        SELECT c.captured_at, c.underlying_ticker, count(*) AS without_row, min(k.ticker)
        FROM snapshot_coverage c
        JOIN option_contracts k
          ON k.underlying_ticker = c.underlying_ticker AND k.active
         AND k.first_seen_at <= c.captured_at
         AND (k.expiration_date IS NULL
              OR k.expiration_date >= (c.captured_at AT TIME ZONE 'America/New_York')::date)
        WHERE c.complete AND NOT EXISTS (
            SELECT 1 FROM option_snapshots s
            WHERE s.ticker = k.ticker AND s.captured_at = c.captured_at)
        GROUP BY 1, 2
        """
    )
    if not found:
        return []
    return [f"coverage complete with active contracts lacking a row: {_rows(found)}"]


async def listed_but_inactive(conn: asyncpg.Connection, listed: Sequence[str]) -> list[str]:
    """No contract the API still lists is inactive."""
    found = await conn.fetch(
        "SELECT ticker, last_seen_at FROM option_contracts "
        "WHERE NOT active AND ticker = ANY($1::text[]) ORDER BY 1",
        list(listed),
    )
    return [f"contracts the API lists are inactive: {_rows(found)}"] if found else []


async def ledger_disagreeing_with_data(conn: asyncpg.Connection) -> list[str]:
    """The run ledger counts exactly what was committed, whenever each run stopped.

    The snapshot runs' ``rows_written`` add up to the rows stored; the latest snapshot run
    counts every chain it committed (succeeded: complete) and the latest contracts run every
    underlying it synced (``last_contract_sync_at``) and every contract it wrote (seen at its
    start; a rejected row's contract may be marked seen without being written).
    """
    problems = []
    counted, stored = await conn.fetchrow(
        "SELECT (SELECT coalesce(sum(rows_written), 0) FROM ingest_runs WHERE job = 'snapshots'),"
        " (SELECT count(*) FROM option_snapshots)"
    )
    if counted != stored:
        problems.append(f"the snapshot runs count {counted} rows written, the table holds {stored}")
    chains = await conn.fetchrow(
        """
        SELECT r.id, r.status, r.underlyings_succeeded, r.underlyings_failed,
               count(c.*) FILTER (WHERE c.complete) AS complete, count(c.*) AS committed
        FROM (SELECT * FROM ingest_runs WHERE job = 'snapshots' ORDER BY id DESC LIMIT 1) r
        LEFT JOIN snapshot_coverage c ON c.run_id = r.id AND c.committed_at IS NOT NULL
        GROUP BY 1, 2, 3, 4
        """
    )
    if chains is not None and (
        chains["underlyings_succeeded"] != chains["complete"]
        or chains["underlyings_succeeded"] + chains["underlyings_failed"] != chains["committed"]
    ):
        problems.append(
            f"snapshot run {chains['id']} ({chains['status']}) counts "
            f"{chains['underlyings_succeeded']} chains succeeded and "
            f"{chains['underlyings_failed']} failed, but committed {chains['committed']} "
            f"({chains['complete']} complete)"
        )
    sync = await conn.fetchrow(
        """
        SELECT r.id, r.status, r.underlyings_succeeded, r.rows_written, r.rows_rejected,
               (SELECT count(*) FROM tracked_underlyings t
                WHERE t.last_contract_sync_at = r.started_at) AS synced,
               (SELECT count(*) FROM option_contracts k
                WHERE k.last_seen_at = r.started_at) AS seen
        FROM ingest_runs r WHERE r.job = 'options' ORDER BY r.id DESC LIMIT 1
        """
    )
    if sync is not None and (
        sync["underlyings_succeeded"] != sync["synced"]
        or not sync["rows_written"] <= sync["seen"] <= sync["rows_written"] + sync["rows_rejected"]
    ):
        problems.append(
            f"contracts run {sync['id']} ({sync['status']}) counts "
            f"{sync['underlyings_succeeded']} underlyings and {sync['rows_written']} contracts "
            f"written ({sync['rows_rejected']} rejected), but synced {sync['synced']} "
            f"underlyings and saw {sync['seen']} contracts"
        )
    return problems


async def check_data(conn: asyncpg.Connection, listed: Sequence[str]) -> list[str]:
    """Every invariant of the stored data; returns the violations."""
    return [
        *await duplicate_snapshots(conn),
        *await coverage_disagreeing_with_rows(conn),
        *await slots_not_as_planned(conn),
        *await false_completes(conn),
        *await listed_but_inactive(conn, listed),
        *await ledger_disagreeing_with_data(conn),
    ]


STATUS_OF_EXIT = {0: "succeeded", 3: "partial", 1: "failed", 5: "interrupted"}


async def runs_disagreeing_with_exits(
    conn: asyncpg.Connection, children: Sequence[Child], after_run: int
) -> list[str]:
    """The run row of each child (found by its pid) says what its exit code says: succeeded
    for 0 (or no row when a --resume had nothing to do), partial for 3, failed for 1,
    interrupted for 5 (or no row, when a second signal cancelled the job before it opened its
    run); interrupted for 1 when the job lost its lease (the copy that took over closed the
    row); no row for 4 (or 2).

    A child killed by a signal has no row, or one it closed itself before that signal came
    (it was exiting). After a SIGKILL the next run closes the row 'interrupted'; a SIGTERM
    kills only a job that has not yet installed its handler (no row) or has removed it (its
    row already closed), never a running one.
    """
    problems = []
    for child in children:
        rows = await conn.fetch(
            "SELECT id, status, finished_at, error FROM ingest_runs "
            "WHERE pid = $1 AND job = $2 AND id > $3",
            child.pid,
            child.job.name,
            after_run,
        )
        code = child.code
        statuses = [r["status"] for r in rows]
        if code == 0 and NOTHING_TO_RESUME in child.output():
            right = statuses == []
        elif code == ExitCode.FAILED and LOST_LEASE in child.output():
            # another copy found it silent and closed its run, which it may not touch again
            right = statuses == ["interrupted"]
        elif code == ExitCode.INTERRUPTED and len(child.signalled) >= 2 and statuses == []:
            # the second signal cancelled it before its run was opened: nothing to record
            right = True
        elif code in STATUS_OF_EXIT:
            right = statuses == [STATUS_OF_EXIT[code]]
        elif code is not None and code < 0 and child.signalled:
            last = child.signalled[-1][1]
            closed_before = (
                len(rows) == 1
                and rows[0]["finished_at"] is not None
                and rows[0]["finished_at"] <= last
            )
            killed = code == -signal.SIGKILL and statuses == ["interrupted"]
            right = statuses == [] or closed_before or killed
        else:
            right = statuses == []
        if not right:
            seen = [
                (r["id"], r["status"], r["finished_at"], (r["error"] or "")[:160]) for r in rows
            ]
            problems.append(
                f"{child.job.script} ({child.role}, pid {child.pid}, signals {child.signals}) "
                f"exited {code} but its run rows are {seen}"
            )
    return problems


async def runs_left_running(conn: asyncpg.Connection) -> list[str]:
    """No run is still ``running`` once the follow-up has finished."""
    found = await conn.fetch(
        "SELECT id, job, pid, started_at FROM ingest_runs WHERE status = 'running'"
    )
    return [f"runs left 'running': {_rows(found)}"] if found else []


async def check_runs(
    conn: asyncpg.Connection, children: Sequence[Child], after_run: int
) -> list[str]:
    """Every invariant of the run ledger, once the follow-up has finished."""
    return [
        *await runs_disagreeing_with_exits(conn, children, after_run),
        *await runs_left_running(conn),
    ]


async def unexplained_incomplete(conn: asyncpg.Connection, spec: SimulatorSpec) -> list[str]:
    """After the follow-up every coverage row is complete, except chains read to their end
    whose gaps are the faults the API keeps serving: contracts it hides, rows it serves
    malformed (rejected, and counted against the chain for good)."""
    found = await conn.fetch(
        """
        SELECT captured_at, underlying_ticker, read_to_end, committed_at IS NOT NULL AS committed,
               contracts_missing, rows_rejected, error
        FROM snapshot_coverage WHERE NOT complete ORDER BY 1, 2
        """
    )

    def explained(row: asyncpg.Record) -> bool:
        missing, rejected = row["contracts_missing"], row["rows_rejected"]
        hidden = spec.hidden.get(row["underlying_ticker"], 0)
        return (
            row["committed"]
            and row["read_to_end"]
            and (missing or rejected)
            and (not rejected or spec.rejects_rows)
            and missing <= rejected + hidden
        )

    unexplained = [row for row in found if not explained(row)]
    return [f"chains incomplete after the follow-up: {_rows(unexplained)}"] if unexplained else []


async def listed_not_active(conn: asyncpg.Connection, listed: Sequence[str]) -> list[str]:
    """After a clean contracts sync, every contract the API lists is stored and active."""
    active = await conn.fetchval(
        "SELECT count(*) FROM option_contracts WHERE active AND ticker = ANY($1::text[])",
        list(listed),
    )
    if active == len(listed):
        return []
    return [f"after a clean sync only {active} of the {len(listed)} listed contracts are active"]


INVARIANTS = Invariants(
    data=check_data,
    runs=check_runs,
    snapshots_completed=unexplained_incomplete,
    contracts_completed=listed_not_active,
)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def schedule() -> Schedule:
    """The seeded schedule: ``CHAOS_SEED``, or the fixed default."""
    return Schedule.from_env(os.environ)


@pytest.fixture(scope="session")
def summary(request: pytest.FixtureRequest, schedule: Schedule) -> Summary:
    """The summary table, printed by :func:`pytest_terminal_summary`."""
    table = Summary(schedule.seed)
    request.config.stash[SUMMARY] = table
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown at once, even without -s
            reporter.ensure_newline()
            reporter.write_line(
                f"chaos: CHAOS_SEED={schedule.seed} (set CHAOS_SEED to draw another schedule)"
            )
    return table


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, summary: Summary) -> Iterator[Cluster]:
    """The suite's own PostgreSQL cluster (never TEST_DATABASE_URL: cases restart it)."""
    server = Cluster(tmp_path_factory.mktemp("chaos-pg") / "data")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def simulator_urls(schedule: Schedule) -> Iterator[Callable[[str], str]]:
    """The base URL of a simulator configuration; each runs in its own process, started on
    first use and kept until the session ends."""
    specs = simulator_specs(schedule)
    running: dict[str, str] = {}
    with ExitStack() as stack:

        def url(name: str) -> str:
            if name not in running:
                process = stack.enter_context(SimulatorProcess(specs[name].config))
                running[name] = process.base_url
            return running[name]

        yield url


@pytest.fixture(scope="session")
async def chaos(
    cluster: Cluster,
    schedule: Schedule,
    simulator_urls: Callable[[str], str],
    summary: Summary,
    tmp_path_factory: pytest.TempPathFactory,
) -> Chaos:
    """The shared state of the cases, with its templates made."""
    suite = Chaos(
        cluster,
        schedule,
        simulator_specs(schedule),
        simulator_urls,
        tmp_path_factory.mktemp("chaos-logs"),
        summary,
        INVARIANTS,
    )
    await suite.prepare()
    return suite


@pytest.fixture(scope="session")
async def durations(chaos: Chaos) -> dict[str, float]:
    """How long each job runs when nothing goes wrong (both side by side, as in the cases):
    the clean case, whose invariants hold like every other case's."""
    parts = await chaos.run_case(
        "clean", expect={"snapshots": Expect.of(0), "options": Expect.of(0)}
    )
    # the shorter of the victim and the follow-up's full run: the session's first run is cold
    measured = {
        name: min(part.victims[0].duration, part.children[-1].duration)
        for name, part in parts.items()
    }
    for name, part in parts.items():
        part.row.when = f"{measured[name]:.2f}s"
    return measured


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """The chaos summary table: one row per job and case."""
    table = config.stash.get(SUMMARY, None)
    if table is None or not table.rows:
        return
    header = SummaryRow(
        "case", "job", "", "exit", "expected", "rows stored", "c/i/u", "follow-up", "result"
    )
    columns = [c for c in vars(header) if c != "when"]

    def cells(row: SummaryRow) -> list[str]:
        return [f"{row.case} {row.when}".rstrip(), *(str(getattr(row, c)) for c in columns[1:])]

    lines = [cells(row) for row in (header, *table.rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    terminalreporter.section("chaos summary")
    for line in lines:
        terminalreporter.write_line(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )
    failed = sum(not r.result.startswith("pass") for r in table.rows)
    terminalreporter.write_line(
        f"{len(table.rows)} job runs in {len({r.case for r in table.rows})} cases, {failed} "
        f"failed; CHAOS_SEED={table.seed}; {time.monotonic() - table.started:.0f} s since the "
        "cluster started; c/i/u: chains complete/incomplete/not stored after the victims"
    )
