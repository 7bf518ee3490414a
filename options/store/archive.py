"""The archive tier: old days of snapshots written to Parquet, verified value by value,
recorded, and only then dropped from PostgreSQL; idempotent and resumable.

A day still in ``option_snapshots`` is first moved to the compact tier
(:mod:`options.store.compaction`); the archive then works on the day's ``snapshot_rows``
partition. One day at a time, oldest first, under the retention lock (one compaction, archive or
retention at a time per database), the day's state kept by :mod:`options.store.lifecycle`:

0. **Archiving.** The day is recorded ``archiving`` (a writer of the day holds it ``FOR SHARE``:
   the archive waits for it, or leaves the day for a later run); from then on no write reaches
   it, and a failure below puts it back to ``compact``.
1. **Write.** The day's rows are read through the ``snapshot_reads`` view (each snapshot with its
   contract's type, expiration and strike) by a server-side cursor in one repeatable-read
   transaction, sorted by underlying, ticker and time, digested (every value of every row,
   :mod:`options.store.archive_digest`) and written a row group at a time under a staging name
   outside the dataset (:mod:`options.store.archive_writer`): memory holds one row group, never
   the day.
2. **Verify and publish.** The staged file is read back from its storage and its digest must
   equal the rows'; only then is it moved into place (a rename on disk, a server-side copy on
   S3, read back again there). A file already in place stays until then.
3. **Record.** ``archived_days`` gets the day's row: URL, rows, bytes, digest (``v2:...``). The
   day's companions (computed greeks, coverage, daily rows, listings) are written, verified and
   recorded the same way (:mod:`options.store.archive_companions`).
4. **Archived.** In one transaction, with the compact partition counted against the record, the
   day is recorded ``archived``: readers read it from the archive from then on.
5. **Drop.** Once no snapshot older than that is left, the partition is detached
   (``CONCURRENTLY``) and dropped in the transaction that sets ``dropped_at`` and deletes the
   day's computed greeks (counted against their file's record); the coverage rows and the
   daily rows stay.

Killed at any moment, nothing is lost: a partition is dropped only after its day was verified
and recorded, and a file in place is replaced only by a verified one. A rerun takes each day
where it stands, and trusts no record without reading both copies again:

- recorded and dropped: skipped;
- killed between writing and recording (a file in place, no record): the file is read back and
  PostgreSQL's rows digested again; equal, the day is recorded without writing it again;
- killed between recording and dropping, or kept in PostgreSQL when asked (a record, the
  partition attached): the file is read back and PostgreSQL's rows digested again, and both
  must equal the record before the partition is dropped; a record of an earlier version's key
  checksum (``k1:...``) is verified the same way against the file and recorded again with the
  full digest;
- killed during the drop (a record, the partition detached): the file is read back against the
  record; the detached table, which nothing writes to, is counted under its lock;
- a file missing, unreadable or changed since it was recorded, or PostgreSQL's rows changed
  since (a late ``--resume`` of one of its slots, a value corrected): the day is written
  again, the new file verified before it replaces the old one, and recorded again; a detached
  partition is attached again first.

Only whole past days are archived: a day is over once it is over both in UTC (its partition)
and in New York (the market's day). An empty partition (a weekend's, made ahead) is dropped
without a file. ``stop`` (a signal, the deadline) is obeyed between days, the compaction
before them included, and within a day's write (the file is given up).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import asyncpg

from options.errors import ArchiveError, CompactionError
from options.store.archive_companions import (
    CompanionsStopped,
    archive_companions,
    archive_pending_copies,
    delete_moved,
)
from options.store.archive_digest import DIGEST_VERSION, Digest, checksum_version
from options.store.archive_files import (
    ARCHIVE_SCHEMA,
    SNAPSHOTS,
    ArchiveLocation,
    read_digest,
)
from options.store.archive_writer import clean_staging, export_day, postgres_digest
from options.store.compaction import BUSY, compact_day, last_finished_day
from options.store.compaction import EMPTY as COMPACTION_EMPTY
from options.store.db import bounded_db_connection
from options.store.lifecycle import ARCHIVED as ARCHIVED_TIER
from options.store.lifecycle import ARCHIVING, Tier, lock_for_move, older_snapshots_left, set_tier
from options.store.lifecycle import COMPACT as COMPACT_TIER
from options.store.partitions import (
    COMPACT,
    RETENTION_LOCK_KEY,
    RETENTION_LOCK_TIMEOUT,
    WIDE,
    DropOutcome,
    PartitionState,
    drop_day_partition,
    partition_name,
    partition_states,
    reattach_partition,
)
from options.store.reconnect import DB_ERRORS

logger = logging.getLogger(__name__)

_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# A count of a day's partition scans it whole: minutes for the whole market
ARCHIVE_STATEMENT_TIMEOUT = 3600.0

_EXPORT_SQL = f"""
    SELECT {", ".join(f"{n}::float8" if n == "strike_price" else n for n in ARCHIVE_SCHEMA.names)}
    FROM snapshot_reads
    WHERE captured_at >= $1 AND captured_at < $2
    -- byte order: the same on every server, whatever its collation
    ORDER BY underlying_ticker COLLATE "C", ticker COLLATE "C", captured_at
