"""Reading the stored history back, from PostgreSQL or the Parquet archive, the same either way.

**PostgreSQL** is read only through the functions of migration 0005: ``snapshot_slot_at``,
``chain_at`` and ``contract_history``. They are the interface; the storage beneath them may
change, their columns (the composite type ``snapshot_read``) do not.

**The archive** holds the days whose partitions were archived and dropped: ``archived_days``
lists them, ``dropped_at`` set once a day's partition is gone. A day is the UTC day of
PostgreSQL's daily partition. Its rows are Parquet files under
``<ARCHIVE_URL>/option_snapshots/date=YYYY-MM-DD/`` with exactly the columns of
``snapshot_read`` (:mod:`options.store.archive_files` says where and how they are written, and
opens the directory or the S3 bucket with the ``AWS_*`` settings). Only the day's own directory
is listed, never the whole bucket, and its files are cast to :data:`READ_SCHEMA`, so a writer
may choose other widths.

**Which slot** answers "the chain at T" is always PostgreSQL's answer: coverage rows
(``snapshot_coverage``) stay in PostgreSQL for every day, archived or not. Only the rows come
from one tier or the other. Which days are dropped, which slot, and PostgreSQL's rows are read
in one repeatable-read transaction.

Every read is a :class:`pyarrow.Table` with :data:`READ_SCHEMA`, sorted the same way whichever
tier it came from, so both tiers give equal tables for the same day.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import asyncpg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from asyncpg.transaction import Transaction

from options.config import S3Access, Settings, redact_url
from options.errors import ArchiveError, ConfigError, NotStoredError
from options.store.archive_files import ARCHIVE_SCHEMA, ArchiveLocation, open_archive
from options.store.db import Limits, bounded_db_connection, looking_pool
from options.store.lifecycle import ARCHIVED, days_in

logger = logging.getLogger(__name__)

MARKET_TZ = ZoneInfo("America/New_York")

_UTC_US = pa.timestamp("us", tz="UTC")
# A read's columns are a day file's: snapshot_read's, in its order (strike_price a double, as
# the API sends strikes as JSON numbers).
READ_SCHEMA = ARCHIVE_SCHEMA
"""The columns of ``snapshot_read`` (migration 0005), in its order, as Arrow types."""
READ_COLUMNS: tuple[str, ...] = tuple(READ_SCHEMA.names)

CHAIN_ORDER = (
    ("expiration_date", "ascending"),
    ("strike_price", "ascending"),
    ("contract_type", "ascending"),
    ("ticker", "ascending"),
)
"""A chain's rows in the order of ``chain_at``."""
HISTORY_ORDER = (("captured_at", "ascending"), ("ticker", "ascending"))
DAY_ORDER = (("captured_at", "ascending"), *CHAIN_ORDER)

POSTGRESQL, ARCHIVE = "postgresql", "archive"


@dataclass(frozen=True)
class ChainRead:
    """A chain as it was stored at its slot.

    Attributes:
        underlying: the underlying as the data names it (``SPX`` for ``I:SPX``).
        at: the time asked for (``None``: the latest chain).
        captured_at: the slot: the latest complete one at or before ``at``.
        table: its rows (:data:`READ_SCHEMA`), in the order of ``chain_at``.
        source: :data:`POSTGRESQL` or :data:`ARCHIVE`.
    """

    underlying: str
    at: dt.datetime | None
    captured_at: dt.datetime
    table: pa.Table
    source: str


@dataclass(frozen=True)
class HistoryRead:
    """One contract's snapshots from ``start`` (included) to ``end`` (excluded), oldest first.

    Attributes:
        archived_days: the UTC days in the range read from the archive.
    """

    ticker: str
    start: dt.datetime
    end: dt.datetime
    table: pa.Table
    archived_days: tuple[dt.date, ...]


@dataclass(frozen=True)
class DayRead:
    """One underlying's complete chains of a time range (a day), oldest slot first."""

    underlying: str
    slots: tuple[dt.datetime, ...]
    table: pa.Table
    archived_days: tuple[dt.date, ...]


