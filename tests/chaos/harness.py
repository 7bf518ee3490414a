"""Plumbing of the chaos suite: the jobs as child processes, the cluster they write to, the
seeded schedule and the simulator configurations.

Nothing here asserts: the invariants live in ``conftest.py``, the case runner in ``cases.py``
and the cases in ``test_chaos.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from options.dev.localdb import (
    LOG_FILE_NAME,
    LocalPostgres,
    find_postgres_bindir,
    start_local_postgres,
)
from options.jobs.filters import market_today
from options.simulator import SimulatorConfig

BIN = Path(sys.executable).parent  # the console scripts sit beside the interpreter
KEY = "chaos-key"
DEFAULT_SEED = 20261202
# Six chains of 1,200 contracts: five snapshot pages and two listing pages each, so a
# next_url loop or a broken second page reaches both endpoints; one index, asked for as I:SPX.
UNDERLYINGS = ("AAA", "BBB", "CCC", "DDD", "EEE", "I:SPX")
CONTRACTS_PER_UNDERLYING = 1200
LATENCY = 0.1  # per API response: a run lasts about 2 s, mostly spent waiting on the API
SLOW_LATENCY = 0.7  # runs of about 10 s, long enough for heartbeats and idle sessions
WAIT_SECONDS = 120.0  # a child that has not exited by then hangs
# What the jobs are told in every case; a case adds its own variables on top.
BASE_ENV = {
    "POLYGON_API_KEY": KEY,
    "UNDERLYINGS": ",".join(UNDERLYINGS),
    "POLYGON_RATE_LIMIT": "off",
    "HTTP_MAX_RETRIES": "3",  # a page failing forever costs seconds of backoff, not minutes
    "HTTP_TIMEOUT": "1.5",  # a latency spike beyond it is a timeout, retried
    "LOG_LEVEL": "INFO",
}
# PostgreSQL refuses to run as root: as root, options/dev/localdb.py runs its binaries in a
# user namespace where the caller is an ordinary user, and pg_ctl restart must run the same way.
_UNSHARE = ("unshare", "--user", "--map-user=1000", "--map-group=1000", "--")


@dataclass(frozen=True)
class Job:
    """One of the two jobs, as the suite starts it."""

    name: str  # "options" or "snapshots", as ingest_runs.job names it
    args: tuple[str, ...]
    env: Mapping[str, str]

    @property
    def script(self) -> str:
        """The console script."""
        return f"ingest_{self.name}"


# Limited concurrency stretches a run over several rounds of API latency, so a moment drawn
# across its duration lands in fetching, committing and closing alike.
OPTIONS = Job("options", (), {"UNDERLYING_CONCURRENCY": "2"})
SNAPSHOTS = Job("snapshots", ("--force",), {"HTTP_CONCURRENCY": "4"})
JOBS = (SNAPSHOTS, OPTIONS)
NOTHING_TO_RESUME = "Nothing to resume"  # what ingest_snapshots --resume says, exiting 0


def root(underlying: str) -> str:
    """The underlying as its contracts and coverage rows name it (``I:SPX`` -> ``SPX``)."""
    return underlying.removeprefix("I:")


PLANNED_KEYS = sorted(root(u) for u in UNDERLYINGS)  # the coverage rows of every new slot


class Schedule:
    """Every random choice of the suite, drawn from ``CHAOS_SEED``.

    Each purpose gets its own ``random.Random`` seeded from the seed and the purpose's name,
    so adding a case does not move the moments of the others.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Schedule:
        """``CHAOS_SEED`` (an integer), or :data:`DEFAULT_SEED`."""
        raw = environ.get("CHAOS_SEED", "").strip()
        return cls(int(raw) if raw else DEFAULT_SEED)

    def rng(self, purpose: str) -> random.Random:
        """The generator of one purpose."""
        return random.Random(f"{self.seed}:{purpose}")

    def moments(self, purpose: str, count: int, duration: float) -> list[float]:
        """``count`` moments across ``duration`` seconds, one drawn in each ``count``-th of it
        (stratified, so they cover the run from start-up to exit)."""
        rng = self.rng(purpose)
        return [duration * (i + rng.random()) / count for i in range(count)]