"""

# What happened to a day (DayReport.action)
ARCHIVED = "archived"
RECORDED = "recorded"  # its file, left by an interrupted run, verified and recorded
ARCHIVED_BEFORE = "archived before"
EMPTY = "empty"
WOULD_ARCHIVE = "would archive"
FAILED = "failed"
LEFT = "left"  # partition of an archived and dropped day made again: left in PostgreSQL


@dataclass(frozen=True)
class DayReport:
    """What one day's archiving did.

    Attributes:
        action: :data:`ARCHIVED`, :data:`RECORDED`, :data:`ARCHIVED_BEFORE`, :data:`EMPTY`,
            :data:`WOULD_ARCHIVE`, :data:`FAILED` or :data:`LEFT`.
        rows: the day's snapshots.
        parquet_bytes: the size of its file (``None``: none written or known).
        postgres_bytes: the size of its partition with its indexes, before any drop.
        postgres: ``dropped``, ``kept`` (asked to), ``would drop``, ``busy`` (in use: a later run
            drops it), ``changed`` (rows were written to it meanwhile: archived again next
            run), or ``-``.
        note: a failure's message.
    """

    day: dt.date
    action: str
    rows: int
    parquet_bytes: int | None = None
    postgres_bytes: int | None = None
    postgres: str = "-"
    note: str = ""

    @property
    def bytes_per_snapshot(self) -> float | None:
        """Parquet bytes per snapshot row."""
        if self.parquet_bytes is None or not self.rows:
            return None
        return self.parquet_bytes / self.rows


@dataclass(frozen=True)
class ArchiveRun:
    """What one call of :func:`archive_days` did, day by day.

    Attributes:
        busy: another session held the retention lock: nothing was done.
        interrupted: ``stop`` was set: the days after the last one reported were left.
        failed: a day could not be archived (its report says why); the later ones were left.
    """

    days: tuple[DayReport, ...]
    busy: bool = False
    interrupted: bool = False

    @property
    def failed(self) -> DayReport | None:
        """The day that failed, if one did."""
        return next((day for day in self.days if day.action == FAILED), None)


@dataclass(frozen=True)
class ArchivedDay:
    """One row of ``archived_days``."""

    day: dt.date
    url: str
    rows: int
    bytes: int
    checksum: str
    archived_at: dt.datetime
    dropped_at: dt.datetime | None


class _Stopped(Exception):
    """``stop`` was set while a day was being written: its file was given up."""


def first_kept_day(now: dt.datetime, days: int) -> dt.date:
    """The oldest UTC day that keeping ``days`` days at ``now`` keeps: days before it are
    archived (the same cut as retention's)."""
    return now.astimezone(dt.UTC).date() - dt.timedelta(days=days)


def last_archivable_day(now: dt.datetime) -> dt.date:
    """The last day that may be archived at ``now`` (or at the clock, if earlier): the day
    before today, today being the earlier of the UTC day and New York's day."""
    return last_finished_day(now)


@bounded_db_connection
async def archive_days(
    conn: asyncpg.Connection,
    location: ArchiveLocation,
    *,
    before: dt.date,
    now: dt.datetime,
    keep_in_postgres: bool = False,
    dry_run: bool = False,
    stop: asyncio.Event | None = None,
    lock_timeout: float = RETENTION_LOCK_TIMEOUT,
) -> ArchiveRun:
    """Archive every day before ``before`` (and before today) still in PostgreSQL, oldest
    first, and drop each one's partition once its file is verified and recorded.

    Args:
        location: where the files go.
        before: the first day not archived.
        now: the moment "today" is taken from (never later than the clock).
        keep_in_postgres: write, verify and record, but drop nothing.
        dry_run: report what would be done; write and drop nothing.
        stop: when set, the day being written is given up (a rerun writes it again) and the
            rest left; no day is compacted or archived after it is set.
        lock_timeout: how long a detach or drop waits for sessions using the table.

    Returns:
        A report per day acted on; a day that failed ends the run (its report says why).

    Raises:
        DatabaseError: PostgreSQL failed.
    """
    if dry_run:
        return ArchiveRun(
            tuple(
                [
                    await _preview_day(conn, day, state, record)
                    for day, state, record in await _days_to_archive(conn, before, now)
                ]
            )
        )
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK_KEY):
        logger.info("Archive: another session is archiving or dropping old partitions; skipped")
        return ArchiveRun((), busy=True)
    try:
        reports, failed = await _compact_first(conn, before, now, lock_timeout, stop)
        if failed is not None:
            return ArchiveRun((*reports, failed))
        if stop is not None and stop.is_set():
            return ArchiveRun(tuple(reports), interrupted=True)
        for day, state, record in await _days_to_archive(conn, before, now):
            if stop is not None and stop.is_set():
                return ArchiveRun(tuple(reports), interrupted=True)
            try:
                reports.append(
                    await _archive_day(
                        conn, location, day, state, record, keep_in_postgres, stop, lock_timeout
                    )
                )
            except _Stopped:
                logger.info("Archive: stopped while writing %s; a later run writes it again", day)
                return ArchiveRun(tuple(reports), interrupted=True)
            except ArchiveError as exc:
                logger.error("Archive: %s stays in PostgreSQL: %s", day, exc)
                reports.append(DayReport(day, FAILED, 0, note=str(exc).splitlines()[0]))
                break
        else:
            if not keep_in_postgres:
                copies = await archive_pending_copies(conn, location, stop=stop)
                if copies:
                    logger.info("Archive: %d copies of archived days written again", copies)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_KEY)
    return ArchiveRun(tuple(reports))


