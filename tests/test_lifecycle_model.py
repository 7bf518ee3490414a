"""A model-based test of a day's whole lifecycle (issue 16, item 6): random sequences of the
stages against a real PostgreSQL and the simulator, every invariant checked after every step.

The machine (:class:`LifecycleMachine`) takes snapshots with the real jobs (complete; partial: a
chain answering 500 from one of its pages, or leaving contracts out; stopped by the job's stop
event at the n-th page; SIGKILLed at the n-th page), each slot moved to its moment on a few
sessions that ended days ago; resumes the latest unfinished slot (a late write, into whichever
tier its day is in by then; a rule of its own first lets that day be compacted or archived);
computes greeks; builds daily rows; compacts; archives (a local
directory, or the S3 test server: the test runs once for each); retires old days (keeping them,
deleting them as SNAPSHOT_DELETE_UNARCHIVED asks, or archiving them); and reads chains,
histories and days of chains through ``options_read``'s Reader. Time only moves forward (the
model's clock; the stages are given it as ``now``), as it does for the jobs.

After every step it checks, from every tier (``option_snapshots``, ``snapshot_rows``, the
archive's files):

- each (contract, slot) is read exactly once, in the tier its day is in, and the set of them is
  the model's: nothing appears that a run did not store, nothing leaves that is not archived
  (only retention, when the model asked for deletion, removes rows);
- every stored row read back equals what the simulator served to the run that stored it (taken
  from the served JSON, to the compact tier's stated precision), and then reads back the same
  from every tier it moves to;
- coverage equals rows: ``snapshots_stored`` is the rows read for that slot and underlying, and
  ``complete`` holds exactly when every contract of the chain is stored;
- each day is in the tier the stages put it in;
- no derived row without its source (computed greeks, daily rows), and no source without its
  derived row once its stage ran (a slot of an archived day is computed, or recorded as not
  computed with its reason).

A defect found and reported, not yet fixed, is passed over where the check meets it (a
``# KNOWN FAILURE:`` comment says which) and counted: the summary printed at the end lists the
known failures met with the steps taken and their time.

Every async stage runs on one event loop per machine run (:class:`tests.lifecycle_model.World`
keeps it, with the run's database, pool, simulators and archive), driven by
``asyncio.Runner.run`` from the synchronous rules; the test itself is synchronous, so it may.

**Budget.** CI runs :data:`DEFAULT_STEPS` steps from seed :data:`DEFAULT_SEED`, half with each
archive kind, without shrinking. ``LIFECYCLE_MODEL_STEPS=2000`` runs that many steps (the long
run), ``LIFECYCLE_MODEL_SEED=N`` another seed, ``LIFECYCLE_MODEL_SHRINK=1`` shrinks a failure to
its shortest sequence (slow: each try replays the jobs)::

    LIFECYCLE_MODEL_STEPS=2000 LIFECYCLE_MODEL_SEED=7 .venv/bin/pytest tests/test_lifecycle_model.py
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.fs as pafs
import pytest
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from options.config import S3Access, Secret
from options.errors import ExitCode, NotStoredError
from options.jobs.filters import market_today
from options.jobs.retention import retire_old_days
from options.jobs.wiring import compute_greeks, run_daily_job
from options.store.archive import archive_days, first_kept_day
from options.store.compaction import compact_days, last_finished_day
from options.store.daily import CLOSE_GRACE
from options.store.lifecycle import ARCHIVED, COMPACT, DELETED, HOT, Tier
from options.store.reads import Reader
from tests.conftest import S3_KEY, S3_SECRET, free_port
from tests.lifecycle_model import (
    KEYS,
    UNDERLYINGS,
    Faults,
    Grid,
    Key,
    Seen,
    Taken,
    World,
    differences,
    forks,
    lacking_greeks,
    observe,
    served_row,
    utc_day,
)

DEFAULT_STEPS = 300
DEFAULT_SEED = 20261208
STEPS_PER_RUN = 20
"""Steps of one machine run (one database): long enough to carry a day through every tier."""

ENDS = ("complete", "killed", "broken", "stopped", "hidden")
# a complete slot as often as all the others: an unfinished slot is then often an older one,
# and its resume a late write into a day compacted or archived since
NEW_SLOTS = st.sampled_from(ENDS[:1] * 4 + ENDS[1:])
RESUME_ENDS = ("complete", "stopped", "killed")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


class LifecycleMachine(RuleBasedStateMachine):
    """The stages of a day's life as rules, the lifecycle's invariants as invariants (see the
    module docstring)."""

    make_world: ClassVar[Callable[[], World]]
    steps: ClassVar[Counter[str]] = Counter()
    spent: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.world = self.make_world()
        self.grid = Grid.before(market_today())
        self.clock = self.grid.start
        self.rows: dict[Key, dict[str, Any]] = {}
        """Every snapshot stored, as first read back (checked against what was served)."""
        self.tiers: dict[dt.date, Tier] = {}
        """Where the stages have put each day that holds rows (not listed: hot)."""
        self.deleted: set[dt.date] = set()
        self.greeks_fresh = False
        """compute_greeks ran and nothing was stored since."""
        self.daily_fresh = False
        """ingest_daily ran and nothing changed since."""
        self.cache: dict[Any, Any] = {}
        self.seen = self.observe()
        self.current = "setup"
        self.started = time.monotonic()

    def teardown(self) -> None:
        self.world.close()

    # --- helpers ---------------------------------------------------------------------------

    def known(self, failure: str) -> None:
        """Count a known failure met (the test goes on past it; the summary lists it)."""
        self.steps[f"KNOWN FAILURE: {failure}"] += 1

    def count(self, step: str) -> None:
        """Count the step (its time is counted when the invariants start)."""
        self.current = step
        self.steps[step] += 1
        if step.split()[0] not in ("daily", "reads", "greeks"):
            self.daily_fresh = False

    def observe(self) -> Seen:
        return self.world.run(observe(self.world, self.cache))

    def tier(self, day: dt.date) -> Tier:
        return self.tiers.get(day, HOT)

    def days_with_rows(self) -> set[dt.date]:
        return {utc_day(slot) for slot, _ in self.rows}

    def base_url(self) -> str:
        return self.world.run(self.world.simulator(Faults())).base_url

    def adopt(self, taken: Taken, slot: dt.datetime | None) -> set[Key]:
        """Take the snapshots the run stored into the model, each checked against what the
        simulator served to that run. Returns them."""
        self.seen = self.observe()
        new = self.seen.keys() - self.rows.keys()
        for key in sorted(new):
            assert key[0] == slot, f"{key} stored, but the run wrote to the slot {slot}"
            row = self.seen.rows[key]
            assert key[1] in self.world.universe.get(row["underlying_ticker"], ()), (
                f"{key} stored under {row['underlying_ticker']}, not its underlying"
            )
            served = taken.served.get(key[1])
            assert served, f"{key} stored, but the simulator never served it to this run"
            exact = self.tier(utc_day(key[0])) is HOT
            wrong = [
                differences(
                    served_row(raw, underlying=row["underlying_ticker"], slot=key[0]),
                    row,
                    exact=exact,
                )
                for raw in served
            ]
            assert not all(wrong), f"{key} does not read back as served: {wrong[0]}"
            self.rows[key] = row
        self.check_values(self.seen, skip=new)
        if new:
            self.greeks_fresh = False
        self.steps["snapshots stored"] += len(new)
        return new

    def resumable(self) -> dt.datetime | None:
        """The slot ``--resume`` takes: the latest with a chain not stored or not read to
        the end."""
        left = [
            slot
            for (slot, _), row in self.seen.coverage.items()
            if row["committed_at"] is None or not row["read_to_end"]
        ]
        return max(left, default=None)

    def pending(self, *tiers: Tier, last: dt.date | None = None) -> bool:
        """Some day holding rows is in one of ``tiers`` (and not after ``last``)."""
        return any(
            self.tier(day) in tiers and (last is None or day <= last)
            for day in self.days_with_rows()
        )

    def finished(self) -> dt.date:
        return last_finished_day(self.clock)

    # --- rules -----------------------------------------------------------------------------

    @initialize(
        first=st.lists(
            st.tuples(NEW_SLOTS, st.sampled_from(UNDERLYINGS), st.integers(1, 2)),
            min_size=1,
            max_size=3,
        )
    )
    def history(self, first: list[tuple[str, str, int]]) -> None:
        """A few slots to start from, taken on the first session's moments."""
        for end, victim, page in first:
            self.snapshot(end, 0, victim, page, page, 0.0)

    @rule(
        end=NEW_SLOTS,
        skip=st.integers(0, 2),
        victim=st.sampled_from(UNDERLYINGS),
        page=st.integers(1, 2),
        at_page=st.integers(1, 6),
        delay=st.sampled_from((0.0, 0.01, 0.05)),
    )
    def snapshot(
        self, end: str, skip: int, victim: str, page: int, at_page: int, delay: float
    ) -> None:
        """A new slot, taken by the job at the clock and moved to the next moment of the grid
        (or one a little later); nothing once the grid's last moment is past."""
        at = self.grid.after(self.clock, skip) or self.grid.after(self.clock)
        if at is None:
            self.count("snapshot (no moment left)")
            return
        faults = Faults(
            broken=(victim, page) if end == "broken" else None,
            hidden=(victim, 3) if end == "hidden" else None,
        )
        how = end if end in ("stopped", "killed") else "complete"
        taken = self.world.run(
            self.world.take(faults, resume=False, end=how, at_page=at_page, delay=delay)
        )
        moved = self.world.run(self.world.move_new_slot(at, after=self.grid.end))
        self.clock = at
        self.count(f"snapshot {end}")
        new = self.adopt(taken, at if moved else None)
        if end == "complete":
            assert taken.code == ExitCode.OK and moved
            assert len(new) == sum(len(t) for t in self.world.universe.values())
        elif end in ("broken", "hidden"):
            assert taken.code == ExitCode.PARTIAL and moved
        elif end == "stopped":
            assert taken.code in (ExitCode.OK, ExitCode.INTERRUPTED), taken

    @rule(
        end=st.sampled_from(RESUME_ENDS),
        at_page=st.integers(1, 6),
        delay=st.sampled_from((0.0, 0.01, 0.05)),
    )
    def resume(self, end: str, at_page: int, delay: float) -> None:
        """``ingest_snapshots --resume --force``: the latest unfinished slot, whatever tier its
        day is in (a late write into an older day)."""
        target = self.resumable()
        taken = self.world.run(
            self.world.take(Faults(), resume=True, end=end, at_page=at_page, delay=delay)
        )
        gone = target is not None and self.tier(utc_day(target)) in (ARCHIVED, DELETED)
        kind = "nothing" if target is None else f"{self.tier(utc_day(target)).value} day"
        self.count(f"resume {end} ({kind})")
        new = self.adopt(taken, target)
        if target is None or gone:
            assert not new, f"{len(new)} snapshots stored by a resume with nothing to resume"
        if taken.killed:
            return
        if target is None:
            assert taken.code == ExitCode.OK, taken
        elif gone:
            # refused with its reason (in a child: the error's exit code)
            assert taken.refused or taken.code == ExitCode.FAILED, taken

    @rule()
    def greeks(self) -> None:
        """``ingest_admin greeks`` over every slot."""
        settings_ = self.world.settings(self.base_url())
        self.world.run(
            compute_greeks(settings_, self.world.db, since=self.grid.start - dt.timedelta(days=1))
        )
        self.greeks_fresh = True
        self.count("greeks")

    @rule()
    def daily(self) -> None:
        """``ingest_daily`` at the clock: the sessions closed by then (not again while
        nothing changed)."""
        if self.daily_fresh:
            self.count("daily (nothing new)")
            return
        settings_ = self.world.settings(self.base_url())
        code = self.world.run(run_daily_job(settings_, now=self.clock))
        assert code in (ExitCode.OK, ExitCode.PARTIAL), code
        self.count("daily")
        self.daily_fresh = True
        self.seen = self.observe()
        self.check_daily_built()

    @rule()
    def compact(self) -> None:
        """``ingest_admin compact`` at the clock."""
        idle = not self.pending(HOT, last=self.finished())
        reports = self.world.run(compact_days(self.world.db, now=self.clock))
        assert reports is not None
        last = last_finished_day(self.clock)
        for day in self.days_with_rows():
            if day <= last and self.tier(day) is HOT:
                self.tiers[day] = COMPACT
        self.count("compact (nothing to do)" if idle else "compact")

    @rule(before=st.integers(0, 5), keep=st.booleans())
    def archive(self, before: int, keep: bool) -> None:
        """``ingest_admin archive --before DAY [--keep-in-postgres]`` at the clock."""
        sessions = self.grid.sessions
        first_kept = (
            sessions[before].day if before < len(sessions) else self.grid.end.date()
        ) + dt.timedelta(days=1)
        self.archive_before(first_kept, keep)

    def archive_before(self, first_kept: dt.date, keep: bool) -> None:
        idle = not self.pending(
            HOT, COMPACT, last=min(first_kept - dt.timedelta(days=1), self.finished())
        )
        run = self.world.run(
            archive_days(
                self.world.db,
                self.world.location,
                before=first_kept,
                now=self.clock,
                keep_in_postgres=keep,
            )
        )
        assert not run.busy and run.failed is None, run
        self.archived(min(first_kept - dt.timedelta(days=1), last_finished_day(self.clock)), keep)
        self.count(("archive kept" if keep else "archive") + (" (nothing to do)" if idle else ""))

    def archived(self, last: dt.date, keep: bool) -> None:
        for day in self.days_with_rows():
            if day <= last and self.tier(day).in_postgres:
                self.tiers[day] = COMPACT if keep else ARCHIVED

    @rule(mode=st.sampled_from(("keep", "delete", "archive")), retain=st.integers(0, 4))
    def retention(self, mode: str, retain: int) -> None:
        """What a snapshot run does after storing (``--retain-days``): archive with an
        ARCHIVE_URL, delete with SNAPSHOT_DELETE_UNARCHIVED, else keep and warn."""
        if mode == "archive":
            settings_ = self.world.archive_settings(self.base_url())
        else:
            settings_ = self.world.settings(self.base_url(), delete_unarchived=mode == "delete")
        cutoff = self.clock.astimezone(dt.UTC).date() - dt.timedelta(days=retain)
        last = cutoff - dt.timedelta(days=1) if mode == "delete" else self.finished()
        idle = not self.pending(HOT, COMPACT, last=last)
        self.world.run(
            retire_old_days(settings_, self.world.db, retain_days=retain, now=self.clock)
        )
        if mode == "archive":
            kept = first_kept_day(self.clock, min(settings_.archive_after_days, retain))
            self.archived(min(kept - dt.timedelta(days=1), last_finished_day(self.clock)), False)
        elif mode == "delete":
            for day in self.days_with_rows():
                if day < cutoff and self.tier(day).in_postgres:
                    self.tiers[day] = DELETED
                    self.deleted.add(day)
            self.rows = {k: v for k, v in self.rows.items() if utc_day(k[0]) not in self.deleted}
        self.count(f"retention {mode}" + (" (nothing to do)" if idle else ""))

    @rule(
        into=st.sampled_from(("compact", "archive", "archive kept")),
        end=st.sampled_from(RESUME_ENDS),
        at_page=st.integers(1, 6),
        delay=st.sampled_from((0.0, 0.01, 0.05)),
    )
    def late_write(self, into: str, end: str, at_page: int, delay: float) -> None:
        """The day of the unfinished slot moves on before ``--resume`` comes to it: time
        passes until the day is over, the day is compacted (or archived, or archived and kept
        in PostgreSQL), then the resume writes late into its tier, or is refused.

        (No precondition says whether there is such a slot: it depends on where kills landed,
        and Hypothesis needs the same choices to give the same rules when it replays them.)"""
        target = self.resumable()
        if target is None:
            self.count("late write (no unfinished slot)")
            return
        day = utc_day(target)
        if self.tier(day) is not HOT:
            self.resume(end, at_page, delay)  # its day moved on already
            return
        later = [m for m in self.grid.moments if m > self.clock and last_finished_day(m) >= day]
        self.clock = later[0] if later else max(self.clock, self.grid.end)
        if into == "compact":
            self.compact()
        else:
            self.archive_before(day + dt.timedelta(days=1), keep=into == "archive kept")
        self.resume(end, at_page, delay)

    @rule(skip=st.integers(0, 2))
    def advance(self, skip: int) -> None:
        """Time passes: the clock moves to a later moment of the grid."""
        self.clock = self.grid.after(self.clock, skip) or max(self.clock, self.grid.end)
        self.count("advance")

    @rule(
        at=st.integers(0, 40),
        underlying=st.sampled_from(UNDERLYINGS),
        pick=st.integers(0, 10**6),
    )
    def reads(self, at: int, underlying: str, pick: int) -> None:
        """``options_read``: a chain at a moment, a contract's history, a range's chains."""
        moments = self.grid.moments
        moment = (moments[at] if at < len(moments) else self.grid.end) + dt.timedelta(minutes=1)
        key = underlying.removeprefix("I:")
        reader = Reader(self.world.db, archive=self.world.archive)
        complete = sorted(
            slot
            for (slot, u), row in self.seen.coverage.items()
            if u == key and row["complete"] and slot <= moment
        )
        try:
            chain = self.world.run(reader.chain(underlying, moment))
        except NotStoredError:
            assert not complete, f"no chain of {key} read at {moment}, though {complete[-1]}"
        else:
            assert complete and chain.captured_at == complete[-1], (chain.captured_at, complete)
            day = utc_day(chain.captured_at)
            assert chain.source == ("archive" if self.tier(day) is ARCHIVED else "postgresql")
            self.assert_rows(
                chain.table.to_pylist(),
                {k for k in self.rows if k[0] == chain.captured_at and k[1] in self.chain_of(key)},
            )
        tickers = sorted(self.world.universe[key])
        ticker = tickers[pick % len(tickers)]
        history = self.world.run(reader.history(ticker, self.grid.start, self.grid.end))
        self.assert_rows(history.table.to_pylist(), {k for k in self.rows if k[1] == ticker})
        archived = {d for d, t in self.seen.tiers.items() if t is ARCHIVED}
        in_range = {d for d in archived if utc_day(self.grid.start) <= d <= utc_day(self.grid.end)}
        assert set(history.archived_days) == in_range, (history.archived_days, in_range)
        slots = self.world.run(reader.complete_slots(self.grid.start, self.grid.end, [underlying]))
        wanted = slots.get(key, [])
        day_read = self.world.run(reader.slots(underlying, wanted))
        self.assert_rows(
            day_read.table.to_pylist(),
            {k for k in self.rows if k[0] in set(wanted) and k[1] in self.chain_of(key)},
        )
        self.count("reads")

    def chain_of(self, key: str) -> set[str]:
        return self.world.universe[key]

    def assert_rows(self, read: list[dict[str, Any]], keys: set[Key]) -> None:
        """A read holds exactly the model's rows of ``keys``, each once, as first stored."""
        got = Counter((r["captured_at"], r["ticker"]) for r in read)
        assert set(got) == keys, (
            f"read {len(got)} snapshots, the model has {len(keys)}: missing "
            f"{sorted(keys - set(got))[:3]}, extra {sorted(set(got) - keys)[:3]}"
        )
        assert max(got.values(), default=1) == 1, [k for k, n in got.items() if n > 1][:3]
        for row in read:
            key = (row["captured_at"], row["ticker"])
            wrong = differences(self.rows[key], row, exact=False)
            assert not wrong, f"{key}: {wrong}"

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def lifecycle_holds(self) -> None:
        checking = time.monotonic()
        self.spent[self.current] += checking - self.started
        seen = self.seen = self.observe()
        self.check_once(seen)
        self.check_values(seen)
        self.check_coverage(seen)
        self.check_tiers(seen)
        self.check_greeks(seen)
        self.check_daily_sources(seen)
        self.check_archive_files(seen)
        self.started = time.monotonic()
        self.spent["invariants"] += self.started - checking

    def check_once(self, seen: Seen) -> None:
        """Each (contract, slot) read exactly once, from the tier its day is in; the set of
        them is the model's (nothing lost that was not deleted on request, nothing extra)."""
        counts = seen.hot + seen.compact + seen.archived
        twice = sorted(k for k, n in counts.items() if n > 1)
        assert not twice, f"{len(twice)} snapshots read more than once, e.g. {twice[:3]}"
        for keys, tier in ((seen.hot, HOT), (seen.compact, COMPACT), (seen.archived, ARCHIVED)):
            wrong = sorted({utc_day(s) for s, _ in keys if seen.tier(utc_day(s)) is not tier})
            assert not wrong, f"rows in the {tier.value} tier of days not {tier.value}: {wrong}"
        lost = sorted(self.rows.keys() - counts.keys())
        assert not lost, f"{len(lost)} snapshots stored are read nowhere, e.g. {lost[:3]}"
        extra = sorted(counts.keys() - self.rows.keys())
        assert not extra, f"{len(extra)} snapshots no run stored, e.g. {extra[:3]}"

    def check_values(self, seen: Seen, skip: set[Key] | frozenset[Key] = frozenset()) -> None:
        """Every value reads back as first stored (to the compact tier's precision): the rows
        of every day whose content changed since the last look."""
        for key, got in seen.rows.items():
            if key not in self.rows or key in skip:
                continue  # check_once says so; or just stored
            wrong = differences(self.rows[key], got, exact=False)
            assert not wrong, f"{key} in the {seen.tier(utc_day(key[0])).value} tier: {wrong}"

    def check_coverage(self, seen: Seen) -> None:
        """``snapshots_stored`` is the rows read for the slot and underlying; ``complete``
        exactly when every contract of the chain is stored."""
        stored: dict[tuple[dt.datetime, str], set[str]] = {}
        for key in self.rows:
            stored.setdefault((key[0], self.rows[key]["underlying_ticker"]), set()).add(key[1])
        for chain, row in seen.coverage.items():
            assert utc_day(chain[0]) not in self.deleted, f"coverage of a deleted day: {chain}"
            rows = stored.get(chain, set())
            assert row["snapshots_stored"] == len(rows), (
                f"{chain}: coverage says {row['snapshots_stored']} stored, {len(rows)} read"
            )
            if row["committed_at"] is None:
                assert not rows, chain
            assert row["complete"] == (rows == self.world.universe[chain[1]]), (
                f"{chain}: complete={row['complete']} with {len(rows)} of "
                f"{len(self.world.universe[chain[1]])} contracts stored"
            )
        without = sorted(set(stored) - set(seen.coverage))
        assert not without, f"rows without a coverage row: {without[:3]}"

    def check_tiers(self, seen: Seen) -> None:
        """Each day holding rows is where the stages put it; a day without rows is hot, or
        deleted by retention."""
        with_rows = self.days_with_rows()
        for day in with_rows:
            assert seen.tier(day) is self.tier(day), (
                f"{day} is {seen.tier(day).value}, the stages left it {self.tier(day).value}"
            )
        for day, tier in seen.tiers.items():
            if day not in with_rows:
                # archived: a day of daily rows and coverage alone (its slots all failed)
                assert tier in (HOT, DELETED, ARCHIVED), f"{day} holds no rows yet is {tier.value}"

    def check_greeks(self, seen: Seen) -> None:
        """A computed row only for a stored snapshot the API left without IV or delta; once
        the stage ran, every such snapshot in PostgreSQL computed, and every slot of an
        archived day computed or recorded not computed with its reason."""
        orphans = sorted(seen.computed.keys() - self.rows.keys())
        assert not orphans, f"{len(orphans)} computed greeks without their snapshot: {orphans[:3]}"
        slots = {slot for slot, _ in seen.coverage}
        done = sorted(slot for slot in seen.greeks_slots if slot not in slots)
        assert not done, f"greeks_slots rows of slots never taken: {done[:3]}"
        needless = sorted(
            k for k in seen.computed if k in self.rows and not lacking_greeks(self.rows[k])
        )
        assert not needless, f"greeks computed for snapshots that had them: {needless[:3]}"
        if not self.greeks_fresh:
            return
        owed: dict[dt.datetime, list[Key]] = {}
        for key, row in self.rows.items():
            if lacking_greeks(row) and key not in seen.computed:
                owed.setdefault(key[0], []).append(key)
        for slot, keys in sorted(owed.items()):
            tier = self.tier(utc_day(slot))
            assert tier is ARCHIVED, f"{len(keys)} snapshots of {slot} ({tier.value}) not computed"
            done = seen.greeks_slots.get(slot)
            assert done is not None and done["reason"], (
                f"{slot} (archived): {len(keys)} snapshots without greeks, and the slot is "
                f"recorded {dict(done) if done else 'nowhere'}"
            )

    def check_daily_sources(self, seen: Seen) -> None:
        """A daily row only for a stored snapshot of its session, with its values."""
        orphaned = 0
        for (ticker, session), row in seen.contract_days.items():
            sources = [row[c] for c in ("close_captured_at", "oi_captured_at") if row[c]]
            gone = [slot for slot in sources if (slot, ticker) not in self.rows]
            if gone and all(utc_day(slot) in self.deleted for slot in gone):
                orphaned += 1
                continue
            assert not gone, f"daily row {ticker} {session}: its snapshots {gone} are gone"
            close, oi = row["close_captured_at"], row["oi_captured_at"]
            if close is not None:
                source = self.rows[(close, ticker)]
                for name in ("bid", "ask", "midpoint", "last_price", "day_close"):
                    assert row[name] == source[name], (ticker, session, name)
            if oi is not None:
                assert row["open_interest"] == self.rows[(oi, ticker)]["open_interest"]
        slots = {slot for slot, _ in seen.coverage}
        for (key, session), row in seen.daily_coverage.items():
            gone = [row[c] for c in ("close_captured_at", "oi_captured_at") if row[c]]
            gone = [slot for slot in gone if slot not in slots]
            if gone and all(utc_day(slot) in self.deleted for slot in gone):
                orphaned += 1
                continue
            assert not gone, f"daily coverage {key} {session}: its slots {gone} were never taken"
        # the daily rows of days retention deleted stay, by design: the daily table is the
        # history kept once the snapshots are deleted (README, The life of a day)
        self.steps["daily rows kept of deleted days"] += orphaned

    def check_daily_built(self) -> None:
        """Right after ``ingest_daily``: every closed session since the first slot is built
        from its last complete slot (and the next session's first, for the open interest),
        or recorded as not built because its day left PostgreSQL."""
        seen = self.seen
        sessions = self.grid.sessions
        for key in KEYS:
            slots = sorted(s for (s, u) in seen.coverage if u == key)
            if not slots:
                continue
            complete = sorted(
                s for (s, u), r in seen.coverage.items() if u == key and r["complete"]
            )
            first_day = slots[0].astimezone(sessions[0].open.tzinfo).date()
            for n, session in enumerate(sessions[:-1]):
                if session.close + CLOSE_GRACE > self.clock or session.day < first_day:
                    continue
                built = seen.daily_coverage.get((key, session.day))
                assert built is not None, f"{key} {session.day}: not built"
                closing = max(
                    (s for s in complete if session.open <= s < session.close + CLOSE_GRACE),
                    default=None,
                )
                following = sessions[n + 1]
                oi = min(
                    (s for s in complete if following.open <= s < following.close + CLOSE_GRACE),
                    default=None,
                )
                rows = {
                    t: r
                    for (t, d), r in seen.contract_days.items()
                    if d == session.day and r["underlying_ticker"] == key
                }
                what = f"{key} {session.day}"
                assert built["contracts"] == len(rows), (what, dict(built), len(rows))
                # a slot the rows were built from before its day left stays theirs; one they
                # still need whose day left means "not built"
                used = (built["close_captured_at"], built["oi_captured_at"])
                slot_days = {utc_day(s) for s in (closing, oi) if s is not None and s not in used}
                if any(not self.tier(d).in_postgres for d in slot_days):
                    if built["complete"] or built["reason"].startswith("not built"):
                        continue
                    raise AssertionError(
                        f"{what}: {dict(built)}; its slots {closing} and {oi} are on days "
                        f"{[(d, self.tier(d).value) for d in sorted(slot_days)]}"
                    )
                assert (built["close_captured_at"], built["oi_captured_at"]) == (closing, oi), (
                    f"{what}: built from {built['close_captured_at']} and "
                    f"{built['oi_captured_at']}, the slots are {closing} and {oi}"
                )
                if closing is not None:
                    chain = {t for s, t in self.rows if s == closing and t in self.chain_of(key)}
                    closed = {t for t, r in rows.items() if r["close_captured_at"] == closing}
                    assert chain == closed, f"{what}: {len(closed)} of {len(chain)} rows"

    def check_archive_files(self, seen: Seen) -> None:
        """An archived day is recorded dropped, with as many rows as it holds; a file a
        dataset reader sees is one of a recorded day."""
        for day, tier in seen.tiers.items():
            if tier is not ARCHIVED:
                continue
            record = seen.archived_days.get(day)
            assert record is not None and record["dropped_at"] is not None, (day, record)
            rows = sum(1 for s, _ in seen.archived if utc_day(s) == day)
            assert record["rows"] == rows, f"{day}: recorded {record['rows']} rows, read {rows}"
        stray = sorted(d for d in seen.visible_files if d not in seen.archived_days)
        assert not stray, f"files of days never recorded are in the dataset: {stray}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A local S3-compatible server (moto) for the session."""
    from moto.server import ThreadedMotoServer

    # its request log would fill a failure's report
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def budget() -> tuple[int, int, bool]:
    """Steps (in all), seed, and whether to shrink a failure, from the environment."""
    return (
        env_int("LIFECYCLE_MODEL_STEPS", DEFAULT_STEPS),
        env_int("LIFECYCLE_MODEL_SEED", DEFAULT_SEED),
        os.environ.get("LIFECYCLE_MODEL_SHRINK", "") not in ("", "0"),
    )


