"""The daily partitions of both tiers, ``option_snapshots`` (:data:`WIDE`, the days being
written) and ``snapshot_rows`` (:data:`COMPACT`, finished days, :mod:`options.store.compaction`):
attached ahead of the runs, detached and dropped whole by retention, without ever locking
readers or writers out of the table. Every function takes the tier as ``table`` (default the
hot one); what follows says ``option_snapshots`` for either.

A partition holds the snapshots captured on one UTC day and is named after it
(``option_snapshots_p20261123``, ``snapshot_rows_p20261123``). Only tables named so (the
prefix and a date) are ever dropped.

``CREATE TABLE ... PARTITION OF`` and ``DROP TABLE`` of a partition take ACCESS EXCLUSIVE on
``option_snapshots``: they wait behind every reader, and while they wait every new reader and
writer queues behind them. So neither is used. A partition is made as a plain table
(``LIKE option_snapshots``, with its primary key and a CHECK constraint matching the day's
bounds, so attaching it needs no validation scan) and then attached with ``ATTACH PARTITION``,
which takes SHARE UPDATE EXCLUSIVE on the parent: readers and writers go on, and only other
schema changes, VACUUM or ANALYZE of the parent, or partition maintenance make it wait. Each
partition is made in one transaction, so a killed process leaves no half-made table; a table of
the name that is not attached (made by hand, or by an earlier version) is attached as it is.
:data:`PARTITIONS_AHEAD` days are made ahead, so a run after a weekend or a holiday finds its
day's partition waiting.

Retention detaches with ``DETACH PARTITION ... CONCURRENTLY``, which waits (up to the lock
timeout) for the transactions that use ``option_snapshots`` but blocks none of them, then drops
the detached table, which locks only that table. A detach interrupted while waiting leaves the
partition "detach pending": invisible to new queries, and blocking any other concurrent detach
until ``DETACH PARTITION ... FINALIZE`` completes it, which the next retention does first.

The archive (:mod:`options.store.archive`) drops one day at a time with
:func:`drop_day_partition`: the same detach, then, under the detached table's own lock, a count
of its rows against what was archived, so a row written after the archive was verified puts the
partition back instead of being dropped with it. Compaction drops the hot partition it emptied
the same way. Retention, compaction and the archive take turns under one advisory lock
(:data:`RETENTION_LOCK_KEY`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg

from options.errors import DatabaseError
from options.store.db import DB_ERRORS, bounded_db_connection
from options.store.lifecycle import DELETED, lock_for_move, set_tier

logger = logging.getLogger(__name__)

WIDE = "option_snapshots"  # the hot tier: the days being written
COMPACT = "snapshot_rows"  # the compact tier: finished days (options.store.compaction)
PARTITIONS_AHEAD = 7  # a week: a run after a long weekend or a holiday makes no partition first
# Waiting for the parent's lock blocks no reader or writer: the run's own partition may wait long
PARTITION_LOCK_TIMEOUT = 30.0
# Retention is maintenance a later run can do: it does not hold the run up for long readers
RETENTION_LOCK_TIMEOUT = 5.0
# "opthis" + 0x30: one retention or archive at a time per database. Its own key: the tracked
# underlyings' sync (0x20), which every job start takes, must never wait behind an archive.
RETENTION_LOCK_KEY = 0x6F7074686973_30


def partition_name(day: dt.date, table: str = WIDE) -> str:
    """The partition of ``table`` (:data:`WIDE` or :data:`COMPACT`) holding the snapshots
    captured on ``day`` (UTC)."""
    return f"{table}_p{day:%Y%m%d}"


@bounded_db_connection("making the partitions of {day} and the days ahead")
async def ensure_partitions(
    conn: asyncpg.Connection,
    day: dt.date,
    *,
    days_ahead: int = PARTITIONS_AHEAD,
    lock_timeout: float = PARTITION_LOCK_TIMEOUT,
) -> str:
    """Make sure the partitions of ``day`` (UTC) and of the ``days_ahead`` days after it are
    attached, making only the missing ones; return the name of ``day``'s partition.

    Safe to call from several processes at once. When every partition exists this reads the
    catalog and takes no lock. A partition of a later day that cannot be made now is left, with
    a warning, for a later run (the days after it too, as they would wait as long).

    Args:
        day: the UTC day whose partition the caller is about to write to.
        days_ahead: how many following days to make ready too.
        lock_timeout: how long, in seconds, each partition's DDL waits for a lock.

    Raises:
        DatabaseError: ``day``'s partition is missing and another session kept
            ``option_snapshots`` locked (a schema change, VACUUM or ANALYZE, partition
            maintenance) for ``lock_timeout`` seconds, or PostgreSQL failed.
        ValueError: ``days_ahead`` is negative.
    """
    if days_ahead < 0:
        raise ValueError(f"days_ahead must be 0 or more, not {days_ahead}")
    days = [day + dt.timedelta(days=n) for n in range(days_ahead + 1)]
    attached = await _attached(conn, [partition_name(d) for d in days])
    for missing in (d for d in days if partition_name(d) not in attached):
        try:
            await _attach_partition(conn, missing, lock_timeout)
        except asyncpg.LockNotAvailableError as exc:
            if missing == day:
                raise DatabaseError(
                    f"cannot attach partition {partition_name(day)}: another session kept "
                    f"option_snapshots locked for more than {lock_timeout:g} s (a schema change, "
                    "VACUUM or ANALYZE, or partition maintenance?), and nothing can be stored "
                    "without it"
                ) from exc
            logger.warning(
                "Partitions from %s on not attached yet: another session kept option_snapshots "
                "locked for more than %g s; a later run will attach them",
                partition_name(missing),
                lock_timeout,
            )
            break
    return partition_name(day)


async def _attached(conn: asyncpg.Connection, names: list[str], table: str = WIDE) -> set[str]:
    """Those of ``names`` that are partitions of ``table`` (no lock is taken)."""
    rows = await conn.fetch(
        """
        SELECT n FROM unnest($1::text[]) AS n
        JOIN pg_inherits i ON i.inhrelid = to_regclass(n)
        WHERE i.inhparent = $2::regclass
        """,
        names,
        table,
    )
    return {row["n"] for row in rows}


async def _attach_partition(
    conn: asyncpg.Connection, day: dt.date, lock_timeout: float, table: str = WIDE
) -> None:
    """Make ``day``'s partition as a table and attach it, in one transaction, unless another
    session just did.

    Raises:
        asyncpg.LockNotAvailableError: a lock was not granted within ``lock_timeout`` seconds.
    """
    name = partition_name(day, table)
    async with conn.transaction():
        await _set_lock_timeout(conn, lock_timeout)
        # the lock ATTACH takes, taken first: concurrent callers take turns here, and none
        # holds a weaker lock on the parent while waiting for this one (no upgrade deadlock)
        await conn.execute(f"LOCK TABLE ONLY {table} IN SHARE UPDATE EXCLUSIVE MODE")
        exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
        if exists:
            if await _attached(conn, [name], table):
                return  # another session attached it while we waited
            # left unattached: attach it as it is; ATTACH checks its columns and adds any
            # index of the parent's it lacks, the primary key included
            await conn.execute(f"ALTER TABLE {name} DROP CONSTRAINT IF EXISTS {name}_bounds")
        else:
            # INCLUDING ALL copies the primary key, which ATTACH then makes a partition of the
            # parent's primary key index instead of building another
            await conn.execute(f"CREATE TABLE {name} (LIKE {table} INCLUDING ALL)")
        await attach_table(conn, name, day, table)
    logger.info("Attached partition %s", name)


async def attach_table(conn: asyncpg.Connection, name: str, day: dt.date, table: str) -> None:
    """Attach the plain table ``name`` to ``table`` as ``day``'s partition, in the caller's
    transaction, without the scan that would prove its rows belong to the day (a CHECK
    constraint of the day's bounds proves it first); ATTACH adds any of the parent's indexes
    the table lacks. It takes SHARE UPDATE EXCLUSIVE on ``table``: readers and writers go on."""
    start = f"'{day.isoformat()} 00:00:00+00'"
    end = f"'{(day + dt.timedelta(days=1)).isoformat()} 00:00:00+00'"
    # implies the partition constraint, so ATTACH skips the scan that would prove it
    await conn.execute(
        f"ALTER TABLE {name} ADD CONSTRAINT {name}_bounds "
        f"CHECK (captured_at >= {start} AND captured_at < {end})"
    )
    await conn.execute(
        f"ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES FROM ({start}) TO ({end})"
    )
    # redundant now; dropping it locks only the new partition, which this transaction holds
    await conn.execute(f"ALTER TABLE {name} DROP CONSTRAINT {name}_bounds")


async def _set_lock_timeout(conn: asyncpg.Connection, seconds: float) -> None:
    """Within the current transaction, wait at most ``seconds`` for a lock."""
    await conn.execute("SELECT set_config('lock_timeout', $1, true)", _milliseconds(seconds))


@contextlib.asynccontextmanager
async def _session_lock_timeout(conn: asyncpg.Connection, seconds: float) -> AsyncIterator[None]:
    """Within the block, statements outside a transaction wait at most ``seconds`` for a lock."""
    await conn.execute("SELECT set_config('lock_timeout', $1, false)", _milliseconds(seconds))
    try:
        yield
    finally:
        # a broken connection is not reused; the original error is the one to report
        with contextlib.suppress(*DB_ERRORS):
            await conn.execute("RESET lock_timeout")


def _milliseconds(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


@bounded_db_connection("dropping the partitions older than {retain_days} days")
async def drop_old_partitions(
    conn: asyncpg.Connection,
    *,
    retain_days: int,
    now: dt.datetime,
    lock_timeout: float = RETENTION_LOCK_TIMEOUT,
) -> list[str]:
    """Drop whole partitions whose day ended more than ``retain_days`` days before ``now``.

    Their ``snapshot_coverage``, ``computed_greeks`` and ``greeks_slots`` rows go with them (the
    daily rows stay), in the transaction that drops the table and records the day as deleted
    (:mod:`options.store.lifecycle`: nothing is written to it again). A partition left "detach
    pending", or left detached but not dropped, by an interrupted earlier call is finished
    first. While a transaction that used ``option_snapshots`` stays open for ``lock_timeout``
    seconds, the rest is left for a later run with a warning; only one call at a time works on a
    database, others return at once.

    Returns:
        The names dropped, in order.
    """
    cutoff = now.astimezone(dt.UTC).date() - dt.timedelta(days=retain_days)
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK_KEY):
        logger.info("Retention: another session is dropping old partitions; skipped")
        return []
    try:
        # the compact tier first: a day's coverage rows go with the last of its tables
        dropped = await _drop_partitions_before(conn, cutoff, lock_timeout, COMPACT)
        dropped += await _drop_partitions_before(conn, cutoff, lock_timeout, WIDE)
    finally:
        with contextlib.suppress(*DB_ERRORS):  # the server frees it with a broken connection
            await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_KEY)
    if dropped:
        logger.info("Retention: dropped %d partitions older than %s", len(dropped), cutoff)
    return dropped


async def _drop_partitions_before(
    conn: asyncpg.Connection, cutoff: dt.date, lock_timeout: float, table: str
) -> list[str]:
    """Detach and drop our partitions of ``table`` (and detached leftovers) of the days before
    ``cutoff``."""
    rows = await _our_tables(conn, table)
    dropped = []
    for row in rows:
        name = row["relname"]
        day = _partition_day(name, table)
        if day is None or day + dt.timedelta(days=1) > cutoff:
            continue  # not one of ours, or not old enough
        try:
            if row["pending"]:
                await _detach(conn, f"{name} FINALIZE", lock_timeout, table)
            elif row["attached"]:
                await _detach(conn, f"{name} CONCURRENTLY", lock_timeout, table)
        except asyncpg.LockNotAvailableError:
            # DETACH waits for every transaction that uses the table: the next ones
            # would wait as long, and a detach left pending blocks them anyway
            logger.warning(
                "Retention: %s is in use by another session; a later run will drop it", name
            )
            break
        except asyncpg.ObjectNotInPrerequisiteStateError as exc:
            logger.warning(
                "Retention: cannot detach %s now (%s); a later run will drop it",
                name,
                str(exc).splitlines()[0],
            )
            break
        try:
            async with conn.transaction():
                await _set_lock_timeout(conn, lock_timeout)
                await lock_for_move(conn, day)
                await conn.execute(f"DROP TABLE {name}")
                await set_tier(conn, day, DELETED)
                # the rows of its slots go with it; the daily rows (a session's) stay: the
                # daily table is the history kept once the snapshots are deleted
                for slot_table in ("snapshot_coverage", "computed_greeks", "greeks_slots"):
                    await conn.execute(
                        f"DELETE FROM {slot_table} WHERE captured_at >= $1 AND captured_at < $2",
                        dt.datetime.combine(day, dt.time(), dt.UTC),
                        dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC),
                    )
        except asyncpg.LockNotAvailableError:
            # a session reading the detached table by name: the next call drops it
            logger.warning(
                "Retention: %s is in use by another session; a later run will drop it", name
            )
            continue
        dropped.append(name)
    return sorted(dropped)


async def _our_tables(conn: asyncpg.Connection, table: str = WIDE) -> list[asyncpg.Record]:
    """The tables named like our partitions of ``table``, attached to it or to nothing:
    ``relname``, ``attached``, ``pending`` (a detach left pending first: it blocks the others)."""
    return await conn.fetch(
        """
        SELECT c.relname, i.inhrelid IS NOT NULL AS attached,
               coalesce(i.inhdetachpending, false) AS pending
        FROM pg_class c
        LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
        WHERE c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = $2::regclass)
          AND c.relkind = 'r' AND starts_with(c.relname, $1)
          AND (i.inhparent IS NULL OR i.inhparent = $2::regclass)
        -- a pending detach blocks every other one: finish it first
        ORDER BY pending DESC, c.relname
        """,
        f"{table}_p",
        table,
    )


class PartitionState(enum.Enum):
    """Where one day's table stands."""

    ATTACHED = "attached"
    DETACH_PENDING = "detach pending"  # invisible to new queries until FINALIZE
    DETACHED = "detached"  # a table of the name, attached to nothing
    ABSENT = "absent"