@dataclass(frozen=True)
class SimulatorSpec:
    """A named simulator configuration and the data faults it leaves for good."""

    name: str
    config: SimulatorConfig

    @property
    def hidden(self) -> dict[str, int]:
        """Contracts each chain never returns, by coverage key."""
        return {root(name): count for name, count in self.config.hidden_contracts.items()}

    @property
    def rejects_rows(self) -> bool:
        """Whether some snapshots are served malformed (rejected on every read)."""
        return self.config.malformed_snapshots_rate > 0


def simulator_specs(schedule: Schedule) -> dict[str, SimulatorSpec]:
    """The suite's simulator configurations: ``clean``, ``slow``, one per API fault, and
    every fault at once. The targets of per-underlying faults are drawn from the seed."""
    rng = schedule.rng("api-faults")
    broken, looping, hidden = rng.sample(UNDERLYINGS, 3)
    base: dict[str, Any] = {
        "underlyings": UNDERLYINGS,
        "contracts_per_underlying": CONTRACTS_PER_UNDERLYING,
        "api_key": KEY,
        "latency": LATENCY,
        "seed": schedule.rng("universe").randrange(2**31),
        # New York's date, as the jobs take it: no contract of the universe has expired
        "as_of": market_today(),
    }
    faults: dict[str, dict[str, Any]] = {
        "5xx": {"error_rate": 0.15},
        "429-bursts": {"throttle_bursts": 20, "throttle_burst_length": 3},
        "truncated": {"truncate_rate": 0.15},
        # page 2 of both the listing (the last of two) and the chain snapshot (of five)
        "next-url-loop": {"looping_pages": {root(looping): 2}},
        "broken-page": {"broken_pages": {root(broken): rng.choice((1, 2))}},
        "latency-spikes": {"latency_spike_rate": 0.1, "latency_spike": 2.0},
        "malformed-rows": {"malformed_contracts_rate": 0.02, "malformed_snapshots_rate": 0.01},
        "hidden-contracts": {"hidden_contracts": {root(hidden): rng.randint(3, 9)}},
    }
    together: dict[str, Any] = {}
    for knobs in faults.values():
        together.update(knobs)
    specs = {"clean": {}, "slow": {"latency": SLOW_LATENCY}, **faults, "all-together": together}
    return {
        name: SimulatorSpec(name, SimulatorConfig(**{**base, **knobs}))
        for name, knobs in specs.items()
    }


# -- what a case expects ----------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """The exit codes a case allows its victims.

    Attributes:
        label: the expectation as the summary shows it.
        codes: the codes each victim may exit with (negative: killed by that signal).
        exactly: for copies started at once, their sorted codes.
        transient: exit 3 is allowed too, when the run's error shows a transient fault whose
            retries ran out (a 5xx, a 429, a truncated body, a timeout).
    """

    label: str
    codes: frozenset[int] = frozenset()
    exactly: tuple[int, ...] | None = None
    transient: bool = False

    @classmethod
    def of(cls, *codes: int, label: str | None = None, transient: bool = False) -> Expect:
        """Each victim exits with one of ``codes``."""
        text = label or "/".join(str(c) for c in codes) + (" (3: retries ran out)" * transient)
        return cls(text, frozenset(codes), transient=transient)

    @classmethod
    def copies(cls, *codes: int) -> Expect:
        """Copies started at once exit with exactly these codes, in any order."""
        return cls(" and ".join(map(str, codes)), exactly=tuple(sorted(codes)))


# What a transient fault looks like in a run's error once the retries ran out.
TRANSIENT_CAUSE = re.compile(r"HTTP (5\d\d|429)|not valid JSON|timed out", re.IGNORECASE)


@dataclass
class Child:
    """A job started as a child process, its output going to ``log``."""

    job: Job
    role: str
    popen: subprocess.Popen[bytes]
    log: Path
    started: float
    args: tuple[str, ...]
    signals: list[str] = field(default_factory=list)
    signalled: list[tuple[signal.Signals, dt.datetime]] = field(default_factory=list)
    ended: float | None = None

    @property
    def pid(self) -> int:
        """The child's pid, as ``ingest_runs.pid`` records it."""
        return self.popen.pid

    @property
    def code(self) -> int | None:
        """The exit code (negative: the signal that killed it), or ``None`` while running."""
        return self.popen.poll()

    @property
    def elapsed(self) -> float:
        """Seconds since the child was started (until its exit, once it has exited)."""
        return (self.ended or time.monotonic()) - self.started

    @property
    def duration(self) -> float:
        """Seconds from start to exit (seen by :meth:`wait`)."""
        assert self.ended is not None, "the child has not been waited for"
        return self.ended - self.started

    def send(self, sig: signal.Signals) -> bool:
        """Send ``sig`` if the child still runs; returns whether it was sent."""
        if self.popen.poll() is not None:
            return False
        self.signalled.append((sig, dt.datetime.now(dt.UTC)))  # to compare with finished_at
        self.popen.send_signal(sig)
        self.signals.append(f"{sig.name}@{self.elapsed:.2f}s")
        return True

    async def wait(self, limit: float = WAIT_SECONDS) -> int:
        """Wait for the exit (polling: the event loop stays free for the other children);
        a child still running after ``limit`` seconds is killed and -9 returned."""
        deadline = time.monotonic() + limit
        while (code := self.popen.poll()) is None:
            if time.monotonic() > deadline:
                self.signals.append("SIGKILL (hung)")
                self.popen.kill()
                code = self.popen.wait()
                break
            await asyncio.sleep(0.02)
        if self.ended is None:
            self.ended = time.monotonic()
        return code

    def output(self) -> str:
        """Everything the child wrote."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 12) -> str:
        """The child's last lines, indented, for a failure message."""
        text = self.output().splitlines()[-lines:]
        return "\n".join(f"      | {line}" for line in text)

    def describe(self) -> str:
        """``ingest_snapshots --force (victim, pid 123, exit -9, SIGKILL@1.20s)``."""
        signals = f", {' '.join(self.signals)}" if self.signals else ""
        return (
            f"{self.job.script} {' '.join(self.args)} ({self.role}, pid {self.pid}, "
            f"exit {self.code}{signals}, log {self.log})"
        )


