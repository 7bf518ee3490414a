"""The tables that go with a day into the archive, beside its snapshots (its companions): what
was derived from them or recorded about them, so that the archive alone rebuilds every read
(the greeks a snapshot lacked, which slots were complete, the daily rows and their sources).

One directory per dataset under ``ARCHIVE_URL``, hive-partitioned by day like the snapshots'
(``<ARCHIVE_URL>/<dataset>/date=YYYY-MM-DD/part-0.parquet``), each file written, read back and
verified value by value, and published like a day of snapshots
(:mod:`options.store.archive_writer`), and recorded in ``archived_files``:

============================  =====================  ==========================================
dataset                       rows of day D          after the day is archived
============================  =====================  ==========================================
``computed_greeks``           the slots of D (UTC)   moved: deleted from PostgreSQL with the day
``greeks_slots``              the slots of D         copied: PostgreSQL keeps them
``snapshot_coverage``         the slots of D         copied (``chain_at`` and status use them)
``contract_days``             the session D          copied (the daily table stays queryable)
``daily_coverage``            the session D          copied
``daily_listings``            the session D          copied (backfill)
``listed_contracts``          the session D          copied (backfill)
============================  =====================  ==========================================

The moved table's rows of a day are exported while the day is being archived (no write reaches
it then: :mod:`options.store.lifecycle`) and deleted, after a count against the file's record,
in the transaction that drops the day's partition; they are never exported again. A copied
table's rows of an archived day may still change in PostgreSQL (a backfill of an underlying
added later, a coverage row's reason): triggers note the day in ``archive_pending``, and the next
archive run writes that copy again, verified, before it replaces the old one
(:func:`archive_pending_copies`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Final

import asyncpg
import pyarrow as pa

from options.errors import ArchiveError
from options.store.archive_digest import Digest
from options.store.archive_files import ArchiveLocation, Dataset, read_digest, remove_file
from options.store.archive_writer import clean_staging, export_day, postgres_digest

logger = logging.getLogger(__name__)

_UTC_US = pa.timestamp("us", tz="UTC")
_WRITER: Final = {"compression": "zstd", "compression_level": 9, "write_statistics": True}

_TYPES: Final = {
    "text": pa.string(),
    "timestamptz": _UTC_US,
    "float8": pa.float64(),
    "int8": pa.int64(),
    "int4": pa.int32(),
    "bool": pa.bool_(),
    "date": pa.date32(),
}


def _schema(columns: str) -> pa.Schema:
    """``name type`` pairs, one per line, as a schema."""
    fields = []
    for line in columns.strip().splitlines():
        name, kind = line.split()
        fields.append(pa.field(name, _TYPES[kind]))
    return pa.schema(fields)


@dataclass(frozen=True)
class Companion:
    """A table whose rows of a day go to the archive with the day.

    Attributes:
        dataset: its files' name, columns and order.
        table: the PostgreSQL table.
        by_slot: its rows belong to a day by ``captured_at`` (else by ``session``).
        moved: its rows of the day are deleted from PostgreSQL once archived.
    """

    dataset: Dataset
    table: str
    by_slot: bool
    moved: bool

    @property
    def where(self) -> str:
        """The day's rows: ``$1`` and ``$2`` bound ``captured_at`` (epoch microseconds), ``$3``
        is the session."""
        if self.by_slot:
            return "captured_at >= $1 AND captured_at < $2 AND $3::date IS NOT NULL"
        return "session = $3 AND $1::timestamptz IS NOT NULL AND $2::timestamptz IS NOT NULL"

    @property
    def export_sql(self) -> str:
        """The day's rows in the dataset's columns and order."""
        names = ", ".join(self.dataset.schema.names)
        order = ", ".join(
            f'{name} COLLATE "C"' if self.dataset.schema.field(name).type == pa.string() else name
            for name in self.dataset.sort_key
        )
        return f"SELECT {names} FROM {self.table} WHERE {self.where} ORDER BY {order}"


def _companion(
    table: str, columns: str, key: tuple[str, ...], *, by_slot: bool, moved: bool = False
) -> Companion:
    return Companion(Dataset(table, _schema(columns), key, _WRITER), table, by_slot, moved)


COMPANIONS: Final = (
    _companion(
        "computed_greeks",
        """
        ticker text
        captured_at timestamptz
        implied_volatility float8
        delta float8
        gamma float8
        theta float8
        vega float8
        reason text
        model text
        rate float8
        dividend_yield float8
        years float8
        computed_at timestamptz
        """,
        ("ticker", "captured_at"),
        by_slot=True,
        moved=True,
    ),
    _companion(
        "greeks_slots",
        """
        captured_at timestamptz
        computed int4
        not_computed int4
        computed_at timestamptz
        reason text
        """,
        ("captured_at",),
        by_slot=True,
    ),
    _companion(
        "snapshot_coverage",
        """
        captured_at timestamptz
        underlying_ticker text
        requested_ticker text
        run_id int8
        contracts_active int4
        snapshots_stored int4
        contracts_missing int4
        complete bool
        pages int4
        error text
        rows_rejected int4
        read_to_end bool
        committed_at timestamptz
        crossed_quotes int4
        negative_prices int4
        iv_out_of_range int4
        negative_open_interest int4
        stale_quotes int4
        greeks_missing int4
        """,
        ("captured_at", "underlying_ticker"),
        by_slot=True,
    ),
    _companion(
        "contract_days",
        """
        ticker text
        session date
        underlying_ticker text
        open_interest int8
        oi_source text
        oi_captured_at timestamptz
        close_captured_at timestamptz
        bid float8
        ask float8
        midpoint float8
        last_price float8
        last_trade_at timestamptz
        implied_volatility float8
        delta float8
        gamma float8
        theta float8
        vega float8
        underlying_price float8
        greeks_source text
        day_open float8
        day_high float8
        day_low float8
        day_close float8
        day_volume int8
        day_vwap float8
        day_trades int4
        bar_source text
        built_at timestamptz
        """,
        ("ticker",),
        by_slot=False,
    ),
    _companion(
        "daily_coverage",
        """
        underlying_ticker text
        session date
        run_id int8
        close_captured_at timestamptz
        oi_captured_at timestamptz
        contracts int4
        complete bool
        reason text
        source text
        built_at timestamptz
        """,
        ("underlying_ticker",),
        by_slot=False,
    ),
    _companion(
        "daily_listings",
        """
        underlying_ticker text
        session date
        contracts int4
        listed_at timestamptz
        """,
        ("underlying_ticker",),
        by_slot=False,
    ),
    _companion(
        "listed_contracts",
        """
        underlying_ticker text
        session date
        ticker text
        """,
        ("underlying_ticker", "ticker"),
        by_slot=False,
    ),
)
"""Every table that goes with a day, in the order they are archived."""


def day_arguments(day: dt.date) -> tuple[int, int, dt.date]:
    """The arguments of :attr:`Companion.export_sql` for ``day``."""
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    micros = (start - epoch) // dt.timedelta(microseconds=1)
    return micros, micros + 86_400_000_000, day


MOVED: Final = tuple(c for c in COMPANIONS if c.moved)
COPIED: Final = tuple(c for c in COMPANIONS if not c.moved)
BY_NAME: Final = {c.dataset.name: c for c in COMPANIONS}


class CompanionsStopped(Exception):
    """``stop`` was set while a companion's file was being written (it was given up)."""