@bounded_db_connection
async def list_archived_days(
    conn: asyncpg.Connection, *, dropped_only: bool = False
) -> list[ArchivedDay]:
    """The rows of ``archived_days``, oldest first; ``dropped_only``: only the days whose
    partition is gone, which readers must read from the archive."""
    rows = await conn.fetch(
        "SELECT day, url, rows, bytes, checksum, archived_at, dropped_at FROM archived_days "
        "WHERE dropped_at IS NOT NULL OR NOT $1 ORDER BY day",
        dropped_only,
    )
    return [ArchivedDay(**dict(row)) for row in rows]


@bounded_db_connection
async def unarchived_days(
    conn: asyncpg.Connection, *, before: dt.date, now: dt.datetime
) -> list[dt.date]:
    """The days before ``before`` (and over at ``now``) with a partition in PostgreSQL and no
    record in ``archived_days``, oldest first."""
    return [
        day
        for day, state, record in await _days_to_archive(conn, before, now)
        if record is None and state is not PartitionState.ABSENT
    ]


async def _compact_first(
    conn: asyncpg.Connection,
    before: dt.date,
    now: dt.datetime,
    lock_timeout: float,
    stop: asyncio.Event | None,
) -> tuple[list[DayReport], DayReport | None]:
    """Move the days to archive that are still in ``option_snapshots`` to the compact tier,
    which the archive reads and drops from: the reports of the empty days dropped, and of a
    day that could not be moved. No day is started once ``stop`` is set (a day's move, one
    transaction, runs to its end)."""
    emptied: list[DayReport] = []
    last = min(before - dt.timedelta(days=1), last_archivable_day(now))
    wide = await partition_states(conn, WIDE)
    for day in sorted(d for d in wide if d <= last):
        if stop is not None and stop.is_set():
            break
        try:
            if wide[day] is not PartitionState.ATTACHED:
                # a retention's leftover, detached before archives existed: attached again
                await reattach_partition(conn, day, lock_timeout=lock_timeout, table=WIDE)
            report = await compact_day(conn, day, lock_timeout=lock_timeout)
        except CompactionError as exc:
            logger.error("Archive: %s stays in PostgreSQL: %s", day, exc)
            return emptied, DayReport(day, FAILED, 0, note=str(exc).splitlines()[0])
        except asyncpg.LockNotAvailableError:
            report = None
        if report is None or report.action == BUSY:
            return emptied, DayReport(day, FAILED, 0, note=f"{partition_name(day)} is in use")
        if report.action == COMPACTION_EMPTY and day not in await partition_states(conn, COMPACT):
            emptied.append(
                DayReport(day, EMPTY, 0, postgres_bytes=report.wide_bytes, postgres="dropped")
            )
    return emptied, None


