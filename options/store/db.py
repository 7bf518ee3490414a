"""PostgreSQL access: the pool, the bounded-connection decorators and the migrations.

Every query of the jobs runs on a connection lent by :func:`bounded_db_connection` (or its
async-generator twin), so the number of connections in use never exceeds the pool size and
asyncpg errors become :class:`~options.errors.DatabaseError` in one place.

Every connection carries limits, so no statement, lock wait or lost peer can hang a job:
``statement_timeout`` and ``lock_timeout`` on the server, ``command_timeout`` in asyncpg, and TCP
keepalives on both ends (so a NAT or proxy that drops idle connections is noticed, and kept
from dropping them). A connection the server closes (a restart, ``pg_terminate_backend``,
``idle_session_timeout``) is replaced: the decorators retry on a fresh connection for up to
:data:`reconnect_window` (``DB_RECONNECT_SECONDS``) before giving up with an error that
names the real cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Concatenate, ParamSpec, TypeVar

import asyncpg
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from options.config import redact_url
from options.errors import DatabaseError

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

ACQUIRE_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
# How long a running job waits for a database that went away (restart, failover, a cut
# connection) before it fails: long enough for a restart, short enough to notice an outage.
RECONNECT_SECONDS = 60.0
reconnect_window: contextvars.ContextVar[float] = contextvars.ContextVar(
    "reconnect_window", default=RECONNECT_SECONDS
)
"""The job's ``DB_RECONNECT_SECONDS``: set once by the job's entry, read by
:func:`reconnecting` in every task the job starts."""
MIGRATION_LOCK_TIMEOUT = 60.0  # how long a job waits for another process's migrations
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3  # a dead peer shows in ~60 s
PG_EPOCH_MICROSECONDS = 946_684_800_000_000  # 2000-01-01 UTC, PostgreSQL's epoch
MIGRATION_LOCK_KEY = 0x6F7074686973_01  # "opthis" + 1: one advisory lock id for migrations
_MIGRATION_FILE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")

DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)

# The server ended the session or cannot be reached: another connection may succeed.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.IdleSessionTimeoutError,
    asyncpg.IdleInTransactionSessionTimeoutError,
    asyncpg.InterfaceError,  # "connection is closed": the session died under the client
    # "cannot switch to state ...": the protocol was cut mid-operation by the server
    asyncpg.exceptions.InternalClientError,
    OSError,  # ConnectionRefusedError, ConnectionResetError, a cut network
)
# InterfaceErrors that are the client's own refusals, not a lost connection.
_NOT_LOST: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
)


@dataclass(frozen=True)
class Limits:
    """What one statement may take on the job's connections, in seconds."""

    statement_timeout: float = 300.0
    lock_timeout: float = 30.0

    @property
    def server_settings(self) -> dict[str, str]:
        """The session settings that enforce the limits on the server."""
        return {
            "statement_timeout": f"{round(self.statement_timeout * 1000)}ms",
            "lock_timeout": f"{round(self.lock_timeout * 1000)}ms",
            # a transaction of ours left open (a client frozen mid-chain) cannot hold locks long
            "idle_in_transaction_session_timeout": f"{round(self.statement_timeout * 1000)}ms",
            # the server probes an idle connection, so NATs keep it and dead clients are noticed
            "tcp_keepalives_idle": str(KEEPALIVE_IDLE),
            "tcp_keepalives_interval": str(KEEPALIVE_INTERVAL),
            "tcp_keepalives_count": str(KEEPALIVE_COUNT),
        }


def is_connection_lost(exc: BaseException) -> bool:
    """The error says the session is gone or the server unreachable, not that a statement
    was refused: the same work may succeed on a new connection."""
    return isinstance(exc, _CONNECTION_LOST) and not isinstance(exc, _NOT_LOST)


async def create_pool(
    dsn: str,
    *,
    max_size: int,
    limits: Limits | None = None,
    application_name: str = "options-history",
) -> asyncpg.Pool:
    """Open the shared connection pool, every connection with :class:`Limits` and keepalives.

    Raises:
        DatabaseError: the server cannot be reached or refuses the login; the message names the
            host and database, never the password.
    """
    limits = limits or Limits()
    try:
        pool = await asyncpg.create_pool(
            dsn,
            # no floor: asyncpg would re-open lost connections in the background and log each
            # failure with a traceback while the database is away; ours are opened on demand
            min_size=0,
            max_size=max_size,
            timeout=CONNECT_TIMEOUT,
            # the client gives up a little after the server would have cancelled the statement
            command_timeout=limits.statement_timeout + 10.0,
            init=_enable_client_keepalive,
            server_settings={"application_name": application_name, **limits.server_settings},
        )
    except DB_ERRORS as exc:
        raise DatabaseError(
            f"cannot connect to PostgreSQL at {redact_url(dsn)}: {describe_db_error(exc)}"
        ) from exc
    assert pool is not None
    return pool


async def _enable_client_keepalive(conn: asyncpg.Connection) -> None:
    """Probe an idle TCP connection from our end too, so a server that vanished without a
    word (a cut network) fails the next statement instead of hanging it."""
    # asyncpg has no public handle on the socket; its transport has one
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


