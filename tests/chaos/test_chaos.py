"""The chaos suite: both jobs killed, stopped, fed faulty pages and cut off from PostgreSQL.

Every case runs ``ingest_snapshots --force`` and ``ingest_options`` side by side as child
processes, each on a database of its own, then checks the invariants of ``conftest.py``,
runs the follow-up with the faults off and checks them again. Moments, targets and durations
come from ``CHAOS_SEED``. Run alone: ``pytest -m chaos``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from collections.abc import Mapping

import pytest

from .cases import Chaos, JobCase
from .harness import Expect

pytestmark = pytest.mark.chaos

KILLS = 20
TERMS = 10
DONE_FIRST = "(0: done first)"
BOTH_SUCCEED = {"snapshots": Expect.of(0), "options": Expect.of(0)}
# stretched runs on the slow simulator (about 10 s): heartbeats and idle sessions happen
SLOW_RUN = {"UNDERLYING_CONCURRENCY": "1", "HTTP_CONCURRENCY": "2"}


async def signal_at(part: JobCase, moment: float, sig: signal.Signals) -> None:
    """Send ``sig`` to the part's victim ``moment`` seconds after it started."""
    victim = part.victims[0]
    await asyncio.sleep(max(0.0, moment - victim.elapsed))
    part.row.when = f"@{moment:.2f}s"
    victim.send(sig)


@pytest.mark.parametrize("index", range(KILLS), ids=lambda i: f"{i:02d}")
async def test_sigkill(chaos: Chaos, durations: Mapping[str, float], index: int) -> None:
    """SIGKILL at one of 20 moments across each job's run: what was committed stays whole
    and counted, the next run closes the killed run and completes the data."""
    moments = {
        job: chaos.schedule.moments(f"sigkill:{job}", KILLS, seconds)[index]
        for job, seconds in durations.items()
    }

    async def kill(parts: Mapping[str, JobCase]) -> None:
        await asyncio.gather(
            *(signal_at(part, moments[job], signal.SIGKILL) for job, part in parts.items())
        )

    killed = Expect.of(-9, 0, label=f"-9 {DONE_FIRST}")
    await chaos.run_case(
        f"sigkill-{index:02d}",
        expect={"snapshots": killed, "options": killed},
        disturb=kill,
        # every other case: a first sync of the contracts, and the next scheduled snapshot
        # run (which resumes a young slot by itself) instead of --resume
        fresh_options=index % 2 == 1,
        follow_up="resume" if index % 2 == 0 else "next",
    )


@pytest.mark.parametrize("index", range(TERMS), ids=lambda i: f"{i:02d}")
async def test_sigterm(chaos: Chaos, durations: Mapping[str, float], index: int) -> None:
    """SIGTERM at one of 10 moments across each job's run (every other case a second one
    soon after): the job stores what it read, records the run interrupted and exits 5."""
    rng = chaos.schedule.rng(f"sigterm-again:{index}")
    again = rng.uniform(0.05, 0.5) if index % 2 else None
    moments = {
        job: chaos.schedule.moments(f"sigterm:{job}", TERMS, seconds)[index]
        for job, seconds in durations.items()
    }

    async def stop(part: JobCase, moment: float) -> None:
        await signal_at(part, moment, signal.SIGTERM)
        if again is not None:
            await asyncio.sleep(again)
            part.victims[0].send(signal.SIGTERM)

    async def terminate(parts: Mapping[str, JobCase]) -> None:
        await asyncio.gather(*(stop(part, moments[job]) for job, part in parts.items()))

    # -15: the signal came before the job's handler was installed (while importing)
    stopped = Expect.of(5, 0, -15, label=f"5 {DONE_FIRST}")
    await chaos.run_case(
        f"sigterm{'x2' if again else ''}-{index:02d}",
        expect={"snapshots": stopped, "options": stopped},
        disturb=terminate,
        follow_up="resume" if index % 2 == 0 else "next",
    )


# Exit codes per fault: (snapshots, options). A next_url loop or a page failing for good fails
# that underlying (3); malformed rows and hidden contracts leave chains incomplete (3) but
# cost the contracts job nothing; transient faults are retried (3 only if retries ran out).
RETRIED = Expect.of(0, transient=True)
API_FAULTS = {  # the simulator's counter that proves the fault fired, or None
    "5xx": ("errors_injected", RETRIED, RETRIED),
    "429-bursts": ("rate_limited", RETRIED, RETRIED),
    "truncated": ("truncated", RETRIED, RETRIED),
    "next-url-loop": ("looped_pages", Expect.of(3), Expect.of(3)),
    "broken-page": ("broken_page_errors", Expect.of(3), Expect.of(3)),
    "latency-spikes": ("latency_spikes", RETRIED, RETRIED),
    "malformed-rows": (None, Expect.of(3), Expect.of(0)),
    "hidden-contracts": (None, Expect.of(3), Expect.of(0)),
    "all-together": ("errors_injected", Expect.of(3), Expect.of(3)),
}


