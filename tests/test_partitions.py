"""The daily partitions of option_snapshots: attached ahead without locking readers out, detached
and dropped whole by retention."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator

import asyncpg
import pytest

from options.errors import DatabaseError
from options.store.partitions import (
    PARTITIONS_AHEAD,
    RETENTION_LOCK_KEY,
    DropOutcome,
    PartitionState,
    drop_day_partition,
    drop_old_partitions,
    ensure_partitions,
    partition_name,
    partition_states,
)
from options.store.underlyings import sync_configured

DAY = dt.date(2026, 11, 23)
NOW = dt.datetime.combine(DAY, dt.time(15), dt.UTC)
GENEROUS = 20.0  # seconds: "did not hang", never a measure of speed


def names(*days: dt.date) -> list[str]:
    return [partition_name(day) for day in days]


def days_from(first: dt.date, count: int) -> list[dt.date]:
    return [first + dt.timedelta(days=n) for n in range(count)]


async def partitions(pool: asyncpg.Pool) -> dict[str, bool]:
    """The partitions of option_snapshots, by name, each with whether its detach is pending."""
    rows = await pool.fetch(
        "SELECT inhrelid::regclass::text AS name, inhdetachpending FROM pg_inherits "
        "WHERE inhparent = 'option_snapshots'::regclass ORDER BY 1"
    )
    return {row["name"]: row["inhdetachpending"] for row in rows}


async def insert_snapshot(conn: asyncpg.Connection | asyncpg.Pool, at: dt.datetime) -> None:
    await conn.execute(
        "INSERT INTO option_snapshots (ticker, underlying_ticker, captured_at) "
        "VALUES ('O:AAA261231C00001000', 'AAA', $1)",
        at,
    )


async def add_coverage(pool: asyncpg.Pool, *moments: dt.datetime) -> None:
    run_id = await pool.fetchval(
        "INSERT INTO ingest_runs (job, started_at, finished_at, status) "
        "VALUES ('snapshots', $1, $1, 'failed') RETURNING id",
        NOW,
    )
    for at in moments:
        await pool.execute(
            "INSERT INTO snapshot_coverage (captured_at, underlying_ticker, run_id, "
            "contracts_active, snapshots_stored, contracts_missing, complete, pages) "
            "VALUES ($1, 'AAA', $2, 1, 1, 0, false, 1)",
            at,
            run_id,
        )


async def wait_for_lock_request(pool: asyncpg.Pool, relation: str) -> asyncpg.Record:
    """The first lock on ``relation`` that a session is waiting for, once there is one."""
    while True:
        waiting = await pool.fetchrow(
            "SELECT pid, mode FROM pg_locks WHERE relation = to_regclass($1) AND NOT granted",
            relation,
        )
        if waiting is not None:
            return waiting
        await asyncio.sleep(0.05)


@pytest.fixture
async def session(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """Another client's connection, outside the pool."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def test_a_week_of_partitions_is_made_once(pool, session) -> None:
    """The day's partition and the PARTITIONS_AHEAD days after it are made; a second call
    makes none and takes no lock (it returns while another session holds the table)."""
    assert PARTITIONS_AHEAD >= 7
    assert await ensure_partitions(pool, DAY) == "option_snapshots_p20261123"
    expected = names(*days_from(DAY, PARTITIONS_AHEAD + 1))
    assert list(await partitions(pool)) == expected
    oids = await pool.fetch("SELECT oid FROM pg_class WHERE relname = ANY($1) ORDER BY 1", expected)
    async with session.transaction():
        await session.execute("LOCK TABLE option_snapshots IN ACCESS EXCLUSIVE MODE")
        assert await ensure_partitions(pool, DAY, lock_timeout=0.2) == partition_name(DAY)
        assert await ensure_partitions(pool, DAY + dt.timedelta(days=3), days_ahead=2)
    assert list(await partitions(pool)) == expected
    assert oids == await pool.fetch(
        "SELECT oid FROM pg_class WHERE relname = ANY($1) ORDER BY 1", expected
    )