async def partition_states(
    conn: asyncpg.Connection, table: str = WIDE
) -> dict[dt.date, PartitionState]:
    """Every day that has a table named like our partitions of ``table``, with where it stands
    (no lock is taken)."""
    states = {}
    for row in await _our_tables(conn, table):
        day = _partition_day(row["relname"], table)
        if day is None:
            continue
        if row["pending"]:
            states[day] = PartitionState.DETACH_PENDING
        elif row["attached"]:
            states[day] = PartitionState.ATTACHED
        else:
            states[day] = PartitionState.DETACHED
    return states


class DropOutcome(enum.Enum):
    """What :func:`drop_day_partition` did."""

    DROPPED = "dropped"
    BUSY = "busy"  # another session used the table: left (maybe detached) for a later call
    CHANGED = "changed"  # it held other than the rows expected: attached again, not dropped


async def drop_day_partition(
    conn: asyncpg.Connection,
    day: dt.date,
    *,
    expected_rows: int,
    also: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    lock_timeout: float = RETENTION_LOCK_TIMEOUT,
    table: str = WIDE,
) -> DropOutcome:
    """Detach ``day``'s partition and drop it, if it holds exactly ``expected_rows`` rows.

    The detach is ``CONCURRENTLY`` (or the ``FINALIZE`` of one left pending), so readers and
    writers of ``option_snapshots`` go on. The detached table is then locked, counted and dropped
    in one transaction, with ``also(conn)`` (the caller's record of the drop): a row written
    between the caller's count and the detach is seen here, and the table is attached again
    instead. The day's coverage rows stay. The caller holds :data:`RETENTION_LOCK_KEY`.

    Returns:
        ``DROPPED``; ``BUSY`` when a session kept the table in use for ``lock_timeout`` seconds
        (a later call finishes: the table may be left detached or "detach pending");
        ``CHANGED`` when the count differed (the table is attached again, or left detached if
        that could not be done now; a later call of the caller's sees it so).
    """
    name = partition_name(day, table)
    state = (await partition_states(conn, table)).get(day, PartitionState.ABSENT)
    if state is PartitionState.ABSENT:
        raise ValueError(f"{name} does not exist")
    try:
        if state is PartitionState.DETACH_PENDING:
            await _detach(conn, f"{name} FINALIZE", lock_timeout, table)
        elif state is PartitionState.ATTACHED:
            await _detach(conn, f"{name} CONCURRENTLY", lock_timeout, table)
    except (asyncpg.LockNotAvailableError, asyncpg.ObjectNotInPrerequisiteStateError) as exc:
        # DETACH waits for every transaction that uses option_snapshots; a detach pending
        # elsewhere refuses this one: both pass, a later call retries
        logger.warning(
            "Cannot detach %s now (%s); a later run will", name, str(exc).splitlines()[0]
        )
        return DropOutcome.BUSY
    try:
        async with conn.transaction():
            await _set_lock_timeout(conn, lock_timeout)
            await conn.execute(f"LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE")
            rows = await conn.fetchval(f"SELECT count(*) FROM {name}")
            if rows == expected_rows:
                await conn.execute(f"DROP TABLE {name}")
                if also is not None:
                    await also(conn)
    except asyncpg.LockNotAvailableError:
        # a session reading the detached table by name: the next call drops it
        logger.warning("%s is in use by another session; a later run will drop it", name)
        return DropOutcome.BUSY
    if rows == expected_rows:
        logger.info("Dropped partition %s (%d rows)", name, rows)
        return DropOutcome.DROPPED
    logger.warning(
        "%s holds %d rows, not the %d expected: rows were written to it meanwhile; it is "
        "attached again, not dropped",
        name,
        rows,
        expected_rows,
    )
    with contextlib.suppress(asyncpg.LockNotAvailableError):
        await reattach_partition(conn, day, lock_timeout=lock_timeout, table=table)
    return DropOutcome.CHANGED


