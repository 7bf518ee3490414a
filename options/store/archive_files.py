"""The archive's Parquet files: where they live, their columns and encodings, a day written row
group by row group, and a file read back into its row count and key checksum.

**Where.** One dataset, hive-partitioned by the UTC day of ``captured_at`` (the day of the
PostgreSQL partition it came from)::

    <ARCHIVE_URL>/option_snapshots/date=2026-11-20/part-0.parquet

``ARCHIVE_URL`` is a local directory or ``s3://BUCKET[/PREFIX]`` of any S3-compatible store,
reached through :mod:`pyarrow.fs` with the standard ``AWS_*`` settings (:class:`S3Access`).
DuckDB (``read_parquet('<url>/option_snapshots/*/*.parquet', hive_partitioning = true)``),
pandas, Spark and Trino read it as it is. A local file is written under a hidden temporary name
in its day's directory (dataset readers skip names starting with ``.``) and renamed into place;
on S3 an object appears whole when its upload completes, so it is written under its own name.

**Columns.** Exactly those of the ``snapshot_read`` type (migration 0005), in its order and with
its types, except ``strike_price``: a double, which gives back each strike as the API sent it (a
JSON number), where a ``numeric`` would need a scale chosen for every future contract. Rows are
sorted by underlying, ticker and time, so each contract's day is one run: its constant columns
collapse to run lengths and its changing ones sit next to their neighbours for zstd.

**Checksum.** Of the key columns ``(ticker, captured_at)``, computed the same way in SQL
(:data:`KEY_DIGEST_SQL`) and from a file (:class:`KeyChecksum`), and independent of row order:
the sum, modulo 2**64, over the rows of ``h(ticker) * h(microseconds since the epoch as decimal
text)``, where ``h`` is the first 8 bytes of the MD5 of the text, big-endian. Each product is
taken modulo 2**64, so a signed reading of the 8 bytes (PostgreSQL's ``bigint``) gives the same
sum as an unsigned one (numpy's, Arrow's). A missing, extra, duplicated or altered key changes
it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from options.config import S3Access, Settings
from options.errors import ArchiveError

ARCHIVE_DATASET = "option_snapshots"
"""The dataset's directory under ``ARCHIVE_URL``."""
DAY_FILE = "part-0.parquet"
TEMPORARY_FILE = f".{DAY_FILE}.tmp"
ROW_GROUP_ROWS = 131_072  # ~40 MB of Arrow columns held before each row group is written
READ_BATCH_ROWS = 262_144
S3_CONNECT_TIMEOUT = 10.0
S3_REQUEST_TIMEOUT = 120.0  # one part of a multipart upload on a slow link
CHECKSUM_VERSION = "k1"
"""Names the checksum's definition in ``archived_days.checksum`` (``k1:<16 hex digits>``)."""

_UTC_US = pa.timestamp("us", tz="UTC")
ARCHIVE_SCHEMA = pa.schema(
    [
        ("captured_at", _UTC_US),
        ("underlying_ticker", pa.string()),
        ("ticker", pa.string()),
        ("contract_type", pa.string()),
        ("expiration_date", pa.date32()),
        ("strike_price", pa.float64()),
        ("bid", pa.float64()),
        ("bid_size", pa.int64()),
        ("ask", pa.float64()),
        ("ask_size", pa.int64()),
        ("midpoint", pa.float64()),
        ("quote_updated_at", _UTC_US),
        ("last_price", pa.float64()),
        ("last_size", pa.int64()),
        ("last_trade_at", _UTC_US),
        ("day_open", pa.float64()),
        ("day_high", pa.float64()),
        ("day_low", pa.float64()),
        ("day_close", pa.float64()),
        ("day_volume", pa.int64()),
        ("day_vwap", pa.float64()),
        ("day_change", pa.float64()),
        ("day_change_percent", pa.float64()),
        ("day_previous_close", pa.float64()),
        ("implied_volatility", pa.float64()),
        ("delta", pa.float64()),
        ("gamma", pa.float64()),
        ("theta", pa.float64()),
        ("vega", pa.float64()),
        ("open_interest", pa.int64()),
        ("break_even_price", pa.float64()),
        ("underlying_price", pa.float64()),
        ("fmv", pa.float64()),
    ]
)
"""A day file's columns: ``snapshot_read``'s, in its order (``strike_price`` a double)."""
SORT_KEY = ("underlying_ticker", "ticker", "captured_at")