async def test_rows_through_the_parent_land_in_their_day_under_its_primary_key(pool) -> None:
    """A row inserted through option_snapshots lands in its UTC day's partition, and the
    partition's primary key is part of the parent's: a duplicate is refused, ON CONFLICT works."""
    captured = dt.datetime(2026, 11, 23, 23, 59, 59, tzinfo=dt.UTC)
    await ensure_partitions(pool, DAY, days_ahead=1)
    for moment in (captured, captured + dt.timedelta(seconds=2)):
        await insert_snapshot(pool, moment)
    rows = await pool.fetch(
        "SELECT tableoid::regclass::text AS part FROM option_snapshots ORDER BY captured_at"
    )
    assert [r["part"] for r in rows] == ["option_snapshots_p20261123", "option_snapshots_p20261124"]
    with pytest.raises(asyncpg.UniqueViolationError):
        await insert_snapshot(pool, captured)
    assert (
        await pool.execute(
            "INSERT INTO option_snapshots (ticker, underlying_ticker, captured_at) "
            "VALUES ('O:AAA261231C00001000', 'AAA', $1) "
            "ON CONFLICT (ticker, captured_at) DO NOTHING",
            captured,
        )
        == "INSERT 0 0"
    )
    index = await pool.fetchrow(
        "SELECT x.indisprimary, x.indisvalid, i.inhparent::regclass::text AS parent "
        "FROM pg_index x JOIN pg_inherits i ON i.inhrelid = x.indexrelid "
        "WHERE x.indrelid = 'option_snapshots_p20261123'::regclass"
    )
    assert dict(index) == {
        "indisprimary": True,
        "indisvalid": True,
        "parent": "option_snapshots_pkey",
    }
    columns = (
        "SELECT attname, atttypid, attnotnull FROM pg_attribute "
        "WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    )
    assert await pool.fetch(columns, "option_snapshots_p20261123") == await pool.fetch(
        columns, "option_snapshots"
    )
    # the bounds CHECK only served the attach
    assert not await pool.fetchval(
        "SELECT count(*) FROM pg_constraint "
        "WHERE conrelid = 'option_snapshots_p20261123'::regclass AND contype = 'c'"
    )


# the listener stays on the pooled connection, which asyncpg warns about when it is released
@pytest.mark.filterwarnings("ignore:.*active log listener:asyncpg.InterfaceWarning")
async def test_attach_needs_no_validation_scan(database_url: str) -> None:
    """The CHECK made with the table implies the partition constraint, so ATTACH scans
    nothing."""
    messages: list[str] = []

    async def listen(conn: asyncpg.Connection) -> None:
        await conn.execute("SET client_min_messages = debug1")
        conn.add_log_listener(lambda _conn, message: messages.append(message.message))

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1, setup=listen)
    try:
        await ensure_partitions(pool, DAY, days_ahead=0)
    finally:
        await pool.close()
    assert (
        'partition constraint for table "option_snapshots_p20261123" is implied by existing '
        "constraints" in messages
    )


async def test_a_long_reader_does_not_stop_attaching(pool, session) -> None:
    """A transaction that read option_snapshots and stays open (ACCESS SHARE) does not make
    ensure_partitions wait, even for the day's own missing partition."""
    async with session.transaction():
        await session.fetchval("SELECT count(*) FROM option_snapshots")
        assert await ensure_partitions(pool, DAY, lock_timeout=0.5) == partition_name(DAY)
    assert list(await partitions(pool)) == names(*days_from(DAY, PARTITIONS_AHEAD + 1))


