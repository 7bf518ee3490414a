"""PostgreSQL access: the pool, the bounded-connection decorators and the migrations.

Every query of the jobs runs on a connection lent by :func:`bounded_db_connection` (or its
async-generator twin), so the number of connections in use never exceeds the pool size and
asyncpg errors become :class:`~options.errors.DatabaseError` in one place.

Every connection carries limits, so no statement, lock wait or lost peer can hang a job:
``statement_timeout`` and ``lock_timeout`` on the server, ``command_timeout`` in asyncpg, and TCP
keepalives on both ends (so a NAT or proxy that drops idle connections is noticed, and kept
from dropping them). Every connection of a pool carries an ``application_name`` unique to that
pool (``ingest_snapshots/3f9a...``), which is how a copy that takes over a dead run finds the
dead copy's sessions (:mod:`options.store.runs_lease`).

A connection the server closes (a restart, ``pg_terminate_backend``, ``idle_session_timeout``)
is replaced: the decorators retry on a fresh connection while the job's database has been
away for less than ``DB_RECONNECT_SECONDS`` (:mod:`options.store.reconnect`, whose error
helpers ``DB_ERRORS`` and ``describe_db_error`` are imported here too), then give up with an
error that says what was being done and names the real cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import hashlib
import inspect
import logging
import re
import secrets
import socket
import string
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Concatenate, ParamSpec, TypeVar, overload

import asyncpg

from options.config import redact_url
from options.errors import DatabaseError
from options.store.reconnect import (
    ACQUIRE_TIMEOUT,
    CONNECT_TIMEOUT,
    DB_ERRORS,
    acquire_timeout,
    describe_db_error,
    reconnecting,
    wait_for_database,
)

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_POOL_NAME = re.compile(r".+/[0-9a-f]{16}")
MIGRATION_LOCK_TIMEOUT = 60.0  # how long a job waits for another process's migrations
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3  # a dead peer shows in ~60 s
PG_EPOCH_MICROSECONDS = 946_684_800_000_000  # 2000-01-01 UTC, PostgreSQL's epoch
MIGRATION_LOCK_KEY = 0x6F7074686973_01  # "opthis" + 1: one advisory lock id for migrations
_MIGRATION_FILE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")


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


def pool_application_name(name: str) -> str:
    """``name`` followed by a token unique to one pool: ``ingest_snapshots/3f9a1c2b7d4e6a80``.

    Every session of the pool carries it, so they can all be found in ``pg_stat_activity``
    (those opened after a reconnect too) and told apart from another copy's of the same job.
    """
    return f"{name}/{secrets.token_hex(8)}"


def is_pool_application_name(name: str | None) -> bool:
    """``name`` was made by :func:`pool_application_name` (so it names one pool's sessions)."""
    return name is not None and _POOL_NAME.fullmatch(name) is not None


async def create_pool(
    dsn: str,
    *,
    max_size: int,
    limits: Limits | None = None,
    application_name: str = "options-history",
) -> asyncpg.Pool:
    """Open the shared connection pool, every connection with :class:`Limits` and keepalives,
    and with ``application_name`` made unique to the pool (:func:`pool_application_name`).

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
            server_settings={
                "application_name": pool_application_name(application_name),
                **limits.server_settings,
            },
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
    wait_for_database(0.0)
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


Func = Callable[Concatenate[asyncpg.Connection, P], Awaitable[R]]
PoolFunc = Callable[Concatenate[asyncpg.Pool, P], Awaitable[R]]


@overload
def bounded_db_connection(doing: str, /) -> Callable[[Func[P, R]], PoolFunc[P, R]]: ...


@overload
def bounded_db_connection(doing: Func[P, R], /) -> PoolFunc[P, R]: ...


def bounded_db_connection(
    doing: str | Func[P, R], /
) -> Callable[[Func[P, R]], PoolFunc[P, R]] | PoolFunc[P, R]:
    """Turn ``func(conn, ...)`` into ``func(pool, ...)`` running on a connection from the pool.

    Used as ``@bounded_db_connection("reading the known contracts of {underlying}")``: the
    description says in the user's words what the call does, its fields filled from the
    call's arguments (a list of tickers is spoken as ``AAA, BBB``); it leads every error and
    retry line of the call. Bare ``@bounded_db_connection`` speaks the function's name
    (``close_slot`` becomes "close slot").

    The pool's size bounds how many such calls hold a connection at once; a call waits at most
    ``ACQUIRE_TIMEOUT`` seconds for one. A lost connection is replaced and the call run again
    (see :func:`reconnecting`), so ``func`` must be safe to repeat. asyncpg and socket errors
    leave as DatabaseError.
    """
    if isinstance(doing, str):
        template = doing

        def decorate(func: Func[P, R]) -> PoolFunc[P, R]:
            return _bounded(func, _describer(func, template))

        return decorate
    return _bounded(doing, _describer(doing, None))


def _bounded(func: Func[P, R], describe: Callable[..., str]) -> PoolFunc[P, R]:
    @functools.wraps(func)
    async def wrapper(pool: asyncpg.Pool, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            async for attempt in reconnecting(what=lambda: describe(*args, **kwargs)):
                with attempt:
                    async with pool.acquire(timeout=acquire_timeout()) as conn:
                        return await func(conn, *args, **kwargs)
        except DB_ERRORS as exc:
            raise DatabaseError(f"{describe(*args, **kwargs)}: {describe_db_error(exc)}") from exc
        raise AssertionError("unreachable: reconnecting() returns or raises")

    return wrapper


def bounded_db_connection_gen(
    func: Callable[Concatenate[asyncpg.Connection, P], AsyncIterator[R]],
) -> Callable[Concatenate[asyncpg.Pool, P], AsyncIterator[R]]:
    """The async-generator twin of :func:`bounded_db_connection` (bare, the name spoken).

    The connection is held for as long as the generator runs and returned when it is closed.
    """
    describe = _describer(func, None)

    @functools.wraps(func)
    async def wrapper(pool: asyncpg.Pool, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[R]:
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                async for item in func(conn, *args, **kwargs):
                    yield item
        except DB_ERRORS as exc:
            raise DatabaseError(f"{describe(*args, **kwargs)}: {describe_db_error(exc)}") from exc

    return wrapper


def _describer(func: Callable[..., object], template: str | None) -> Callable[..., str]:
    """What a call of ``func`` (its arguments after the connection) is doing, in words."""
    if template is None:
        spoken = func.__name__.strip("_").replace("_", " ")
        return lambda *args, **kwargs: spoken
    signature = inspect.signature(func)
    params = list(signature.parameters.values())[1:]  # the connection is the pool's business
    signature = signature.replace(parameters=params)
    fields = {
        re.split(r"[.\[]", name, maxsplit=1)[0]
        for _, name, _, _ in string.Formatter().parse(template)
        if name
    }
    if unknown := fields - {p.name for p in params}:
        raise TypeError(f"{func.__qualname__}: {template!r} names no argument {sorted(unknown)}")

    def describe(*args: object, **kwargs: object) -> str:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return template  # the call itself is wrong; it fails on its own
        bound.apply_defaults()
        return template.format_map({k: _spoken(v) for k, v in bound.arguments.items()})

    return describe


def _spoken(value: object) -> object:
    """A value as a sentence names it: tickers as ``AAA, BBB`` (the first few), days ISO."""
    if isinstance(value, str):
        return value
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, Iterable) and not isinstance(value, bytes | dict):
        items = [str(v) for v in value]
        shown = ", ".join(items[:5])
        return shown + (f" and {len(items) - 5} more" if len(items) > 5 else "")
    return value


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


@bounded_db_connection("applying the schema migrations")
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
