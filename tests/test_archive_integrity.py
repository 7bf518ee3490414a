"""The archive as the only copy: every value verified before a day leaves PostgreSQL, files
published whole or not at all (on disk and on S3), a good file never replaced by an unverified
one; and the archive's seams with compaction and retention."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from options.errors import ExitCode
from options.jobs.wiring import run_snapshots_job
from options.store import archive_writer
from options.store.archive import (
    ARCHIVED,
    ARCHIVED_BEFORE,
    FAILED,
    archive_days,
    list_archived_days,
)
from options.store.archive_files import (
    ArchiveLocation,
    Dataset,
    archive_location,
    open_archive,
    read_digest,
)
from options.store.archive_writer import StagedDayFile
from options.store.partitions import (
    COMPACT,
    WIDE,
    ensure_partitions,
    partition_name,
    partition_states,
)
from tests.conftest import S3_KEY, S3_SECRET
from tests.test_archive import (
    AFTER_WEEK,
    CONTRACTS,
    UNDERLYINGS,
    WEEK,
    History,
    now,
    our_days,
    rows_of_day,
    rows_of_file,
    take_history,
)


class _Sink:
    """A real output stream that can fail on its ``fail_at``-th write, call ``on_write`` at
    each write and ``on_close`` once it is closed."""

    def __init__(self, storage: Storage, path: str, real: pa.NativeFile) -> None:
        self._storage = storage
        self._path = path
        self._real = real
        self._writes = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self._writes += 1
        if self._storage.on_write is not None:
            self._storage.on_write(self._path)
        if self._storage.fail_at is not None and self._writes >= self._storage.fail_at:
            raise OSError("injected: no space left on device")
        return int(self._real.write(data))

    def flush(self) -> None:
        self._real.flush()

    def tell(self) -> int:
        return int(self._real.tell())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._real.close()
        if self._storage.on_close is not None:
            self._storage.on_close(self._path)


class Storage(pafs.FileSystemHandler):
    """The archive's real filesystem (a directory or the S3 test server), with the faults a
    test asks for: a write that fails, a callback at each write or after a file is closed.
    Every path opened for writing is kept in :attr:`written`."""

    def __init__(self, real: pafs.FileSystem) -> None:
        self.real = real
        self.fail_at: int | None = None
        self.on_write: Callable[[str], None] | None = None
        self.on_close: Callable[[str], None] | None = None
        self.written: list[str] = []

    def get_type_name(self) -> str:
        return f"faulty-{self.real.type_name}"

    def normalize_path(self, path: str) -> str:
        return str(self.real.normalize_path(path))

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return list(self.real.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return list(self.real.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self.real.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.real.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.real.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("not in these tests")

    def delete_file(self, path: str) -> None:
        self.real.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.real.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.real.copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.real.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.real.open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict[str, str] | None) -> pa.NativeFile:
        self.written.append(path)
        real = self.real.open_output_stream(path, metadata=metadata)
        return pa.PythonFile(_Sink(self, path, real), mode="w")

    def open_append_stream(self, path: str, metadata: dict[str, str] | None) -> pa.NativeFile:
        raise OSError("not in these tests")


def faulty(location: ArchiveLocation) -> tuple[ArchiveLocation, Storage]:
    """``location`` reached through a :class:`Storage` over its own filesystem."""
    storage = Storage(location.filesystem)
    return dataclasses.replace(location, filesystem=pafs.PyFileSystem(storage)), storage


def alter_one_price(filesystem: pafs.FileSystem, path: str) -> None:
    """Rewrite the Parquet file at ``path`` with its first row's bid one cent higher: the same
    rows and keys, one value wrong."""
    with filesystem.open_input_file(path) as source:
        table = pq.read_table(source)
    bids = table.column("bid").to_pylist()
    bids[0] = (bids[0] or 0.0) + 0.01
    table = table.set_column(
        table.schema.get_field_index("bid"), "bid", pa.array(bids, pa.float64())
    )
    with filesystem.open_output_stream(path) as sink:
        pq.write_table(table, sink, compression="zstd")


def change_a_price_in_place(location: ArchiveLocation, day: dt.date) -> None:
    """Change ``day``'s file as a disk, a bucket or a person may, unseen by its size: its first
    bid one cent higher, the file rewritten to exactly its former size (without the Arrow
    schema in its footer, zeros before the footer making up the difference)."""
    path = location.day_file(day)
    with location.filesystem.open_input_file(path) as source:
        size = source.size()
        table = pq.read_table(source)
    bids = table.column("bid").to_pylist()
    bids[0] = (bids[0] or 0.0) + 0.01
    table = table.set_column(
        table.schema.get_field_index("bid"), "bid", pa.array(bids, pa.float64())
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, store_schema=False, compression="zstd")
    changed = sink.getvalue().to_pybytes()
    assert len(changed) <= size
    footer = len(changed) - 8 - int.from_bytes(changed[-8:-4], "little")
    changed = changed[:footer] + bytes(size - len(changed)) + changed[footer:]
    with location.filesystem.open_output_stream(path) as out:
        out.write(changed)


def s3_client(location: ArchiveLocation, endpoint: str) -> Any:
    """A boto3 client of the S3 test server, and the bucket of ``location``."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
    )


