"""The archive's Parquet files: where they live, the datasets and their columns and encodings,
and a file read back into its row count and digest.

**Where.** One directory of day files per dataset under ``ARCHIVE_URL``, hive-partitioned by
the UTC day (for snapshots, the day of ``captured_at``: of the PostgreSQL partition it came
from)::

    <ARCHIVE_URL>/option_snapshots/date=2026-11-20/part-0.parquet

``ARCHIVE_URL`` is a local directory or ``s3://BUCKET[/PREFIX]`` of any S3-compatible store,
reached through :mod:`pyarrow.fs` with the standard ``AWS_*`` settings (:class:`S3Access`).
DuckDB (``read_parquet('<url>/option_snapshots/*/*.parquet', hive_partitioning = true)``),
pandas, Spark and Trino read a dataset as it is. A file is written and verified under
``<ARCHIVE_URL>/.staging/<dataset>/date=.../`` first, outside every dataset's directory, and
only then moved into place (:mod:`options.store.archive_writer`): a reader of a dataset never
sees a file being written.

**Datasets.** A :class:`Dataset` names a directory, its Arrow schema, its sort key and its
writer options; the writing, the digest, the staging and the publishing take one, so a day can
hold several datasets. :data:`SNAPSHOTS` is the snapshots' one.

**Columns.** The snapshots' are exactly those of the ``snapshot_read`` type (migration 0005),
in its order and with its types, except ``strike_price``: a double, which gives back each
strike as the API sent it (a JSON number), where a ``numeric`` would need a scale chosen for
every future contract. Rows are sorted by underlying, ticker and time, so each contract's day
is one run: its constant columns collapse to run lengths and its changing ones sit next to
their neighbours for zstd.

**Digest.** Of every value of every row (:mod:`options.store.archive_digest`): computed from
the rows as PostgreSQL gave them while they are written, and again from the file as read back
from its storage (:func:`read_digest`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from options.config import S3Access, Settings
from options.errors import ArchiveError
from options.store.archive_digest import Digest, TableDigest

ARCHIVE_DATASET = "option_snapshots"
"""The snapshots' directory under ``ARCHIVE_URL``."""
DAY_FILE = "part-0.parquet"
STAGING_DIR = ".staging"
"""Where files are written and verified, under ``ARCHIVE_URL``: outside every dataset."""
LEGACY_TEMPORARY_FILE = f".{DAY_FILE}.tmp"  # earlier versions wrote here, in the day's dir
ROW_GROUP_ROWS = 131_072  # ~40 MB of Arrow columns held before each row group is written
# Reading a file back holds a batch and a buffered part of each column chunk, not row groups
READ_BATCH_ROWS = 16_384
READ_BUFFER_BYTES = 1 << 20
S3_CONNECT_TIMEOUT = 10.0
S3_REQUEST_TIMEOUT = 120.0  # one part of a multipart upload on a slow link

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


@dataclass(frozen=True, eq=False)
class Dataset:
    """One dataset of the archive: a directory of day files under ``ARCHIVE_URL``, each with
    the same columns.

    Attributes:
        name: its directory under ``ARCHIVE_URL`` (and under its staging directory).
        schema: the columns of every file, in order; each must have a digest
            (:class:`~options.store.archive_digest.TableDigest`).
        sort_key: the columns a day's rows are sorted by, as they are written. The digest
            follows the rows' order, so a key that orders the rows fully lets a day's digest be
            computed again from PostgreSQL (a key that leaves ties only costs a day written
            again when an interrupted run is resumed).
        writer_options: :class:`pyarrow.parquet.ParquetWriter`'s keyword arguments.
        row_group_rows: rows held before a row group is written.
    """

    name: str
    schema: pa.Schema
    sort_key: tuple[str, ...]
    writer_options: Mapping[str, Any] = field(default_factory=dict)
    row_group_rows: int = ROW_GROUP_ROWS

    def __post_init__(self) -> None:
        TableDigest(self.schema)  # raises TypeError for a column without a digest
        if missing := [name for name in self.sort_key if name not in self.schema.names]:
            raise ValueError(f"dataset {self.name}: no column {', '.join(missing)} to sort by")


SNAPSHOTS: Final = Dataset(ARCHIVE_DATASET, ARCHIVE_SCHEMA, SORT_KEY, WRITER_OPTIONS)
"""The snapshots of a day, as ``snapshot_reads`` gives them."""


