"""The archive tier: old days written to Parquet, verified, recorded, then dropped from
PostgreSQL; reruns, interruptions, an S3-compatible server, and retention that deletes nothing
unless asked."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from options.config import Settings
from options.errors import DatabaseError, ExitCode
from options.jobs.wiring import run_options_job, run_snapshots_job
from options.simulator import RunningSimulator
from options.store.archive import (
    ARCHIVED,
    ARCHIVED_BEFORE,
    EMPTY,
    RECORDED,
    WOULD_ARCHIVE,
    archive_days,
    first_kept_day,
    last_archivable_day,
    list_archived_days,
)
from options.store.archive_digest import Digest, TableDigest
from options.store.archive_files import (
    ARCHIVE_SCHEMA,
    LEGACY_TEMPORARY_FILE,
    ArchiveLocation,
    archive_location,
    open_archive,
)
from options.store.compaction import compact_days
from options.store.partitions import (
    COMPACT,
    RETENTION_LOCK_KEY,
    WIDE,
    PartitionState,
    ensure_partitions,
    partition_name,
    partition_states,
)
from tests.conftest import S3_KEY, S3_SECRET

BIN = Path(sys.executable).parent
UNDERLYINGS = ("AAA", "BBB")
CONTRACTS = 120
WEEK = tuple(dt.date(2026, 11, 16) + dt.timedelta(days=n) for n in range(5))  # Mon to Fri
SLOT_TIMES = (dt.time(15, 0), dt.time(19, 30))  # UTC: 10:00 and 14:30 in New York
AFTER_WEEK = dt.date(2026, 11, 23)


@dataclass(frozen=True)
class History:
    """A week of snapshots taken by the real jobs, each slot moved to its day."""

    settings: Settings
    slots: tuple[dt.datetime, ...]
    rows_per_day: int


async def take_history(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> History:
    """Sync the contracts, then take one snapshot per slot of :data:`WEEK` with the real job.

    The job stamps a slot with the database's clock, so each slot is then moved to its time in
    the past: its rows (into that day's partition), its coverage rows and its run.
    """
    slots = tuple(dt.datetime.combine(day, at, dt.UTC) for day in WEEK for at in SLOT_TIMES)
    async with simulator(underlyings=UNDERLYINGS, contracts_per_underlying=CONTRACTS) as api:
        settings = make_settings(api.base_url, UNDERLYINGS)
        # (the contracts job compacts finished days, and drops their empty partitions)
        assert await run_options_job(settings) == ExitCode.OK
        for day in WEEK:
            await ensure_partitions(pool, day, days_ahead=0)
        for slot in slots:
            assert await run_snapshots_job(settings, force=True, now=slot) == ExitCode.OK
            taken = await pool.fetchval(
                "SELECT captured_at FROM ingest_runs WHERE job = 'snapshots' "
                "ORDER BY id DESC LIMIT 1"
            )
            async with pool.acquire() as conn, conn.transaction():
                for table in ("option_snapshots", "snapshot_coverage", "ingest_runs"):
                    await conn.execute(
                        f"UPDATE {table} SET captured_at = $1 WHERE captured_at = $2", slot, taken
                    )
    # as the contracts job leaves finished days: in the compact tier
    assert await compact_days(pool, now=dt.datetime.now(dt.UTC)) is not None
    return History(settings, slots, len(UNDERLYINGS) * CONTRACTS * len(SLOT_TIMES))


async def rows_of_day(pool: asyncpg.Pool, day: dt.date) -> list[dict[str, Any]]:
    """The day's rows as PostgreSQL gives them through ``snapshot_reads``, in file order."""
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    rows = await pool.fetch(
        "SELECT * FROM snapshot_reads WHERE captured_at >= $1 AND captured_at < $2 "
        'ORDER BY underlying_ticker COLLATE "C", ticker COLLATE "C", captured_at',
        start,
        start + dt.timedelta(days=1),
    )
    return [
        {
            **dict(row),
            "strike_price": None if row["strike_price"] is None else float(row["strike_price"]),
        }
        for row in rows
    ]


def rows_of_file(location: ArchiveLocation, day: dt.date) -> list[dict[str, Any]]:
    """The day's file, row by row."""
    with location.filesystem.open_input_file(location.day_file(day)) as source:
        table = pq.read_table(source)
    assert table.schema.equals(ARCHIVE_SCHEMA)
    return table.to_pylist()


async def our_days(pool: asyncpg.Pool) -> dict[dt.date, PartitionState]:
    """The days with a table in either tier (the compact one's state first)."""
    async with pool.acquire() as conn:
        return {**await partition_states(conn, WIDE), **await partition_states(conn, COMPACT)}


def truncate(location: ArchiveLocation, day: dt.date) -> None:
    """Leave what a killed run may: half of the day's file in its place, the start of a staged
    file, and the start of the temporary file earlier versions wrote beside the day's."""
    whole = Path(location.day_file(day)).read_bytes()
    Path(location.day_file(day)).write_bytes(whole[: len(whole) // 2])
    Path(location.day_dir(day), LEGACY_TEMPORARY_FILE).write_bytes(whole[:100])
    Path(location.staging_dir(day)).mkdir(parents=True, exist_ok=True)
    Path(location.staging_dir(day), "killed.parquet").write_bytes(whole[:100])


def ingest_admin(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``ingest_admin`` with only ``env`` (and PATH), in ``cwd``."""
    return subprocess.run(
        [str(BIN / "ingest_admin"), *args],
        env={"PATH": os.environ.get("PATH", ""), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


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


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def test_a_week_is_archived_verified_and_dropped(pool, history, location) -> None:
    """Every day of the week goes to Parquet with exactly PostgreSQL's rows (every column),
    is recorded, and its partition is dropped; coverage stays; a rerun changes nothing."""
    before = {day: await rows_of_day(pool, day) for day in WEEK}
    assert all(len(rows) == history.rows_per_day for rows in before.values())

    run = await archive_days(pool, location, before=AFTER_WEEK, now=now())

    archived = [d for d in run.days if d.rows]
    assert [(d.day, d.action, d.postgres) for d in archived] == [
        (day, ARCHIVED, "dropped") for day in WEEK
    ]
    assert all(d.rows == history.rows_per_day and d.parquet_bytes for d in archived)
    assert not set(WEEK) & set(await our_days(pool))
    for day in WEEK:
        assert rows_of_file(location, day) == before[day]
    records = await list_archived_days(pool, dropped_only=True)
    assert [(r.day, r.rows, r.url) for r in records] == [
        (day, history.rows_per_day, location.day_url(day)) for day in WEEK
    ]
    assert await pool.fetchval("SELECT count(*) FROM snapshot_coverage") == len(
        history.slots
    ) * len(UNDERLYINGS)
    sizes = {day: location.filesystem.get_file_info(location.day_file(day)).mtime for day in WEEK}

    again = await archive_days(pool, location, before=AFTER_WEEK, now=now())

    assert [d for d in again.days if d.rows] == []
    assert await list_archived_days(pool) == records
    assert {
        day: location.filesystem.get_file_info(location.day_file(day)).mtime for day in WEEK
    } == sizes


async def test_a_kill_after_writing_is_finished_by_a_rerun(pool, history, location) -> None:
    """A run that dies after writing a day's file but before recording it drops nothing; the
    rerun reads that file back, records it without writing it again, and drops the day."""
    await pool.execute(
        """
        CREATE FUNCTION refuse_records() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'killed before recording'; END $$;
        CREATE TRIGGER refuse_records BEFORE INSERT ON archived_days
        FOR EACH ROW EXECUTE FUNCTION refuse_records();
        """
    )
    first = WEEK[0]
    expected = await rows_of_day(pool, first)
    with pytest.raises(DatabaseError, match="killed before recording"):
        await archive_days(pool, location, before=AFTER_WEEK, now=now())
    assert set(WEEK) <= set(await our_days(pool))
    assert await pool.fetchval("SELECT count(*) FROM archived_days") == 0
    written = location.filesystem.get_file_info(location.day_file(first))
    assert written.type == pafs.FileType.File
    await pool.execute("DROP TRIGGER refuse_records ON archived_days")

    run = await archive_days(pool, location, before=AFTER_WEEK, now=now())

    actions = {d.day: (d.action, d.postgres) for d in run.days if d.rows}
    assert actions == {
        first: (RECORDED, "dropped"),
        **{day: (ARCHIVED, "dropped") for day in WEEK[1:]},
    }
    assert location.filesystem.get_file_info(location.day_file(first)).mtime == written.mtime
    assert rows_of_file(location, first) == expected
    assert not set(WEEK) & set(await our_days(pool))


async def test_a_half_written_file_is_written_again(pool, history, tmp_path) -> None:
    """A truncated file in a day's place and a temporary file left by a killed run are not
    taken for the day: it is written again, verified, and only then dropped."""
    location = open_archive(str(tmp_path / "archive"))
    day = WEEK[2]
    expected = await rows_of_day(pool, day)
    await archive_days(pool, location, before=AFTER_WEEK, now=now(), keep_in_postgres=True)
    await pool.execute("DELETE FROM archived_days")
    truncate(location, day)

    run = await archive_days(pool, location, before=AFTER_WEEK, now=now())

    report = next(d for d in run.days if d.day == day)
    assert (report.action, report.postgres) == (ARCHIVED, "dropped")
    assert rows_of_file(location, day) == expected
    left = location.filesystem.get_file_info(
        [f"{location.day_dir(day)}/{LEGACY_TEMPORARY_FILE}", location.staging_dir(day)]
    )
    assert [info.type for info in left] == [pafs.FileType.NotFound] * 2
    assert partition_name(day) not in {partition_name(d) for d in await our_days(pool)}


async def test_a_day_kept_in_postgres_is_dropped_later_and_archived_again_if_changed(
    pool, history, tmp_path
) -> None:
    """--keep-in-postgres records the days and drops none; a later run drops them without
    writing again, except a day whose rows changed since, which is archived again first."""
    location = open_archive(str(tmp_path / "archive"))
    kept = await archive_days(pool, location, before=AFTER_WEEK, now=now(), keep_in_postgres=True)
    assert {d.postgres for d in kept.days if d.rows} == {"kept"}
    assert set(WEEK) <= set(await our_days(pool))
    changed = WEEK[1]
    late = dt.datetime.combine(changed, dt.time(20, 0), dt.UTC)
    await ensure_partitions(pool, changed, days_ahead=0)  # a late resumed slot makes it again
    await pool.execute(
        "INSERT INTO option_snapshots (ticker, underlying_ticker, captured_at, bid) "
        "SELECT ticker, underlying_ticker, $1, bid FROM snapshot_reads "
        "WHERE captured_at = $2 LIMIT 5",
        late,
        history.slots[2],
    )
    expected = await rows_of_day(pool, changed)

    run = await archive_days(pool, location, before=AFTER_WEEK, now=now())

    actions = {d.day: (d.action, d.postgres, d.rows) for d in run.days if d.rows}
    rows = history.rows_per_day
    assert actions == {
        **{day: (ARCHIVED_BEFORE, "dropped", rows) for day in WEEK if day != changed},
        changed: (ARCHIVED, "dropped", rows + 5),
    }
    assert rows_of_file(location, changed) == expected
    record = next(r for r in await list_archived_days(pool) if r.day == changed)
    assert record.rows == rows + 5


async def test_dry_run_writes_and_drops_nothing(pool, history, tmp_path) -> None:
    """--dry-run lists the days with their rows and PostgreSQL size, and changes nothing."""
    location = open_archive(str(tmp_path / "archive"))
    run = await archive_days(pool, location, before=AFTER_WEEK, now=now(), dry_run=True)
    assert [(d.day, d.action, d.rows) for d in run.days if d.rows] == [
        (day, WOULD_ARCHIVE, history.rows_per_day) for day in WEEK
    ]
    assert all(d.postgres_bytes for d in run.days)
    assert not (tmp_path / "archive").exists()
    assert set(WEEK) <= set(await our_days(pool))


async def test_today_and_later_days_are_never_archived(pool, simulator, make_settings, tmp_path):
    """Asked to archive everything, the archive leaves today's partition (with a snapshot
    taken now) and those made ahead; the empty past day is dropped without a file."""
    location = open_archive(str(tmp_path / "archive"))
    yesterday_utc = last_archivable_day(now())
    await ensure_partitions(pool, yesterday_utc, days_ahead=0)  # empty
    async with simulator(underlyings=("AAA",), contracts_per_underlying=20) as api:
        settings = make_settings(api.base_url, ("AAA",))
        assert await run_snapshots_job(settings, force=True) == ExitCode.OK
    run = await archive_days(pool, location, before=dt.date(2100, 1, 1), now=now())
    assert [(d.day, d.action, d.postgres) for d in run.days] == [(yesterday_utc, EMPTY, "dropped")]
    left = await our_days(pool)
    assert min(left) > yesterday_utc
    assert await pool.fetchval("SELECT count(*) FROM option_snapshots") == 20
    assert await pool.fetchval("SELECT count(*) FROM archived_days") == 0


async def test_a_stopped_archive_leaves_the_rest(pool, history, tmp_path) -> None:
    """With its stop already set (a signal, the job's deadline), the archive touches no day
    and says it was interrupted; the next run does them all."""
    location = open_archive(str(tmp_path / "archive"))
    stop = asyncio.Event()
    stop.set()
    run = await archive_days(pool, location, before=AFTER_WEEK, now=now(), stop=stop)
    assert run.interrupted and not run.days
    assert set(WEEK) <= set(await our_days(pool))
    done = await archive_days(pool, location, before=AFTER_WEEK, now=now())
    assert [d.day for d in done.days if d.action == ARCHIVED] == list(WEEK)


async def test_one_archive_at_a_time(pool, history, tmp_path, database_url) -> None:
    """While another session holds the retention lock, the archive does nothing and says so."""
    location = open_archive(str(tmp_path / "archive"))
    other = await asyncpg.connect(database_url)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", RETENTION_LOCK_KEY)
        run = await archive_days(pool, location, before=AFTER_WEEK, now=now())
    finally:
        await other.close()
    assert run.busy and not run.days
    assert set(WEEK) <= set(await our_days(pool))


async def test_duckdb_reads_the_local_dataset(pool, history, tmp_path) -> None:
    """DuckDB reads the archive as it is: one dataset, the day as a hive partition."""
    import duckdb

    location = open_archive(str(tmp_path / "archive"))
    await archive_days(pool, location, before=AFTER_WEEK, now=now())
    counted = (
        duckdb.connect()
        .execute(
            "SELECT date, count(*), count(DISTINCT captured_at) FROM read_parquet(?, "
            "hive_partitioning = true) GROUP BY date ORDER BY date",
            [f"{location.dataset_url}/*/*.parquet"],
        )
        .fetchall()
    )
    assert counted == [(day, history.rows_per_day, len(SLOT_TIMES)) for day in WEEK]
    assert location.dataset().count_rows() == history.rows_per_day * len(WEEK)


def digest_of(table: pa.Table, batch_rows: int) -> Digest:
    """The digest of ``table`` added ``batch_rows`` rows at a time."""
    digest = TableDigest(table.schema)
    for batch in table.to_batches(max_chunksize=batch_rows):
        digest.add(batch)
    return digest.digest


DIGEST_TABLE = pa.table(
    {
        "at": pa.array([0, 1, 2, 3], pa.timestamp("us", tz="UTC")),
        "name": pa.array(["O:AAA", "O:AAB", None, ""]),
        "price": pa.array([1.5, -0.0, float("nan"), None]),
        "size": pa.array([1, None, 0, 2**40], pa.int64()),
        "day": pa.array([dt.date(2026, 11, 16), None, dt.date(1970, 1, 1), dt.date(2100, 1, 1)]),
    }
)


@pytest.mark.parametrize(
    ("column", "row", "value"),
    [
        ("price", 0, 1.5000000000000002),  # the last bit of a double
        ("price", 1, 0.0),  # -0.0 and 0.0 are different bits
        ("price", 2, None),  # NaN is not null
        ("price", 3, 0.0),  # null is not 0
        ("size", 1, 0),
        ("size", 3, 2**40 + 1),
        ("at", 0, dt.datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=dt.UTC)),  # a microsecond
        ("name", 2, ""),  # null is not empty
        ("name", 0, "O:AAa"),
        ("day", 1, dt.date(1970, 1, 1)),
    ],
    ids=[
        "last-bit", "sign-of-zero", "nan-to-null", "null-to-zero", "int-null", "int-big",
        "microsecond", "text-null", "text-byte", "date-null",
    ],
)  # fmt: skip
def test_the_digest_changes_with_any_one_value(column: str, row: int, value: Any) -> None:
    """One value changed anywhere (a bit of a double, the sign of zero, a null for a value,
    a microsecond) changes the digest."""
    values = DIGEST_TABLE.column(column).to_pylist()
    values[row] = value
    index = DIGEST_TABLE.schema.get_field_index(column)
    altered = DIGEST_TABLE.set_column(
        index, DIGEST_TABLE.schema.field(index), pa.array(values, DIGEST_TABLE[column].type)
    )
    assert digest_of(altered, 4) != digest_of(DIGEST_TABLE, 4)


def test_the_digest_depends_on_the_values_and_their_order_only(tmp_path: Path) -> None:
    """The digest is the same however the rows are batched, and of the file written from
    them, read back with or without dictionaries; rows swapped, dropped or added change it."""
    whole = digest_of(DIGEST_TABLE, 4)
    assert whole.rows == 4 and whole.checksum.startswith("v2:")
    assert digest_of(DIGEST_TABLE, 1) == digest_of(DIGEST_TABLE, 3) == whole
    path = tmp_path / "day.parquet"
    pq.write_table(DIGEST_TABLE, path, use_dictionary=True, compression="zstd")
    for dictionary in ([], ["name"]):
        read = TableDigest(DIGEST_TABLE.schema)
        for batch in pq.ParquetFile(path, read_dictionary=dictionary).iter_batches(2):
            read.add(batch)
        assert read.digest == whole
    swapped = DIGEST_TABLE.take([1, 0, 2, 3])
    assert digest_of(swapped, 4) != whole
    assert digest_of(DIGEST_TABLE.slice(0, 3), 4).rows == 3
    assert digest_of(pa.concat_tables([DIGEST_TABLE, DIGEST_TABLE.slice(3)]), 4) != whole


async def test_the_archive_has_the_columns_of_snapshot_read(pool) -> None:
    """A day file's columns are those of the SQL type the read functions return, in order."""
    names = await pool.fetch(
        "SELECT a.attname FROM pg_type t JOIN pg_attribute a ON a.attrelid = t.typrelid "
        "WHERE t.typname = 'snapshot_read' AND a.attnum > 0 AND NOT a.attisdropped "
        "ORDER BY a.attnum"
    )
    assert ARCHIVE_SCHEMA.names == [row[0] for row in names]


@pytest.mark.parametrize(
    ("archive", "delete", "kept"),
    [(False, False, True), (False, True, False), (True, False, False)],
    ids=["no-archive-no-deletion-keeps", "deletion-asked-deletes", "archive-archives"],
)
async def test_retention_deletes_nothing_unarchived_unless_asked(
    pool, history, simulator, make_settings, tmp_path, caplog, archive, delete, kept
) -> None:
    """A snapshot run with --retain-days: without ARCHIVE_URL and without
    SNAPSHOT_DELETE_UNARCHIVED it drops nothing and warns; with the deletion asked, it drops
    the old days; with an archive, it archives them first and then drops them."""
    archive_url = str(tmp_path / "archive") if archive else None
    async with simulator(underlyings=UNDERLYINGS, contracts_per_underlying=CONTRACTS) as api:
        settings = make_settings(
            api.base_url, UNDERLYINGS, archive_url=archive_url, delete_unarchived=delete
        )
        with caplog.at_level(logging.WARNING, logger="options.jobs.retention"):
            code = await run_snapshots_job(settings, force=True, retain_days=3)
    assert code == ExitCode.OK
    left = set(await our_days(pool))
    assert (set(WEEK) <= left) is kept
    assert not (set(WEEK) & left) or kept
    if kept:
        assert "are kept: nothing is deleted that is not archived" in caplog.text
    archived = {r.day for r in await list_archived_days(pool, dropped_only=True)}
    assert archived == (set(WEEK) if archive else set())


def test_first_kept_day_cuts_like_retention() -> None:
    """Keeping 3 days on the 23rd keeps the 20th on: the 19th and before are archived."""
    at = dt.datetime(2026, 11, 23, 15, tzinfo=dt.UTC)
    assert first_kept_day(at, 3) == dt.date(2026, 11, 20)


def test_cli_archive_needs_an_archive(database_url: str, tmp_path: Path) -> None:
    """ingest_admin archive without ARCHIVE_URL is refused in one line (exit 2); with one, on
    a database with no old day, it says there is nothing to archive."""
    refused = ingest_admin("archive", "--dry-run", env={"DATABASE_URL": database_url}, cwd=tmp_path)
    assert refused.returncode == ExitCode.USAGE
    assert refused.stderr.startswith("error: ARCHIVE_URL is not set")
    env = {"DATABASE_URL": database_url, "ARCHIVE_URL": str(tmp_path / "a"), "LOG_LEVEL": "ERROR"}
    done = ingest_admin("archive", "--older-than", "3", env=env, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, "nothing to archive\n")


async def test_cli_archive_prints_a_table(pool, history, database_url, tmp_path) -> None:
    """ingest_admin archive prints each day's rows, bytes and bytes per snapshot, and a
    total; a second run finds nothing to do."""
    env = {
        "DATABASE_URL": database_url,
        "ARCHIVE_URL": str(tmp_path / "archive"),
        "LOG_LEVEL": "WARNING",
    }
    command = ("archive", "--before", AFTER_WEEK.isoformat())
    done = await asyncio.to_thread(ingest_admin, *command, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "day", "rows", "parquet", "bytes", "B/snapshot", "postgres", "bytes", "B/row",
        "archive", "pg",
    ]  # fmt: skip
    by_day = {line.split()[0]: line.split() for line in lines[1:]}
    for day in WEEK:
        assert by_day[day.isoformat()][1] == f"{history.rows_per_day:,}"
        assert by_day[day.isoformat()][-2:] == ["archived", "dropped"]
    assert by_day["total"][1] == f"{history.rows_per_day * len(WEEK):,}"
    again = await asyncio.to_thread(ingest_admin, *command, env=env, cwd=tmp_path)
    assert (again.returncode, again.stdout) == (0, "nothing to archive\n")


def options_read(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``options_read`` with only ``env`` (and PATH), in ``cwd``."""
    return subprocess.run(
        [str(BIN / "options_read"), *args],
        env={"PATH": os.environ.get("PATH", ""), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("tier", ["local", "s3"])
async def test_a_chain_reads_the_same_before_and_after_its_week_is_archived(
    pool, history, database_url, tmp_path, tier, request
) -> None:
    """`options_read chain` on a day of the week prints the same rows (every column, csv) and
    the same table before the week is archived and dropped from PostgreSQL and after, when the
    day is read from Parquet: on a local directory and on the S3-compatible server."""
    env = {"DATABASE_URL": database_url, "HOME": str(tmp_path)}
    if tier == "local":
        env["ARCHIVE_URL"] = str(tmp_path / "archive")
        location = open_archive(env["ARCHIVE_URL"])
    else:
        settings = request.getfixturevalue("s3_settings")
        assert settings.archive_url is not None and settings.s3 is not None
        env |= {
            "ARCHIVE_URL": settings.archive_url,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_ENDPOINT_URL": str(settings.s3.endpoint_url),
            "AWS_REGION": "us-east-1",
        }
        found = archive_location(settings)
        assert found is not None
        location = found
    # Wednesday 14:45 New York: the slot of 14:30 that day
    at = ("--at", "2026-11-18 14:45")
    before_csv = options_read("chain", "AAA", *at, "--format", "csv", env=env, cwd=tmp_path)
    before_table = options_read("chain", "AAA", *at, env=env, cwd=tmp_path)
    assert before_csv.returncode == 0, before_csv.stderr
    assert len(before_csv.stdout.split()) == CONTRACTS + 1  # the header and every contract

    run = await archive_days(pool, location, before=AFTER_WEEK, now=now())
    assert [d.day for d in run.days if d.rows] == list(WEEK)
    assert not set(WEEK) & set(await our_days(pool))

    after_csv = options_read("chain", "AAA", *at, "--format", "csv", env=env, cwd=tmp_path)
    after_table = options_read("chain", "AAA", *at, env=env, cwd=tmp_path)
    assert after_csv.returncode == 0, after_csv.stderr
    assert after_csv.stdout == before_csv.stdout
    assert after_table.stdout == before_table.stdout
    # the line on stderr names the tier read, and only that differs
    assert before_table.stderr.rstrip().endswith("(from postgresql)")
    assert after_table.stderr.replace("(from archive)", "(from postgresql)") == (
        before_table.stderr
    )