async def reattach_partition(
    conn: asyncpg.Connection,
    day: dt.date,
    *,
    lock_timeout: float = RETENTION_LOCK_TIMEOUT,
    table: str = WIDE,
) -> None:
    """Attach ``day``'s table again as it is, finishing a detach left pending first; nothing
    when it is attached.

    Raises:
        asyncpg.LockNotAvailableError: a lock was not granted within ``lock_timeout`` seconds.
    """
    name = partition_name(day, table)
    state = (await partition_states(conn, table)).get(day, PartitionState.ABSENT)
    if state is PartitionState.DETACH_PENDING:
        await _detach(conn, f"{name} FINALIZE", lock_timeout, table)
    if state in (PartitionState.DETACH_PENDING, PartitionState.DETACHED):
        await _attach_partition(conn, day, lock_timeout, table)


async def _detach(
    conn: asyncpg.Connection, partition: str, lock_timeout: float, table: str = WIDE
) -> None:
    """Run ``ALTER TABLE <table> DETACH PARTITION <partition>`` outside a transaction
    (CONCURRENTLY refuses to run in one), waiting at most ``lock_timeout`` seconds for a lock."""
    async with _session_lock_timeout(conn, lock_timeout):
        await conn.execute(f"ALTER TABLE {table} DETACH PARTITION {partition}")


def _partition_day(name: str, table: str = WIDE) -> dt.date | None:
    """The day of one of our partitions of ``table`` named ``name``; ``None`` for any other
    name."""
    try:
        day = dt.datetime.strptime(name.removeprefix(f"{table}_p"), "%Y%m%d").date()
    except ValueError:
        return None
    return day if partition_name(day, table) == name else None
