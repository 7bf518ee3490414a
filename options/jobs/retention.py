"""What leaves ``option_snapshots``, and how: finished days moved to the compact tier (after each
contract sync, :func:`compact_finished_days`), old days archived to Parquet, or deleted only
when asked.

Nothing is deleted from PostgreSQL that is not verified in the archive, unless the user asks
for deletion explicitly. After each snapshot run (:func:`retire_old_days`):

- ``ARCHIVE_URL`` set: the days older than ``ARCHIVE_AFTER_DAYS`` (or than ``--retain-days`` /
  ``SNAPSHOT_RETAIN_DAYS`` when that is fewer) are archived, verified, recorded and dropped
  (:mod:`options.store.archive`). A day that cannot be archived stays, with an error in the
  log.
- no archive, a retention (``--retain-days`` / ``SNAPSHOT_RETAIN_DAYS``) and
  ``SNAPSHOT_DELETE_UNARCHIVED=true``: the days older than the retention are deleted.
- no archive, a retention, no deletion asked: nothing is dropped, and a warning names the
  days past the retention and the two ways to let them go.

Retention and compaction are maintenance after a run whose rows are stored: whatever fails in
them (PostgreSQL, the archive, a bug) is logged as an error and leaves the days where they are
for a later run; it never changes the run's status or exit code.

``ingest_admin archive`` (:func:`archive_before`, then :func:`options.store.archive.archive_days`)
archives on demand, with ``--before``, ``--older-than``, ``--dry-run`` and
``--keep-in-postgres``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg

from options.config import Settings
from options.errors import ConfigError, OptionsError
from options.store.partitions import drop_old_partitions

# The archive modules load pyarrow (half a second and about 90 MB): imported where used, so a
# snapshot run without an archive never loads it.
if TYPE_CHECKING:
    from options.store.archive import ArchiveRun, DayReport
    from options.store.archive_files import ArchiveLocation
    from options.store.compaction import DayCompaction

logger = logging.getLogger(__name__)


async def retire_old_days(
    settings: Settings,
    pool: asyncpg.Pool,
    *,
    retain_days: int | None,
    now: dt.datetime,
    stop: asyncio.Event | None = None,
) -> None:
    """After a snapshot run: archive (or, when asked, delete) the days past their time in
    PostgreSQL, as the module docstring says. Never raises (but for a cancellation): a failure
    is logged as an error, and the run keeps its status.

    Args:
        retain_days: ``--retain-days``, else ``SNAPSHOT_RETAIN_DAYS`` (``None``: neither).
        now: the run's moment, which "today" is taken from.
        stop: a signal or the deadline: no day is started, the one being archived is given
            up, the rest left.
    """
    try:
        await _retire_old_days(settings, pool, retain_days=retain_days, now=now, stop=stop)
    except Exception as exc:  # maintenance never fails the run whose rows it follows
        _log_failure("Retention", exc, "old days stay in PostgreSQL; a later run tries again")


async def _retire_old_days(
    settings: Settings,
    pool: asyncpg.Pool,
    *,
    retain_days: int | None,
    now: dt.datetime,
    stop: asyncio.Event | None,
) -> None:
    if settings.archive_url is None and retain_days is None:
        return
    from options.store.archive import archive_days, first_kept_day, unarchived_days

    if settings.archive_url is not None:
        keep = settings.archive_after_days
        if retain_days is not None:
            keep = min(keep, retain_days)
        # finding an S3 bucket's region is a request: off the loop, as the writing is
        location = await asyncio.to_thread(require_archive, settings)
        _log_run(
            await archive_days(pool, location, before=first_kept_day(now, keep), now=now, stop=stop)
        )
        return
    if retain_days is None:
        return
    if settings.delete_unarchived:
        await drop_old_partitions(pool, retain_days=retain_days, now=now)
        return
    kept = await unarchived_days(pool, before=first_kept_day(now, retain_days), now=now)
    if kept:
        logger.warning(
            "Retention: %d days older than %d days (%s to %s) are kept: nothing is deleted "
            "that is not archived. Set ARCHIVE_URL to archive them, or "
            "SNAPSHOT_DELETE_UNARCHIVED=true to delete them",
            len(kept),
            retain_days,
            kept[0],
            kept[-1],
        )


async def compact_finished_days(
    pool: asyncpg.Pool, *, now: dt.datetime, stop: asyncio.Event | None = None
) -> None:
    """After a contract sync (the daily job): move the finished days from ``option_snapshots``
    to the compact tier (:mod:`options.store.compaction`). Never raises (but for a
    cancellation): a day that fails stays where it is, with an error in the log; the run keeps
    its status and exit code."""
    from options.store.compaction import compact_days

    try:
        await compact_days(pool, now=now, stop=stop)
    except Exception as exc:  # maintenance never fails the run whose rows it follows
        _log_failure("Compaction", exc, "a later run tries again")


def _log_failure(stage: str, exc: Exception, then: str) -> None:
    """One error line for a failed maintenance stage; the traceback too when the error is
    not one of ours (a bug to report)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    logger.error("%s: %s; %s", stage, text, then, exc_info=not isinstance(exc, OptionsError))