async def _day_states(conn: asyncpg.Connection) -> dict[dt.date, PartitionState]:
    """Where each day's table stands: its compact partition's state, else its
    ``option_snapshots`` partition's (a day not compacted yet)."""
    return {**await partition_states(conn, WIDE), **await partition_states(conn, COMPACT)}


async def _days_to_archive(
    conn: asyncpg.Connection, before: dt.date, now: dt.datetime
) -> list[tuple[dt.date, PartitionState, asyncpg.Record | None]]:
    """The days with a table of ours or a record not dropped, before ``before`` and over."""
    last = min(before - dt.timedelta(days=1), last_archivable_day(now))
    states = await _day_states(conn)
    records = {
        row["day"]: row
        for row in await conn.fetch("SELECT * FROM archived_days WHERE day <= $1", last)
    }
    pending = {day for day, row in records.items() if row["dropped_at"] is None}
    # an archive interrupted between its first step and its last; days of daily rows alone (a
    # backfill's, or sessions whose every slot failed): their companions go to the archive
    others = {
        row["day"]
        for row in await conn.fetch(
            """
            SELECT day FROM stored_days WHERE tier = 'archiving' AND day <= $1
            UNION
            SELECT DISTINCT c.session FROM daily_coverage c
            WHERE c.session <= $1
              AND NOT EXISTS (SELECT 1 FROM stored_days d
                              WHERE d.day = c.session AND d.tier IN ('archived', 'deleted'))
            """,
            last,
        )
    }
    days = sorted(day for day in set(states) | pending | others if day <= last)
    return [(day, states.get(day, PartitionState.ABSENT), records.get(day)) for day in days]


async def _preview_day(
    conn: asyncpg.Connection,
    day: dt.date,
    state: PartitionState,
    record: asyncpg.Record | None,
) -> DayReport:
    """What archiving ``day`` would do, from its partition's size and rows."""
    if state is PartitionState.ABSENT:
        if record is None:
            return DayReport(day, WOULD_ARCHIVE, 0, note="daily rows and coverage only")
        return DayReport(day, ARCHIVED_BEFORE, record["rows"], postgres="dropped")
    size = rows = 0
    for table in (WIDE, COMPACT):  # a day not compacted yet is compacted first
        name = partition_name(day, table)
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
            size += await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", name)
            rows += await conn.fetchval(
                f"SELECT count(*) FROM {name}", timeout=ARCHIVE_STATEMENT_TIMEOUT
            )
    if record is not None and record["dropped_at"] is not None:
        return DayReport(day, LEFT, rows, postgres_bytes=size, postgres="kept")
    if record is not None:
        return DayReport(day, ARCHIVED_BEFORE, rows, record["bytes"], size, postgres="would drop")
    return DayReport(day, WOULD_ARCHIVE if rows else EMPTY, rows, None, size, "would drop")