class Archive:
    """The Parquet tier as this module reads it: a day is every ``*.parquet`` file of its
    directory (:meth:`ArchiveLocation.day_dir`), except names starting with ``.`` or ``_``
    (a writer's temporary files), cast to :data:`READ_SCHEMA`.

    Args:
        location: where the dataset lives (:func:`options.store.archive_files.open_archive`).
    """

    def __init__(self, location: ArchiveLocation) -> None:
        self.location = location

    @classmethod
    def at(cls, url: str, *, s3: S3Access | None = None) -> Archive:
        """The archive at ``url``: a directory (relative ones from the working directory),
        ``file:///DIR``, or ``s3://BUCKET[/PREFIX]`` reached with ``s3``.

        Raises:
            ConfigError: another kind of URL.
            ArchiveError: the S3 bucket's region cannot be found.
        """
        parts = urlsplit(url)
        if parts.scheme == "s3":
            return cls(open_archive(url, s3=s3))
        if parts.scheme == "file" and not parts.netloc:
            url = parts.path
        elif parts.scheme:
            raise ConfigError(
                f"archive URL {redact_url(url)} is not supported: expected a directory, "
                "file:///DIR or s3://BUCKET[/PREFIX]",
                variable="ARCHIVE_URL",
            )
        return cls(open_archive(str(Path(url).resolve())))

    def read(self, day: dt.date, where: ds.Expression) -> pa.Table:
        """The rows of ``day`` that match ``where``, as :data:`READ_SCHEMA` (unsorted).

        Blocking I/O: call it in a thread.

        Raises:
            ArchiveError: the day has no file, a file cannot be read, or its columns are not
                those of ``snapshot_read``.
        """
        location = self.location
        path = location.day_dir(day)
        where_text = f"{location.dataset_url}/date={day.isoformat()}"
        try:
            selector = pafs.FileSelector(path, allow_not_found=True)
            files = [
                info.path
                for info in location.filesystem.get_file_info(selector)
                if info.type == pafs.FileType.File
                and info.base_name.endswith(".parquet")
                and not info.base_name.startswith((".", "_"))
            ]
            if not files:
                raise ArchiveError(
                    f"{day} is listed in archived_days but {where_text} has no Parquet file",
                    url=location.url,
                    day=day,
                )
            dataset = ds.dataset(sorted(files), filesystem=location.filesystem, format="parquet")
            table = dataset.to_table(columns=list(READ_COLUMNS), filter=where)
            return table.cast(READ_SCHEMA)
        except (OSError, pa.ArrowException) as exc:
            raise ArchiveError(
                f"cannot read {where_text}: {str(exc).splitlines()[0]}",
                url=location.url,
                day=day,
            ) from exc