def format_compaction(reports: Sequence[DayCompaction] | None) -> list[str]:
    """``ingest_admin compact``'s table: a line per day (rows, bytes per snapshot before and
    after, rows with extra values, what was done), then the total, then a line per day left
    busy saying why."""
    if reports is None:
        return ["another session is compacting, archiving or dropping old days: nothing done"]
    if not reports:
        return ["nothing to compact: every finished day is in the compact tier"]
    table: list[tuple[str, ...]] = [("day", "rows", "wide B/row", "compact B/row", "extra", "")]
    for day in reports:
        table.append(
            (
                day.day.isoformat(),
                f"{day.rows:,}",
                _ratio(day.wide_bytes, day.rows),
                _ratio(day.compact_bytes, day.rows),
                f"{day.extra_rows:,}",
                day.action,
            )
        )
    done = [day for day in reports if day.compact_bytes is not None]
    table.append(
        (
            "total",
            f"{sum(day.rows for day in reports):,}",
            _ratio(sum(d.wide_bytes for d in reports if d.rows), sum(d.rows for d in reports)),
            _ratio(sum(d.compact_bytes or 0 for d in done), sum(d.rows for d in done))
            if done
            else "-",
            f"{sum(day.extra_rows for day in reports):,}",
            "",
        )
    )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return [
        "  ".join(
            cell.rjust(width) if 0 < i < 5 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in table
    ] + [f"{day.day}: left in option_snapshots: {day.note}" for day in busy_days(reports)]


def busy_days(reports: Sequence[DayCompaction]) -> list[DayCompaction]:
    """The days a compaction left because their tables were in use."""
    from options.store.compaction import BUSY

    return [day for day in reports if day.action == BUSY]


def require_archive(settings: Settings) -> ArchiveLocation:
    """The archive ``ARCHIVE_URL`` names.

    Raises:
        ConfigError: ``ARCHIVE_URL`` is not set.
        ArchiveError: the S3 bucket's region cannot be found.
    """
    from options.store.archive_files import archive_location

    location = archive_location(settings)
    if location is None:
        raise ConfigError(
            "ARCHIVE_URL is not set: expected an absolute directory or s3://BUCKET[/PREFIX] "
            "to archive old days to",
            variable="ARCHIVE_URL",
        )
    return location


def archive_before(
    settings: Settings,
    *,
    before: dt.date | None,
    older_than: int | None,
    now: dt.datetime,
) -> dt.date:
    """The first day ``ingest_admin archive`` keeps: ``--before DATE``, else the day
    ``--older-than DAYS`` (else ``ARCHIVE_AFTER_DAYS``) keeps from ``now``."""
    from options.store.archive import first_kept_day

    if before is not None:
        return before
    return first_kept_day(now, settings.archive_after_days if older_than is None else older_than)


def format_archive_run(run: ArchiveRun) -> list[str]:
    """The run as a table: a line per day (rows, Parquet bytes and bytes per snapshot, the
    partition's size, what was done), then the total."""
    if run.busy:
        return ["another session is archiving or dropping old partitions: nothing done"]
    if not run.days:
        return ["nothing to archive"]
    table: list[tuple[str, ...]] = [
        ("day", "rows", "parquet bytes", "B/snapshot", "postgres bytes", "B/row", "archive", "pg")
    ]
    for day in run.days:
        table.append(_row(day))
    rows = sum(day.rows for day in run.days)
    written = [day for day in run.days if day.parquet_bytes is not None]
    table.append(
        (
            "total",
            f"{rows:,}",
            _bytes(sum(day.parquet_bytes or 0 for day in written)) if written else "-",
            _ratio(
                sum(day.parquet_bytes or 0 for day in written), sum(day.rows for day in written)
            ),
            _bytes(sum(day.postgres_bytes or 0 for day in run.days)),
            _ratio(
                sum(day.postgres_bytes or 0 for day in run.days),
                sum(day.rows for day in run.days if day.postgres_bytes),
            ),
            f"{len(written)} day{'' if len(written) == 1 else 's'} in Parquet",
            "",
        )
    )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(
            cell.rjust(width) if 0 < i < 6 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in table
    ]
    failed = run.failed
    if failed is not None:
        lines.append(f"{failed.day}: {failed.note}")
    if run.interrupted:
        lines.append("stopped: the days after the last one shown are left for a later run")
    return lines


def _row(day: DayReport) -> tuple[str, ...]:
    from options.store.archive import FAILED

    return (
        day.day.isoformat(),
        f"{day.rows:,}",
        _bytes(day.parquet_bytes),
        _ratio(day.parquet_bytes, day.rows),
        _bytes(day.postgres_bytes),
        _ratio(day.postgres_bytes, day.rows),
        day.action,
        day.postgres if day.action != FAILED else "kept",
    )


def _bytes(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _ratio(total: int | None, rows: int) -> str:
    return "-" if total is None or not rows else f"{total / rows:.1f}"


def _log_run(run: ArchiveRun) -> None:
    from options.store.archive import FAILED

    done = [day for day in run.days if day.action != FAILED]
    if done:
        logger.info(
            "Archive: %d days taken care of (%s to %s); %d rows in Parquet",
            len(done),
            done[0].day,
            done[-1].day,
            sum(day.rows for day in done if day.parquet_bytes is not None),
        )