async def _archive_day(
    conn: asyncpg.Connection,
    location: ArchiveLocation,
    day: dt.date,
    state: PartitionState,
    record: asyncpg.Record | None,
    keep_in_postgres: bool,
    stop: asyncio.Event | None,
    lock_timeout: float,
) -> DayReport:
    """Take one day from where it stands to archived and dropped (or written and kept, if
    asked): its snapshots, then its companions (:mod:`options.store.archive_companions`)."""
    name = partition_name(day, COMPACT)
    if record is not None and record["dropped_at"] is not None:
        logger.warning(
            "Archive: %s was archived and dropped on %s, yet table %s exists again (written by "
            "a version before the day's state was kept?): it is left in PostgreSQL",
            day,
            record["dropped_at"].date(),
            name,
        )
        return DayReport(day, LEFT, 0, postgres="kept")
    if record is None and state is PartitionState.ABSENT:
        return await _archive_companions_only(conn, location, day, keep_in_postgres, stop)
    if state is PartitionState.ABSENT:
        # recorded, and the partition dropped by other means since: the record says so now
        assert record is not None
        async with conn.transaction():
            await lock_for_move(conn, day)
            await conn.execute("UPDATE archived_days SET dropped_at = now() WHERE day = $1", day)
            await set_tier(conn, day, ARCHIVED_TIER)
        return DayReport(day, ARCHIVED_BEFORE, record["rows"], record["bytes"], None, "dropped")
    size = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", name)
    tier = None if keep_in_postgres else await _begin_archiving(conn, day, lock_timeout)
    if tier is None and not keep_in_postgres:
        return DayReport(day, FAILED, 0, postgres_bytes=size, note=f"{day} is in use")
    try:
        if state is not PartitionState.ATTACHED and (
            record is None or not await _file_as_recorded(location, day, record)
        ):
            # a retention's leftover, detached before archives existed, or a drop interrupted
            # whose file is no longer the one recorded: readers see it again, then it is
            # archived
            try:
                await reattach_partition(conn, day, lock_timeout=lock_timeout, table=COMPACT)
            except asyncpg.LockNotAvailableError:
                logger.warning("Archive: cannot attach %s again now; a later run will", name)
                raise ArchiveError(f"{name} is in use", day=day) from None
            state = PartitionState.ATTACHED
        if state is PartitionState.ATTACHED:
            action, digest, parquet_bytes = await _archived_file(conn, location, day, record, stop)
            await archive_companions(conn, location, day, stop=stop)
        else:
            # recorded, its file as recorded, and detached before being dropped: the drop was
            # interrupted; the detached table, which nothing writes to, is counted when
            # dropped, and the companions were archived before the drop began
            assert record is not None
            action = ARCHIVED_BEFORE
            digest, parquet_bytes = Digest(record["rows"], record["checksum"]), record["bytes"]
    except CompanionsStopped:
        await _give_up_archiving(conn, day, tier)
        raise _Stopped from None
    except (ArchiveError, _Stopped):
        await _give_up_archiving(conn, day, tier)
        raise
    report = DayReport(day, action, digest.rows, parquet_bytes, size)
    if keep_in_postgres:
        return dataclasses.replace(report, postgres="kept")
    if state is PartitionState.ATTACHED and not await _finish_archiving(
        conn, day, digest.rows, lock_timeout
    ):
        return dataclasses.replace(report, postgres=DropOutcome.CHANGED.value)
    if await _older_snapshots_left(conn, day, lock_timeout):
        return dataclasses.replace(report, postgres=DropOutcome.BUSY.value)
    outcome = await drop_day_partition(
        conn,
        day,
        expected_rows=digest.rows,
        also=_marking_dropped(day),
        lock_timeout=lock_timeout,
        table=COMPACT,
    )
    if outcome is DropOutcome.CHANGED:
        # rows written by other means than the jobs since the day was archived: they are not
        # in the archive, which readers now read; the table is left attached for a look
        logger.error(
            "Archive: %s was written to after it was archived (not by this project's jobs): "
            "%s is left in PostgreSQL; the archive holds the day as archived",
            day,
            name,
        )
    return dataclasses.replace(report, postgres=outcome.value)


async def _archive_companions_only(
    conn: asyncpg.Connection,
    location: ArchiveLocation,
    day: dt.date,
    keep_in_postgres: bool,
    stop: asyncio.Event | None,
) -> DayReport:
    """A day without snapshots in PostgreSQL (daily rows alone): its companions are archived
    and it is recorded archived (PostgreSQL keeps the copies)."""
    tier = None
    if not keep_in_postgres:
        tier = await _begin_archiving(conn, day, RETENTION_LOCK_TIMEOUT)
        if tier is None:
            return DayReport(day, FAILED, 0, note=f"{day} is in use")
    try:
        written = await archive_companions(conn, location, day, stop=stop)
    except CompanionsStopped:
        await _give_up_archiving(conn, day, tier)
        raise _Stopped from None
    except ArchiveError:
        await _give_up_archiving(conn, day, tier)
        raise
    if not keep_in_postgres:
        async with conn.transaction():
            await lock_for_move(conn, day)
            await set_tier(conn, day, ARCHIVED_TIER)
    return DayReport(day, ARCHIVED, 0, written or None, None, "kept")


