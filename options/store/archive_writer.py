"""A day file of a dataset written so that the archive can be the only copy: digested as it is
written, written outside the dataset, read back and verified there, then moved into place
whole, and checked in place.

**Staging.** A day's file of a dataset is written under
``<ARCHIVE_URL>/.staging/<dataset>/date=YYYY-MM-DD/<random>.parquet``: outside every dataset's
directory, so no engine reading ``<ARCHIVE_URL>/<dataset>/*/*.parquet``, nor one listing the
dataset, ever sees it. pyarrow's writer completes an S3 upload when it is closed, even after a
failure (its close writes the footer), and has no way to abort one: staging is what keeps an
abandoned upload away from the final key. An abandoned file is removed (best effort); what a
killed process leaves there is removed by the next run that takes the day up
(:func:`clean_staging`).

**Verify.** The staged file is read back from its storage, every column of every row, and its
digest (:mod:`options.store.archive_digest`) must equal the one of the rows given to the
writer; otherwise it is removed and nothing moves.

**Publish.** On a local disk, ``rename(2)`` moves it into place (replacing an older file in one
step), then the day's directory and its parents are synced. On S3, a server-side copy
(``CopyObject``) makes the final object appear whole (it replaces an older one in one step);
the staged object is then deleted, and the final object is read back whole and its digest
compared again. A copy is a new object written by the server: its size or ETag would prove
it exists, not that it holds the rows, and it is about to become the only copy, so it is read
back like the staged one (a second download of the file, a small cost beside the export). A
file that was in place before stays there, untouched, until the new one is verified.

**From PostgreSQL.** :func:`export_day` streams a query's rows through a server-side cursor
into a staged file (memory holds one row group, never the day) and publishes it;
:func:`postgres_digest` streams the same rows into a digest alone, for a day whose file is
already in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Final

import asyncpg
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from options.errors import ArchiveError
from options.store.archive_digest import Digest, TableDigest
from options.store.archive_files import (
    LEGACY_TEMPORARY_FILE,
    ArchiveLocation,
    Dataset,
    first_line,
    fsync,
    read_digest,
    records_batch,
    remove_file,
)
from options.store.db import epoch_microsecond_timestamps

logger = logging.getLogger(__name__)

FETCH_ROWS = 5_000  # rows per cursor fetch: ~10 MB of Python objects at a time
# The day's sort scans the whole partition: minutes for the whole market
EXPORT_STATEMENT_TIMEOUT = 3600.0
S3_COPY_LIMIT: Final = 5 * 1024**3
"""The largest object one S3 ``CopyObject`` copies (pyarrow's copy is one such request)."""


class StagedDayFile:
    """One day's file of a dataset, written under a staging name: :meth:`add` rows, then
    :meth:`close`, then :meth:`publish`; :meth:`abandon` after a failure or a stop.

    The file is opened at the first row added. Blocking I/O: call it from a thread.
    """

    def __init__(self, location: ArchiveLocation, dataset: Dataset, day: dt.date) -> None:
        self.location = location
        self.dataset = dataset
        self.day = day
        self.path = f"{location.staging_dir(day, dataset)}/{uuid.uuid4().hex}.parquet"
        self._digest = TableDigest(dataset.schema)
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._sink: pa.NativeFile | None = None
        self._writer: pq.ParquetWriter | None = None

    @property
    def digest(self) -> Digest:
        """The rows added so far, and their digest."""
        return self._digest.digest

    def add(self, batch: pa.RecordBatch) -> None:
        """Add rows (in the dataset's sort order, after those added before).

        Raises:
            ArchiveError: the file cannot be written.
        """
        self._digest.add(batch)
        if self._writer is None:
            self._open()
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if self._pending_rows >= self.dataset.row_group_rows:
            self._flush()

    def close(self) -> None:
        """Write what is left and the footer, and close the file (on S3: complete the upload
        at the staging key); nothing when no row was added.

        Raises:
            ArchiveError: the file cannot be written.
        """
        if self._writer is None or self._sink is None:
            return
        self._flush()
        try:
            self._writer.close()
            self._sink.close()
            if self.location.local:
                fsync(self.path)
        except (OSError, pa.ArrowException) as exc:
            raise self._error("write", exc) from exc

    def publish(self) -> int:
        """Read the closed file back, verify it, move it into place and check it there: its
        size in bytes.

        Raises:
            ArchiveError: the file does not read back as the rows added (it is removed, and
                whatever was in place stays), or it cannot be moved into place.
        """
        expected = self.digest
        final = self.location.day_file(self.day, self.dataset)
        try:
            found = read_digest(self.location, self.path, self.dataset)
            _verify(found, expected, self.day, "the file read back from staging")
            assert found is not None
            if self.location.local:
                self._rename(final)
            else:
                self._copy(final, found[1])
        finally:
            self._discard()
        if not self.location.local:
            _verify(
                read_digest(self.location, final, self.dataset),
                expected,
                self.day,
                f"{self.location.day_url(self.day, self.dataset)} read back after the copy",
            )
        return found[1]

    def abandon(self) -> None:
        """Give the file up after a failure or a stop: close what is open (on S3 that
        completes the upload, at the staging key), and remove it (best effort; a later run
        removes what is left)."""
        if self._writer is not None:
            with contextlib.suppress(OSError, pa.ArrowException):
                self._writer.close()
            self._writer.is_open = False  # else its __del__ would write a footer again
        if self._sink is not None:
            with contextlib.suppress(OSError, pa.ArrowException):
                self._sink.close()
            self._discard()

    def _open(self) -> None:
        fs = self.location.filesystem
        try:
            if self.location.local:  # S3 has no directories to make
                fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
            self._sink = fs.open_output_stream(self.path)
            self._writer = pq.ParquetWriter(
                self._sink, self.dataset.schema, **self.dataset.writer_options
            )
        except (OSError, pa.ArrowException) as exc:
            if self._sink is not None:
                with contextlib.suppress(OSError, pa.ArrowException):
                    self._sink.close()
                self._discard()
            raise self._error("write", exc) from exc

    def _flush(self) -> None:
        if not self._pending or self._writer is None:
            return
        table = pa.Table.from_batches(self._pending, schema=self.dataset.schema)
        self._pending, self._pending_rows = [], 0
        try:
            self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        except (OSError, pa.ArrowException) as exc:
            raise self._error("write", exc) from exc

    def _rename(self, final: str) -> None:
        """Local: ``rename(2)`` into place, then the directories synced (the rename, and the
        day's directory if it is new)."""
        fs = self.location.filesystem
        day_dir = self.location.day_dir(self.day, self.dataset)
        try:
            fs.create_dir(day_dir, recursive=True)
            fs.move(self.path, final)
            for directory in (
                day_dir,
                self.location.dataset_root(self.dataset),
                self.location.base,
            ):
                fsync(directory)
        except OSError as exc:
            raise self._error("move into place", exc) from exc

    def _copy(self, final: str, size: int) -> None:
        """S3: a server-side copy into place, then the staged object deleted."""
        try:
            if size > S3_COPY_LIMIT:
                raise ArchiveError(
                    f"{size:,} bytes is over the {S3_COPY_LIMIT:,} one S3 copy can move"
                )
            self.location.filesystem.copy_file(self.path, final)
        except (OSError, pa.ArrowException, ArchiveError) as exc:
            raise self._error("move into place", exc) from exc

    def _discard(self) -> None:
        """Remove the staged file and its directory (best effort: a later run removes what
        is left)."""
        remove_file(self.location, self.path)
        with contextlib.suppress(OSError, pa.ArrowException):
            self.location.filesystem.delete_dir(self.location.staging_dir(self.day, self.dataset))

    def _error(self, doing: str, exc: BaseException) -> ArchiveError:
        return ArchiveError(
            f"cannot {doing} {self.path}: {first_line(exc)}",
            url=self.location.url,
            day=self.day,
        )


def _verify(found: tuple[Digest, int] | None, expected: Digest, day: dt.date, what: str) -> None:
    """Raise unless ``found`` (a file's digest and size) holds the ``expected`` rows.

    Raises:
        ArchiveError: it does not.
    """
    if found is not None and found[0] == expected:
        return
    seen = f"{found[0].rows} rows, digest {found[0].checksum}" if found else "no file"
    raise ArchiveError(
        f"{day}: {what} ({seen}) is not what PostgreSQL holds ({expected.rows} rows, digest "
        f"{expected.checksum})",
        day=day,
    )


def clean_staging(location: ArchiveLocation, dataset: Dataset, day: dt.date) -> None:
    """Remove what an interrupted run left of ``day``'s file of ``dataset``: its staging
    directory, and the temporary file earlier versions wrote beside the day's file (best
    effort).

    Blocking I/O: call it from a thread.
    """
    fs = location.filesystem
    left = location.staging_dir(day, dataset)
    try:
        if fs.get_file_info(left).type != pafs.FileType.NotFound:
            fs.delete_dir(left)
    except (OSError, pa.ArrowException) as exc:
        logger.warning("Archive: cannot remove %s: %s", left, first_line(exc))
    if location.local:
        remove_file(location, f"{location.day_dir(day, dataset)}/{LEGACY_TEMPORARY_FILE}")


async def export_day(
    conn: asyncpg.Connection,
    location: ArchiveLocation,
    dataset: Dataset,
    day: dt.date,
    query: str,
    *args: Any,
    stop: asyncio.Event | None = None,
) -> tuple[Digest, int | None] | None:
    """Write the rows ``query`` selects (``dataset``'s columns, in its sort order) to ``day``'s
    file of ``dataset``, verify it and publish it, as the module docstring says.

    Timestamps are read as microseconds since the epoch (as arguments, too: pass ints). One
    repeatable-read transaction reads the rows, so they are one moment's.

    Returns:
        The rows' digest and the file's size (``None``: no rows, and no file written); ``None``
        when ``stop`` was set (the file is given up, nothing moved).

    Raises:
        ArchiveError: the file cannot be written, does not read back as the rows, or cannot be
            moved into place; whatever was in place stays.
    """
    staged = StagedDayFile(location, dataset, day)
    try:
        async with contextlib.aclosing(_batches(conn, dataset, query, args)) as batches:
            async for batch in batches:
                if stop is not None and stop.is_set():
                    await asyncio.to_thread(staged.abandon)
                    return None
                await asyncio.to_thread(staged.add, batch)
        await asyncio.to_thread(staged.close)
    except BaseException:
        staged.abandon()  # also when cancelled: on the loop, as nothing else may await
        raise
    if not staged.digest.rows:
        return staged.digest, None
    return staged.digest, await asyncio.to_thread(staged.publish)


async def postgres_digest(
    conn: asyncpg.Connection, dataset: Dataset, query: str, *args: Any
) -> Digest:
    """The digest of the rows ``query`` selects, as :func:`export_day` would write them."""
    digest = TableDigest(dataset.schema)
    async with contextlib.aclosing(_batches(conn, dataset, query, args)) as batches:
        async for batch in batches:
            await asyncio.to_thread(digest.add, batch)
    return digest.digest


async def _batches(
    conn: asyncpg.Connection, dataset: Dataset, query: str, args: Sequence[Any]
) -> AsyncGenerator[pa.RecordBatch, None]:
    """The rows of ``query`` as record batches of ``dataset``'s schema, :data:`FETCH_ROWS` at a
    time, from one repeatable-read transaction."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # the cursor's transaction sits idle while a row group is written
        for setting in ("statement_timeout", "idle_in_transaction_session_timeout"):
            await conn.execute(
                "SELECT set_config($1, $2, true)", setting, f"{EXPORT_STATEMENT_TIMEOUT:.0f}s"
            )
        async with epoch_microsecond_timestamps(conn):
            cursor = await conn.cursor(query, *args)
            while records := await cursor.fetch(FETCH_ROWS, timeout=EXPORT_STATEMENT_TIMEOUT):
                yield await asyncio.to_thread(records_batch, records, dataset.schema)