@dataclass(frozen=True, eq=False)
class ArchiveLocation:
    """Where the archive lives, and the :mod:`pyarrow.fs` filesystem that reaches it.

    The methods that take no dataset are the snapshots' (:data:`SNAPSHOTS`).

    Attributes:
        url: ``ARCHIVE_URL`` as the settings normalized it (never with credentials).
        filesystem: a local or an S3 filesystem.
        base: ``ARCHIVE_URL``'s path on ``filesystem``: ``<directory>`` or
            ``<bucket>/<prefix>``.
        local: ``filesystem`` reaches a local directory: files are renamed into place and
            synced to the disk, where on S3 they are copied into place.
    """

    url: str
    filesystem: pafs.FileSystem
    base: str
    local: bool

    @property
    def is_local(self) -> bool:
        """The archive is a local directory (files are renamed into place and synced)."""
        return self.local

    @property
    def root(self) -> str:
        """The snapshots' dataset on :attr:`filesystem`: ``<base>/option_snapshots``."""
        return self.dataset_root(SNAPSHOTS)

    @property
    def dataset_url(self) -> str:
        """The snapshots' dataset as a URL, for DuckDB and people."""
        return self.url_of(SNAPSHOTS)

    def dataset_root(self, dataset: Dataset) -> str:
        """``dataset``'s directory on :attr:`filesystem`."""
        return f"{self.base}/{dataset.name}"

    def url_of(self, dataset: Dataset) -> str:
        """``dataset``'s directory as a URL: ``<ARCHIVE_URL>/<name>``."""
        return f"{self.url.rstrip('/')}/{dataset.name}"

    def day_dir(self, day: dt.date, dataset: Dataset = SNAPSHOTS) -> str:
        """The directory of ``day``'s file of ``dataset`` on :attr:`filesystem`."""
        return f"{self.dataset_root(dataset)}/date={day.isoformat()}"

    def day_file(self, day: dt.date, dataset: Dataset = SNAPSHOTS) -> str:
        """``day``'s file of ``dataset`` on :attr:`filesystem`."""
        return f"{self.day_dir(day, dataset)}/{DAY_FILE}"

    def day_url(self, day: dt.date, dataset: Dataset = SNAPSHOTS) -> str:
        """``day``'s file of ``dataset`` as a URL (what ``archived_days.url`` records)."""
        return f"{self.url_of(dataset)}/date={day.isoformat()}/{DAY_FILE}"

    def staging_dir(self, day: dt.date, dataset: Dataset = SNAPSHOTS) -> str:
        """Where ``day``'s file of ``dataset`` is written before it is verified:
        ``<base>/.staging/<name>/date=YYYY-MM-DD``, outside every dataset's directory."""
        return f"{self.base}/{STAGING_DIR}/{dataset.name}/date={day.isoformat()}"

    def dataset(self, dataset: Dataset = SNAPSHOTS) -> ds.Dataset:
        """The whole of ``dataset``, its ``date`` column typed from the directory names.

        Raises:
            ArchiveError: the dataset cannot be listed (no day archived yet, no access).
        """
        try:
            return ds.dataset(
                self.dataset_root(dataset),
                filesystem=self.filesystem,
                format="parquet",
                partitioning=ds.partitioning(pa.schema([("date", pa.date32())]), flavor="hive"),
            )
        except (OSError, pa.ArrowException) as exc:
            raise ArchiveError(
                f"cannot list {self.url_of(dataset)}: {first_line(exc)}", url=self.url
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
        return ArchiveLocation(url, pafs.LocalFileSystem(), url.rstrip("/"), local=True)
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
                f"cannot find the region of bucket {bucket}: {first_line(exc)} (set AWS_REGION)",
                url=url,
            ) from exc
    return ArchiveLocation(url, pafs.S3FileSystem(**options), bucket_and_prefix, local=False)


def records_batch(
    records: Sequence[Sequence[Any]], schema: pa.Schema = ARCHIVE_SCHEMA
) -> pa.RecordBatch:
    """Rows in ``schema``'s column order (timestamps as microseconds since the epoch) as one
    record batch.

    Raises:
        ArchiveError: a value does not fit its column.
    """
    columns = list(zip(*records, strict=True))
    try:
        arrays = [
            pa.array(column, type=column_field.type)
            for column, column_field in zip(columns, schema, strict=True)
        ]
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise ArchiveError(f"a row cannot be written to Parquet: {first_line(exc)}") from exc
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def read_digest(
    location: ArchiveLocation, path: str, dataset: Dataset = SNAPSHOTS
) -> tuple[Digest, int] | None:
    """Read the file at ``path`` back from its storage, every column of every row: its digest
    and its size in bytes; ``None`` when there is no such file.

    Blocking I/O: call it from a thread.

    Raises:
        ArchiveError: the file cannot be read whole (truncated, damaged, not Parquet, no
            access), or its columns are not ``dataset``'s.
    """
    fs = location.filesystem
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return None
        digest = TableDigest(dataset.schema)
        with fs.open_input_file(path) as source:
            parquet = pq.ParquetFile(source, buffer_size=READ_BUFFER_BYTES)
            for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS):
                digest.add(batch)
            if digest.rows != parquet.metadata.num_rows:
                raise ArchiveError(f"{path} reads {digest.rows} of its rows")
    except (OSError, pa.ArrowException, ArchiveError) as exc:
        raise ArchiveError(f"cannot read {path}: {first_line(exc)}", url=location.url) from exc
    return digest.digest, info.size


def file_size(location: ArchiveLocation, path: str) -> int | None:
    """The size of the file at ``path``; ``None`` when there is none.

    Raises:
        ArchiveError: the archive cannot be reached.
    """
    try:
        info = location.filesystem.get_file_info(path)
    except (OSError, pa.ArrowException) as exc:
        raise ArchiveError(f"cannot read {path}: {first_line(exc)}", url=location.url) from exc
    return info.size if info.type == pafs.FileType.File else None


def remove_file(location: ArchiveLocation, path: str) -> None:
    """Remove the file at ``path`` if it is there (best effort: a temporary left behind is
    removed by a later run)."""
    with contextlib.suppress(OSError, pa.ArrowException):
        location.filesystem.delete_file(path)


def fsync(path: str) -> None:
    """Flush a local file or directory to the disk: a partition is dropped after this."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, or its class name when it has none."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
