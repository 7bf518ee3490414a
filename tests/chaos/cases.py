"""The case runner of the chaos suite: both jobs side by side, disturbed, checked, followed up.

A case clones a database per job from a template, starts the victims, runs the disturbance
alongside them, checks the invariants ``conftest.py`` hands in, runs the follow-up with the
faults off (``ingest_snapshots --resume --force`` or the next scheduled run; the next clean
``ingest_options``), checks again, and adds one summary row per job.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from options.store.db import apply_migrations
from options.store.runs_lease import HEARTBEAT_SECONDS

from .harness import (
    JOBS,
    KEY,
    NOTHING_TO_RESUME,
    OPTIONS,
    PLANNED_KEYS,
    SNAPSHOTS,
    TRANSIENT_CAUSE,
    UNDERLYINGS,
    Child,
    Cluster,
    Expect,
    Job,
    Schedule,
    SimulatorSpec,
    spawn,
)

EMPTY, SEEDED = "chaos_empty", "chaos_seeded"
CONNECT_SECONDS = 30.0  # how long the suite waits for its own cluster to come back
FREEZE_SECONDS = 30.0  # how long freeze_mid_commit waits for a commit to catch

Check = Callable[..., Awaitable[list[str]]]


@dataclass(frozen=True)
class Invariants:
    """The checks a case runs; each returns its violations (``conftest.py`` defines them).

    Attributes:
        data: ``(conn, listed)``: the stored data, at any moment.
        runs: ``(conn, children, after_run)``: run rows against exit codes, none running.
        snapshots_completed: ``(conn, spec)``: after the snapshot follow-up.
        contracts_completed: ``(conn, listed)``: after the contracts follow-up.
    """

    data: Check
    runs: Check
    snapshots_completed: Check
    contracts_completed: Check


@dataclass
class SummaryRow:
    """One line of the table: one job in one case."""

    case: str
    job: str
    when: str = ""  # the moment of the disturbance, or the run's duration
    exit: str = "-"
    expected: str = "-"
    rows: str = "-"
    coverage: str = "-"
    resume: str = "-"
    result: str = "fail"


@dataclass
class Summary:
    """The table printed at the end of the session."""

    seed: int
    started: float = field(default_factory=time.monotonic)
    rows: list[SummaryRow] = field(default_factory=list)


@dataclass
class JobCase:
    """One job's part of a case: its database, its children, what went wrong."""

    case: str
    job: Job
    database: str
    dsn: str
    spec: SimulatorSpec
    base_url: str
    workdir: Path
    expect: Expect
    after_run: int  # the last run id the template came with
    children: list[Child] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    row: SummaryRow = field(init=False)

    def __post_init__(self) -> None:
        self.row = SummaryRow(self.case, self.job.script, expected=self.expect.label)

    @property
    def victims(self) -> list[Child]:
        """The children the case disturbs."""
        return [c for c in self.children if c.role == "victim"]

    def spawn(
        self,
        role: str,
        *,
        base_url: str | None = None,
        args: tuple[str, ...] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        """Start a copy of the job on this part's database."""
        child = spawn(
            self.job,
            role=role,
            dsn=self.dsn,
            base_url=base_url or self.base_url,
            workdir=self.workdir,
            args=args,
            env=env,
        )
        self.children.append(child)
        return child


Disturbance = Callable[[Mapping[str, JobCase]], Awaitable[None]]


class Chaos:
    """What the cases share: the cluster, the templates, the simulators, the listing."""

    def __init__(
        self,
        cluster: Cluster,
        schedule: Schedule,
        specs: Mapping[str, SimulatorSpec],
        urls: Callable[[str], str],
        logs: Path,
        summary: Summary,
        invariants: Invariants,
    ) -> None:
        self.cluster = cluster
        self.invariants = invariants
        self.schedule = schedule
        self.specs = specs
        self.url = urls
        self.logs = logs
        self.summary = summary
        self.listed: list[str] = []
        self.template_runs: dict[str, int] = {}

    @asynccontextmanager
    async def connect(self, database: str = "postgres") -> AsyncIterator[asyncpg.Connection]:
        """A connection of the suite's own (idle_session_timeout off, whatever the database
        says), tried again for a while when the cluster is coming back."""
        deadline = time.monotonic() + CONNECT_SECONDS
        while True:
            try:
                conn = await asyncpg.connect(
                    self.cluster.dsn(database),
                    server_settings={"idle_session_timeout": "0", "application_name": "chaos"},
                )
                break
            except (OSError, asyncpg.CannotConnectNowError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        try:
            yield conn
        finally:
            await conn.close()

    async def prepare(self) -> None:
        """The templates (migrated; seeded with a clean sync) and the clean listing."""
        async with self.connect() as admin:
            for name in (EMPTY, SEEDED):
                await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {EMPTY}")
        pool = await asyncpg.create_pool(self.cluster.dsn(EMPTY), min_size=1, max_size=2)
        try:
            await apply_migrations(pool)
        finally:
            await pool.close()
        async with self.connect() as admin:
            await admin.execute(f"CREATE DATABASE {SEEDED} TEMPLATE {EMPTY}")
        clean = self.url("clean")
        seeding = spawn(
            OPTIONS, role="seed", dsn=self.cluster.dsn(SEEDED), base_url=clean, workdir=self.logs
        )
        if await seeding.wait() != 0:
            raise RuntimeError(f"seeding the template failed:\n{seeding.tail(30)}")
        for name in (EMPTY, SEEDED):
            async with self.connect(name) as conn:
                self.template_runs[name] = await conn.fetchval(
                    "SELECT coalesce(max(id), 0) FROM ingest_runs"
                )
        self.listed = await asyncio.to_thread(_list_contracts, clean)
        # the simulator renders a chain's market state on first use: not inside a timed run
        await asyncio.to_thread(_warm_chains, clean)

    async def clone(self, template: str, settings: Mapping[str, str] | None) -> str:
        """A fresh database cloned from ``template``, with database-level ``settings``."""
        name = f"c_{uuid.uuid4().hex[:12]}"
        async with self.connect() as admin:
            await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")
            for setting, value in (settings or {}).items():
                await admin.execute(f"ALTER DATABASE {name} SET {setting} = '{value}'")
        return name

    async def terminate(self, part: JobCase, *, oldest_only: bool = False) -> list[str]:
        """Terminate the job's backends on the part's database (or only the oldest, which
        opened the run); returns what was terminated."""
        async with self.connect() as admin:
            found = await admin.fetch(
                """
                SELECT pid, backend_start, left(regexp_replace(query, '\\s+', ' ', 'g'), 60) AS q
                FROM pg_stat_activity
                WHERE datname = $1 AND split_part(application_name, '/', 1) = $2
                ORDER BY backend_start
                """,
                part.database,
                part.job.script,
            )
            chosen = found[:1] if oldest_only else found
            for backend in chosen:
                await admin.execute("SELECT pg_terminate_backend($1)", backend["pid"])
        return [f"{b['pid']} ({b['q']})" for b in chosen]

    async def run_opened(self, part: JobCase) -> bool:
        """Wait until the part's victim holds the run's lease (its row is ``running``);
        ``False`` if it exited first."""
        victim = part.victims[0]
        async with self.connect(part.database) as conn:
            while victim.code is None:
                if await conn.fetchval(
                    "SELECT exists(SELECT 1 FROM ingest_runs WHERE pid = $1 AND status = "
                    "'running')",
                    victim.pid,
                ):
                    return True
                await asyncio.sleep(0.05)
        return False

    async def cut_heartbeat(self, part: JobCase) -> str | None:
        """Terminate the backend that renews the run's lease, caught in the act: the run's
        row is locked just before the renewal is due, so the heartbeat's UPDATE waits where
        it can be seen. Returns the backend's pid, or ``None`` if the run ended first."""
        script, victim = part.job.script, part.victims[0]
        async with self.connect(part.database) as conn:
            run = await conn.fetchrow(
                "SELECT id, extract(epoch FROM heartbeat_at - clock_timestamp())::float8 AS ago "
                "FROM ingest_runs WHERE job = $1 AND status = 'running'",
                part.job.name,
            )
            if run is None:
                return None
            await asyncio.sleep(max(0.0, run["ago"] + HEARTBEAT_SECONDS - 0.3))
            async with conn.transaction():
                await conn.execute("SELECT FROM ingest_runs WHERE id = $1 FOR UPDATE", run["id"])
                deadline = time.monotonic() + HEARTBEAT_SECONDS + 2
                while victim.code is None and time.monotonic() < deadline:
                    # pg_stat_activity is read once per transaction unless told to look again
                    await conn.execute("SELECT pg_stat_clear_snapshot()")
                    pid = await conn.fetchval(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND split_part(application_name, '/', 1) = $1 AND state = 'active' "
                        "AND query LIKE '%heartbeat_at = now()%'",
                        script,
                    )
                    if pid is not None:
                        await conn.execute("SELECT pg_terminate_backend($1)", pid)
                        return str(pid)
                    await asyncio.sleep(0.02)
        return None

    async def freeze_mid_commit(self, part: JobCase) -> str | None:
        """SIGSTOP the part's victim in the middle of a commit, its transaction open: the run's
        row is locked, so the next transaction that stores a unit (a chain, an underlying) waits
        at its lease check (``count_committed``'s UPDATE) with its rows written; once that
        backend is seen waiting, the victim is stopped and the row let go. The frozen copy's
        transaction then holds its rows and its run's row, as a paused VM's would. Returns the
        backend's pid, or ``None`` if the run ended first."""
        script, victim = part.job.script, part.victims[0]
        async with self.connect(part.database) as conn:
            run_id = await conn.fetchval(
                "SELECT id FROM ingest_runs WHERE job = $1 AND status = 'running'", part.job.name
            )
            if run_id is None:
                return None
            async with conn.transaction():
                await conn.execute("SELECT FROM ingest_runs WHERE id = $1 FOR UPDATE", run_id)
                deadline = time.monotonic() + FREEZE_SECONDS
                while victim.code is None and time.monotonic() < deadline:
                    await conn.execute("SELECT pg_stat_clear_snapshot()")
                    pid = await conn.fetchval(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND split_part(application_name, '/', 1) = $1 AND state = 'active' "
                        "AND query LIKE '%underlyings_succeeded = underlyings_succeeded +%'",
                        script,
                    )
                    if pid is not None:
                        victim.send(signal.SIGSTOP)
                        return str(pid)
                    await asyncio.sleep(0.02)
        return None

    async def footprint(self, part: JobCase, child: Child) -> tuple[object, ...] | None:
        """What ``child``'s run has committed: its ledger row and the units recorded with its
        run id (coverage rows committed, contract syncs, rejected rows)."""
        async with self.connect(part.database) as conn:
            row = await conn.fetchrow(
                """
                SELECT r.id, r.status, r.finished_at, r.rows_written, r.underlyings_succeeded,
                       r.underlyings_failed, r.rows_rejected, r.contracts_deactivated, r.error,
                       (SELECT count(*) FROM contract_syncs s WHERE s.run_id = r.id) AS syncs,
                       (SELECT count(*) FROM rejected_rows j WHERE j.run_id = r.id) AS rejects,
                       (SELECT count(*) FROM snapshot_coverage c WHERE c.run_id = r.id
                        AND c.committed_at > r.finished_at) AS late_chains
                FROM ingest_runs r WHERE r.pid = $1 AND r.id > $2
                """,
                child.pid,
                part.after_run,
            )
        return None if row is None else tuple(row.values())

    async def run_case(
        self,
        name: str,
        *,
        expect: Mapping[str, Expect],
        simulator: str = "clean",
        disturb: Disturbance | None = None,
        copies: int = 1,
        fresh_options: bool = False,
        follow_up: str = "resume",
        database_settings: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> dict[str, JobCase]:
        """Run one case: both jobs' victims side by side, ``disturb`` alongside them, the
        invariants, the follow-up (faults off), the invariants again; one summary row per job.

        Args:
            name: the case's name in the summary.
            expect: per job name, the exit codes its victims may have.
            simulator: the simulator configuration the victims talk to.
            disturb: what happens to the victims while they run.
            copies: victims of each job started at once.
            fresh_options: the contracts job starts from an empty database (a first sync)
                instead of the seeded one (a re-sync).
            follow_up: for snapshots, ``resume`` (``--resume --force``, then the next run if
                there was nothing to resume) or ``next`` (the next scheduled run).
            database_settings: ``ALTER DATABASE ... SET`` before the victims start.
            env: extra variables of the victims.

        Raises:
            AssertionError: an invariant does not hold; every violation is listed.
        """
        spec = self.specs[simulator]
        parts: dict[str, JobCase] = {}
        for job in JOBS:
            template = EMPTY if job is OPTIONS and fresh_options else SEEDED
            database = await self.clone(template, database_settings)
            parts[job.name] = JobCase(
                name,
                job,
                database,
                self.cluster.dsn(database),
                spec,
                self.url(simulator),
                self.logs / name / job.name,
                expect[job.name],
                self.template_runs[template],
            )
        try:
            for part in parts.values():
                for _ in range(copies):
                    part.spawn("victim", env=env)
            await asyncio.gather(
                disturb(parts) if disturb else asyncio.sleep(0),
                *(child.wait() for part in parts.values() for child in part.victims),
            )
            for part in parts.values():
                await self._check_victims(part)
            await asyncio.gather(*(self._follow_up(part, follow_up) for part in parts.values()))
        except BaseException as exc:
            for part in parts.values():  # the table shows the case all the same
                part.row.result = f"ERROR: {type(exc).__name__}"
                self.summary.rows.append(part.row)
            raise
        finally:
            for part in parts.values():
                for child in part.children:
                    if child.code is None:
                        child.send(signal.SIGKILL)
                    await child.wait()
        if not any(part.violations for part in parts.values()):
            await self._drop(parts)  # a failed case keeps its databases, for a look
        self._conclude(name, parts)
        return parts

    async def _check_victims(self, part: JobCase) -> None:
        codes = [c.code for c in part.victims]
        part.row.exit = ",".join(str(c) for c in codes)
        async with self.connect(part.database) as conn:
            if not await self._exits_expected(conn, part, codes):
                part.violations.append(
                    f"victims exited {codes}, expected {part.expect.label}: "
                    + "; ".join(c.describe() for c in part.victims)
                )
            part.violations += [
                f"after the victims: {v}" for v in await self.invariants.data(conn, self.listed)
            ]
            if part.job is SNAPSHOTS:
                stored = await conn.fetchval("SELECT count(*) FROM option_snapshots")
                part.row.rows = f"{stored}"
                part.row.coverage = await _coverage_counts(conn)
            else:
                written = await conn.fetchval(
                    "SELECT coalesce(sum(rows_written), 0) FROM ingest_runs WHERE id > $1",
                    part.after_run,
                )
                part.row.rows = f"{written} upserted"

    async def _exits_expected(
        self, conn: asyncpg.Connection, part: JobCase, codes: list[int | None]
    ) -> bool:
        expect = part.expect
        if expect.exactly is not None:
            return tuple(sorted(c for c in codes if c is not None)) == expect.exactly
        for child, code in zip(part.victims, codes, strict=True):
            if code in expect.codes:
                continue
            if expect.transient and code == 3:
                error = await conn.fetchval(
                    "SELECT error FROM ingest_runs WHERE pid = $1 AND id > $2",
                    child.pid,
                    part.after_run,
                )
                if error and TRANSIENT_CAUSE.search(error):
                    part.notes.append("retries ran out")
                    continue
            return False
        return True

    async def _follow_up(self, part: JobCase, mode: str) -> None:
        clean = self.url("clean")
        if part.job is OPTIONS:
            child = part.spawn("next", base_url=clean)
            code = await child.wait()
            async with self.connect(part.database) as conn:
                gaps = await self.invariants.contracts_completed(conn, self.listed)
                active = await conn.fetchval(
                    "SELECT count(*) FROM option_contracts WHERE active AND ticker = ANY($1)",
                    self.listed,
                )
            part.row.resume = f"next {code}: {active}/{len(self.listed)} listed active"
            if code != 0:
                part.violations.append(f"the next clean sync exited {code}: {child.describe()}")
            part.violations += gaps
        else:
            allowed = {0, 3} if part.spec.rejects_rows else {0}
            steps = []
            args = ("--resume", "--force") if mode == "resume" else ("--force",)
            child = part.spawn(mode, base_url=clean, args=args)
            code = await child.wait()
            if mode == "resume" and code == 0 and NOTHING_TO_RESUME in child.output():
                steps.append("resume: nothing")
                async with self.connect(part.database) as conn:
                    left = await conn.fetchval(
                        "SELECT count(*) FROM ingest_runs WHERE status = 'running'"
                    )
                if left:  # a --resume with nothing to do opens no run, so closes none
                    part.notes.append(f"{left} run left running after --resume")
                child = part.spawn("next", base_url=clean, args=("--force",))
                code = await child.wait()
            async with self.connect(part.database) as conn:
                slot = await conn.fetchval(
                    "SELECT captured_at FROM ingest_runs WHERE pid = $1 AND id > $2",
                    child.pid,
                    part.after_run,
                )
                complete, planned = await conn.fetchrow(
                    "SELECT count(*) FILTER (WHERE complete), count(*) FROM snapshot_coverage "
                    "WHERE captured_at = $1",
                    slot,
                )
                part.violations += await self.invariants.snapshots_completed(conn, part.spec)
            steps.append(f"{child.role} {code}: {complete}/{planned} complete")
            part.row.resume = "; ".join(steps)
            if code not in allowed or planned != len(PLANNED_KEYS):
                part.violations.append(
                    f"the follow-up exited {code} (allowed {sorted(allowed)}) with {planned} "
                    f"chains in its slot: {child.describe()}"
                )
        async with self.connect(part.database) as conn:
            part.violations += [
                *await self.invariants.data(conn, self.listed),
                *await self.invariants.runs(conn, part.children, part.after_run),
            ]

    def _conclude(self, name: str, parts: Mapping[str, JobCase]) -> None:
        failures = []
        for part in parts.values():
            part.row.result = "pass" if not part.violations else "FAIL"
            if part.notes:
                part.row.result += f" ({', '.join(part.notes)})"
            self.summary.rows.append(part.row)
            if part.violations:
                failures.append(
                    f"  {part.job.script} on database {part.database}:\n"
                    + "".join(f"    - {v}\n" for v in part.violations)
                    + "".join(f"    {c.describe()}\n{c.tail()}\n" for c in part.children)
                )
        if failures:
            raise AssertionError(
                f"case {name} (CHAOS_SEED={self.schedule.seed}):\n" + "".join(failures)
            )

    async def _drop(self, parts: Mapping[str, JobCase]) -> None:
        async with self.connect() as admin:
            for part in parts.values():
                await admin.execute(f"DROP DATABASE IF EXISTS {part.database} WITH (FORCE)")


async def _coverage_counts(conn: asyncpg.Connection) -> str:
    """``complete/incomplete/unstored`` coverage rows."""
    complete, partial, unstored = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE complete), "
        "count(*) FILTER (WHERE NOT complete AND committed_at IS NOT NULL), "
        "count(*) FILTER (WHERE committed_at IS NULL) FROM snapshot_coverage"
    )
    return f"{complete}/{partial}/{unstored}"


def _get(url: str) -> object:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _list_contracts(base_url: str) -> list[str]:
    """Every contract the API lists, asked directly (the clean simulator: no fault knobs)."""
    tickers: list[str] = []
    url: str | None = f"{base_url}/v3/reference/options/contracts?limit=1000"
    while url:
        page = _get(url)
        assert isinstance(page, dict)
        tickers += [c["ticker"] for c in page["results"]]
        url = page.get("next_url")
    return tickers


def _warm_chains(base_url: str) -> None:
    for underlying in UNDERLYINGS:
        _get(f"{base_url}/v3/snapshot/options/{underlying}?limit=1")
