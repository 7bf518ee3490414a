"""The daily partitions of ``option_snapshots``: created ahead of the runs, dropped whole by
retention.

A partition holds the snapshots captured on one UTC day and is named after it
(``option_snapshots_p20261123``). Only partitions with that prefix are ever dropped. Creating or
dropping one locks the table against readers, so neither waits long on a reader's lock: the
day's partition is made the day before, after a run's rows are stored.
"""

from __future__ import annotations

import datetime as dt
import logging

import asyncpg

from options.errors import DatabaseError
from options.store.db import bounded_db_connection

logger = logging.getLogger(__name__)

PARTITION_PREFIX = "option_snapshots_p"
# Partition DDL locks option_snapshots against every reader, and readers queue behind a waiting
# lock: how long to wait for one, in seconds.
TODAY_LOCK_TIMEOUT = 30.0  # the run's own partition: without it nothing can be stored
AHEAD_LOCK_TIMEOUT = 2.0  # tomorrow's partition, or retention: a later run can do it


def partition_name(day: dt.date) -> str:
    """The partition of ``option_snapshots`` holding the snapshots captured on ``day`` (UTC)."""
    return f"{PARTITION_PREFIX}{day:%Y%m%d}"


async def ensure_partition(
    pool: asyncpg.Pool, day: dt.date, *, lock_timeout: float = TODAY_LOCK_TIMEOUT
) -> str:
    """Create the partition of ``day`` (UTC) unless it exists; return its name.

    Normally the day before made it (:func:`create_next_partition`), and then nothing waits.

    Raises:
        DatabaseError: it does not exist and another session kept ``option_snapshots`` locked
            (a long query holds it) for ``lock_timeout`` seconds, or PostgreSQL failed.
    """
    name = await _create_partition(pool, day, lock_timeout)
    if name is None:
        raise DatabaseError(
            f"cannot create partition {partition_name(day)}: another session held "
            f"option_snapshots for more than {lock_timeout:g} s (a long query?), and nothing "
            "can be stored without it"
        )
    return name


async def create_next_partition(
    pool: asyncpg.Pool, captured_at: dt.datetime, *, lock_timeout: float = AHEAD_LOCK_TIMEOUT
) -> bool:
    """Create the partition of the UTC day after ``captured_at``'s, unless it exists, so a run
    just after midnight waits on no DDL. Returns whether it exists now.

    Creating a partition locks ``option_snapshots`` against readers; while a long query holds
    the table this gives up after ``lock_timeout`` seconds with a warning, rather than stall
    that query's successors: any later run of the day can make it.
    """
    day = captured_at.astimezone(dt.UTC).date() + dt.timedelta(days=1)
    if await _create_partition(pool, day, lock_timeout) is None:
        logger.warning(
            "Partition %s not created yet: another session holds option_snapshots; "
            "a later run will create it",
            partition_name(day),
        )
        return False
    return True


@bounded_db_connection
async def _create_partition(
    conn: asyncpg.Connection, day: dt.date, lock_timeout: float
) -> str | None:
    """Create ``day``'s partition unless it exists; ``None`` when its lock was not granted."""
    name = partition_name(day)
    end = day + dt.timedelta(days=1)
    try:
        async with conn.transaction():
            await _set_lock_timeout(conn, lock_timeout)
            # an existing partition is found before any lock is taken on option_snapshots
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF option_snapshots "
                f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') "
                f"TO ('{end.isoformat()} 00:00:00+00')"
            )
    except asyncpg.LockNotAvailableError:
        return None
    return name


async def _set_lock_timeout(conn: asyncpg.Connection, seconds: float) -> None:
    """Within the current transaction, wait at most ``seconds`` for a lock."""
    await conn.execute(f"SET LOCAL lock_timeout = '{max(1, round(seconds * 1000))}ms'")


@bounded_db_connection
async def drop_old_partitions(
    conn: asyncpg.Connection,
    *,
    retain_days: int,
    now: dt.datetime,
    lock_timeout: float = AHEAD_LOCK_TIMEOUT,
) -> list[str]:
    """Drop whole partitions whose day ended more than ``retain_days`` days before ``now``.

    Their ``snapshot_coverage`` rows go with them. A partition another session keeps locked
    for ``lock_timeout`` seconds is left for a later run. Returns the names dropped.
    """
    cutoff = now.astimezone(dt.UTC).date() - dt.timedelta(days=retain_days)
    rows = await conn.fetch(
        """
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'option_snapshots'::regclass ORDER BY c.relname
        """
    )
    dropped = []
    for row in rows:
        name = row["relname"]
        if not name.startswith(PARTITION_PREFIX):
            continue  # not one of ours: leave it alone
        try:
            day = dt.datetime.strptime(name.removeprefix(PARTITION_PREFIX), "%Y%m%d").date()
        except ValueError:
            continue
        if day + dt.timedelta(days=1) <= cutoff:
            try:
                async with conn.transaction():
                    await _set_lock_timeout(conn, lock_timeout)
                    await conn.execute(f"DROP TABLE {name}")
                    await conn.execute(
                        "DELETE FROM snapshot_coverage "
                        "WHERE captured_at >= $1 AND captured_at < $2",
                        dt.datetime.combine(day, dt.time(), dt.UTC),
                        dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC),
                    )
            except asyncpg.LockNotAvailableError:
                logger.warning(
                    "Retention: %s is in use by another session; a later run will drop it", name
                )
                continue
            dropped.append(name)
    if dropped:
        logger.info("Retention: dropped %d partitions older than %s", len(dropped), cutoff)
    return dropped
