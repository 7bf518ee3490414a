"""The life of a day across stages: a write into a compacted or archived day, derived rows of
a day in any tier, and the seams between snapshot, resume, greeks, daily rows, compaction and
the archive (options/store/lifecycle.py)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import asyncpg
import pyarrow.parquet as pq
import pytest

from options.config import Settings
from options.errors import DayRefusedError, ExitCode
from options.jobs.wiring import (
    archive_snapshots,
    compute_greeks,
    run_daily_job,
    run_options_job,
    run_snapshots_job,
)
from options.simulator import RunningSimulator
from options.store.compaction import compact_days
from options.store.partitions import WIDE, ensure_partitions, partition_states
from options.store.reads import Archive, Reader
from tests.test_compaction import assert_same

UNDERLYINGS = ("AAA", "BBB")
CONTRACTS = 600  # three pages of a chain
DAY = dt.date(2026, 11, 18)
SLOT = dt.datetime(2026, 11, 18, 15, 0, tzinfo=dt.UTC)  # 10:00 in New York
LATER = dt.datetime(2026, 11, 23, 15, 0, tzinfo=dt.UTC)


async def move_last_slot(pool: asyncpg.Pool, to: dt.datetime) -> None:
    """Give the last snapshot run's slot the time ``to`` (the job stamps a slot with the
    clock), its rows, coverage and run row with it."""
    await ensure_partitions(pool, to.date(), days_ahead=0)
    taken = await pool.fetchval(
        "SELECT captured_at FROM ingest_runs WHERE job = 'snapshots' ORDER BY id DESC LIMIT 1"
    )
    async with pool.acquire() as conn, conn.transaction():
        for table in ("option_snapshots", "snapshot_coverage", "ingest_runs"):
            await conn.execute(
                f"UPDATE {table} SET captured_at = $1 WHERE captured_at = $2", to, taken
            )


async def slot_reads(pool: asyncpg.Pool, underlying: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM snapshot_reads WHERE underlying_ticker = $1 AND captured_at = $2 "
        'ORDER BY ticker COLLATE "C"',
        underlying,
        SLOT,
    )


async def take_broken_slot(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> None:
    """A slot of :data:`DAY` whose AAA chain answered 500 from its second page: 250 of its
    600 contracts stored, the chain incomplete."""
    async with simulator(
        underlyings=UNDERLYINGS, contracts_per_underlying=CONTRACTS, broken_pages={"AAA": 2}
    ) as api:
        settings = make_settings(api.base_url, UNDERLYINGS)
        assert await run_options_job(settings) == ExitCode.OK
        assert await run_snapshots_job(settings, force=True, now=SLOT) == ExitCode.PARTIAL
    await move_last_slot(pool, SLOT)
    assert len(await slot_reads(pool, "AAA")) == 250


async def test_a_resume_into_a_compacted_day_merges_each_contract_once(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> None:
    """A slot left incomplete, its day compacted, then resumed: the missing contracts land in
    the compact tier beside the stored ones, each once; the day compacts again without a
    verification failure, and no hot partition is made for it."""
    await take_broken_slot(pool, simulator, make_settings)
    stored = {r["ticker"]: dict(r) for r in await slot_reads(pool, "AAA")}
    assert [r.action for r in await compact_days(pool, now=LATER) or [] if r.rows] == ["compacted"]
    async with simulator(underlyings=UNDERLYINGS, contracts_per_underlying=CONTRACTS) as api:
        settings = make_settings(api.base_url, UNDERLYINGS)
        assert await run_snapshots_job(settings, resume=True, force=True) == ExitCode.OK
    after = await slot_reads(pool, "AAA")
    assert len(after) == CONTRACTS
    assert len({r["ticker"] for r in after}) == CONTRACTS
    # the rows stored before are kept as they were (to the compact tier's precision)
    assert_same(list(stored.values()), [dict(r) for r in after if r["ticker"] in stored])
    coverage = await pool.fetchrow(
        "SELECT complete, snapshots_stored FROM snapshot_coverage "
        "WHERE underlying_ticker = 'AAA' AND captured_at = $1",
        SLOT,
    )
    assert (coverage["complete"], coverage["snapshots_stored"]) == (True, CONTRACTS)
    assert await pool.fetchval("SELECT count(*) FROM option_snapshots") == 0
    async with pool.acquire() as conn:
        assert DAY not in await partition_states(conn, WIDE)
    # every later compaction goes on as before
    assert [r for r in await compact_days(pool, now=LATER) or [] if r.rows] == []
    assert len(await slot_reads(pool, "AAA")) == CONTRACTS


async def test_greeks_of_a_compacted_day_are_computed_from_the_compact_tier(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> None:
    """``ingest_admin greeks`` on a compacted day computes the rows the API left without IV or
    greeks, as it does on a hot day, and only then records the slot as done."""
    await take_broken_slot(pool, simulator, make_settings)
    missing = await pool.fetchval(
        "SELECT count(*) FROM snapshot_reads WHERE captured_at = $1 "
        "AND (implied_volatility IS NULL OR delta IS NULL)",
        SLOT,
    )
    assert missing > 0
    await compact_days(pool, now=LATER)
    async with simulator(underlyings=UNDERLYINGS, contracts_per_underlying=CONTRACTS) as api:
        settings = make_settings(api.base_url, UNDERLYINGS)
        slots, computed, refused = await compute_greeks(
            settings, pool, since=SLOT - dt.timedelta(hours=1)
        )
    assert (slots, computed + refused) == (1, missing)
    assert await pool.fetchval("SELECT count(*) FROM computed_greeks") == missing
    done = await pool.fetchrow("SELECT * FROM greeks_slots WHERE captured_at = $1", SLOT)
    assert (done["computed"] + done["not_computed"], done["reason"]) == (missing, None)


async def test_a_session_whose_every_slot_failed_is_backfilled(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> None:
    """A session with coverage rows but no complete slot (every chain answered 500) is not
    "built from its snapshots": the backfill fills it from its listing and daily bars."""
    today = dt.date(2026, 11, 27)
    async with simulator(
        underlyings=UNDERLYINGS,
        contracts_per_underlying=40,
        as_of=today,
        broken_pages={"AAA": 1, "BBB": 1},
    ) as api:
        settings = make_settings(api.base_url, UNDERLYINGS)
        assert await run_snapshots_job(settings, force=True, now=SLOT) == ExitCode.FAILED
    await move_last_slot(pool, SLOT)
    assert await pool.fetchval("SELECT count(*) FROM snapshot_coverage WHERE complete") == 0
    async with simulator(underlyings=UNDERLYINGS, contracts_per_underlying=40, as_of=today) as api:
        settings = make_settings(api.base_url, UNDERLYINGS)
        assert await run_daily_job(settings, backfill_range=(DAY, DAY)) == ExitCode.OK
    rows = await pool.fetch(
        "SELECT underlying_ticker, count(*) AS n, min(bar_source) AS source FROM contract_days "
        "WHERE session = $1 GROUP BY underlying_ticker ORDER BY underlying_ticker",
        DAY,
    )
    assert [r["underlying_ticker"] for r in rows] == list(UNDERLYINGS)
    assert all(r["n"] > 0 and r["source"] == "bars" for r in rows)
    done = await pool.fetch(
        "SELECT underlying_ticker, complete, source FROM daily_coverage WHERE session = $1 "
        "ORDER BY underlying_ticker",
        DAY,
    )
    assert [tuple(r) for r in done] == [(u, True, "bars") for u in UNDERLYINGS]


async def take_complete_slots(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
    slots: tuple[dt.datetime, ...],
    **overrides: object,
) -> Settings:
    """A complete slot at each of ``slots``; the settings of the runs (with ``overrides``)."""
    async with simulator(underlyings=UNDERLYINGS, contracts_per_underlying=40) as api:
        settings = make_settings(api.base_url, UNDERLYINGS, **overrides)
        assert await run_options_job(settings) == ExitCode.OK
        for slot in slots:
            assert await run_snapshots_job(settings, force=True, now=slot) == ExitCode.OK
            await move_last_slot(pool, slot)
    return settings


async def test_a_session_archived_before_its_daily_rows_is_not_called_complete(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """A session whose day was archived before ``ingest_daily`` built it is not built from
    nothing and called complete: its coverage row says why it was not built, and no row is
    written or claimed for it."""
    next_slot = SLOT + dt.timedelta(days=1)
    settings = await take_complete_slots(
        pool,
        simulator,
        make_settings,
        (SLOT, next_slot),
        archive_url=str(tmp_path / "archive"),
    )
    run = await archive_snapshots(settings, before=next_slot.date())
    assert [(d.day, d.postgres) for d in run.days if d.rows] == [(DAY, "dropped")]
    assert await run_daily_job(settings, now=LATER) == ExitCode.OK
    rows = await pool.fetch(
        "SELECT underlying_ticker, contracts, complete, reason FROM daily_coverage "
        "WHERE session = $1 ORDER BY underlying_ticker",
        DAY,
    )
    assert [r["underlying_ticker"] for r in rows] == list(UNDERLYINGS)
    for row in rows:
        assert (row["contracts"], row["complete"]) == (0, False)
        assert "archived" in row["reason"]
    assert await pool.fetchval("SELECT count(*) FROM contract_days WHERE session = $1", DAY) == 0
    # the next session is built from its slots as before
    built = await pool.fetchval(
        "SELECT count(*) FROM contract_days WHERE session = $1", next_slot.date()
    )
    assert built == 40 * len(UNDERLYINGS)


async def test_a_resume_into_an_archived_day_is_refused(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """A slot left incomplete whose day was then archived and dropped: ``--resume`` refuses it
    in one line naming the day, stores nothing, and the day reads back from the archive as it
    was archived."""
    await take_broken_slot(pool, simulator, make_settings)
    async with simulator(underlyings=UNDERLYINGS, contracts_per_underlying=CONTRACTS) as api:
        settings = make_settings(api.base_url, UNDERLYINGS, archive_url=str(tmp_path / "archive"))
        run = await archive_snapshots(settings, before=DAY + dt.timedelta(days=1))
        assert [(d.day, d.postgres) for d in run.days if d.rows] == [(DAY, "dropped")]
        with pytest.raises(DayRefusedError, match=f"the slot of .*its day {DAY} is archived"):
            await run_snapshots_job(settings, resume=True, force=True)
    assert await pool.fetchval("SELECT count(*) FROM snapshot_reads") == 0
    assert await pool.fetchval("SELECT count(*) FROM option_snapshots") == 0
    async with pool.acquire() as conn:
        assert DAY not in await partition_states(conn, WIDE)
    reader = Reader(pool, archive=Archive.at(str(tmp_path / "archive")))
    day = await reader.slots("AAA", [SLOT])
    assert day.table.num_rows == 250


def archived_rows(root: Path, dataset: str, day: dt.date) -> list[dict[str, object]]:
    """The rows of ``dataset``'s file of ``day`` in the archive at ``root``."""
    path = root / dataset / f"date={day.isoformat()}" / "part-0.parquet"
    return pq.read_table(path).to_pylist()


