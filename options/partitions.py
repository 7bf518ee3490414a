"""The daily partitions of ``option_snapshots``: created ahead of the runs, dropped whole by
retention.

A partition holds the snapshots captured on one UTC day and is named after it
(``option_snapshots_p20261123``). Only partitions with that prefix are ever dropped.
"""

from __future__ import annotations

import datetime as dt
import logging

import asyncpg

from options.db import bounded_db_connection

logger = logging.getLogger(__name__)

PARTITION_PREFIX = "option_snapshots_p"


def partition_name(day: dt.date) -> str:
    """The partition of ``option_snapshots`` holding the snapshots captured on ``day`` (UTC)."""
    return f"{PARTITION_PREFIX}{day:%Y%m%d}"


@bounded_db_connection
async def ensure_partitions(conn: asyncpg.Connection, captured_at: dt.datetime) -> str:
    """Create the partitions for ``captured_at``'s UTC day and the next; return the first's name."""
    day = captured_at.astimezone(dt.UTC).date()
    for offset in (0, 1):
        start = day + dt.timedelta(days=offset)
        end = start + dt.timedelta(days=1)
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {partition_name(start)} PARTITION OF option_snapshots "
            f"FOR VALUES FROM ('{start.isoformat()} 00:00:00+00') "
            f"TO ('{end.isoformat()} 00:00:00+00')"
        )
    return partition_name(day)


@bounded_db_connection
async def drop_old_partitions(
    conn: asyncpg.Connection, *, retain_days: int, now: dt.datetime
) -> list[str]:
    """Drop whole partitions whose day ended more than ``retain_days`` days before ``now``.

    Their ``snapshot_coverage`` rows go with them. Returns the names dropped.
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
            async with conn.transaction():
                await conn.execute(f"DROP TABLE {name}")
                await conn.execute(
                    "DELETE FROM snapshot_coverage WHERE captured_at >= $1 AND captured_at < $2",
                    dt.datetime.combine(day, dt.time(), dt.UTC),
                    dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC),
                )
            dropped.append(name)
    if dropped:
        logger.info("Retention: dropped %d partitions older than %s", len(dropped), cutoff)
    return dropped