def simulator_stats(base_url: str) -> dict[str, int]:
    """The simulator's fault counters."""
    with urllib.request.urlopen(f"{base_url}/_sim/stats", timeout=10) as response:
        stats: dict[str, int] = json.load(response)
    return stats


@pytest.mark.parametrize("fault", list(API_FAULTS))
async def test_api_fault(chaos: Chaos, fault: str) -> None:
    """Each API fault alone, and all at once: whatever the API does, the data stays whole
    and honest, and the follow-up with the faults off completes it."""
    counter, snapshots, options = API_FAULTS[fault]
    await chaos.run_case(
        f"api-{fault}",
        simulator=fault,
        expect={"snapshots": snapshots, "options": options},
        # a slot the faults left unfinished is resumed; a transient fault leaves none
        follow_up="next" if snapshots.transient else "resume",
    )
    if counter is not None:
        stats = await asyncio.to_thread(simulator_stats, chaos.url(fault))
        assert stats[counter] > 0, f"the fault never fired ({stats}): the case proved nothing"


async def test_backends_terminated(chaos: Chaos, durations: Mapping[str, float]) -> None:
    """All of a job's PostgreSQL sessions terminated at three moments of its run: the job
    reconnects, stores every chain once and succeeds."""
    moments = {
        job: chaos.schedule.moments(f"terminate:{job}", 3, seconds)
        for job, seconds in durations.items()
    }

    async def cut(part: JobCase) -> None:
        victim = part.victims[0]
        total = 0
        for moment in moments[part.job.name]:
            await asyncio.sleep(max(0.0, moment - victim.elapsed))
            if victim.code is None:
                gone = await chaos.terminate(part)
                total += len(gone)
                part.notes.append(f"{len(gone)} cut @{moment:.1f}s")
        if not total:
            part.violations.append("no backend was terminated: the case proved nothing")

    await chaos.run_case(
        "backends-terminated",
        expect=BOTH_SUCCEED,
        follow_up="next",
        disturb=lambda parts: asyncio.gather(*(cut(p) for p in parts.values())),
    )


async def test_server_restarted(chaos: Chaos, durations: Mapping[str, float]) -> None:
    """pg_ctl restart in the middle of both runs: they wait for the server and succeed."""
    moment = chaos.schedule.rng("restart").uniform(0.3, 0.7) * min(durations.values())

    async def restart(parts: Mapping[str, JobCase]) -> None:
        await asyncio.sleep(moment)
        await asyncio.to_thread(chaos.cluster.restart)
        for part in parts.values():
            part.row.when = f"@{moment:.2f}s"

    await chaos.run_case("server-restarted", expect=BOTH_SUCCEED, disturb=restart, follow_up="next")


async def test_server_stopped_for_a_while(chaos: Chaos, durations: Mapping[str, float]) -> None:
    """The server stopped for 10 to 14 s in the middle of both runs, then started: the jobs
    wait for it (DB_RECONNECT_SECONDS) and succeed."""
    rng = chaos.schedule.rng("stop")
    moment = rng.uniform(0.3, 0.7) * min(durations.values())
    pause = rng.uniform(10.0, 14.0)

    async def stop_then_start(parts: Mapping[str, JobCase]) -> None:
        await asyncio.sleep(moment)
        await asyncio.to_thread(chaos.cluster.stop)
        await asyncio.sleep(pause)
        await asyncio.to_thread(chaos.cluster.start)
        for part in parts.values():
            part.row.when = f"@{moment:.2f}s for {pause:.1f}s"

    await chaos.run_case(
        "server-stopped", expect=BOTH_SUCCEED, disturb=stop_then_start, follow_up="next"
    )