async def test_an_archived_day_takes_its_companions_and_the_archive_alone_holds_them(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """Archiving a day writes, beside its snapshots, its computed greeks (moved: gone from
    PostgreSQL), its coverage, greeks bookkeeping and daily rows (copied), each verified; a
    copied table changed later (a backfill of an underlying added since) is written again by
    the next archive run."""
    root = tmp_path / "archive"
    next_slot = SLOT + dt.timedelta(days=1)
    settings = await take_complete_slots(
        pool, simulator, make_settings, (SLOT, next_slot), archive_url=str(root)
    )
    await compute_greeks(settings, pool, since=SLOT - dt.timedelta(hours=1))
    assert await run_daily_job(settings, now=LATER) == ExitCode.OK
    day_rows = {
        "computed_greeks": "SELECT * FROM computed_greeks WHERE captured_at = $1 "
        'ORDER BY ticker COLLATE "C"',
        "greeks_slots": "SELECT * FROM greeks_slots WHERE captured_at = $1",
        "snapshot_coverage": "SELECT * FROM snapshot_coverage WHERE captured_at = $1 "
        'ORDER BY underlying_ticker COLLATE "C"',
    }
    session_rows = {
        "contract_days": "SELECT * FROM contract_days WHERE session = $1 "
        'ORDER BY ticker COLLATE "C"',
        "daily_coverage": "SELECT * FROM daily_coverage WHERE session = $1 "
        'ORDER BY underlying_ticker COLLATE "C"',
    }
    before = {name: [dict(r) for r in await pool.fetch(q, SLOT)] for name, q in day_rows.items()}
    before |= {
        name: [dict(r) for r in await pool.fetch(q, DAY)] for name, q in session_rows.items()
    }
    assert all(before.values()), {name: len(rows) for name, rows in before.items()}

    run = await archive_snapshots(settings, before=next_slot.date())
    assert [(d.day, d.postgres) for d in run.days if d.rows] == [(DAY, "dropped")]
    for name, rows in before.items():
        assert archived_rows(root, name, DAY) == rows, name
    recorded = {
        r["dataset"]: r["rows"]
        for r in await pool.fetch("SELECT * FROM archived_files WHERE day = $1", DAY)
    }
    assert {name: recorded[name] for name in before} == {n: len(r) for n, r in before.items()}
    # moved: computed greeks leave PostgreSQL with the day; copies stay
    assert (
        await pool.fetchval("SELECT count(*) FROM computed_greeks WHERE captured_at = $1", SLOT)
        == 0
    )
    assert [dict(r) for r in await pool.fetch(session_rows["contract_days"], DAY)] == before[
        "contract_days"
    ]

    # a backfill of another underlying's listing of that session, after the archive
    await pool.execute(
        "INSERT INTO listed_contracts (underlying_ticker, session, ticker) "
        "VALUES ('CCC', $1, 'O:CCC261218C00010000')",
        DAY,
    )
    assert await pool.fetchval("SELECT count(*) FROM archive_pending") == 1
    await archive_snapshots(settings, before=next_slot.date())
    assert archived_rows(root, "listed_contracts", DAY) == [
        {"underlying_ticker": "CCC", "session": DAY, "ticker": "O:CCC261218C00010000"}
    ]
    assert await pool.fetchval("SELECT count(*) FROM archive_pending") == 0


async def test_a_resume_completing_a_later_slot_rebuilds_the_session(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> None:
    """A session built complete from its last complete slot is built again when a resume
    completes a later slot of it: its daily rows take the new closing slot."""
    later = SLOT + dt.timedelta(hours=3)  # 13:00 in New York, same session
    following = SLOT + dt.timedelta(days=1)
    await take_complete_slots(pool, simulator, make_settings, (SLOT,))
    async with simulator(
        underlyings=UNDERLYINGS, contracts_per_underlying=CONTRACTS, broken_pages={"AAA": 2}
    ) as api:
        broken = make_settings(api.base_url, UNDERLYINGS)
        assert await run_snapshots_job(broken, force=True, now=later) == ExitCode.PARTIAL
        await move_last_slot(pool, later)
    async with simulator(underlyings=UNDERLYINGS, contracts_per_underlying=CONTRACTS) as api:
        settings = make_settings(api.base_url, UNDERLYINGS)
        assert await run_options_job(settings) == ExitCode.OK
        assert await run_snapshots_job(settings, force=True, now=following) == ExitCode.OK
        await move_last_slot(pool, following)
        assert await run_daily_job(settings, now=LATER) == ExitCode.OK
        built = (
            "SELECT close_captured_at FROM daily_coverage "
            "WHERE underlying_ticker = $1 AND session = $2"
        )
        assert await pool.fetchval(built, "AAA", DAY) == SLOT
        assert await run_snapshots_job(settings, resume=True, force=True) == ExitCode.OK
        assert await run_daily_job(settings, now=LATER) == ExitCode.OK
    assert await pool.fetchval(built, "AAA", DAY) == later
    closing = await pool.fetch(
        "SELECT DISTINCT close_captured_at FROM contract_days "
        "WHERE underlying_ticker = 'AAA' AND session = $1",
        DAY,
    )
    assert [r[0] for r in closing] == [later]


async def test_a_session_waiting_for_its_open_interest_gets_it_after_its_day_is_archived(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """A session built before the next session's first slot (its open interest missing) whose
    own day is then archived still gets its open interest from that slot, which is in
    PostgreSQL: its closing values stay as built."""
    following = SLOT + dt.timedelta(days=1)
    settings = await take_complete_slots(
        pool, simulator, make_settings, (SLOT,), archive_url=str(tmp_path / "archive")
    )
    assert await run_daily_job(settings, now=SLOT + dt.timedelta(hours=12)) == ExitCode.OK
    row = (
        "SELECT complete, reason, oi_captured_at FROM daily_coverage "
        "WHERE session = $1 AND underlying_ticker = 'AAA'"
    )
    assert (await pool.fetchrow(row, DAY))["complete"] is False
    closing_values = await pool.fetch(
        "SELECT ticker, bid, ask, close_captured_at FROM contract_days WHERE session = $1 "
        "ORDER BY ticker",
        DAY,
    )
    await take_complete_slots(pool, simulator, make_settings, (following,))
    run = await archive_snapshots(settings, before=following.date())
    assert [(d.day, d.postgres) for d in run.days if d.rows] == [(DAY, "dropped")]
    assert await run_daily_job(settings, now=LATER) == ExitCode.OK
    done = await pool.fetchrow(row, DAY)
    assert (done["complete"], done["reason"], done["oi_captured_at"]) == (True, None, following)
    assert (
        await pool.fetch(
            "SELECT ticker, bid, ask, close_captured_at FROM contract_days WHERE session = $1 "
            "ORDER BY ticker",
            DAY,
        )
        == closing_values
    )
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM contract_days WHERE session = $1 AND open_interest IS NULL", DAY
        )
        == 0
    )