# Measured column by column on the simulator's day (benchmarks/bench_archive.py): model outputs
# with every bit of a double (greeks, IV) cost least split into byte streams (their sign,
# exponent and high mantissa bytes repeat along a contract's day); a vwap or a percentage with
# many distinct values, least plain; counts and timestamps that grow along a contract's day,
# least as deltas; the rest (names, dates, prices in cents, sizes) least as dictionaries, whose
# indices run-length encode along a contract.
_BYTE_STREAM_SPLIT = ("implied_volatility", "delta", "gamma", "theta", "vega")
_DELTA = ("quote_updated_at", "last_trade_at", "day_volume")
_PLAIN = ("day_vwap", "day_change_percent")
_ENCODINGS = {
    **dict.fromkeys(_BYTE_STREAM_SPLIT, "BYTE_STREAM_SPLIT"),
    **dict.fromkeys(_DELTA, "DELTA_BINARY_PACKED"),
    **dict.fromkeys(_PLAIN, "PLAIN"),
}
WRITER_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 9,
    "use_dictionary": [name for name in ARCHIVE_SCHEMA.names if name not in _ENCODINGS],
    "column_encoding": _ENCODINGS,
    "write_statistics": True,
    "sorting_columns": [
        pq.SortingColumn(ARCHIVE_SCHEMA.get_field_index(name)) for name in SORT_KEY
    ],
}

KEY_DIGEST_SQL = """
    SELECT coalesce(sum(n), 0)::bigint AS rows, coalesce(sum(s * g), 0) AS total
    FROM (
        SELECT count(*) AS n,
               -- sum(bigint) adds in 128 bits: exact
               sum(('x' || left(md5(ticker), 16))::bit(64)::bigint) AS s,
               ('x' || left(md5(
                   (extract(epoch FROM captured_at) * 1000000)::bigint::text), 16)
               )::bit(64)::bigint::numeric AS g
        FROM snapshot_reads
        WHERE captured_at >= $1 AND captured_at < $2
        GROUP BY captured_at
    ) AS slots
"""
"""The row count and checksum total (take it modulo 2**64) of the snapshots in ``[$1, $2)``."""


@dataclass(frozen=True)
class Digest:
    """A day's row count and key checksum, of a file or of PostgreSQL's rows."""

    rows: int
    checksum: str


def checksum_text(total: int) -> str:
    """The checksum as ``archived_days`` keeps it, from a sum of any size or sign."""
    return f"{CHECKSUM_VERSION}:{total % 2**64:016x}"


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.md5(text.encode(), usedforsecurity=False).digest()[:8], "big")


class KeyChecksum:
    """The key checksum of batches of rows, added up batch by batch (any order).

    Each distinct ticker and time is hashed once per batch; the products and their sum are
    Arrow's, on unsigned 64-bit integers, which wrap around as the definition wants.
    """

    def __init__(self) -> None:
        self.rows = 0
        self._total = 0

    def add(self, tickers: pa.Array, captured_at: pa.Array) -> None:
        """Add the rows whose keys are ``tickers`` (strings, or a dictionary of them) and
        ``captured_at`` (timestamps in microseconds).

        Raises:
            ArchiveError: a key is null (a file that is not one of ours, or damaged).
        """
        if tickers.null_count or captured_at.null_count:
            raise ArchiveError("a row has no ticker or no captured_at")
        if not pa.types.is_dictionary(tickers.type):
            tickers = pc.dictionary_encode(tickers)
        names = pa.array([_h64(name) for name in tickers.dictionary.to_pylist()], pa.uint64())
        micros = captured_at.cast(pa.int64())
        moments = pc.unique(micros)
        stamps = pa.array([_h64(str(us)) for us in moments.to_pylist()], pa.uint64())
        product = pc.multiply(
            pc.take(names, tickers.indices), pc.take(stamps, pc.index_in(micros, moments))
        )
        self._total = (self._total + (pc.sum(product).as_py() or 0)) % 2**64
        self.rows += len(tickers)

    @property
    def digest(self) -> Digest:
        """The rows added so far, and their checksum."""
        return Digest(self.rows, checksum_text(self._total))