_SPAWNED = itertools.count(1)  # numbers the logs in the order the children started


def spawn(
    job: Job,
    *,
    role: str,
    dsn: str,
    base_url: str,
    workdir: Path,
    args: tuple[str, ...] | None = None,
    env: Mapping[str, str] | None = None,
) -> Child:
    """Start ``job`` as its console script with settings in the environment only.

    The child runs in ``workdir`` (no ``.env`` there) with an environment built from scratch,
    so neither the clone's ``.env`` nor the caller's variables reach it.
    """
    args = job.args if args is None else args
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{next(_SPAWNED):03d}-{job.script}-{role}.log"
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        **BASE_ENV,
        **job.env,
        "DATABASE_URL": dsn,
        "POLYGON_BASE_URL": base_url,
        **(env or {}),
    }
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [str(BIN / job.script), *args, "--log-format", "text"],
            cwd=workdir,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Child(job, role, popen, log, time.monotonic(), (*args, "--log-format", "text"))


class Cluster:
    """The suite's own PostgreSQL cluster, which cases stop, start and restart."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server: LocalPostgres = start_local_postgres(data_dir)

    @property
    def port(self) -> int:
        """The port, the same across restarts."""
        return self.server.port

    def dsn(self, database: str) -> str:
        """The URL of ``database`` on the cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def log_size(self) -> int:
        """Where the server log ends now (see :meth:`log_since`)."""
        log = self.data_dir / LOG_FILE_NAME
        return log.stat().st_size if log.exists() else 0

    def log_since(self, offset: int) -> str:
        """What the server logged after ``offset``."""
        with (self.data_dir / LOG_FILE_NAME).open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: sessions are terminated, the server goes away."""
        self.server.stop()

    def start(self) -> None:
        """Start the stopped cluster again on the same port."""
        self.server = start_local_postgres(self.data_dir, port=self.port)

    def restart(self) -> None:
        """``pg_ctl restart -m fast`` (the server's options are kept in postmaster.opts)."""
        prefix = _UNSHARE if os.geteuid() == 0 and shutil.which("unshare") else ()
        pg_ctl = str(find_postgres_bindir() / "pg_ctl")
        data, log = str(self.data_dir), str(self.data_dir / LOG_FILE_NAME)
        # -l: the server's output goes to its log, so the pipes close when pg_ctl exits
        argv = [*prefix, pg_ctl, "restart", "-D", data, "-m", "fast", "-w", "-l", log]
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl restart failed: {result.stderr or result.stdout}")
