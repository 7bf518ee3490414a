"""The world the lifecycle model (tests/test_lifecycle_model.py) drives, and what it reads back.

A :class:`World` is one machine run: its own database (cloned from the migrated template), the
simulator (one server per fault setting, every chain page it serves recorded by a
:class:`Recorder`), the archive (a local directory or a bucket on the S3 test server), and one
event loop (:class:`asyncio.Runner`) that every step runs its coroutines on, so the pool and the
servers live across the steps of the run. A snapshot run is taken by the real job: in this
process (complete, broken, stopped by its ``stop`` event at the n-th page), or in a child process
SIGKILLed at the n-th page (forked from a server that has the project loaded, so it starts in
milliseconds). The job stamps its slot with the clock: :meth:`World.move_new_slot` moves it to
its time in the past, as tests/test_lifecycle.py's ``move_last_slot`` does.

:func:`observe` reads back everything the invariants look at, from every tier.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import multiprocessing
import sys
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
import orjson
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from aiohttp import web

from options.config import NO_ENV_FILE, S3Access, Secret, Settings
from options.errors import DayRefusedError, ExitCode, RunInterrupted
from options.jobs.wiring import run_options_job, run_snapshots_job
from options.ops.calendar import Session, sessions_between
from options.simulator import RunningSimulator, SimulatorConfig, create_app, start_server
from options.store.archive_files import ArchiveLocation, open_archive
from options.store.lifecycle import HOT, Tier
from options.store.partitions import ensure_partitions
from options.store.reads import READ_COLUMNS, Archive
from tests.conftest import SIM_KEY, with_database

T = TypeVar("T")
Key = tuple[dt.datetime, str]
"""A snapshot: (slot, contract)."""

UNDERLYINGS = ("AAA", "BBB", "I:CCC")
KEYS = tuple(u.removeprefix("I:") for u in UNDERLYINGS)
"""The underlyings as the data names them."""
CONTRACTS = 255
"""Two pages of a chain (250 and 5): a chain broken or stopped at its second page is stored
in part, so a resume has contracts to add beside stored ones."""
SESSIONS = 5
SLOT_TIMES = (
    dt.timedelta(minutes=30),  # 10:00 New York
    dt.timedelta(hours=3, minutes=30),  # 13:00
)
AFTER_CLOSE = (
    dt.timedelta(minutes=5),  # 16:05: still the session's closing slot (the 16:00 timer)
    dt.timedelta(hours=3, minutes=30),  # 19:30 New York: the next UTC day
)
MILLISECOND = dt.timedelta(milliseconds=1)
GREEKS = ("implied_volatility", "delta", "gamma", "theta", "vega")
TIMES = ("quote_updated_at", "last_trade_at")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Grid:
    """The past the model lives in: a few sessions that ended days ago, and the moments of
    each a slot may be taken at, in order."""

    sessions: tuple[Session, ...]
    moments: tuple[dt.datetime, ...]
    end: dt.datetime
    """Two days after the last session: every day is over."""

    @classmethod
    def before(cls, today: dt.date) -> Grid:
        """The last :data:`SESSIONS` sessions that ended at least three days before ``today``
        (New York's date): their days are over for every stage, whatever the hour."""
        sessions = tuple(sessions_between(today - dt.timedelta(days=30), today)[:-3][-SESSIONS:])
        moments = sorted(
            {
                *(s.open + t for s in sessions for t in SLOT_TIMES),
                *(s.close + t for s in sessions for t in AFTER_CLOSE),
            }
        )
        return cls(sessions, tuple(moments), sessions[-1].close + dt.timedelta(days=2))

    @property
    def start(self) -> dt.datetime:
        """Before the first moment."""
        return self.moments[0] - dt.timedelta(hours=1)

    def after(self, clock: dt.datetime, skip: int = 0) -> dt.datetime | None:
        """The ``skip``-th moment after ``clock`` (0: the next one), or ``None``."""
        later = [m for m in self.moments if m > clock]
        return later[skip] if skip < len(later) else None


# --- what the simulator served -------------------------------------------------------------


class Recorder:
    """Every chain-snapshot page the simulators serve (an ``on_response_prepare`` hook): the
    results by contract, and a hook called with the number of pages served so far."""

    def __init__(self) -> None:
        self.served: dict[str, list[dict[str, Any]]] = {}
        self.pages = 0
        self.on_page: Any = None

    def reset(self, on_page: Any = None) -> None:
        """Forget what was served; call ``on_page(pages)`` at each chain page from now on."""
        self.served, self.pages, self.on_page = {}, 0, on_page

    async def __call__(self, request: web.Request, response: web.StreamResponse) -> None:
        parts = request.path.split("/")
        if request.path.startswith("/v3/snapshot/options/") and len(parts) == 5:
            self.pages += 1
            body = getattr(response, "body", None)
            if response.status == 200 and isinstance(body, bytes):
                for result in orjson.loads(body).get("results") or []:
                    self.served.setdefault(result["details"]["ticker"], []).append(result)
            if self.on_page is not None:
                self.on_page(self.pages)


def served_row(raw: dict[str, Any], *, underlying: str, slot: dt.datetime) -> dict[str, Any]:
    """A chain-snapshot result as ``snapshot_reads`` gives it back (the README's columns), read
    from the JSON here, not by the project's normalizer."""
    quote = raw.get("last_quote") or {}
    trade = raw.get("last_trade") or {}
    day = raw.get("day") or {}
    greeks = raw.get("greeks") or {}
    asset = raw.get("underlying_asset") or {}
    details = raw["details"]

    def moment(ns: int | None) -> dt.datetime | None:
        return None if not ns else EPOCH + dt.timedelta(microseconds=ns // 1000)

    return {
        "captured_at": slot,
        "underlying_ticker": underlying,
        "ticker": details["ticker"],
        "contract_type": details.get("contract_type"),
        "expiration_date": dt.date.fromisoformat(details["expiration_date"]),
        "strike_price": float(details["strike_price"]),
        "bid": quote.get("bid"),
        "bid_size": quote.get("bid_size"),
        "ask": quote.get("ask"),
        "ask_size": quote.get("ask_size"),
        "midpoint": quote.get("midpoint"),
        "quote_updated_at": moment(quote.get("last_updated")),
        "last_price": trade.get("price"),
        "last_size": trade.get("size"),
        "last_trade_at": moment(trade.get("sip_timestamp")),
        "day_open": day.get("open"),
        "day_high": day.get("high"),
        "day_low": day.get("low"),
        "day_close": day.get("close"),
        "day_volume": day.get("volume"),
        "day_vwap": day.get("vwap"),
        "day_change": day.get("change"),
        "day_change_percent": day.get("change_percent"),
        "day_previous_close": day.get("previous_close"),
        "implied_volatility": raw.get("implied_volatility"),
        "delta": greeks.get("delta"),
        "gamma": greeks.get("gamma"),
        "theta": greeks.get("theta"),
        "vega": greeks.get("vega"),
        "open_interest": raw.get("open_interest"),
        "break_even_price": raw.get("break_even_price"),
        "underlying_price": asset.get("price", asset.get("value")),
        "fmv": raw.get("fmv"),
    }


def plain(row: Any) -> dict[str, Any]:
    """A read row (asyncpg record or Arrow row) as a dict of the read's columns, the strike a
    float as the archive holds it."""
    values = {name: row[name] for name in READ_COLUMNS}
    if isinstance(values["strike_price"], Decimal):
        values["strike_price"] = float(values["strike_price"])
    return values


def differences(expected: dict[str, Any], got: dict[str, Any], *, exact: bool) -> list[str]:
    """The columns of ``got`` that do not read back as ``expected``: exactly when ``exact``,
    else to the compact tier's precision (the README's: IV and greeks as a real holds them,
    quote and trade times to the millisecond, rounded down; every other value exactly)."""
    found = []
    for name in READ_COLUMNS:
        want, have = expected[name], got[name]
        if _same(name, want, have, exact=exact):
            continue
        found.append(f"{name}: {want!r} read back as {have!r}")
    return found


def _same(name: str, want: Any, have: Any, *, exact: bool) -> bool:
    if want is None or have is None:
        return want is None and have is None
    if isinstance(want, float) and math.isnan(want):
        return isinstance(have, float) and math.isnan(have)
    if exact or name not in (*GREEKS, *TIMES):
        return bool(want == have)
    if name in TIMES:
        return bool(have <= want < have + MILLISECOND)
    if want == 0 or 1e-37 <= abs(want) <= 1e37:
        return bool(abs(have - want) <= abs(want) * 2**-24)
    return bool(have == want)


# --- the killed run's process ----------------------------------------------------------------


class Forks:
    """Processes forked from a server that imported this module (the project, asyncpg,
    aiohttp): a child starts in milliseconds, not seconds."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload([__name__])

    def start_forkserver(self) -> None:
        """Start the server now (it imports in the background; the first child waits)."""
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def process(self, target: Any, args: tuple[Any, ...]) -> Any:
        return self.context.Process(target=target, args=args)


_FORKS: list[Forks] = []


def forks() -> Forks:
    """The one :class:`Forks` of this process."""
    if not _FORKS:
        _FORKS.append(Forks())
    return _FORKS[0]


def snapshot_child(environ: dict[str, str], resume: bool) -> None:
    """``ingest_snapshots --force [--resume]`` with ``environ`` as its whole environment."""
    settings = Settings.from_env(environ, env_file=NO_ENV_FILE)
    try:
        code = asyncio.run(run_snapshots_job(settings, resume=resume, force=True))
    except DayRefusedError:
        code = ExitCode.FAILED
    except RunInterrupted:
        code = ExitCode.INTERRUPTED
    sys.exit(int(code))


# --- one machine run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    """What the simulator does wrong for one snapshot run."""

    broken: tuple[str, int] | None = None  # underlying, 1-based page answering 500
    hidden: tuple[str, int] | None = None  # underlying, contracts missing from its chain


@dataclass
class Taken:
    """How a snapshot run ended: its exit code (``None``: killed or refused)."""

    code: ExitCode | None
    refused: str | None = None
    killed: bool = False
    # not in the repr: asyncio.Runner formats the finished task, its result included
    served: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)


class World:
    """One machine run's database, simulators, archive and event loop (see the module
    docstring). :meth:`run` drives a coroutine on the run's loop; :meth:`close` ends it all."""

    def __init__(
        self,
        *,
        server_url: str,
        template: str,
        archive_url: str,
        s3: S3Access | None,
    ) -> None:
        self.server_url = server_url
        self.template = template
        self.archive_url = archive_url
        self.s3 = s3 or S3Access()
        self.location: ArchiveLocation = open_archive(archive_url, s3=s3)
        self.archive = Archive(self.location)
        self.runner = asyncio.Runner()
        self.recorder = Recorder()
        self.simulators: dict[Faults, RunningSimulator] = {}
        self.name = f"t_model_{uuid.uuid4().hex[:10]}"
        self.url = with_database(server_url, self.name)
        self.pool: asyncpg.Pool | None = None
        self.universe: dict[str, set[str]] = {}
        self.today = dt.datetime.now(dt.UTC).date()
        self.run(self._open())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this run's loop."""
        return self.runner.run(coro)

    def close(self) -> None:
        """Stop the simulators, close the pool, drop the database, end the loop."""
        try:
            self.run(self._close())
        finally:
            self.runner.close()

    @property
    def db(self) -> asyncpg.Pool:
        assert self.pool is not None
        return self.pool

    async def _open(self) -> None:
        admin = await asyncpg.connect(self.server_url)
        try:
            await admin.execute(f"CREATE DATABASE {self.name} TEMPLATE {self.template}")
        finally:
            await admin.close()
        self.pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4)
        simulator = await self.simulator(Faults())
        assert await run_options_job(self.settings(simulator.base_url)) == ExitCode.OK
        for row in await self.db.fetch(
            "SELECT underlying_ticker, ticker FROM option_contracts WHERE active"
        ):
            self.universe.setdefault(row["underlying_ticker"], set()).add(row["ticker"])
        assert {u: len(t) for u, t in self.universe.items()} == dict.fromkeys(KEYS, CONTRACTS)

    async def _close(self) -> None:
        for simulator in self.simulators.values():
            await simulator.close()
        if self.pool is not None:
            await self.pool.close()
        admin = await asyncpg.connect(self.server_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        finally:
            await admin.close()

    async def simulator(self, faults: Faults) -> RunningSimulator:
        """The simulator with ``faults`` (one server per setting, all serving one universe)."""
        if faults not in self.simulators:
            app = create_app(
                SimulatorConfig(
                    underlyings=UNDERLYINGS,
                    contracts_per_underlying=CONTRACTS,
                    api_key=SIM_KEY,
                    as_of=self.today,
                    broken_pages=dict([faults.broken]) if faults.broken else {},
                    hidden_contracts=dict([faults.hidden]) if faults.hidden else {},
                )
            )
            app.on_response_prepare.append(self.recorder)
            self.simulators[faults] = await start_server(app)
        return self.simulators[faults]

    def settings(self, base_url: str, **overrides: Any) -> Settings:
        """The jobs' settings (as tests/conftest.py's ``make_settings``): only ``--resume``
        resumes a slot."""
        values: dict[str, Any] = {
            "database_url": Secret(self.url),
            "api_key": Secret(SIM_KEY),
            "base_url": base_url,
            "underlyings": UNDERLYINGS,
            "rate_limit": None,
            "http_max_retries": 0,  # a broken page is broken for good: no backoff to wait
            "http_timeout": 10.0,
            "db_pool_size": 4,
            "underlying_concurrency": 4,
            "snapshot_resume_window": 0.0,
        }
        values.update(overrides)
        return Settings(**values)

    def archive_settings(self, base_url: str, **overrides: Any) -> Settings:
        """:meth:`settings` with the run's archive as ``ARCHIVE_URL``."""
        return self.settings(base_url, archive_url=self.archive_url, s3=self.s3, **overrides)

    async def take(
        self,
        faults: Faults,
        *,
        resume: bool,
        end: str,
        at_page: int = 1,
        delay: float = 0.0,
    ) -> Taken:
        """A snapshot run (``--resume`` or a new slot) with ``faults``, ended as ``end`` says:
        ``complete`` (left alone), ``stopped`` (its stop set at the ``at_page``-th chain page)
        or ``killed`` (run in a child, SIGKILLed ``delay`` s after the ``at_page``-th page)."""
        simulator = await self.simulator(faults)
        settings = self.settings(simulator.base_url)
        if end == "killed":
            return await self._killed(simulator, resume=resume, at_page=at_page, delay=delay)
        stop = asyncio.Event()

        def on_page(pages: int) -> None:
            if pages >= at_page:
                stop.set()

        self.recorder.reset(on_page if end == "stopped" else None)
        try:
            code = await run_snapshots_job(settings, resume=resume, force=True, stop=stop)
        except DayRefusedError as exc:
            return Taken(None, refused=str(exc), served=self.recorder.served)
        except RunInterrupted:
            # the CLI's exit code for it
            return Taken(ExitCode.INTERRUPTED, served=self.recorder.served)
        return Taken(code, served=self.recorder.served)

    async def _killed(
        self, simulator: RunningSimulator, *, resume: bool, at_page: int, delay: float
    ) -> Taken:
        environ = {
            "DATABASE_URL": self.url,
            "POLYGON_API_KEY": SIM_KEY,
            "POLYGON_BASE_URL": simulator.base_url,
            "UNDERLYINGS": ",".join(UNDERLYINGS),
            "POLYGON_RATE_LIMIT": "off",
            "HTTP_MAX_RETRIES": "0",
            "SNAPSHOT_RESUME_WINDOW": "0",
            "DB_POOL_SIZE": "4",
            "LOG_LEVEL": "WARNING",
        }
        child = forks().process(snapshot_child, (environ, resume))
        loop = asyncio.get_running_loop()

        def on_page(pages: int) -> None:
            if pages == at_page:
                loop.call_later(delay, child.kill)

        self.recorder.reset(on_page)
        child.start()
        waited = 0.0
        while child.is_alive():
            await asyncio.sleep(0.01)
            waited += 0.01
            assert waited < 60, "the snapshot child did not end"
        child.join()
        await self._sessions_ended("ingest_snapshots")
        killed = child.exitcode == -9
        code = None if killed else ExitCode(child.exitcode)
        return Taken(code, killed=killed, served=self.recorder.served)

    async def _sessions_ended(self, application: str) -> None:
        """Wait until the database sessions of a dead child are gone: until then a commit it
        sent may still land, after the slot was moved."""
        waited = 0.0
        while await self.db.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = $1",
            application,
        ):
            await asyncio.sleep(0.01)
            waited += 0.01
            assert waited < 30, f"the sessions of a dead {application} stayed"

    async def move_new_slot(self, to: dt.datetime, *, after: dt.datetime) -> bool:
        """Give the slot the last run planned now (later than ``after``, the model's past) the
        time ``to``: its rows (into that day's partition), coverage, rejects and run. Returns
        whether there was one (a run killed before planning its slot has none)."""
        taken = await self.db.fetch(
            "SELECT DISTINCT captured_at FROM ingest_runs WHERE job = 'snapshots' "
            "AND captured_at > $1",
            after,
        )
        assert len(taken) <= 1, f"more than one new slot: {taken}"
        if not taken:
            return False
        await ensure_partitions(self.db, to.astimezone(dt.UTC).date(), days_ahead=0)
        async with self.db.acquire() as conn, conn.transaction():
            for table in ("option_snapshots", "snapshot_coverage", "rejected_rows", "ingest_runs"):
                await conn.execute(
                    f"UPDATE {table} SET captured_at = $1 WHERE captured_at = $2",
                    to,
                    taken[0]["captured_at"],
                )
        return True