async def _begin_archiving(
    conn: asyncpg.Connection, day: dt.date, lock_timeout: float
) -> Tier | None:
    """Record that ``day`` is being archived, so that no write reaches it while its files are
    written: its tier before (``ARCHIVED`` when an earlier run got that far), or ``None`` when a
    writer kept it in use for ``lock_timeout`` seconds."""
    try:
        async with conn.transaction():
            await conn.execute(
                "SELECT set_config('lock_timeout', $1, true)",
                f"{max(1, round(lock_timeout * 1000))}ms",
            )
            tier = await lock_for_move(conn, day)
            if tier is not ARCHIVED_TIER:
                await set_tier(conn, day, ARCHIVING)
    except asyncpg.LockNotAvailableError:
        logger.warning("Archive: %s is being written to; a later run archives it", day)
        return None
    return tier


async def _give_up_archiving(conn: asyncpg.Connection, day: dt.date, before: Tier | None) -> None:
    """The day's archive failed or was stopped: writes reach it again (best effort: a day left
    being archived is taken up by the next run)."""
    if before is None or before is ARCHIVED_TIER:
        return
    with contextlib.suppress(*DB_ERRORS):
        await conn.execute(
            "UPDATE stored_days SET tier = $2, changed_at = now() "
            "WHERE day = $1 AND tier = 'archiving'",
            day,
            (COMPACT_TIER if before is ARCHIVING else before).value,
        )


async def _finish_archiving(
    conn: asyncpg.Connection, day: dt.date, rows: int, lock_timeout: float
) -> bool:
    """Record ``day`` archived (readers read it from the archive from now on), if its compact
    partition still holds exactly the ``rows`` archived and nothing of it is left in the hot
    tier; otherwise the day goes back to compact and its record is removed, so the next run
    archives it again (returns ``False``)."""
    start, end = _bounds(day)
    async with conn.transaction():
        await conn.execute(
            "SELECT set_config('lock_timeout', $1, true)", f"{max(1, round(lock_timeout * 1000))}ms"
        )
        await lock_for_move(conn, day)
        held = await conn.fetchval(
            f"SELECT count(*) FROM {partition_name(day, COMPACT)}",
            timeout=ARCHIVE_STATEMENT_TIMEOUT,
        )
        hot = await conn.fetchval(
            "SELECT count(*) FROM option_snapshots WHERE captured_at >= $1 AND captured_at < $2",
            start,
            end,
        )
        if held == rows and not hot:
            await set_tier(conn, day, ARCHIVED_TIER)
            return True
        await set_tier(conn, day, COMPACT_TIER)
        await conn.execute("DELETE FROM archived_days WHERE day = $1 AND dropped_at IS NULL", day)
    logger.warning(
        "Archive: %s holds %d rows (%d in option_snapshots), not the %d archived: archived "
        "again by the next run",
        day,
        held + hot,
        hot,
        rows,
    )
    return False


async def _older_snapshots_left(conn: asyncpg.Connection, day: dt.date, wait: float) -> bool:
    """Whether a reader whose snapshot predates the day's archiving still runs after ``wait``
    seconds: it may read the day from PostgreSQL, so its partition is not dropped yet."""
    waited = 0.0
    while await older_snapshots_left(conn, day):
        if waited >= wait:
            logger.info(
                "Archive: a transaction older than the archiving of %s still runs; its "
                "partition is dropped by a later run",
                day,
            )
            return True
        await asyncio.sleep(0.1)
        waited += 0.1
    return False