def s3_key(location: ArchiveLocation, day: dt.date) -> tuple[str, str]:
    """The bucket and key of ``day``'s file."""
    bucket, key = location.day_file(day).split("/", 1)
    return bucket, key


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> ArchiveLocation:
    """The archive: a local directory, or a bucket on the local S3 server."""
    if request.param == "local":
        return open_archive(str(tmp_path / "archive"))
    found = archive_location(request.getfixturevalue("s3_settings"))
    assert found is not None
    return found


@pytest.fixture
async def history(pool, simulator, make_settings) -> History:
    return await take_history(pool, simulator, make_settings)


async def test_a_value_altered_in_the_written_file_is_refused(pool, history, location) -> None:
    """A file that reads back with the right rows and keys but one price wrong is refused:
    nothing is recorded, nothing is published, the day stays in PostgreSQL."""
    wrapped, storage = faulty(location)
    storage.on_close = lambda path: alter_one_price(location.filesystem, path)
    first = WEEK[0]

    run = await archive_days(pool, wrapped, before=AFTER_WEEK, now=now())

    assert [(d.day, d.action) for d in run.days if d.action != "empty"] == [(first, FAILED)]
    assert run.failed is not None and "read back" in run.failed.note
    assert await list_archived_days(pool) == []
    assert set(WEEK) <= set(await our_days(pool))
    missing = location.filesystem.get_file_info(location.day_file(first))
    assert missing.type == pafs.FileType.NotFound


@pytest.mark.parametrize("fault", ["exception", "stop"])
async def test_an_abandoned_s3_upload_never_appears_at_the_final_key(
    pool, history, s3_settings, s3_endpoint, fault, monkeypatch
) -> None:
    """A write that fails in the middle (the storage refuses a write) or is stopped (a signal,
    the deadline) never completes an object at the day's key, not even for a moment (the
    bucket keeps every version), and its temporary object is removed."""
    location = archive_location(s3_settings)
    assert location is not None
    client = s3_client(location, s3_endpoint)
    bucket, key = s3_key(location, WEEK[0])
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    wrapped, storage = faulty(location)
    stop = asyncio.Event()
    if fault == "exception":
        storage.fail_at = 2  # the magic bytes pass, the first row group fails
    else:  # a signal while the day's rows are still coming
        monkeypatch.setattr(archive_writer, "FETCH_ROWS", 100)
        loop = asyncio.get_running_loop()
        storage.on_write = lambda path: loop.call_soon_threadsafe(stop.set)

    run = await archive_days(pool, wrapped, before=AFTER_WEEK, now=now(), stop=stop)

    if fault == "exception":
        assert run.failed is not None and run.failed.day == WEEK[0]
    else:
        assert run.interrupted and not [d for d in run.days if d.rows]
    assert storage.written, "the write began"
    versions = client.list_object_versions(Bucket=bucket, Prefix=key)
    assert versions.get("Versions", []) == [] and versions.get("DeleteMarkers", []) == []
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [o["Key"] for o in listed if o["Key"].endswith(".parquet")] == []
    assert await list_archived_days(pool) == []
    assert set(WEEK) <= set(await our_days(pool))