@dataclass(frozen=True, eq=False)
class ArchiveLocation:
    """Where the dataset lives, and the :mod:`pyarrow.fs` filesystem that reaches it.

    Attributes:
        url: ``ARCHIVE_URL`` as the settings normalized it (never with credentials).
        filesystem: a local or an S3 filesystem.
        root: the dataset's path on ``filesystem``: ``<directory>/option_snapshots`` or
            ``<bucket>/<prefix>/option_snapshots``.
    """

    url: str
    filesystem: pafs.FileSystem
    root: str

    @property
    def is_local(self) -> bool:
        """The archive is a local directory (files are renamed into place and synced)."""
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def dataset_url(self) -> str:
        """The dataset's URL, for DuckDB and people: ``<ARCHIVE_URL>/option_snapshots``."""
        return f"{self.url.rstrip('/')}/{ARCHIVE_DATASET}"

    def day_dir(self, day: dt.date) -> str:
        """The directory of ``day``'s file on :attr:`filesystem`."""
        return f"{self.root}/date={day.isoformat()}"

    def day_file(self, day: dt.date) -> str:
        """``day``'s file on :attr:`filesystem`."""
        return f"{self.day_dir(day)}/{DAY_FILE}"

    def day_url(self, day: dt.date) -> str:
        """``day``'s file as a URL (what ``archived_days.url`` records)."""
        return f"{self.dataset_url}/date={day.isoformat()}/{DAY_FILE}"

    def dataset(self) -> ds.Dataset:
        """The whole dataset, its ``date`` column typed from the directory names.

        Raises:
            ArchiveError: the dataset cannot be listed (no day archived yet, no access).
        """
        try:
            return ds.dataset(
                self.root,
                filesystem=self.filesystem,
                format="parquet",
                partitioning=ds.partitioning(pa.schema([("date", pa.date32())]), flavor="hive"),
            )
        except (OSError, pa.ArrowException) as exc:
            raise ArchiveError(
                f"cannot list {self.dataset_url}: {_first_line(exc)}", url=self.url
            ) from exc


def archive_location(settings: Settings) -> ArchiveLocation | None:
    """The archive ``ARCHIVE_URL`` names, reached with the settings' ``AWS_*`` values; ``None``
    when no archive is set. Readers of archived days call this too.

    Raises:
        ArchiveError: the S3 bucket's region cannot be found (no region and no endpoint set).
    """
    if settings.archive_url is None:
        return None
    return open_archive(settings.archive_url, s3=settings.s3)


def open_archive(url: str, *, s3: S3Access | None = None) -> ArchiveLocation:
    """The archive at ``url``: an absolute directory or ``s3://BUCKET[/PREFIX]``, as
    :class:`~options.config.Settings` normalizes ``ARCHIVE_URL``. Nothing is written yet.

    Raises:
        ArchiveError: the S3 bucket's region cannot be found (no region and no endpoint set).
    """
    if not url.startswith("s3://"):
        return ArchiveLocation(url, pafs.LocalFileSystem(), f"{url.rstrip('/')}/{ARCHIVE_DATASET}")
    s3 = s3 or S3Access()
    bucket_and_prefix = url.removeprefix("s3://").strip("/")
    options: dict[str, Any] = {
        "connect_timeout": S3_CONNECT_TIMEOUT,
        "request_timeout": S3_REQUEST_TIMEOUT,
    }
    if s3.access_key_id is not None and s3.secret_access_key is not None:
        options["access_key"] = s3.access_key_id.get()
        options["secret_key"] = s3.secret_access_key.get()
        if s3.session_token is not None:
            options["session_token"] = s3.session_token.get()
    if s3.endpoint_url is not None:
        endpoint = urlsplit(s3.endpoint_url)
        options["endpoint_override"] = endpoint.netloc
        options["scheme"] = endpoint.scheme
        options["region"] = s3.region or "us-east-1"
    elif s3.region is not None:
        options["region"] = s3.region
    else:
        bucket = bucket_and_prefix.split("/", 1)[0]
        try:
            options["region"] = pafs.resolve_s3_region(bucket)
        except (OSError, pa.ArrowException) as exc:
            raise ArchiveError(
                f"cannot find the region of bucket {bucket}: {_first_line(exc)} (set AWS_REGION)",
                url=url,
            ) from exc
    return ArchiveLocation(
        url, pafs.S3FileSystem(**options), f"{bucket_and_prefix}/{ARCHIVE_DATASET}"
    )


def records_batch(records: Sequence[Sequence[Any]]) -> pa.RecordBatch:
    """Rows in :data:`ARCHIVE_SCHEMA`'s order (timestamps as microseconds since the epoch) as
    one record batch.

    Raises:
        ArchiveError: a value does not fit its column.
    """
    columns = list(zip(*records, strict=True))
    try:
        arrays = [
            pa.array(column, type=field.type)
            for column, field in zip(columns, ARCHIVE_SCHEMA, strict=True)
        ]
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise ArchiveError(f"a row cannot be written to Parquet: {_first_line(exc)}") from exc
    return pa.RecordBatch.from_arrays(arrays, schema=ARCHIVE_SCHEMA)