@contextlib.asynccontextmanager
async def looking_pool(
    dsn: str, *, location: str, limits: Limits, application_name: str
) -> AsyncIterator[asyncpg.Pool]:
    """A one-connection pool for a look at the database (a read command, ``status``), closed at
    the end. A look does not wait for a database that went away (the next look tries again),
    and says at once when no connection can be had.

    Raises:
        DatabaseError: the database cannot be reached.
    """
    reconnect_window.set(0.0)
    pool = await create_pool(dsn, max_size=1, limits=limits, application_name=application_name)
    try:
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT):
                pass  # the pool opens connections on demand: say at once if none can be had
        except DB_ERRORS as exc:
            raise DatabaseError(
                f"cannot connect to PostgreSQL at {location}: {describe_db_error(exc)}"
            ) from exc
        yield pool
    finally:
        await pool.close()


def describe_db_error(exc: BaseException) -> str:
    """Return a one-line description of a database error, without secrets.

    A lost connection says so first ("the database connection was lost: ..."), so the real
    cause leads the line rather than whichever statement happened to notice it.
    """
    text = str(exc).splitlines()[0] if str(exc) else ""
    sqlstate = getattr(exc, "sqlstate", None)
    prefix = f"{type(exc).__name__}" + (f" [{sqlstate}]" if sqlstate else "")
    described = f"{prefix}: {text}" if text else prefix
    if is_connection_lost(exc):
        return f"the database connection was lost ({described})"
    return described


def reconnecting(
    *,
    seconds: float | None = None,
    what: str = "a query",
    on: tuple[type[BaseException], ...] | None = None,
) -> AsyncRetrying:
    """A tenacity loop that retries its block while the connection keeps being lost, for up
    to ``seconds`` (default: :data:`reconnect_window`); any other error, or the last loss, is
    raised as it is. ``on``: retry these errors instead of lost connections only.

    Only for blocks that are safe to run again: reads, and transactions that either
    committed as a whole or not at all and check what is already there.
    """

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.warning(
            "%s: %s; retrying on a new connection (attempt %d)",
            what,
            describe_db_error(error) if error else "failed",
            state.attempt_number + 1,
        )

    return AsyncRetrying(
        retry=retry_if_exception(is_connection_lost)
        if on is None
        else retry_if_exception(lambda exc: isinstance(exc, on)),
        stop=stop_after_delay(reconnect_window.get() if seconds is None else seconds),
        wait=wait_random_exponential(multiplier=0.2, max=5.0),
        before_sleep=log_retry,
        reraise=True,
    )


def bounded_db_connection(
    func: Callable[Concatenate[asyncpg.Connection, P], Awaitable[R]],
) -> Callable[Concatenate[asyncpg.Pool, P], Awaitable[R]]:
    """Turn ``func(conn, ...)`` into ``func(pool, ...)`` running on a connection from the pool.

    The pool's size bounds how many such calls hold a connection at once; a call waits at most
    ``ACQUIRE_TIMEOUT`` seconds for one. A lost connection is replaced and the call run again
    (see :func:`reconnecting`), so ``func`` must be safe to repeat. asyncpg and socket errors
    leave as DatabaseError.
    """

    @functools.wraps(func)
    async def wrapper(pool: asyncpg.Pool, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            async for attempt in reconnecting(what=func.__name__):
                with attempt:
                    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                        return await func(conn, *args, **kwargs)
        except DB_ERRORS as exc:
            raise DatabaseError(f"{func.__name__}: {describe_db_error(exc)}") from exc
        raise AssertionError("unreachable: reconnecting() returns or raises")

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

    Safe to run from several processes at once and on every job start; waits at most
    :data:`MIGRATION_LOCK_TIMEOUT` seconds for another process's migrations.

    Returns:
        The names of the migrations applied by this call.

    Raises:
        DatabaseError: a migration failed, an applied migration's file has changed, or another
            process held the migration lock for too long.
    """
    applied_now = []
    await _take_migration_lock(conn)
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


async def _take_migration_lock(
    conn: asyncpg.Connection, *, patience: float = MIGRATION_LOCK_TIMEOUT
) -> None:
    """Take the migration lock, waiting at most ``patience`` seconds for its holder."""
    deadline = time.monotonic() + patience
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY):
        if time.monotonic() >= deadline:
            holder = await conn.fetchrow(
                """
                SELECT a.pid, a.application_name, a.state FROM pg_locks l
                JOIN pg_stat_activity a ON a.pid = l.pid
                WHERE l.locktype = 'advisory' AND l.granted
                  AND (l.classid::bigint << 32) | l.objid::bigint = $1
                """,
                MIGRATION_LOCK_KEY,
            )
            who = (
                f" (held by backend {holder['pid']}, {holder['application_name'] or 'no name'},"
                f" {holder['state']})"
                if holder
                else ""
            )
            raise DatabaseError(
                f"the schema migration lock was held by another session for {patience:g} s{who}: "
                "wait for that migration to finish, or end that session"
            )
        await asyncio.sleep(0.2)