async def test_readers_and_writers_do_not_queue_behind_a_waiting_attach(
    pool, session, database_url: str
) -> None:
    """While an attach waits for the parent's lock, it asks for SHARE UPDATE EXCLUSIVE, never
    ACCESS EXCLUSIVE, so new readers and writers of option_snapshots go ahead of it."""
    await ensure_partitions(pool, DAY, days_ahead=0)
    async with session.transaction():
        # what VACUUM, ANALYZE or another attach hold; conflicts with ATTACH, not with readers
        await session.execute("LOCK TABLE ONLY option_snapshots IN SHARE UPDATE EXCLUSIVE MODE")
        attaching = asyncio.ensure_future(ensure_partitions(pool, DAY, lock_timeout=GENEROUS))
        waiting = await asyncio.wait_for(wait_for_lock_request(pool, "option_snapshots"), GENEROUS)
        assert waiting["mode"] == "ShareUpdateExclusiveLock"
        assert not await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE relation = 'option_snapshots'::regclass "
            "AND mode = 'AccessExclusiveLock'"
        )
        other = await asyncpg.connect(database_url)
        try:
            await asyncio.wait_for(
                other.fetchval("SELECT count(*) FROM option_snapshots"), GENEROUS
            )
            await asyncio.wait_for(insert_snapshot(other, NOW), GENEROUS)
        finally:
            await other.close()
        assert not attaching.done()
    assert await asyncio.wait_for(attaching, GENEROUS) == partition_name(DAY)
    assert list(await partitions(pool)) == names(*days_from(DAY, PARTITIONS_AHEAD + 1))


async def test_concurrent_callers_all_succeed(pool, database_url: str) -> None:
    """Callers ensuring the same days at once (as two processes would) all succeed, and each
    partition is made once."""
    other = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        results = await asyncio.gather(
            ensure_partitions(pool, DAY),
            ensure_partitions(other, DAY),
            ensure_partitions(pool, DAY + dt.timedelta(days=2)),
            ensure_partitions(other, DAY),
        )
    finally:
        await other.close()
    assert results == names(DAY, DAY, DAY + dt.timedelta(days=2), DAY)
    assert list(await partitions(pool)) == names(*days_from(DAY, PARTITIONS_AHEAD + 3))


async def test_a_leftover_unattached_table_is_attached(pool) -> None:
    """A table of the partition's name that is not attached (no primary key, no CHECK, one row)
    is attached as it is, and gets the parent's primary key."""
    await pool.execute("CREATE TABLE option_snapshots_p20261123 (LIKE option_snapshots)")
    await pool.execute(
        "INSERT INTO option_snapshots_p20261123 (ticker, underlying_ticker, captured_at) "
        "VALUES ('O:AAA261231C00001000', 'AAA', $1)",
        NOW,
    )
    assert await ensure_partitions(pool, DAY, days_ahead=0) == "option_snapshots_p20261123"
    assert list(await partitions(pool)) == ["option_snapshots_p20261123"]
    assert await pool.fetchval("SELECT count(*) FROM option_snapshots") == 1
    assert (
        await pool.fetchval(
            "SELECT i.inhparent::regclass::text FROM pg_index x "
            "JOIN pg_inherits i ON i.inhrelid = x.indexrelid "
            "WHERE x.indrelid = 'option_snapshots_p20261123'::regclass AND x.indisprimary"
        )
        == "option_snapshots_pkey"
    )
    with pytest.raises(asyncpg.UniqueViolationError):
        await insert_snapshot(pool, NOW)


async def test_own_day_fails_clearly_while_the_parent_stays_locked(pool, session) -> None:
    """When the day's own partition is missing and its lock is not granted within lock_timeout,
    a DatabaseError names the partition and the cause, and nothing is left half made."""
    async with session.transaction():
        await session.execute("LOCK TABLE ONLY option_snapshots IN SHARE UPDATE EXCLUSIVE MODE")
        with pytest.raises(DatabaseError) as caught:
            await ensure_partitions(pool, DAY, lock_timeout=0.2)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "cannot attach partition option_snapshots_p20261123: another session kept "
        "option_snapshots locked for more than 0.2 s"
    )
    assert await pool.fetchval("SELECT to_regclass('option_snapshots_p20261123')") is None
    assert await ensure_partitions(pool, DAY, lock_timeout=0.2) == partition_name(DAY)


