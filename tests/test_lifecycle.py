"""The life of a day across stages: a write into a compacted or archived day, derived rows of
a day in any tier, and the seams between snapshot, resume, greeks, daily rows, compaction and
the archive (options/store/lifecycle.py)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import asyncpg

from options.config import Settings
from options.errors import ExitCode
from options.jobs.wiring import compute_greeks, run_options_job, run_snapshots_job
from options.simulator import RunningSimulator
from options.store.compaction import compact_days
from options.store.partitions import WIDE, ensure_partitions, partition_states
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
