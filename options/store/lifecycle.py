"""The life of a day: which tier holds a day's data, and the only ways it moves.

A day is the UTC day of ``captured_at`` (the day of its partitions). It is in exactly one
state at a time, kept in ``stored_days`` (migration ``0011_lifecycle.sql``); a day without a
row is :data:`HOT`::

    state      where its snapshots are                  a late write (resume, late chain)
    HOT        option_snapshots (the COPY target)       stored there
    COMPACT    snapshot_rows                            merged into the compact partition,
                                                        verified, in the write's transaction
    ARCHIVING  snapshot_rows, being written to the      refused for now (a later write finds
               archive                                  the day compact again, or archived)
    ARCHIVED   the Parquet archive (ARCHIVE_URL)        refused, with the reason
    DELETED    nowhere (retention deleted it unarchived) refused, with the reason

    HOT --compaction--> COMPACT --archive starts--> ARCHIVING --verified, recorded--> ARCHIVED
                                   ^------- the archive of the day failed ----'
    HOT or COMPACT --retention with SNAPSHOT_DELETE_UNARCHIVED--> DELETED

Derived rows follow: computed IV and greeks and daily rows are computed from whichever tier
holds their slot while it is in PostgreSQL, and recorded as not computed, with the reason, once
it is archived (:data:`REFUSED_REASONS`).

**One owner.** Every stage asks this module where a day is; none assumes it. The state changes
in the transaction that moves the day's rows (:func:`lock_for_move`, :func:`set_tier`), so a
state and the rows can never disagree. Writers take the day's row ``FOR SHARE`` in the
transaction that stores into it (:func:`lock_for_write`) and movers ``FOR UPDATE``: a write and
a move of one day never overlap, and a write lands in the tier it saw.

**Readers.** A move empties the old table with ``DELETE`` (MVCC: a reader whose snapshot is older
than the move still sees the rows there, and not the new tier's, which its snapshot does not
see either), and the emptied table is dropped only once no snapshot older than the move is
left (:func:`older_snapshots_left`). A reader sees a day in one tier, never both, never neither.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable

import asyncpg

from options.errors import DayRefusedError
from options.store.db import bounded_db_connection


class Tier(enum.Enum):
    """Where a day's rows are."""

    HOT = "hot"
    COMPACT = "compact"
    ARCHIVING = "archiving"
    ARCHIVED = "archived"
    DELETED = "deleted"

    @property
    def in_postgres(self) -> bool:
        """Its snapshots are read from PostgreSQL (hot, compact, or compact while archived)."""
        return self in (Tier.HOT, Tier.COMPACT, Tier.ARCHIVING)


HOT, COMPACT, ARCHIVING = Tier.HOT, Tier.COMPACT, Tier.ARCHIVING
ARCHIVED, DELETED = Tier.ARCHIVED, Tier.DELETED

BUSY_REASON = "being archived (a write is refused until the archive of the day is done)"
"""Why a write into a day being archived is refused for now: a later one may succeed."""

REFUSED_REASONS = {
    ARCHIVED: "archived (PostgreSQL no longer holds its snapshots; they are read from the "
    "archive and not written again)",
    DELETED: "deleted by retention (SNAPSHOT_DELETE_UNARCHIVED)",
}
"""Why a write into a day in that state is refused, and why a derived row was not computed."""


def why_not_writable(tier: Tier) -> str | None:
    """Why nothing may be written into a day in ``tier`` now (``None``: it may be)."""
    if tier is ARCHIVING:
        return BUSY_REASON
    return REFUSED_REASONS.get(tier)


def utc_day(moment: dt.datetime) -> dt.date:
    """The day of ``moment`` as the tiers count days (UTC)."""
    return moment.astimezone(dt.UTC).date()


async def lock_for_write(conn: asyncpg.Connection, day: dt.date) -> Tier:
    """The tier of ``day``, held ``FOR SHARE`` until the caller's transaction ends, so no move of
    the day starts before the write commits. Call it inside the writing transaction.

    Raises:
        DayRefusedError: the day is archived or deleted (``final``: nothing may be written into
            it), or being archived (not ``final``: a later write may find it compact again).
    """
    tier = await _locked(conn, day, "SHARE")
    if tier in REFUSED_REASONS:
        raise DayRefusedError(f"the day {day} is {REFUSED_REASONS[tier]}", day=day)
    if tier is ARCHIVING:
        raise DayRefusedError(f"the day {day} is {BUSY_REASON}", day=day, final=False)
    return tier