async def test_a_later_day_that_cannot_be_made_is_left_with_a_warning(
    pool, session, caplog
) -> None:
    """When the day's partition exists but the parent stays locked, the days ahead are left
    for a later run with one warning, and the day's partition is returned."""
    await ensure_partitions(pool, DAY, days_ahead=0)
    async with session.transaction():
        await session.execute("LOCK TABLE ONLY option_snapshots IN SHARE UPDATE EXCLUSIVE MODE")
        with caplog.at_level(logging.WARNING, logger="options.store.partitions"):
            assert await ensure_partitions(pool, DAY, lock_timeout=0.2) == partition_name(DAY)
    assert "Partitions from option_snapshots_p20261124 on not attached yet" in caplog.text
    assert list(await partitions(pool)) == ["option_snapshots_p20261123"]
    await ensure_partitions(pool, DAY, lock_timeout=0.2)
    assert list(await partitions(pool)) == names(*days_from(DAY, PARTITIONS_AHEAD + 1))


async def test_retention_drops_only_whole_old_partitions_and_their_coverage(pool) -> None:
    """Retention drops our partitions whose whole day is older than retain_days, with their
    coverage rows, and leaves younger ones and partitions not named by us alone."""
    await ensure_partitions(pool, DAY - dt.timedelta(days=10))  # 13th to 20th
    await ensure_partitions(pool, DAY, days_ahead=1)  # 23rd, 24th
    await pool.execute(
        "CREATE TABLE option_snapshots_archive_p20261001 PARTITION OF option_snapshots "
        "FOR VALUES FROM ('2026-10-01 00:00:00+00') TO ('2026-10-02 00:00:00+00')"
    )
    await pool.execute(
        "CREATE TABLE option_snapshots_p20261002_kept PARTITION OF option_snapshots "
        "FOR VALUES FROM ('2026-10-02 00:00:00+00') TO ('2026-10-03 00:00:00+00')"
    )
    last_old = dt.datetime(2026, 11, 19, 23, 59, 59, tzinfo=dt.UTC)
    first_kept = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
    for moment in (last_old, first_kept):
        await insert_snapshot(pool, moment)
    await add_coverage(pool, dt.datetime(2026, 11, 13, 15, tzinfo=dt.UTC), last_old, first_kept)

    dropped = await drop_old_partitions(pool, retain_days=3, now=NOW)

    assert dropped == names(*days_from(dt.date(2026, 11, 13), 7))
    assert list(await partitions(pool)) == [
        "option_snapshots_archive_p20261001",
        "option_snapshots_p20261002_kept",
        "option_snapshots_p20261120",
        "option_snapshots_p20261123",
        "option_snapshots_p20261124",
    ]
    assert not await pool.fetchval("SELECT count(*) FROM pg_class WHERE relname = ANY($1)", dropped)
    assert await pool.fetchval("SELECT array_agg(captured_at) FROM option_snapshots") == [
        first_kept
    ]
    assert await pool.fetchval("SELECT array_agg(captured_at) FROM snapshot_coverage") == [
        first_kept
    ]
    assert await drop_old_partitions(pool, retain_days=3, now=NOW) == []


async def test_retention_under_a_long_reader_finishes_later(pool, session, caplog) -> None:
    """While a transaction that read option_snapshots stays open, retention leaves the oldest
    partition "detach pending" with a warning; the next call finishes that detach first and
    drops it with the others."""
    await ensure_partitions(pool, DAY - dt.timedelta(days=10), days_ahead=2)  # 13th to 15th
    async with session.transaction():
        await session.fetchval("SELECT count(*) FROM option_snapshots")
        with caplog.at_level(logging.WARNING, logger="options.store.partitions"):
            assert await drop_old_partitions(pool, retain_days=3, now=NOW, lock_timeout=0.2) == []
        assert await partitions(pool) == {
            "option_snapshots_p20261113": True,
            "option_snapshots_p20261114": False,
            "option_snapshots_p20261115": False,
        }
    assert "Retention: option_snapshots_p20261113 is in use by another session" in caplog.text
    assert await drop_old_partitions(pool, retain_days=3, now=NOW, lock_timeout=0.2) == names(
        dt.date(2026, 11, 13), dt.date(2026, 11, 14), dt.date(2026, 11, 15)
    )
    assert await partitions(pool) == {}
    assert not await pool.fetchval(
        "SELECT count(*) FROM pg_class WHERE relname LIKE 'option\\_snapshots\\_p2%'"
    )