async def test_files_are_written_outside_the_dataset_then_moved_into_place(
    pool, history, location
) -> None:
    """Each day is written under ``<ARCHIVE_URL>/.staging/``, where no reader of the dataset
    looks, and moved into place once verified; a temporary left by a killed run is removed by
    the next run."""
    base = location.day_file(WEEK[0]).split("/option_snapshots/")[0]
    leftover = f"{base}/.staging/option_snapshots/date={WEEK[1].isoformat()}/killed.parquet"
    location.filesystem.create_dir(leftover.rsplit("/", 1)[0], recursive=True)
    with location.filesystem.open_output_stream(leftover) as sink:
        sink.write(b"PAR1 and no more")
    wrapped, storage = faulty(location)

    run = await archive_days(pool, wrapped, before=AFTER_WEEK, now=now())

    assert [d.day for d in run.days if d.action == ARCHIVED] == list(WEEK)
    assert storage.written
    assert all(path.startswith(f"{base}/.staging/") for path in storage.written), storage.written
    staged = location.filesystem.get_file_info(
        pafs.FileSelector(f"{base}/.staging", recursive=True, allow_not_found=True)
    )
    assert [info.path for info in staged if info.type == pafs.FileType.File] == []
    for day in WEEK:
        assert location.filesystem.get_file_info(location.day_file(day)).size > 0


async def test_rearchiving_with_a_failing_write_keeps_the_old_file(pool, history, location) -> None:
    """A day archived (kept in PostgreSQL) whose rows changed since is written again; when
    that new write fails, the old file stays in place, whole and readable, and so does its
    record."""
    day = WEEK[1]
    kept = await archive_days(pool, location, before=AFTER_WEEK, now=now(), keep_in_postgres=True)
    assert {d.postgres for d in kept.days if d.rows} == {"kept"}
    old_rows = rows_of_file(location, day)
    old_record = {r.day: r for r in await list_archived_days(pool)}[day]
    late = dt.datetime.combine(day, dt.time(20, 0), dt.UTC)
    await ensure_partitions(pool, day, days_ahead=0)
    await pool.execute(
        "INSERT INTO option_snapshots (ticker, underlying_ticker, captured_at, bid) "
        "SELECT ticker, underlying_ticker, $1, bid FROM snapshot_reads "
        "WHERE captured_at = $2 LIMIT 5",
        late,
        history.slots[2],
    )
    wrapped, storage = faulty(location)
    storage.fail_at = 2

    run = await archive_days(pool, wrapped, before=AFTER_WEEK, now=now())

    assert run.failed is not None and run.failed.day == day
    assert rows_of_file(location, day) == old_rows
    assert {r.day: r for r in await list_archived_days(pool)}[day] == old_record
    assert day in await our_days(pool)


async def test_a_file_changed_since_it_was_recorded_is_written_again_before_the_drop(
    pool, history, location
) -> None:
    """A day recorded and kept in PostgreSQL whose file changed since (one price, the size
    unchanged) is not dropped on the strength of its record: the file is read back, found
    wrong, written again and verified, and only then dropped."""
    day = WEEK[2]
    await archive_days(pool, location, before=AFTER_WEEK, now=now(), keep_in_postgres=True)
    expected = await rows_of_day(pool, day)
    change_a_price_in_place(location, day)

    run = await archive_days(pool, location, before=AFTER_WEEK, now=now())

    actions = {d.day: (d.action, d.postgres) for d in run.days if d.rows}
    assert actions[day] == (ARCHIVED, "dropped")
    assert all(actions[d] == (ARCHIVED_BEFORE, "dropped") for d in WEEK if d != day)
    assert rows_of_file(location, day) == expected