# --- reading everything back ---------------------------------------------------------------


@dataclass(repr=False)  # asyncio.Runner formats the finished task, its result included
class Seen:
    """Everything stored, as read back after a step."""

    tiers: dict[dt.date, Tier]
    hot: Counter[Key]
    compact: Counter[Key]
    archived: Counter[Key]
    rows: dict[Key, dict[str, Any]]
    """The rows of the days whose content changed since the last look (see :func:`observe`)."""
    coverage: dict[tuple[dt.datetime, str], asyncpg.Record]
    computed: dict[Key, asyncpg.Record]
    greeks_slots: dict[dt.datetime, asyncpg.Record]
    contract_days: dict[tuple[str, dt.date], asyncpg.Record]
    daily_coverage: dict[tuple[str, dt.date], asyncpg.Record]
    archived_days: dict[dt.date, asyncpg.Record]
    visible_files: dict[dt.date, list[str]]
    """The Parquet files of each day's directory that a dataset reader (DuckDB, pyarrow)
    sees: names not starting with ``.`` or ``_``."""

    def tier(self, day: dt.date) -> Tier:
        return self.tiers.get(day, HOT)

    def keys(self) -> set[Key]:
        return set(self.hot) | set(self.compact) | set(self.archived)


def utc_day(moment: dt.datetime) -> dt.date:
    return moment.astimezone(dt.UTC).date()