async def archive_companions(
    conn: asyncpg.Connection,
    location: ArchiveLocation,
    day: dt.date,
    companions: tuple[Companion, ...] = COMPANIONS,
    *,
    stop: asyncio.Event | None = None,
) -> int:
    """Make sure each of ``companions``' file of ``day`` is in place, holds exactly
    PostgreSQL's rows of the day, and is recorded in ``archived_files``; returns the bytes of
    the files. A file recorded and equal to PostgreSQL's rows is kept; any other is written
    again (verified before it replaces the old one).

    Raises:
        ArchiveError: a file cannot be written, read back or moved into place.
        CompanionsStopped: ``stop`` was set; what was written before stays recorded.
    """
    total = 0
    for companion in companions:
        size = await _archive_companion(conn, location, companion, day, stop)
        total += size or 0
    return total


async def _archive_companion(
    conn: asyncpg.Connection,
    location: ArchiveLocation,
    companion: Companion,
    day: dt.date,
    stop: asyncio.Event | None,
) -> int | None:
    dataset = companion.dataset
    await asyncio.to_thread(clean_staging, location, dataset, day)
    args = day_arguments(day)
    expected = await postgres_digest(conn, dataset, companion.export_sql, *args)
    record = await conn.fetchrow(
        "SELECT * FROM archived_files WHERE day = $1 AND dataset = $2", day, dataset.name
    )
    if (
        record is not None
        and record["url"] == location.day_url(day, dataset)
        and Digest(record["rows"], record["checksum"]) == expected
    ):
        if not expected.rows:
            return None
        try:
            found = await asyncio.to_thread(
                read_digest, location, location.day_file(day, dataset), dataset
            )
        except ArchiveError as exc:
            logger.warning("Archive: %s; writing it again", exc)
            found = None
        if found is not None and found[0] == expected:
            return found[1]
    written = await export_day(conn, location, dataset, day, companion.export_sql, *args, stop=stop)
    if written is None:
        raise CompanionsStopped
    digest, size = written
    if size is None:
        # no rows: a file of an earlier copy no longer describes them
        await asyncio.to_thread(remove_file, location, location.day_file(day, dataset))
    await conn.execute(
        """
        INSERT INTO archived_files (day, dataset, url, rows, bytes, checksum, archived_at)
        VALUES ($1, $2, $3, $4, $5, $6, now())
        ON CONFLICT (day, dataset) DO UPDATE SET url = EXCLUDED.url, rows = EXCLUDED.rows,
            bytes = EXCLUDED.bytes, checksum = EXCLUDED.checksum,
            archived_at = EXCLUDED.archived_at
        """,
        day,
        dataset.name,
        location.day_url(day, dataset),
        digest.rows,
        size,
        digest.checksum,
    )
    if digest.rows:
        logger.info(
            "Archived %s of %s: %d rows, %d bytes", dataset.name, day, digest.rows, size or 0
        )
    return size