async def test_lease_holders_backend_terminated(chaos: Chaos) -> None:
    """One backend of a running job terminated at a time, and a second copy started right
    after: twice early in the run (the oldest backend, which opened the run), then the one
    renewing the lease, caught in its heartbeat's UPDATE. Each copy exits 4, the first run
    goes on and succeeds."""
    rng = chaos.schedule.rng("lease")
    rounds = [rng.uniform(0.1, 0.6), rng.uniform(1.5, 2.2)]  # seconds after the run opened

    async def copy_is_refused(part: JobCase, cut: str) -> None:
        copy = part.spawn("copy", env=SLOW_RUN)
        code = await copy.wait()
        part.notes.append(f"cut {cut}: copy {code}")
        if code != 4:
            part.violations.append(
                f"after terminating {cut}, a second copy exited {code}, not 4: "
                f"{copy.describe()}\n{copy.tail()}"
            )

    async def hold(part: JobCase) -> None:
        if not await chaos.run_opened(part):
            part.violations.append("the run never held its lease")
            return
        opened = part.victims[0].elapsed
        for moment in rounds:
            await asyncio.sleep(max(0.0, opened + moment - part.victims[0].elapsed))
            cut = await chaos.terminate(part, oldest_only=True)
            await copy_is_refused(part, f"oldest {cut[0].split()[0] if cut else 'none'}")
        pid = await chaos.cut_heartbeat(part)
        if pid is None:
            part.violations.append("the run ended before its heartbeat was caught")
            return
        await copy_is_refused(part, f"heartbeat {pid}")

    await chaos.run_case(
        "lease-backend-terminated",
        simulator="slow",
        env=SLOW_RUN,
        expect=BOTH_SUCCEED,
        disturb=lambda parts: asyncio.gather(*(hold(p) for p in parts.values())),
    )


async def test_idle_session_timeout(chaos: Chaos) -> None:
    """idle_session_timeout = 1s on the database for whole runs (about 10 s each): idle
    pooled sessions are closed under the jobs, which succeed all the same."""
    log = chaos.cluster.log_size()
    await chaos.run_case(
        "idle-session-timeout-1s",
        simulator="slow",
        env=SLOW_RUN,
        database_settings={"idle_session_timeout": "1s"},
        expect=BOTH_SUCCEED,
        follow_up="next",
    )
    closed = chaos.cluster.log_since(log).count("idle-session timeout")
    assert closed, "no session was closed for being idle: the case proved nothing"


async def test_two_copies_at_once(chaos: Chaos) -> None:
    """Two copies of each job started at the same moment: one runs, the other exits 4."""
    await chaos.run_case(
        "two-copies-at-once",
        copies=2,
        expect={"snapshots": Expect.copies(0, 4), "options": Expect.copies(0, 4)},
        follow_up="next",
    )


FROZEN_LEASE = 4.0  # RUN_LEASE_SECONDS of the frozen copy: the take-over need not wait 60 s
LOST_LEASE = "lost its lease"


async def test_frozen_holder_is_fenced(chaos: Chaos) -> None:
    """A copy stopped with SIGSTOP mid-commit (a paused VM), its transaction open on its rows
    and its run's row: once its lease has run out, a second copy ends the frozen copy's
    sessions, takes the job over and succeeds; thawed with SIGCONT, the frozen copy stops with
    `lost its lease`, exits 1 and commits nothing after the take-over."""

    async def fence(part: JobCase) -> None:
        victim = part.victims[0]
        if not await chaos.run_opened(part):
            part.violations.append("the run never held its lease")
            return
        caught = await chaos.freeze_mid_commit(part)
        if caught is None:
            part.violations.append("the run ended before a commit was caught: nothing frozen")
            return
        part.row.when = f"@{victim.elapsed:.2f}s"
        await asyncio.sleep(FROZEN_LEASE + 1.0)  # its last heartbeat was before the freeze
        taker = part.spawn("takeover", env={"DB_LOCK_TIMEOUT": "5s"})
        async with chaos.connect(part.database) as conn:
            while taker.code is None:  # until the take-over has closed the frozen run
                if await conn.fetchval(
                    "SELECT exists(SELECT 1 FROM ingest_runs WHERE pid = $1)", taker.pid
                ):
                    break
                await asyncio.sleep(0.05)
        before = await chaos.footprint(part, victim)
        victim.send(signal.SIGCONT)
        code, thawed = await asyncio.gather(taker.wait(), victim.wait())
        after = await chaos.footprint(part, victim)
        part.notes.append(f"frozen in commit of backend {caught}, take-over {code}")
        if code != 0:
            part.violations.append(
                f"the copy taking over the frozen run exited {code}, not 0: "
                f"{taker.describe()}\n{taker.tail()}"
            )
        if thawed == 1 and LOST_LEASE not in victim.output():
            part.violations.append(f"the thawed copy exited 1 without saying it {LOST_LEASE}")
        if before != after or (after is not None and after[-1]):
            part.violations.append(
                f"the thawed copy committed after the take-over: its run was {before} at the "
                f"take-over and is {after} now (last: chains committed late)"
            )

    await chaos.run_case(
        "frozen-holder-fenced",
        env={"RUN_LEASE_SECONDS": f"{FROZEN_LEASE:g}s"},
        expect={"snapshots": Expect.of(1), "options": Expect.of(1)},
        disturb=lambda parts: asyncio.gather(*(fence(p) for p in parts.values())),
    )
