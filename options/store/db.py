"""PostgreSQL access: the pool, the bounded-connection decorators and the migrations.

Every query of the jobs runs on a connection lent by :func:`bounded_db_connection` (or its
async-generator twin), so the number of connections in use never exceeds the pool size and
asyncpg errors become :class:`~options.errors.DatabaseError` in one place.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Concatenate, ParamSpec, TypeVar

import asyncpg

from options.config import redact_url
from options.errors import DatabaseError

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

ACQUIRE_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
PG_EPOCH_MICROSECONDS = 946_684_800_000_000  # 2000-01-01 UTC, PostgreSQL's epoch
MIGRATION_LOCK_KEY = 0x6F7074686973_01  # "opthis" + 1: one advisory lock id for migrations
_MIGRATION_FILE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")

DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


async def create_pool(dsn: str, *, max_size: int) -> asyncpg.Pool:
    """Open the shared connection pool.

    Raises:
        DatabaseError: the server cannot be reached or refuses the login; the message names the
            host and database, never the password.
    """
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=max_size,
            timeout=CONNECT_TIMEOUT,
            server_settings={"application_name": "options-history"},
        )
    except DB_ERRORS as exc:
        raise DatabaseError(
            f"cannot connect to PostgreSQL at {redact_url(dsn)}: {describe_db_error(exc)}"
        ) from exc
    assert pool is not None
    return pool


def describe_db_error(exc: BaseException) -> str:
    """Return a one-line description of a database error, without secrets."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    sqlstate = getattr(exc, "sqlstate", None)
    prefix = f"{type(exc).__name__}" + (f" [{sqlstate}]" if sqlstate else "")
    return f"{prefix}: {text}" if text else prefix


def bounded_db_connection(
    func: Callable[Concatenate[asyncpg.Connection, P], Awaitable[R]],
) -> Callable[Concatenate[asyncpg.Pool, P], Awaitable[R]]:
    """Turn ``func(conn, ...)`` into ``func(pool, ...)`` running on a connection from the pool.

    The pool's size bounds how many such calls hold a connection at once; a call waits at most
    ``ACQUIRE_TIMEOUT`` seconds for one. asyncpg and socket errors leave as DatabaseError.
    """

    @functools.wraps(func)
    async def wrapper(pool: asyncpg.Pool, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                return await func(conn, *args, **kwargs)
        except DB_ERRORS as exc:
            raise DatabaseError(f"{func.__name__}: {describe_db_error(exc)}") from exc

    return wrapper


def bounded_db_connection_gen(
    func: Callable[Concatenate[asyncpg.Connection, P], AsyncIterator[R]],
) -> Callable[Concatenate[asyncpg.Pool, P], AsyncIterator[R]]:
    """The async-generator twin of :func:`bounded_db_connection`.

    The connection is held for as long as the generator runs and returned when it is closed.
    """

    @functools.wraps(func)
    async def wrapper(pool: asyncpg.Pool, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[R]:
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                async for item in func(conn, *args, **kwargs):
                    yield item
        except DB_ERRORS as exc:
            raise DatabaseError(f"{func.__name__}: {describe_db_error(exc)}") from exc

    return wrapper


@contextlib.asynccontextmanager
async def epoch_microsecond_timestamps(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """Within the block, ``timestamptz`` values on ``conn`` are ints: microseconds since the
    Unix epoch (:data:`options.api.normalize.SnapshotRow`'s timestamps).

    asyncpg encodes such an int four times faster than a ``datetime``, which matters for the
    three timestamps of every snapshot row. The codec is taken off again before the connection
    goes back to the pool (the pool would keep it); a connection where that fails is closed.
    """
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=_encode_epoch_microseconds,
        decoder=_decode_epoch_microseconds,
        format="tuple",
    )
    try:
        yield
    finally:
        reset = False
        try:
            await conn.reset_type_codec("timestamptz", schema="pg_catalog")
            reset = True
        except DB_ERRORS:
            pass  # the connection is broken: closed below
        finally:
            if not reset:  # also when cancelled while resetting
                # a connection the pool already saw die is detached, and says so
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()


def _encode_epoch_microseconds(value: int) -> tuple[int]:
    return (value - PG_EPOCH_MICROSECONDS,)


def _decode_epoch_microseconds(value: tuple[int]) -> int:
    return value[0] + PG_EPOCH_MICROSECONDS


@dataclass(frozen=True)
class Migration:
    """One versioned SQL file of ``options/store/migrations``."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text, to notice a migration edited after it was applied."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """Return the packaged migrations in version order."""
    found = []
    for entry in resources.files("options.store.migrations").iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise DatabaseError(f"two migrations share a version number: {versions}")
    return found


@bounded_db_connection
async def apply_migrations(conn: asyncpg.Connection) -> list[str]:
    """Apply the migrations not yet applied, each in its own transaction, under an advisory lock.

    Safe to run from several processes at once and on every job start.

    Returns:
        The names of the migrations applied by this call.

    Raises:
        DatabaseError: a migration failed, or an applied migration's file has changed.
    """
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        applied = {
            row["version"]: row
            for row in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        }
        for migration in load_migrations():
            done = applied.get(migration.version)
            if done is not None:
                if done["checksum"] != migration.checksum:
                    raise DatabaseError(
                        f"migration {migration.name} was changed after it was applied: "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            logger.info("Applied migration %s", migration.name)
            applied_now.append(migration.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now