async def delete_moved(conn: asyncpg.Connection, day: dt.date) -> None:
    """In the transaction that drops ``day``'s partition: delete the moved tables' rows of the
    day, each after a count against its file's record.

    Raises:
        ArchiveError: PostgreSQL holds other rows than the file recorded (nothing is deleted:
            the caller's transaction is to be rolled back).
    """
    for companion in MOVED:
        recorded = await conn.fetchval(
            "SELECT rows FROM archived_files WHERE day = $1 AND dataset = $2",
            day,
            companion.dataset.name,
        )
        args = day_arguments(day)
        held = await conn.fetchval(
            f"SELECT count(*) FROM {companion.table} WHERE {companion.where}", *_plain(args)
        )
        if recorded is None or recorded != held:
            raise ArchiveError(
                f"{day}: {companion.table} holds {held} rows of the day, its archived file "
                f"{'none' if recorded is None else recorded}: the day is archived again",
                day=day,
            )
        await conn.execute(f"DELETE FROM {companion.table} WHERE {companion.where}", *_plain(args))


async def archive_pending_copies(
    conn: asyncpg.Connection, location: ArchiveLocation, *, stop: asyncio.Event | None = None
) -> int:
    """Write again the copies of archived days whose rows changed in PostgreSQL since
    (``archive_pending``); returns how many were written. A change made while one was being
    written leaves it pending for the next run.

    Raises:
        ArchiveError: a file cannot be written, read back or moved into place.
    """
    done = 0
    pending = await conn.fetch(
        """
        SELECT p.day, p.dataset, p.since FROM archive_pending p
        JOIN stored_days d ON d.day = p.day AND d.tier = 'archived'
        ORDER BY p.day, p.dataset
        """
    )
    for row in pending:
        if stop is not None and stop.is_set():
            break
        companion = BY_NAME.get(row["dataset"])
        if companion is None or companion.moved:
            continue
        try:
            await _archive_companion(conn, location, companion, row["day"], stop)
        except CompanionsStopped:
            break
        await conn.execute(
            "DELETE FROM archive_pending WHERE day = $1 AND dataset = $2 AND since = $3",
            row["day"],
            row["dataset"],
            row["since"],
        )
        done += 1
    return done


def _plain(args: tuple[int, int, dt.date]) -> tuple[dt.datetime, dt.datetime, dt.date]:
    """:func:`day_arguments` for a connection without the epoch-microseconds codec."""
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (
        epoch + dt.timedelta(microseconds=args[0]),
        epoch + dt.timedelta(microseconds=args[1]),
        args[2],
    )