@pytest.mark.timeout(env_int("LIFECYCLE_MODEL_STEPS", DEFAULT_STEPS) * 3 + 120)
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_the_lifecycle_holds_through_random_sequences_of_stages(
    kind: str,
    server_url: str,
    template_database: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Random sequences of snapshot, resume, greeks, daily, compact, archive, retention and
    reads keep every invariant of a day's lifecycle (the module docstring lists them)."""
    steps, seed_value, shrink = budget()
    forks().start_forkserver()  # its imports overlap the first steps
    s3: S3Access | None = None
    if kind == "s3":
        endpoint = request.getfixturevalue("s3_server")
        bucket = f"model-{uuid.uuid4().hex[:12]}"
        s3 = S3Access(
            access_key_id=Secret(S3_KEY), secret_access_key=Secret(S3_SECRET), endpoint_url=endpoint
        )
        pafs.S3FileSystem(
            access_key=S3_KEY,
            secret_key=S3_SECRET,
            endpoint_override=endpoint.removeprefix("http://"),
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        ).create_dir(bucket)
    runs = iter(range(10**6))

    def make_world() -> World:
        n = next(runs)
        archive_url = f"s3://{bucket}/run{n}" if s3 else str(tmp_path / f"archive{n}")
        return World(
            server_url=server_url,
            template=template_database,
            archive_url=archive_url,
            s3=s3,
        )

    machine = type("LifecycleModel", (LifecycleMachine,), {"make_world": staticmethod(make_world)})
    machine.steps, machine.spent = Counter(), Counter()
    phases = [Phase.explicit, Phase.generate, *([Phase.shrink] if shrink else [])]
    started = time.monotonic()
    try:
        run_state_machine_as_test(
            seed(seed_value + (kind == "s3"))(machine),
            settings=settings(
                max_examples=max(1, steps // 2 // STEPS_PER_RUN),
                stateful_step_count=STEPS_PER_RUN,
                deadline=None,
                database=None,
                phases=phases,
                suppress_health_check=list(HealthCheck),
                print_blob=True,
            ),
        )
    finally:
        elapsed = time.monotonic() - started
        counted = {
            k: v
            for k, v in machine.steps.items()
            if k != "snapshots stored" and not k.startswith("KNOWN")
        }
        idle = sum(v for k, v in counted.items() if "(no" in k)
        print(
            f"\n{kind}: {sum(counted.values())} steps ({idle} found nothing to do) in "
            f"{elapsed:.1f} s"
        )
        for name, count in sorted(machine.steps.items()):
            print(f"  {name:32} {count:6}  {machine.spent[name]:7.1f} s")
        print(f"  {'invariants':32} {'':6}  {machine.spent['invariants']:7.1f} s")
