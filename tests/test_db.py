"""The pool decorators and the migrations, against real PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import re

import asyncpg
import pytest

from options.errors import DatabaseError
from options.store.db import (
    apply_migrations,
    bounded_db_connection,
    bounded_db_connection_gen,
    epoch_microsecond_timestamps,
    load_migrations,
)


@bounded_db_connection
async def backend_pid(conn: asyncpg.Connection, delay: float = 0.0) -> int:
    await asyncio.sleep(delay)
    return int(await conn.fetchval("SELECT pg_backend_pid()"))


@bounded_db_connection
async def broken_query(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT * FROM no_such_table")


@bounded_db_connection("reading the known contracts of {underlying} ({tickers})")
async def _described_query(
    conn: asyncpg.Connection, underlying: str, *, tickers: list[str], day: object = None
) -> None:
    await conn.execute("SELECT * FROM no_such_table")


@bounded_db_connection_gen
async def numbers(conn: asyncpg.Connection, count: int):
    async with conn.transaction():
        async for row in conn.cursor("SELECT generate_series(1, $1) AS n", count):
            yield row["n"]


async def test_decorator_lends_a_connection_and_returns_it(database_url: str) -> None:
    """bounded_db_connection runs the function on a pooled connection and gives it back."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        first = await backend_pid(pool)
        assert await backend_pid(pool) == first  # the one connection came back to the pool
    finally:
        await pool.close()