async def test_a_value_changed_in_postgres_since_it_was_recorded_is_archived_again(
    pool, history, tmp_path
) -> None:
    """A day recorded and kept in PostgreSQL in which one value changed since (same rows,
    same keys) is written again before its partition is dropped: the file holds the value
    PostgreSQL had when it dropped the day."""
    location = open_archive(str(tmp_path / "archive"))
    day = WEEK[3]
    await archive_days(pool, location, before=AFTER_WEEK, now=now(), keep_in_postgres=True)
    table = partition_name(day, COMPACT)
    await pool.execute(
        f"UPDATE {table} SET bid = bid + 100 "
        f"WHERE ctid = (SELECT ctid FROM {table} WHERE bid IS NOT NULL LIMIT 1)"
    )
    expected = await rows_of_day(pool, day)

    run = await archive_days(pool, location, before=AFTER_WEEK, now=now())

    actions = {d.day: (d.action, d.postgres) for d in run.days if d.rows}
    assert actions[day] == (ARCHIVED, "dropped")
    assert rows_of_file(location, day) == expected


async def test_compaction_before_archiving_obeys_stop(pool, tmp_path) -> None:
    """With its stop set (a signal, the deadline), the archive does not start compacting the
    days still in option_snapshots: they stay there, and the run says it was interrupted."""
    location = open_archive(str(tmp_path / "archive"))
    days = WEEK[:2]
    for day in days:
        await ensure_partitions(pool, day, days_ahead=0)
        await pool.execute(
            "INSERT INTO option_snapshots (ticker, underlying_ticker, captured_at, bid) "
            "SELECT 'O:AAA261218C' || lpad(n::text, 8, '0'), 'AAA', $1, 1.5 "
            "FROM generate_series(1, 20) AS n",
            dt.datetime.combine(day, dt.time(15), dt.UTC),
        )
    stop = asyncio.Event()
    stop.set()

    run = await archive_days(pool, location, before=AFTER_WEEK, now=now(), stop=stop)

    assert run.interrupted and not run.days
    async with pool.acquire() as conn:
        wide = await partition_states(conn, WIDE)
    assert set(days) <= set(wide)
    assert await pool.fetchval("SELECT count(*) FROM option_snapshots") == 40
    assert await pool.fetchval("SELECT count(*) FROM snapshot_rows") == 0


async def test_a_database_error_in_retention_does_not_fail_a_stored_run(
    pool, history, simulator, make_settings, tmp_path, caplog
) -> None:
    """A snapshot run that stored every chain ends succeeded (exit 0) even when archiving
    its old days fails in PostgreSQL; the failure is logged as an error, the days stay."""
    await pool.execute(
        """
        CREATE FUNCTION refuse_records() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'archived_days is refused'; END $$;
        CREATE TRIGGER refuse_records BEFORE INSERT ON archived_days
        FOR EACH ROW EXECUTE FUNCTION refuse_records();
        """
    )
    async with simulator(underlyings=UNDERLYINGS, contracts_per_underlying=CONTRACTS) as api:
        settings = make_settings(api.base_url, UNDERLYINGS, archive_url=str(tmp_path / "archive"))
        with caplog.at_level(logging.ERROR):
            code = await run_snapshots_job(settings, force=True, retain_days=3)

    assert code == ExitCode.OK
    status = await pool.fetchval(
        "SELECT status FROM ingest_runs WHERE job = 'snapshots' ORDER BY id DESC LIMIT 1"
    )
    assert status == "succeeded"
    assert "archived_days is refused" in caplog.text
    assert set(WEEK) <= set(await our_days(pool))


def test_the_test_storage_passes_through(tmp_path: Path) -> None:
    """The faulty storage of these tests, without faults, writes and reads like its
    filesystem (so a failure above is the archive's, not the harness's)."""
    location = open_archive(str(tmp_path / "archive"))
    wrapped, storage = faulty(location)
    path = f"{tmp_path}/x.parquet"
    with wrapped.filesystem.open_output_stream(path) as sink:
        pq.write_table(pa.table({"a": [1, 2]}), sink)
    assert pq.read_table(path).column("a").to_pylist() == [1, 2]
    assert storage.written == [path]
    assert os.path.getsize(path) > 0