class Reader:
    """Chains, contract histories and days of chains, from whichever tier holds them.

    Args:
        pool: the database's pool (the caller opens and closes it).
        archive: the Parquet tier, when one is configured; a read that needs it without one
            raises :class:`ConfigError`.
    """

    def __init__(self, pool: asyncpg.Pool, *, archive: Archive | None = None) -> None:
        self._pool = pool
        self._archive = archive

    async def chain(
        self,
        underlying: str,
        at: dt.datetime | None = None,
        *,
        expirations: Collection[dt.date] = (),
    ) -> ChainRead:
        """The chain of ``underlying`` at its latest complete slot at or before ``at``.

        Args:
            underlying: a validated underlying ticker (``I:SPX`` and ``SPX`` read the same).
            at: an aware time; ``None`` reads the latest complete chain.
            expirations: only these expirations (all when empty).

        Raises:
            NotStoredError: no complete chain of ``underlying`` at or before ``at``.
            ConfigError: the slot's day is archived and no archive is configured.
            ArchiveError, DatabaseError: a tier cannot be read.
        """
        key = underlying.removeprefix("I:")
        slot, archived, table = await _read_chain(self._pool, key, at)
        if slot is None:
            when = "stored" if at is None else f"at or before {market_time(at)}"
            raise NotStoredError(f"no complete chain of {key} {when}")
        if archived:
            where = (ds.field("captured_at") == pa.scalar(slot, _UTC_US)) & (
                ds.field("underlying_ticker") == key
            )
            table = await self._read_archive(utc_day(slot), where)
        assert table is not None
        if expirations:
            wanted = pa.array(sorted(expirations), pa.date32())
            table = table.filter(pc.is_in(table["expiration_date"], value_set=wanted))
        return ChainRead(
            key, at, slot, table.sort_by(list(CHAIN_ORDER)), ARCHIVE if archived else POSTGRESQL
        )

    async def history(self, ticker: str, start: dt.datetime, end: dt.datetime) -> HistoryRead:
        """The snapshots of contract ``ticker`` from ``start`` (included) to ``end`` (excluded),
        oldest first, archived days included.

        Raises:
            ConfigError: ``end`` is not after ``start``, or a day in the range is archived and
                no archive is configured.
            ArchiveError, DatabaseError: a tier cannot be read.
        """
        if end <= start:
            raise ConfigError(
                f"the range is empty: {market_time(end)} is not after {market_time(start)}"
            )
        table, archived = await _read_history(self._pool, ticker, start, end)
        parts = [table]
        for day in archived:
            where = (
                (ds.field("ticker") == ticker)
                & (ds.field("captured_at") >= pa.scalar(start, _UTC_US))
                & (ds.field("captured_at") < pa.scalar(end, _UTC_US))
            )
            parts.append(await self._read_archive(day, where))
        merged = pa.concat_tables(parts).sort_by(list(HISTORY_ORDER))
        return HistoryRead(ticker, start, end, merged, archived)

    async def complete_slots(
        self, start: dt.datetime, end: dt.datetime, underlyings: Collection[str] = ()
    ) -> dict[str, list[dt.datetime]]:
        """The complete slots in ``[start, end)`` per underlying (as the data names it), of
        ``underlyings`` or of all, oldest first."""
        keys = sorted({u.removeprefix("I:") for u in underlyings})
        return await _complete_slots(self._pool, start, end, keys)

    async def slots(self, underlying: str, slots: Sequence[dt.datetime]) -> DayRead:
        """The chains of ``underlying`` at each of ``slots`` (complete slots, as
        :meth:`complete_slots` gives them), in one table ordered by slot then chain order."""
        key = underlying.removeprefix("I:")
        table, archived = await _read_slots(self._pool, key, list(slots))
        parts = [table]
        for day in archived:
            on_day = [s for s in slots if utc_day(s) == day]
            where = (ds.field("underlying_ticker") == key) & ds.field("captured_at").isin(
                pa.array(on_day, _UTC_US)
            )
            parts.append(await self._read_archive(day, where))
        merged = pa.concat_tables(parts)
        return DayRead(key, tuple(slots), merged.sort_by(list(DAY_ORDER)), archived)

    async def _read_archive(self, day: dt.date, where: ds.Expression) -> pa.Table:
        if self._archive is None:
            raise ConfigError(
                f"the snapshots of {day} (UTC) are archived and dropped from PostgreSQL: set "
                "ARCHIVE_URL or pass --archive-url to read them",
                variable="ARCHIVE_URL",
            )
        logger.debug("Reading %s from the archive at %s", day, self._archive.location.url)
        return await asyncio.to_thread(self._archive.read, day, where)


@contextlib.asynccontextmanager
async def open_reader(
    settings: Settings, *, archive_url: str | None = None, application_name: str = "options_read"
) -> AsyncIterator[Reader]:
    """Open a one-connection pool on ``DATABASE_URL`` and yield a :class:`Reader` over it and
    the archive at ``archive_url`` (default: ``ARCHIVE_URL``, if set); close the pool at the
    end.

    Raises:
        ConfigError: ``DATABASE_URL`` is not set, or the archive URL is not one.
        ArchiveError: an S3 archive's region cannot be found.
        DatabaseError: the database cannot be reached.
    """
    url = archive_url or settings.archive_url
    archive = Archive.at(url, s3=settings.s3) if url else None
    async with looking_pool(
        settings.require_database_url(),
        location=settings.database_location(),
        limits=Limits(settings.db_statement_timeout, settings.db_lock_timeout),
        application_name=application_name,
    ) as pool:
        yield Reader(pool, archive=archive)


def utc_day(moment: dt.datetime) -> dt.date:
    """The UTC day of ``moment``: the day of its PostgreSQL partition and archive directory."""
    return moment.astimezone(dt.UTC).date()


def market_time(moment: dt.datetime) -> str:
    """``moment`` in New York time, for messages: ``2026-11-20 15:30:00 EST``."""
    return moment.astimezone(MARKET_TZ).strftime("%Y-%m-%d %H:%M:%S %Z")


def records_table(records: Sequence[asyncpg.Record]) -> pa.Table:
    """Rows of ``snapshot_read`` from asyncpg as an Arrow table with :data:`READ_SCHEMA`."""
    columns: dict[str, list[Any]] = {name: [r[name] for r in records] for name in READ_COLUMNS}
    columns["strike_price"] = [None if v is None else float(v) for v in columns["strike_price"]]
    return pa.Table.from_pydict(columns, schema=READ_SCHEMA)