async def lock_for_move(conn: asyncpg.Connection, day: dt.date) -> Tier:
    """The tier of ``day``, held ``FOR UPDATE`` until the caller's transaction ends: writers of
    the day wait (or the move gives up at its lock timeout, ``LockNotAvailableError``)."""
    return await _locked(conn, day, "UPDATE")


async def _locked(conn: asyncpg.Connection, day: dt.date, strength: str) -> Tier:
    query = f"SELECT tier FROM stored_days WHERE day = $1 FOR {strength}"
    tier = await conn.fetchval(query, day)
    if tier is None:
        await conn.execute(
            "INSERT INTO stored_days (day, tier) VALUES ($1, 'hot') ON CONFLICT (day) DO NOTHING",
            day,
        )
        tier = await conn.fetchval(query, day)
    return Tier(tier)


async def set_tier(conn: asyncpg.Connection, day: dt.date, tier: Tier) -> None:
    """Record that ``day`` is now in ``tier``, in the caller's transaction (the one that moved
    its rows, after :func:`lock_for_move`), with that transaction's id."""
    await conn.execute(
        """
        INSERT INTO stored_days (day, tier, changed_at, moved_by)
        VALUES ($1, $2, now(), pg_current_xact_id())
        ON CONFLICT (day) DO UPDATE SET tier = EXCLUDED.tier, changed_at = EXCLUDED.changed_at,
            moved_by = EXCLUDED.moved_by
        """,
        day,
        tier.value,
    )


async def tiers(conn: asyncpg.Connection, days: Iterable[dt.date]) -> dict[dt.date, Tier]:
    """The tier of each of ``days`` (as the caller's snapshot sees them; no lock)."""
    wanted = sorted(set(days))
    rows = await conn.fetch("SELECT day, tier FROM stored_days WHERE day = ANY($1::date[])", wanted)
    found = {row["day"]: Tier(row["tier"]) for row in rows}
    return {day: found.get(day, HOT) for day in wanted}


async def tier_of(conn: asyncpg.Connection, day: dt.date) -> Tier:
    """The tier of ``day`` (no lock)."""
    return (await tiers(conn, [day]))[day]


@bounded_db_connection("reading where the day {day} is stored")
async def find_tier(conn: asyncpg.Connection, day: dt.date) -> Tier:
    """The tier of ``day`` (no lock), on a connection of the pool."""
    return await tier_of(conn, day)


async def days_in(
    conn: asyncpg.Connection,
    tier: Tier,
    *,
    first: dt.date | None = None,
    last: dt.date | None = None,
) -> list[dt.date]:
    """The days recorded in ``tier`` (not :data:`HOT`, which needs no row) within
    ``[first, last]``, oldest first."""
    rows = await conn.fetch(
        """
        SELECT day FROM stored_days
        WHERE tier = $1 AND ($2::date IS NULL OR day >= $2) AND ($3::date IS NULL OR day <= $3)
        ORDER BY day
        """,
        tier.value,
        first,
        last,
    )
    return [row["day"] for row in rows]


async def older_snapshots_left(conn: asyncpg.Connection, day: dt.date) -> bool:
    """Whether a session other than this one still has a snapshot taken before ``day``'s last
    move committed: such a reader would find the day's rows in the table the move emptied, so
    that table is not dropped yet."""
    return bool(
        await conn.fetchval(
            """
            SELECT EXISTS (
                SELECT 1 FROM pg_stat_activity a, stored_days d
                WHERE d.day = $1 AND d.moved_by IS NOT NULL AND a.pid <> pg_backend_pid()
                  AND a.datname = current_database()
                  AND a.backend_xmin IS NOT NULL
                  -- the snapshot's horizon is at or before the move: taken before its commit
                  AND age(a.backend_xmin) >= age(d.moved_by::text::xid))
            """,
            day,
        )
    )