async def test_concurrency_is_bounded_by_the_pool(database_url: str) -> None:
    """More calls than connections wait for one: never more backends than the pool size."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        pids = await asyncio.gather(*(backend_pid(pool, 0.05) for _ in range(6)))
        assert len(set(pids)) <= 2
    finally:
        await pool.close()


async def test_database_errors_become_database_error(pool: asyncpg.Pool) -> None:
    """An asyncpg error leaves the decorator as DatabaseError naming what was being done (bare:
    the function's name, spoken) and the SQLSTATE."""
    with pytest.raises(DatabaseError, match=r"^broken query: UndefinedTableError \[42P01\]"):
        await broken_query(pool)


async def test_database_errors_say_what_was_being_done(pool: asyncpg.Pool) -> None:
    """A described call's error starts with its description, filled from the call's arguments
    (a list spoken as its first few items), and names no Python identifier."""
    tickers = [f"O:AAA{i}" for i in range(7)]
    with pytest.raises(DatabaseError) as caught:
        await _described_query(pool, "AAPL", tickers=tickers)
    assert str(caught.value).startswith(
        "reading the known contracts of AAPL (O:AAA0, O:AAA1, O:AAA2, O:AAA3, O:AAA4 and 2 "
        "more): UndefinedTableError [42P01]"
    )


def test_a_description_naming_no_argument_is_refused_at_once() -> None:
    """A description whose field is not an argument of the function fails where it is
    written (at import), not when an error is being reported."""
    with pytest.raises(TypeError, match="names no argument"):

        @bounded_db_connection("reading {nothing}")
        async def query(conn: asyncpg.Connection, something: str) -> None: ...


async def test_generator_twin_streams_and_releases(database_url: str) -> None:
    """The async-generator twin holds its connection while iterating and releases it after."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        assert [n async for n in numbers(pool, 5)] == [1, 2, 3, 4, 5]
        assert await backend_pid(pool) > 0  # released: the single connection is free again
    finally:
        await pool.close()


async def test_migrations_are_idempotent(pool: asyncpg.Pool) -> None:
    """Applying the migrations to a migrated database applies nothing and keeps the records."""
    assert await apply_migrations(pool) == []
    applied = await pool.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    assert [(r["version"], r["name"]) for r in applied] == [
        (m.version, m.name) for m in load_migrations()
    ]


async def test_concurrent_migrations_apply_once(server_url: str) -> None:
    """Several processes migrating a fresh database at once: each migration is applied once."""
    from tests.conftest import with_database

    name = "t_migrate_race"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name}")
        pools = [
            await asyncpg.create_pool(with_database(server_url, name), min_size=1, max_size=1)
            for _ in range(3)
        ]
        try:
            results = await asyncio.gather(*(apply_migrations(p) for p in pools))
            assert sorted(len(r) for r in results) == [0, 0, len(load_migrations())]
        finally:
            for p in pools:
                await p.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_edited_migration_is_refused(pool: asyncpg.Pool) -> None:
    """A migration whose file changed after it was applied stops the job with a clear error."""
    await pool.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
    with pytest.raises(DatabaseError, match="changed after it was applied"):
        await apply_migrations(pool)


async def test_epoch_microsecond_timestamps_only_inside_the_block(database_url: str) -> None:
    """Inside the block timestamptz is an int of Unix microseconds both ways; the connection
    goes back to the pool speaking datetime again."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    moment = dt.datetime(2024, 3, 1, 14, 30, 0, 123456, tzinfo=dt.UTC)
    unix_us = 1_709_303_400_123_456
    try:
        async with pool.acquire() as conn:
            async with epoch_microsecond_timestamps(conn):
                assert await conn.fetchval("SELECT $1::timestamptz", unix_us) == unix_us
                assert (
                    await conn.fetchval("SELECT '2024-03-01 14:30:00.123456+00'::timestamptz")
                    == unix_us
                )
                await conn.execute("CREATE TEMP TABLE t (at timestamptz)")
                await conn.copy_records_to_table("t", records=[(unix_us,), (None,)])
            assert await conn.fetchval("SELECT at FROM t WHERE at IS NOT NULL") == moment
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT $1::timestamptz", moment) == moment
    finally:
        await pool.close()


async def test_epoch_microsecond_connection_that_breaks_is_not_reused(database_url: str) -> None:
    """A connection lost inside the block is closed, never handed out with the int codec."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            first_pid = conn.get_server_pid()
            async with epoch_microsecond_timestamps(conn):
                await pool_terminate(database_url, first_pid)
        async with pool.acquire() as conn:
            assert conn.get_server_pid() != first_pid
            assert isinstance(await conn.fetchval("SELECT now()"), dt.datetime)
    finally:
        await pool.close()


async def pool_terminate(database_url: str, pid: int) -> None:
    other = await asyncpg.connect(database_url)
    try:
        await other.execute("SELECT pg_terminate_backend($1)", pid)
        await asyncio.sleep(0.1)
    finally:
        await other.close()


async def test_migration_lock_wait_is_bounded(pool: asyncpg.Pool) -> None:
    """A session sitting on the migration lock makes a job fail after a bounded wait, with an
    error naming that session, instead of hanging forever."""
    from options.store.db import MIGRATION_LOCK_KEY, _take_migration_lock

    async with pool.acquire() as holder, pool.acquire() as waiter:
        await holder.execute("SELECT set_config('application_name', 'stuck-migrator', false)")
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        with pytest.raises(DatabaseError, match=r"held by backend \d+, stuck-migrator"):
            await _take_migration_lock(waiter, patience=0.5)
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        await _take_migration_lock(waiter, patience=0.5)
        await waiter.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def test_pool_connections_carry_their_limits(database_url: str) -> None:
    """Every pooled connection has statement and lock timeouts, keeps its own transactions from
    idling forever, has TCP keepalives on, and an application_name unique to its pool."""
    from options.store.db import Limits, create_pool

    pool = await create_pool(database_url, max_size=2, limits=Limits(12.5, 3.0))
    try:
        async with pool.acquire() as conn:
            settings = {
                name: await conn.fetchval(f"SHOW {name}")
                for name in (
                    "statement_timeout",
                    "lock_timeout",
                    "idle_in_transaction_session_timeout",
                    "application_name",
                )
            }
            name = settings.pop("application_name")
            assert settings == {
                "statement_timeout": "12500ms",
                "lock_timeout": "3s",
                "idle_in_transaction_session_timeout": "12500ms",
            }
            # unique to the pool: a copy that takes over a dead run ends exactly its sessions
            assert re.fullmatch(r"options-history/[0-9a-f]{16}", name), name
            with pytest.raises(asyncpg.QueryCanceledError):
                await conn.execute("SET statement_timeout = '100ms'; SELECT pg_sleep(1)")
    finally:
        await pool.close()


async def test_existing_database_is_migrated_in_place(server_url: str) -> None:
    """A database written by the schema before the durable units keeps its data: runs left
    'running' are closed, coverage rows keep their counts, 'complete' takes its stricter
    meaning (read to the end and nothing missing), and their time of storing is kept."""
    from tests.conftest import with_database

    name = "t_migrate_old"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name}")
        pool = await asyncpg.create_pool(with_database(server_url, name), min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                await conn.execute(
                    "CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                    "name text NOT NULL, checksum text NOT NULL, "
                    "applied_at timestamptz NOT NULL DEFAULT now())"
                )
                for migration in load_migrations()[:2]:
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )
                await conn.execute(
                    "INSERT INTO ingest_runs (job, started_at, status, finished_at, captured_at) "
                    "VALUES ('snapshots', '2026-11-20 15:00Z', 'succeeded', '2026-11-20 15:01Z',"
                    " '2026-11-20 15:00Z'), ('options', now(), 'running', NULL, NULL)"
                )
                await conn.execute(
                    "INSERT INTO snapshot_coverage (captured_at, underlying_ticker, run_id, "
                    "contracts_active, snapshots_stored, contracts_missing, complete, pages) "
                    "VALUES ('2026-11-20 15:00Z', 'AAA', 1, 10, 10, 0, true, 1), "
                    "('2026-11-20 15:00Z', 'BBB', 1, 10, 8, 2, true, 1), "
                    "('2026-11-20 15:00Z', 'CCC', 1, 10, 3, 7, false, 1)"
                )
            applied = await apply_migrations(pool)
            assert applied == [m.name for m in load_migrations()[2:]]
            runs = await pool.fetch("SELECT status, finished_at IS NOT NULL FROM ingest_runs")
            assert [tuple(r) for r in runs] == [("succeeded", True), ("interrupted", True)]
            rows = await pool.fetch(
                "SELECT underlying_ticker, snapshots_stored, read_to_end, complete, "
                "committed_at = captured_at FROM snapshot_coverage ORDER BY 1"
            )
            assert [tuple(r) for r in rows] == [
                ("AAA", 10, True, True, True),
                ("BBB", 8, True, False, True),
                ("CCC", 3, False, False, True),
            ]
        finally:
            await pool.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_the_wait_for_a_lost_database_is_counted_once_per_job() -> None:
    """DB_RECONNECT_SECONDS counts from when the job's database went away, across its tasks:
    work that starts after the window has run out tries once and gives up (no window of its
    own); a success clears the count."""
    from options.store.reconnect import reconnecting, wait_for_database

    policy = wait_for_database(0.3)

    async def attempts(**kwargs: float) -> int:
        count = 0
        with pytest.raises(ConnectionRefusedError):
            async for attempt in reconnecting(what="testing", **kwargs):
                with attempt:
                    count += 1
                    raise ConnectionRefusedError("the database is away")
        return count

    assert await attempts() > 1  # retried for the window
    assert policy.lost_since is not None
    assert await attempts() == 1  # the window is spent: one try, no window of its own
    assert await attempts(grace=0.3) > 1  # a last write is tried a little longer
    async for attempt in reconnecting(what="testing"):
        with attempt:
            pass  # the database answers again
    assert policy.lost_since is None
    assert await attempts() > 1


async def test_an_answer_from_the_server_ends_the_wait() -> None:
    """A statement the server refuses (the database is there) clears the job's count of how
    long the database has been away, so a later loss gets the whole window again."""
    from options.store.reconnect import reconnecting, wait_for_database

    policy = wait_for_database(30.0)
    policy.lost(0.0)  # a loss long ago that nothing succeeded after
    with pytest.raises(asyncpg.UndefinedTableError):
        async for attempt in reconnecting(what="testing"):
            with attempt:
                raise asyncpg.UndefinedTableError("no such table")
    assert policy.lost_since is None