async def observe(world: World, cache: dict[Any, Any]) -> Seen:
    """Read back every tier, the coverage, the derived tables and the archive's files.

    The rows themselves (:attr:`Seen.rows`) are read only for the days whose content changed
    since the last call with this ``cache``: a day of PostgreSQL whose rows (every column, as
    ``snapshot_reads`` gives them) hash the same, or an archived day whose files and record are
    the same, reads back as it did, and was checked then. Every key is read every time."""
    pool = world.db
    tiers = {r["day"]: Tier(r["tier"]) for r in await pool.fetch("SELECT * FROM stored_days")}
    hot = Counter(
        (r[0], r[1]) for r in await pool.fetch("SELECT captured_at, ticker FROM option_snapshots")
    )
    compact = Counter(
        (r[0], r[1]) for r in await pool.fetch("SELECT captured_at, ticker FROM compact_reads")
    )
    digests = {
        r["day"]: r["digest"]
        for r in await pool.fetch(
            """
            SELECT (captured_at AT TIME ZONE 'UTC')::date AS day,
                   md5(string_agg(r::text, '|' ORDER BY captured_at, ticker, r::text)) AS digest
            FROM snapshot_reads r GROUP BY 1
            """
        )
    }
    changed = sorted(d for d, digest in digests.items() if cache.get(("postgresql", d)) != digest)
    rows = {
        (r["captured_at"], r["ticker"]): plain(r)
        for r in await pool.fetch(
            "SELECT * FROM snapshot_reads "
            "WHERE (captured_at AT TIME ZONE 'UTC')::date = ANY($1::date[])",
            changed,
        )
    }
    for day in changed:
        cache[("postgresql", day)] = digests[day]
    records = {r["day"]: r for r in await pool.fetch("SELECT * FROM archived_days")}
    archived: Counter[Key] = Counter()
    for day in sorted(d for d, t in tiers.items() if t is Tier.ARCHIVED):
        read, fresh = await asyncio.to_thread(_archived_rows, world, day, records.get(day), cache)
        for row in read:
            archived[(row["captured_at"], row["ticker"])] += 1
            if fresh:
                rows[(row["captured_at"], row["ticker"])] = row
    return Seen(
        tiers=tiers,
        hot=hot,
        compact=compact,
        archived=archived,
        rows=rows,
        coverage={
            (r["captured_at"], r["underlying_ticker"]): r
            for r in await pool.fetch("SELECT * FROM snapshot_coverage")
        },
        computed={
            **{
                (r["captured_at"], r["ticker"]): r
                for r in await pool.fetch("SELECT * FROM computed_greeks")
            },
            # an archived day's computed greeks moved to the archive with it
            **{
                (r["captured_at"], r["ticker"]): r
                for day, t in tiers.items()
                if t is Tier.ARCHIVED
                for r in await asyncio.to_thread(_archived_computed, world, day)
            },
        },
        greeks_slots={r["captured_at"]: r for r in await pool.fetch("SELECT * FROM greeks_slots")},
        contract_days={
            (r["ticker"], r["session"]): r for r in await pool.fetch("SELECT * FROM contract_days")
        },
        daily_coverage={
            (r["underlying_ticker"], r["session"]): r
            for r in await pool.fetch("SELECT * FROM daily_coverage")
        },
        archived_days=records,
        visible_files=await asyncio.to_thread(_visible_files, world.location),
    )