class DayFileWriter:
    """One day's file, written a row group at a time: :meth:`add` rows, then :meth:`close`.

    Blocking I/O: call it from a thread.
    """

    def __init__(self, location: ArchiveLocation, path: str) -> None:
        self._location = location
        self.path = path
        self.rows = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        try:
            location.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
            self._sink = location.filesystem.open_output_stream(path)
            self._writer = pq.ParquetWriter(self._sink, ARCHIVE_SCHEMA, **WRITER_OPTIONS)
        except (OSError, pa.ArrowException) as exc:
            raise ArchiveError(
                f"cannot write {path}: {_first_line(exc)}", url=location.url
            ) from exc

    def add(self, records: Sequence[Sequence[Any]]) -> None:
        """Add rows (in :data:`SORT_KEY` order, after those added before).

        Raises:
            ArchiveError: a value does not fit its column, or the file cannot be written.
        """
        batch = records_batch(records)
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self.rows += batch.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def close(self) -> None:
        """Write what is left and the footer, and close the file (on S3: complete the upload).

        Raises:
            ArchiveError: the file cannot be written.
        """
        self._flush()
        try:
            self._writer.close()
            self._sink.close()
        except (OSError, pa.ArrowException) as exc:
            raise ArchiveError(
                f"cannot write {self.path}: {_first_line(exc)}", url=self._location.url
            ) from exc
        if self._location.is_local:
            _fsync(self.path)

    def abandon(self) -> None:
        """Give the file up after a failure: close what is open, and remove it (best effort;
        a file left behind fails its verification, and a rerun writes it again)."""
        with contextlib.suppress(OSError, pa.ArrowException):
            self._writer.close()
        with contextlib.suppress(OSError, pa.ArrowException):
            self._sink.close()
        remove_file(self._location, self.path)

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=ARCHIVE_SCHEMA)
        self._pending, self._pending_rows = [], 0
        try:
            self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        except (OSError, pa.ArrowException) as exc:
            raise ArchiveError(
                f"cannot write {self.path}: {_first_line(exc)}", url=self._location.url
            ) from exc


def read_digest(location: ArchiveLocation, path: str) -> tuple[Digest, int] | None:
    """Read the file at ``path`` back: its row count and key checksum, and its size in bytes;
    ``None`` when there is no such file.

    Blocking I/O: call it from a thread.

    Raises:
        ArchiveError: the file cannot be read whole (truncated, damaged, not Parquet, no
            access), or lacks the key columns.
    """
    fs = location.filesystem
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return None
        checksum = KeyChecksum()
        with fs.open_input_file(path) as source:
            parquet = pq.ParquetFile(source, read_dictionary=["ticker"])
            for batch in parquet.iter_batches(
                batch_size=READ_BATCH_ROWS, columns=["ticker", "captured_at"]
            ):
                checksum.add(batch.column(0), batch.column(1))
            if checksum.rows != parquet.metadata.num_rows:
                raise ArchiveError(f"{path} reads {checksum.rows} of its rows")
    except (OSError, pa.ArrowException, KeyError) as exc:
        raise ArchiveError(f"cannot read {path}: {_first_line(exc)}", url=location.url) from exc
    return checksum.digest, info.size


def file_size(location: ArchiveLocation, path: str) -> int | None:
    """The size of the file at ``path``; ``None`` when there is none.

    Raises:
        ArchiveError: the archive cannot be reached.
    """
    try:
        info = location.filesystem.get_file_info(path)
    except (OSError, pa.ArrowException) as exc:
        raise ArchiveError(f"cannot read {path}: {_first_line(exc)}", url=location.url) from exc
    return info.size if info.type == pafs.FileType.File else None


def remove_file(location: ArchiveLocation, path: str) -> None:
    """Remove the file at ``path`` if it is there (best effort: a file left behind is found
    unverified, and written again)."""
    with contextlib.suppress(OSError, pa.ArrowException):
        location.filesystem.delete_file(path)


def publish(location: ArchiveLocation, written: str, day: dt.date) -> None:
    """Move a verified temporary file into its day's place (local archives only: S3 objects
    are written under their own name), durably.

    Raises:
        ArchiveError: the file cannot be moved.
    """
    final = location.day_file(day)
    if written == final:
        return
    try:
        location.filesystem.move(written, final)
    except OSError as exc:
        raise ArchiveError(
            f"cannot move {written} to {final}: {_first_line(exc)}", url=location.url
        ) from exc
    # the rename, and the day's directory if it is new
    _fsync(location.day_dir(day))
    _fsync(location.root)


def written_path(location: ArchiveLocation, day: dt.date) -> str:
    """Where a day's file is written before it is verified: a hidden temporary name beside
    its place in a directory, its own name on S3."""
    if location.is_local:
        return f"{location.day_dir(day)}/{TEMPORARY_FILE}"
    return location.day_file(day)


def _fsync(path: str) -> None:
    """Flush a local file or directory to the disk: its partition is dropped after this."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