async def _archived_file(
    conn: asyncpg.Connection,
    location: ArchiveLocation,
    day: dt.date,
    record: asyncpg.Record | None,
    stop: asyncio.Event | None,
) -> tuple[str, Digest, int | None]:
    """Make sure ``day``'s file is in place, holds exactly PostgreSQL's rows, and is recorded
    so: (action, digest, bytes). A file in place is trusted only once read back whole and
    equal to both the record (when it has a digest) and PostgreSQL's rows digested again."""
    await asyncio.to_thread(clean_staging, location, SNAPSHOTS, day)
    try:
        found = await asyncio.to_thread(read_digest, location, location.day_file(day))
    except ArchiveError as exc:
        logger.warning("Archive: %s; writing it again", exc)
        found = None
    known = _recorded_digest(location, day, record)
    if found is not None and (known is None or found[0] == known):
        expected = await postgres_digest(conn, SNAPSHOTS, _EXPORT_SQL, *_micro_bounds(day))
        if found[0] == expected:
            if known is not None:
                return ARCHIVED_BEFORE, expected, found[1]
            await _record(conn, location, day, expected, found[1])
            if record is not None:
                logger.info("Archive: %s's file verified with every value; recorded again", day)
                return ARCHIVED_BEFORE, expected, found[1]
            logger.info("Archive: %s's file was written by an interrupted run; verified", day)
            return RECORDED, expected, found[1]
    if record is not None:
        logger.warning(
            "Archive: %s changed since it was archived (or its file did): archiving it again", day
        )
    written = await export_day(
        conn, location, SNAPSHOTS, day, _EXPORT_SQL, *_micro_bounds(day), stop=stop
    )
    if written is None:
        raise _Stopped
    expected, size = written
    if size is None:
        return EMPTY, expected, None
    await _record(conn, location, day, expected, size)
    logger.info(
        "Archived %s: %d rows, %d bytes (%.1f B per snapshot) to %s",
        day,
        expected.rows,
        size,
        size / expected.rows,
        location.day_url(day),
    )
    return ARCHIVED, expected, size


def _recorded_digest(
    location: ArchiveLocation, day: dt.date, record: asyncpg.Record | None
) -> Digest | None:
    """What ``record`` says the file in place holds, when it says it with the full digest
    (not an earlier version's key checksum) and of the file at this location."""
    if record is None or record["url"] != location.day_url(day):
        return None
    if checksum_version(record["checksum"]) != DIGEST_VERSION:
        return None
    return Digest(record["rows"], record["checksum"])


async def _file_as_recorded(
    location: ArchiveLocation, day: dt.date, record: asyncpg.Record
) -> bool:
    """``day``'s file reads back whole as ``record`` says (never for an earlier version's
    key checksum)."""
    known = _recorded_digest(location, day, record)
    if known is None:
        return False
    try:
        found = await asyncio.to_thread(read_digest, location, location.day_file(day))
    except ArchiveError as exc:
        logger.warning("Archive: %s", exc)
        return False
    return found is not None and found[0] == known


async def _record(
    conn: asyncpg.Connection, location: ArchiveLocation, day: dt.date, digest: Digest, size: int
) -> None:
    await conn.execute(
        """
        INSERT INTO archived_days (day, url, rows, bytes, checksum, archived_at)
        VALUES ($1, $2, $3, $4, $5, now())
        ON CONFLICT (day) DO UPDATE SET url = excluded.url, rows = excluded.rows,
            bytes = excluded.bytes, checksum = excluded.checksum,
            archived_at = excluded.archived_at, dropped_at = NULL
        """,
        day,
        location.day_url(day),
        digest.rows,
        size,
        digest.checksum,
    )


def _marking_dropped(day: dt.date) -> Callable[[asyncpg.Connection], Awaitable[None]]:
    """What the drop's transaction does besides: the moved companions' rows of the day deleted
    (counted against their files' records first), its ``dropped_at``, its tier."""

    async def mark(conn: asyncpg.Connection) -> None:
        await lock_for_move(conn, day)
        await delete_moved(conn, day)
        await conn.execute("UPDATE archived_days SET dropped_at = now() WHERE day = $1", day)
        await set_tier(conn, day, ARCHIVED_TIER)

    return mark


def _micros(moment: dt.datetime) -> int:
    return (moment - _EPOCH) // dt.timedelta(microseconds=1)


def _micro_bounds(day: dt.date) -> tuple[int, int]:
    """``day``'s bounds as the export's arguments: microseconds since the epoch."""
    start, end = _bounds(day)
    return _micros(start), _micros(end)


def _bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    return start, start + dt.timedelta(days=1)