def _archived_rows(
    world: World, day: dt.date, record: Any, cache: dict[Any, Any]
) -> tuple[list[dict[str, Any]], bool]:
    """The day's rows as the Reader reads an archived day (every file of its directory), and
    whether they were read now (``False``: its files and record are as last read)."""
    location = world.location
    infos = location.filesystem.get_file_info(pafs.FileSelector(location.day_dir(day), True))
    identity = (
        tuple(record) if record is not None else None,
        tuple(sorted((i.path, i.size, i.mtime_ns) for i in infos)),
    )
    if ("archive", day) in cache and cache[("archive", day)][0] == identity:
        return cache[("archive", day)][1], False
    table = world.archive.read(day, ds.field("ticker").is_valid())
    rows = [plain(row) for row in table.to_pylist()]
    cache[("archive", day)] = (identity, rows)
    return rows, True


def _archived_computed(world: World, day: dt.date) -> list[dict[str, Any]]:
    """The computed greeks of an archived day, from its file in the archive (none: [])."""
    from options.store.archive_companions import BY_NAME

    location = world.location
    dataset = BY_NAME["computed_greeks"].dataset
    path = location.day_file(day, dataset)
    if location.filesystem.get_file_info(path).type != pafs.FileType.File:
        return []
    with location.filesystem.open_input_file(path) as source:
        return pq.read_table(source).to_pylist()


def _visible_files(location: ArchiveLocation) -> dict[dt.date, list[str]]:
    selector = pafs.FileSelector(location.root, allow_not_found=True, recursive=True)
    found: dict[dt.date, list[str]] = {}
    for info in location.filesystem.get_file_info(selector):
        parent = info.path.rsplit("/", 2)
        if (
            info.type != pafs.FileType.File
            or not info.base_name.endswith(".parquet")
            or info.base_name.startswith((".", "_"))
            or len(parent) < 3
            or not parent[-2].startswith("date=")
        ):
            continue
        found.setdefault(dt.date.fromisoformat(parent[-2].removeprefix("date=")), []).append(
            info.base_name
        )
    return found


def lacking_greeks(row: dict[str, Any]) -> bool:
    """The API gave the snapshot no IV or no delta: computed greeks are owed to it."""
    return row["implied_volatility"] is None or row["delta"] is None


def by_slot(keys: Iterable[Key]) -> dict[dt.datetime, set[str]]:
    found: dict[dt.datetime, set[str]] = {}
    for slot, ticker in keys:
        found.setdefault(slot, set()).add(ticker)
    return found