@pytest.mark.parametrize("file", ["intact", "changed"])
async def test_a_drop_interrupted_after_the_detach_reads_the_file_first(
    pool, history, tmp_path, file
) -> None:
    """A run killed after detaching a recorded day's partition, before dropping it: the next
    run reads the file back against the record; intact, it drops the detached table; changed
    since (one price, the size unchanged), it attaches the table again, writes the day again,
    and drops it only then."""
    location = open_archive(str(tmp_path / "archive"))
    day = WEEK[0]
    await archive_days(pool, location, before=AFTER_WEEK, now=now(), keep_in_postgres=True)
    expected = await rows_of_day(pool, day)
    await pool.execute(f"ALTER TABLE snapshot_rows DETACH PARTITION {partition_name(day, COMPACT)}")
    if file == "changed":
        await asyncio.to_thread(change_a_price_in_place, location, day)

    run = await archive_days(pool, location, before=AFTER_WEEK, now=now())

    report = next(d for d in run.days if d.day == day)
    action = ARCHIVED_BEFORE if file == "intact" else ARCHIVED
    assert (report.action, report.postgres) == (action, "dropped")
    assert rows_of_file(location, day) == expected
    assert day not in await our_days(pool)


async def test_a_day_recorded_with_the_key_checksum_is_verified_with_every_value(
    pool, history, tmp_path
) -> None:
    """A day recorded by an earlier version (a ``k1:`` checksum of its keys) and kept in
    PostgreSQL is read back and digested again, recorded with the full digest, and dropped,
    without its file being written again."""
    location = open_archive(str(tmp_path / "archive"))
    day = WEEK[4]
    await archive_days(pool, location, before=AFTER_WEEK, now=now(), keep_in_postgres=True)
    await pool.execute(
        "UPDATE archived_days SET checksum = 'k1:0123456789abcdef' WHERE day = $1", day
    )
    written = location.filesystem.get_file_info(location.day_file(day)).mtime

    run = await archive_days(pool, location, before=AFTER_WEEK, now=now())

    report = next(d for d in run.days if d.day == day)
    assert (report.action, report.postgres) == (ARCHIVED_BEFORE, "dropped")
    assert location.filesystem.get_file_info(location.day_file(day)).mtime == written
    record = {r.day: r for r in await list_archived_days(pool)}[day]
    assert record.checksum.startswith("v2:") and record.dropped_at is not None


DAILY = Dataset(
    "daily_rows",
    pa.schema([("ticker", pa.string()), ("day", pa.date32()), ("close", pa.float64())]),
    ("ticker", "day"),
    {"compression": "zstd"},
)


def test_another_dataset_is_staged_verified_and_published_the_same_way(location) -> None:
    """The writer, the digest, the staging and the publishing take any dataset: a day of
    another schema lands in its own directory, verified, with nothing left in staging."""
    day = WEEK[0]
    batch = pa.record_batch(
        [pa.array(["O:A", "O:B"]), pa.array([day, day]), pa.array([1.25, None])],
        schema=DAILY.schema,
    )
    staged = StagedDayFile(location, DAILY, day)
    staged.add(batch)
    staged.close()
    size = staged.publish()

    path = location.day_file(day, DAILY)
    assert path.endswith(f"/daily_rows/date={day.isoformat()}/part-0.parquet")
    found = read_digest(location, path, DAILY)
    assert found == (staged.digest, size)
    with location.filesystem.open_input_file(path) as source:
        assert pq.read_table(source).equals(pa.Table.from_batches([batch]))
    left = location.filesystem.get_file_info(
        pafs.FileSelector(location.staging_dir(day, DAILY), allow_not_found=True)
    )
    assert [info.path for info in left] == []


def test_a_dataset_needs_columns_the_digest_covers() -> None:
    """A dataset whose column has no defined digest (a decimal) is refused where it is
    described, not when a day is archived."""
    with pytest.raises(TypeError, match="cannot be digested"):
        Dataset("prices", pa.schema([("price", pa.decimal128(12, 4))]), ("price",))