async def test_retention_drops_an_old_table_left_detached(pool) -> None:
    """A table of one of our old days that is no longer attached (retention was interrupted
    between detach and drop) is dropped; a recent one is not."""
    for day in (dt.date(2026, 11, 1), DAY):
        await pool.execute(f"CREATE TABLE {partition_name(day)} (LIKE option_snapshots)")
    assert await drop_old_partitions(pool, retain_days=3, now=NOW) == ["option_snapshots_p20261101"]
    assert await pool.fetchval("SELECT to_regclass('option_snapshots_p20261101')") is None
    assert await pool.fetchval("SELECT to_regclass('option_snapshots_p20261123')") is not None


async def test_a_single_retention_runs_at_a_time(pool, session, caplog) -> None:
    """A retention started while another one runs returns at once, dropping nothing."""
    await ensure_partitions(pool, DAY - dt.timedelta(days=10), days_ahead=0)
    await session.execute("SELECT pg_advisory_lock($1)", RETENTION_LOCK_KEY)
    with caplog.at_level(logging.INFO, logger="options.store.partitions"):
        assert await drop_old_partitions(pool, retain_days=3, now=NOW) == []
    assert "another session is dropping old partitions" in caplog.text
    assert list(await partitions(pool)) == ["option_snapshots_p20261113"]


async def test_one_day_is_dropped_only_with_the_rows_expected(pool) -> None:
    """drop_day_partition drops a day holding exactly the rows expected, with the caller's
    record in the same transaction and its coverage kept; a day holding other rows is
    attached again, its rows visible, the record not written."""
    old, other = dt.date(2026, 11, 2), dt.date(2026, 11, 3)
    for day in (old, other):
        await ensure_partitions(pool, day, days_ahead=0)
        await insert_snapshot(pool, dt.datetime.combine(day, dt.time(15), dt.UTC))
    await add_coverage(pool, dt.datetime.combine(old, dt.time(15), dt.UTC))
    await pool.execute("CREATE TABLE dropped_days (day date)")

    def recording(day: dt.date):
        async def record(conn: asyncpg.Connection) -> None:
            await conn.execute("INSERT INTO dropped_days VALUES ($1)", day)

        return record

    async with pool.acquire() as conn:
        assert await drop_day_partition(conn, old, expected_rows=1, also=recording(old)) is (
            DropOutcome.DROPPED
        )
        assert await drop_day_partition(conn, other, expected_rows=2, also=recording(other)) is (
            DropOutcome.CHANGED
        )
    assert list(await partitions(pool)) == names(other)
    assert await pool.fetchval("SELECT count(*) FROM option_snapshots") == 1
    assert await pool.fetchval("SELECT array_agg(day) FROM dropped_days") == [old]
    assert await pool.fetchval("SELECT count(*) FROM snapshot_coverage") == 1


async def test_one_day_in_use_is_left_and_finished_later(pool, session) -> None:
    """While a transaction that read option_snapshots stays open, drop_day_partition leaves
    the day (its detach pending) and says so; the next call finishes it."""
    day = dt.date(2026, 11, 2)
    await ensure_partitions(pool, day, days_ahead=0)
    async with pool.acquire() as conn:
        async with session.transaction():
            await session.fetchval("SELECT count(*) FROM option_snapshots")
            outcome = await drop_day_partition(conn, day, expected_rows=0, lock_timeout=0.2)
            assert outcome is DropOutcome.BUSY
            assert (await partition_states(conn))[day] is PartitionState.DETACH_PENDING
        assert await drop_day_partition(conn, day, expected_rows=0) is DropOutcome.DROPPED
    assert await partitions(pool) == {}


async def test_retention_lock_never_holds_up_a_job_start(pool, session) -> None:
    """A retention or archive holding its lock for long does not hold up the tracked
    underlyings' sync every job start makes (they once shared a lock key)."""
    await session.execute("SELECT pg_advisory_lock($1)", RETENTION_LOCK_KEY)
    tracked = await asyncio.wait_for(sync_configured(pool, ("AAA",)), GENEROUS)
    assert tracked == ["AAA"]
