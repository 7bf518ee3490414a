"""The compact tier: finished days moved from option_snapshots to snapshot_rows, every value read
back as stored (to the stated precision), on a database written before the compact tier
existed, by the real jobs, and with values no encoding can hold."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from options.config import Settings
from options.errors import CompactionError, ExitCode
from options.jobs.wiring import run_options_job, run_snapshots_job
from options.simulator import RunningSimulator
from options.store import db as store_db
from options.store.compaction import (
    BUSY,
    COMPACTED,
    EMPTY,
    MERGED,
    WOULD_COMPACT,
    compact_days,
    last_finished_day,
)
from options.store.lifecycle import lock_for_write
from options.store.partitions import (
    COMPACT,
    RETENTION_LOCK_KEY,
    WIDE,
    PartitionState,
    ensure_partitions,
    partition_states,
)
from tests.conftest import with_database

DAYS = (dt.date(2026, 11, 18), dt.date(2026, 11, 19), dt.date(2026, 11, 20))
SLOT_TIMES = (dt.time(15, 0), dt.time(19, 30))  # UTC: 10:00 and 14:30 in New York
LATER = dt.datetime(2026, 11, 23, 15, 0, tzinfo=dt.UTC)
UNDERLYINGS = ("AAA", "BBB")
ORDER = 'ORDER BY captured_at, ticker COLLATE "C"'
MILLISECOND = dt.timedelta(milliseconds=1)


async def all_reads(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    return [dict(r) for r in await pool.fetch(f"SELECT * FROM snapshot_reads {ORDER}")]


def assert_same(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    """Every value as stored: exactly, except IV and greeks (a real's precision) and quote and
    trade times (the millisecond, rounded down)."""
    assert len(after) == len(before)
    for old, new in zip(before, after, strict=True):
        for name, value in old.items():
            got = new[name]
            where = f"{old['ticker']} at {old['captured_at']}: {name}"
            if name in ("implied_volatility", "delta", "gamma", "theta", "vega"):
                if value is None or got is None:
                    assert got == value, where
                elif math.isnan(value):
                    assert math.isnan(got), where
                elif value == 0 or 1e-37 <= abs(value) <= 1e37:
                    assert abs(got - value) <= abs(value) * 2**-24, where
                else:
                    assert got == value, where  # kept exactly, in extra
            elif name in ("quote_updated_at", "last_trade_at") and value is not None:
                assert got is not None and got <= value < got + MILLISECOND, where
            elif isinstance(value, float) and math.isnan(value):
                assert math.isnan(got), where
            else:
                assert got == value, where


async def tier_rows(pool: asyncpg.Pool) -> tuple[int, int]:
    return (
        await pool.fetchval("SELECT count(*) FROM option_snapshots"),
        await pool.fetchval("SELECT count(*) FROM snapshot_rows"),
    )


@pytest.fixture
async def old_schema_url(server_url: str) -> AsyncIterator[str]:
    """A database migrated only up to 0007: as the version before the compact tier made it."""
    name = f"t_old_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield with_database(server_url, name)
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


# Values the encodings cannot hold, and computed columns the API gave otherwise: each must be
# read back exactly (from extra).
ODD_ROWS: list[dict[str, Any]] = [
    {"bid": 1.23456, "ask": 250_000.5, "midpoint": 125_001.0},  # 5 decimals, over $214,748
    {"bid": 1.0, "ask": 1.1, "midpoint": None},  # the API gave no midpoint
    {"bid_size": 40_000, "ask_size": -1, "last_size": 2**40, "day_volume": 2**33},
    {"open_interest": 3_000_000_000},
    {"quote_updated_at": "-40 days", "last_trade_at": "+30 days"},  # beyond 24 days
    {"quote_updated_at": "-1.234567 seconds", "last_trade_at": "-0.0005 seconds"},
    {"delta": 1e-50, "gamma": 1e38, "theta": -0.0, "vega": float("inf")},
    {"implied_volatility": float("nan"), "delta": 0.123456789012345},
    {"day_close": 2.0, "day_previous_close": 0.0, "day_change": 2.0, "day_change_percent": None},
    {"day_close": 2.5, "day_previous_close": 2.0, "day_change": 0.5, "day_change_percent": 25.0},
    {"day_change": 0.49999, "day_change_percent": 24.9},  # not as computed: kept
    {"break_even_price": 99.0},  # not strike + midpoint: kept
    {"underlying_price": -0.0001, "fmv": 0.00005},
]
ODD_TICKERS = ("O:ODD261218C00150000", "O:ODD261218P00150000", "NOT-A-TICKER")


async def insert_odd_rows(conn: asyncpg.Connection, slot: dt.datetime) -> int:
    """:data:`ODD_ROWS` for each of :data:`ODD_TICKERS`, at ``slot``."""
    count = 0
    for n, overrides in enumerate(ODD_ROWS):
        for ticker in ODD_TICKERS:
            row: dict[str, Any] = {
                "ticker": f"{ticker}{n}" if ticker == "NOT-A-TICKER" else ticker,
                "underlying_ticker": "ODD",
                "captured_at": slot + dt.timedelta(microseconds=n),
                "bid": 1.5,
                "ask": 1.6,
                "midpoint": 1.55,
                "day_close": 1.55,
                "day_previous_close": 1.4,
                "day_change": 1.55 - 1.4,
                "day_change_percent": (1.55 - 1.4) / 1.4 * 100,
                "break_even_price": (150 + 1.55) if "C0" in ticker else (150 - 1.55),
                "delta": 0.5,
            }
            times = {}
            for key, value in overrides.items():
                if key in ("quote_updated_at", "last_trade_at"):
                    times[key] = value
                else:
                    row[key] = value
            names = list(row)
            values = ", ".join(f"${i + 1}" for i in range(len(names)))
            for key, offset in times.items():
                names.append(key)
                values += f", $3::timestamptz + interval '{offset}'"
            await conn.execute(
                f"INSERT INTO option_snapshots ({', '.join(names)}) VALUES ({values})",
                *row.values(),
            )
            count += 1
    return count


async def test_a_database_written_before_the_compact_tier_is_compacted_without_loss(
    old_schema_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrations = store_db.load_migrations()
    assert migrations[7].name == "0008_compact.sql"
    old = await asyncpg.create_pool(old_schema_url, min_size=1, max_size=2)
    try:
        monkeypatch.setattr(store_db, "load_migrations", lambda: migrations[:7])
        await store_db.apply_migrations(old)
        monkeypatch.undo()
        assert await old.fetchval("SELECT to_regclass('snapshot_rows')") is None
        stored = 0
        for day in DAYS:
            await ensure_partitions(old, day, days_ahead=0)
            async with old.acquire() as conn:
                stored += await insert_odd_rows(
                    conn, dt.datetime.combine(day, SLOT_TIMES[0], dt.UTC)
                )
        before = await all_reads(old)
        assert len(before) == stored

        assert (await store_db.apply_migrations(old))[0] == "0008_compact.sql"
        assert_same(before, await all_reads(old))  # the migration alone changes no read

        reports = await compact_days(old, now=LATER)
        assert reports is not None
        assert [(r.day, r.action, r.rows) for r in reports if r.rows] == [
            (day, COMPACTED, stored // len(DAYS)) for day in DAYS
        ]
        assert all(r.extra_rows for r in reports if r.rows)
        assert await tier_rows(old) == (0, stored)
        assert_same(before, await all_reads(old))
        # the emptied partitions are gone; each day has its compact one
        async with old.acquire() as conn:
            states = await partition_states(conn, COMPACT)
        assert all(states[day] is PartitionState.ATTACHED for day in DAYS)
        assert (
            await old.fetchval(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'option_snapshots'::regclass "
                "AND inhrelid::regclass::text IN ('option_snapshots_p20261118', "
                "'option_snapshots_p20261119', 'option_snapshots_p20261120')"
            )
            == 0
        )
        # a rerun finds nothing to do
        assert await compact_days(old, now=LATER) == []
        assert_same(before, await all_reads(old))
    finally:
        await old.close()


async def take_days(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> Settings:
    """Snapshots by the real jobs at :data:`SLOT_TIMES` of :data:`DAYS`, each slot moved to
    its time (the job stamps a slot with the clock)."""
    async with simulator(underlyings=UNDERLYINGS, contracts_per_underlying=150) as api:
        settings = make_settings(api.base_url, UNDERLYINGS)
        assert await run_options_job(settings) == ExitCode.OK
        for day in DAYS:
            await ensure_partitions(pool, day, days_ahead=0)
        for day in DAYS:
            for at in SLOT_TIMES:
                slot = dt.datetime.combine(day, at, dt.UTC)
                assert await run_snapshots_job(settings, force=True, now=slot) == ExitCode.OK
                taken = await pool.fetchval(
                    "SELECT captured_at FROM ingest_runs WHERE job = 'snapshots' "
                    "ORDER BY id DESC LIMIT 1"
                )
                async with pool.acquire() as conn, conn.transaction():
                    for table in ("option_snapshots", "snapshot_coverage", "ingest_runs"):
                        await conn.execute(
                            f"UPDATE {table} SET captured_at = $1 WHERE captured_at = $2",
                            slot,
                            taken,
                        )
    return settings


async def test_days_taken_by_the_jobs_read_back_the_same_and_the_reads_agree(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> None:
    await take_days(pool, simulator, make_settings)
    before = await all_reads(pool)
    assert len(before) == len(DAYS) * len(SLOT_TIMES) * 300
    chain = [dict(r) for r in await pool.fetch("SELECT * FROM chain_at('AAA', $1)", LATER)]
    history = [
        dict(r)
        for r in await pool.fetch(
            "SELECT * FROM contract_history($1, '-infinity', 'infinity')", before[0]["ticker"]
        )
    ]

    preview = await compact_days(pool, now=LATER, dry_run=True)
    assert preview is not None
    assert [r.action for r in preview if r.day in DAYS] == [WOULD_COMPACT] * len(DAYS)
    assert await tier_rows(pool) == (len(before), 0)  # a dry run changes nothing

    reports = await compact_days(pool, now=LATER, before=DAYS[-1])
    assert reports is not None
    assert [r.day for r in reports if r.action == COMPACTED] == list(DAYS[:-1])
    assert await tier_rows(pool) == (600, 1200)  # the last day, not asked for, stays wide
    assert_same(before, await all_reads(pool))

    reports = await compact_days(pool, now=LATER)
    assert reports is not None
    assert [r.action for r in reports if r.rows] == [COMPACTED]
    compacted = reports[-1]
    assert compacted.bytes_per_snapshot is not None and compacted.wide_bytes > 0
    # the simulator gives every value in the encodings' range, as the API computes them
    assert compacted.extra_rows == 0
    assert await tier_rows(pool) == (0, len(before))
    assert_same(before, await all_reads(pool))
    assert_same(
        chain, [dict(r) for r in await pool.fetch("SELECT * FROM chain_at('AAA', $1)", LATER)]
    )
    assert_same(
        history,
        [
            dict(r)
            for r in await pool.fetch(
                "SELECT * FROM contract_history($1, '-infinity', 'infinity')",
                before[0]["ticker"],
            )
        ],
    )


async def test_rows_written_to_a_compacted_day_are_merged_once(pool: asyncpg.Pool) -> None:
    """Rows an older version left in option_snapshots for a compacted day are merged into its
    compact partition by the next compaction, once each."""
    slot = dt.datetime.combine(DAYS[0], SLOT_TIMES[0], dt.UTC)
    await ensure_partitions(pool, DAYS[0], days_ahead=0)
    async with pool.acquire() as conn:
        first = await insert_odd_rows(conn, slot)
    assert [r.action for r in await compact_days(pool, now=LATER) or []] == [COMPACTED]
    # a late resumed slot writes to the day again: its partition is made again
    await ensure_partitions(pool, DAYS[0], days_ahead=0)
    async with pool.acquire() as conn:
        later = await insert_odd_rows(conn, slot + dt.timedelta(hours=2))
    before = await all_reads(pool)
    assert len(before) == first + later
    assert [r.action for r in await compact_days(pool, now=LATER) or []] == [MERGED]
    assert await tier_rows(pool) == (0, first + later)
    assert_same(before, await all_reads(pool))


async def test_empty_days_and_busy_moments(pool: asyncpg.Pool) -> None:
    for day in DAYS:
        await ensure_partitions(pool, day, days_ahead=0)
    # another compaction, archive or retention holds the lock: nothing is done
    async with pool.acquire() as holder:
        await holder.execute("SELECT pg_advisory_lock($1)", RETENTION_LOCK_KEY)
        assert await compact_days(pool, now=LATER) is None
        await holder.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_KEY)
    reports = await compact_days(pool, now=LATER)
    assert reports is not None
    assert {r.day: r.action for r in reports if r.day in DAYS} == dict.fromkeys(DAYS, EMPTY)
    async with pool.acquire() as conn:
        wide = await partition_states(conn, WIDE)
    assert not set(DAYS) & set(wide)  # empty past partitions are dropped
    # the day of "now" is never compacted, even when over in UTC but not in New York
    assert last_finished_day(LATER) == LATER.date() - dt.timedelta(days=1)
    late = dt.datetime(2026, 11, 24, 2, 0, tzinfo=dt.UTC)  # 21:00 on the 23rd in New York
    assert last_finished_day(late) == dt.date(2026, 11, 22)
    await ensure_partitions(pool, LATER.date(), days_ahead=0)
    async with pool.acquire() as conn:
        stored = await insert_odd_rows(conn, LATER)
    assert [r.day for r in await compact_days(pool, now=late) or []] == []
    assert await tier_rows(pool) == (stored, 0)


async def test_a_day_that_does_not_read_back_stays_as_it_was(pool: asyncpg.Pool) -> None:
    slot = dt.datetime.combine(DAYS[0], SLOT_TIMES[0], dt.UTC)
    await ensure_partitions(pool, DAYS[0], days_ahead=0)
    async with pool.acquire() as conn:
        stored = await insert_odd_rows(conn, slot)
        # a decoding that no longer matches the encoding (a broken migration, say)
        await conn.execute(
            "CREATE OR REPLACE FUNCTION snapshot_price(code integer) RETURNS double precision "
            "LANGUAGE sql IMMUTABLE AS $$ SELECT code::float8 / 1000 $$"
        )
    before = await all_reads(pool)
    with pytest.raises(CompactionError, match="did not read back"):
        await compact_days(pool, now=LATER)
    assert await tier_rows(pool) == (stored, 0)
    assert_same(before, await all_reads(pool))
    async with pool.acquire() as conn:
        assert DAYS[0] not in await partition_states(conn, COMPACT)


async def test_the_contracts_job_compacts_the_finished_days_after_its_sync(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> None:
    await take_days(pool, simulator, make_settings)
    before = await all_reads(pool)
    assert await tier_rows(pool) == (len(before), 0)
    async with simulator(underlyings=UNDERLYINGS, contracts_per_underlying=150) as api:
        assert await run_options_job(make_settings(api.base_url, UNDERLYINGS)) == ExitCode.OK
    assert await tier_rows(pool) == (0, len(before))
    assert_same(before, await all_reads(pool))


async def test_a_reader_sees_a_day_in_one_tier_while_it_moves(pool: asyncpg.Pool) -> None:
    """The move is MVCC-safe: a repeatable-read reader whose snapshot predates it sees the day
    exactly once (in the hot tier) after the move committed, and the emptied partition is
    dropped only once that reader is gone."""
    slot = dt.datetime.combine(DAYS[0], SLOT_TIMES[0], dt.UTC)
    await ensure_partitions(pool, DAYS[0], days_ahead=0)
    async with pool.acquire() as conn:
        await insert_odd_rows(conn, slot)
    before = await all_reads(pool)
    async with pool.acquire() as reader, reader.transaction(isolation="repeatable_read"):
        # its snapshot is taken now, by a query that touches neither tier
        assert await reader.fetchval("SELECT count(*) FROM ingest_runs") == 0
        reports = await compact_days(pool, now=LATER, lock_timeout=0.3)
        assert [(r.day, r.action) for r in reports or []] == [(DAYS[0], COMPACTED)]
        seen = [dict(r) for r in await reader.fetch(f"SELECT * FROM snapshot_reads {ORDER}")]
        assert_same(before, seen)
        async with pool.acquire() as conn:
            assert DAYS[0] in await partition_states(conn, WIDE)  # kept for that reader
    assert_same(before, await all_reads(pool))
    assert [r.action for r in await compact_days(pool, now=LATER) or []] == [EMPTY]
    async with pool.acquire() as conn:
        assert DAYS[0] not in await partition_states(conn, WIDE)
    assert await tier_rows(pool) == (0, len(before))
    assert_same(before, await all_reads(pool))


async def test_a_writer_of_the_day_makes_the_move_wait(pool: asyncpg.Pool) -> None:
    """A transaction writing into the day (it holds the day's state FOR SHARE) keeps the move
    from starting: the day is left busy for a later run, which moves it."""
    slot = dt.datetime.combine(DAYS[0], SLOT_TIMES[0], dt.UTC)
    await ensure_partitions(pool, DAYS[0], days_ahead=0)
    async with pool.acquire() as conn:
        stored = await insert_odd_rows(conn, slot)
    async with pool.acquire() as writer, writer.transaction():
        await lock_for_write(writer, DAYS[0])
        reports = await compact_days(pool, now=LATER, lock_timeout=0.3)
        assert [(r.day, r.action) for r in reports or []] == [(DAYS[0], BUSY)]
        assert await tier_rows(pool) == (stored, 0)
    assert [r.action for r in await compact_days(pool, now=LATER) or []] == [COMPACTED]
    assert await tier_rows(pool) == (0, stored)


async def test_moves_that_roll_back_consume_no_ids(pool: asyncpg.Pool) -> None:
    """The ids of a day's tickers and underlyings are added in a transaction of their own:
    moves that fail their verification and roll back, again and again, leave the ids dense
    (an underlying's id is a smallint; one consumed by a rollback is lost for good)."""
    slot = dt.datetime.combine(DAYS[0], SLOT_TIMES[0], dt.UTC)
    await ensure_partitions(pool, DAYS[0], days_ahead=0)
    async with pool.acquire() as conn:
        stored = await insert_odd_rows(conn, slot)
    decode = "CREATE OR REPLACE FUNCTION snapshot_price(code integer) RETURNS double precision "
    await pool.execute(decode + "LANGUAGE sql IMMUTABLE AS $$ SELECT code::float8 / 1000 $$")
    for _ in range(5):
        with pytest.raises(CompactionError, match="did not read back"):
            await compact_days(pool, now=LATER)
    await pool.execute(decode + "LANGUAGE sql IMMUTABLE AS $$ SELECT code::float8 / 10000 $$")
    assert [r.action for r in await compact_days(pool, now=LATER) or []] == [COMPACTED]
    assert await tier_rows(pool) == (0, stored)
    for table in ("snapshot_underlyings", "snapshot_tickers"):
        ids = await pool.fetchrow(f"SELECT count(*) AS n, max(id) AS top FROM {table}")
        assert ids["top"] == ids["n"], table


async def test_cli_compact_exits_partial_when_a_day_is_left_busy(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """`ingest_admin compact` that leaves a day because a session kept it in use (a chain
    being stored into it) exits 3 (partial: the other days are compacted, a rerun does this
    one) with a line naming the day and why; once the session is gone a rerun compacts it and
    exits 0."""
    busy, free = DAYS[0], DAYS[1]
    for day in (busy, free):
        await ensure_partitions(pool, day, days_ahead=0)
        async with pool.acquire() as conn:
            await insert_odd_rows(conn, dt.datetime.combine(day, SLOT_TIMES[0], dt.UTC))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": database_url,
        "LOG_LEVEL": "ERROR",
    }
    command = [
        str(Path(sys.executable).parent / "ingest_admin"),
        "compact",
        "--before",
        "2026-11-21",
    ]
    async with pool.acquire() as writer, writer.transaction():
        await lock_for_write(writer, busy)  # a late chain being stored into the day
        done = await asyncio.to_thread(
            subprocess.run, command, env=env, cwd=tmp_path, capture_output=True, text=True
        )
    assert done.returncode == ExitCode.PARTIAL, (done.stdout, done.stderr)
    lines = (done.stdout + done.stderr).splitlines()
    assert any(line.startswith(f"{busy}: ") and "in use" in line for line in lines), lines
    async with pool.acquire() as conn:
        assert set(await partition_states(conn, COMPACT)) == {free}
    again = await asyncio.to_thread(
        subprocess.run, command, env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert again.returncode == ExitCode.OK, (again.stdout, again.stderr)