# PostgreSQL: each read in one repeatable-read, read-only transaction, so the days it takes
# for dropped, the slot and the rows are of one moment.


def _reading(conn: asyncpg.Connection) -> Transaction:
    return conn.transaction(isolation="repeatable_read", readonly=True)


async def _dropped_days(
    conn: asyncpg.Connection, first: dt.date, last: dt.date
) -> tuple[dt.date, ...]:
    """The days in ``[first, last]`` that are archived (:mod:`options.store.lifecycle`; before
    that migration, those ``archived_days`` says were dropped; none before the archive's)."""
    if await conn.fetchval("SELECT to_regclass('stored_days') IS NOT NULL"):
        return tuple(await days_in(conn, ARCHIVED, first=first, last=last))
    if not await conn.fetchval("SELECT to_regclass('archived_days') IS NOT NULL"):
        return ()
    rows = await conn.fetch(
        "SELECT day FROM archived_days WHERE dropped_at IS NOT NULL AND day BETWEEN $1 AND $2 "
        "ORDER BY day",
        first,
        last,
    )
    return tuple(row["day"] for row in rows)


@bounded_db_connection("reading the chain of {underlying}")
async def _read_chain(
    conn: asyncpg.Connection, underlying: str, at: dt.datetime | None
) -> tuple[dt.datetime | None, bool, pa.Table | None]:
    """The slot, whether its day is archived, and (if not) its rows from PostgreSQL."""
    async with _reading(conn):
        slot = await conn.fetchval(
            "SELECT snapshot_slot_at($1, coalesce($2::timestamptz, 'infinity'))", underlying, at
        )
        if slot is None:
            return None, False, None
        if await _dropped_days(conn, utc_day(slot), utc_day(slot)):
            return slot, True, None
        records = await conn.fetch("SELECT * FROM chain_at($1, $2)", underlying, slot)
    return slot, False, records_table(records)


@bounded_db_connection("reading the history of {ticker}")
async def _read_history(
    conn: asyncpg.Connection, ticker: str, start: dt.datetime, end: dt.datetime
) -> tuple[pa.Table, tuple[dt.date, ...]]:
    """PostgreSQL's rows of the range on days not dropped, and the dropped days."""
    last = end - dt.timedelta(microseconds=1)
    async with _reading(conn):
        archived = await _dropped_days(conn, utc_day(start), utc_day(last))
        records = await conn.fetch("SELECT * FROM contract_history($1, $2, $3)", ticker, start, end)
    kept = [r for r in records if utc_day(r["captured_at"]) not in archived]
    return records_table(kept), archived


@bounded_db_connection("finding the complete slots of {keys}")
async def _complete_slots(
    conn: asyncpg.Connection, start: dt.datetime, end: dt.datetime, keys: list[str]
) -> dict[str, list[dt.datetime]]:
    rows = await conn.fetch(
        """
        SELECT underlying_ticker, captured_at FROM snapshot_coverage
        WHERE complete AND captured_at >= $1 AND captured_at < $2
          AND (cardinality($3::text[]) = 0 OR underlying_ticker = ANY($3::text[]))
        ORDER BY underlying_ticker, captured_at
        """,
        start,
        end,
        keys,
    )
    slots: dict[str, list[dt.datetime]] = {}
    for row in rows:
        slots.setdefault(row["underlying_ticker"], []).append(row["captured_at"])
    return slots


@bounded_db_connection("reading the slots of {underlying}")
async def _read_slots(
    conn: asyncpg.Connection, underlying: str, slots: list[dt.datetime]
) -> tuple[pa.Table, tuple[dt.date, ...]]:
    """PostgreSQL's chains of the slots on days not dropped, and the dropped days."""
    if not slots:
        return records_table([]), ()
    async with _reading(conn):
        days = sorted({utc_day(s) for s in slots})
        archived = tuple(d for d in await _dropped_days(conn, days[0], days[-1]) if d in set(days))
        records: list[asyncpg.Record] = []
        for slot in slots:
            if utc_day(slot) not in archived:
                records += await conn.fetch("SELECT * FROM chain_at($1, $2)", underlying, slot)
    return records_table(records), archived
