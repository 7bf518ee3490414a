"""Storage on a realistic simulated day: bytes per snapshot in each tier (PostgreSQL as written,
PostgreSQL compacted, Parquet), and the speed of compaction and archiving.

A day of the simulator's market is stored by the real jobs: contracts synced, then
``ingest_snapshots`` (in-process) once per slot, 39 slots ten minutes apart (09:30 to 15:50
New York), the simulator's clock set to each slot's minute so prices, greeks and IV move as
they would through a day; each slot is then moved to its time on a past day (the job stamps
slots with the database's clock). The day is then compacted by the real ``ingest_admin
compact`` and archived to a temporary directory by the real ``ingest_admin archive --before``,
each as a child process (wall time and peak RSS measured). Prints the bytes per snapshot of the
day's ``option_snapshots`` partition as the job wrote it, of its ``snapshot_rows`` partition
after compaction (``pg_total_relation_size``: table, TOAST and every index), and of the Parquet
file (and per column), both commands' speed, and the time of the archive's digest of every
value (the file read back and digested, as the archive verifies it: once staged, and on S3
once more in place).

Uses BENCH_DATABASE_URL when set (a database whose public schema it may drop), else a
throwaway local PostgreSQL.

    .venv/bin/python benchmarks/bench_archive.py [--underlyings 4] [--contracts 2000] [--slots 39]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import tempfile
import time

import asyncpg
import pyarrow.parquet as pq
from harness import benchmark_database, header, reset_database, run_child

import options.simulator.app as simulator_app
from options.config import Secret, Settings
from options.errors import ExitCode
from options.jobs.wiring import run_options_job, run_snapshots_job
from options.simulator import SimulatorConfig, create_app, make_universe_names, start_server
from options.store.archive_files import open_archive, read_digest
from options.store.partitions import COMPACT, WIDE, ensure_partitions, partition_name

DAY = dt.date(2026, 11, 20)  # a Friday, before the clock's today
FIRST_SLOT = dt.datetime(2026, 11, 20, 14, 30, tzinfo=dt.UTC)  # 09:30 in New York
KEY = "bench-key"


async def store_day(dsn: str, underlyings: int, contracts: int, slots: int) -> int:
    """Store ``slots`` snapshots of the simulated universe on :data:`DAY`; return the rows."""
    names = make_universe_names(underlyings)
    config = SimulatorConfig(
        underlyings=names, contracts_per_underlying=contracts, api_key=KEY, seed=7
    )
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    async with await start_server(create_app(config)) as api:
        settings = Settings(
            database_url=Secret(dsn),
            api_key=Secret(KEY),
            base_url=api.base_url,
            underlyings=names,
            rate_limit=None,
            log_level="WARNING",
        )
        assert await run_options_job(settings) == ExitCode.OK
        await ensure_partitions(pool, DAY, days_ahead=0)
        for n in range(slots):
            slot = FIRST_SLOT + dt.timedelta(minutes=10 * n)
            minute = int(slot.timestamp() // 60)
            # the simulator prices each wall-clock minute: give it the slot's
            simulator_app._minute = lambda minute=minute: minute  # type: ignore[attr-defined]
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
    rows = await pool.fetchval(f"SELECT count(*) FROM {partition_name(DAY)}")
    await pool.execute(f"VACUUM ANALYZE {partition_name(DAY)}")
    await pool.close()
    return int(rows)


async def day_sizes(dsn: str, table: str = WIDE) -> tuple[int, int | None]:
    """The day's partition of ``table`` with its indexes, and the archived file's size (if
    any)."""
    conn = await asyncpg.connect(dsn)
    try:
        size = await conn.fetchval(
            "SELECT pg_total_relation_size(to_regclass($1))", partition_name(DAY, table)
        )
        archived = await conn.fetchval("SELECT bytes FROM archived_days WHERE day = $1", DAY)
    finally:
        await conn.close()
    return size, archived


def column_bytes(path: str) -> list[tuple[str, int]]:
    """Each column's compressed bytes in the file, largest first."""
    meta = pq.ParquetFile(path).metadata
    sizes: dict[str, int] = {}
    for group in range(meta.num_row_groups):
        for index in range(meta.num_columns):
            chunk = meta.row_group(group).column(index)
            sizes[chunk.path_in_schema] = (
                sizes.get(chunk.path_in_schema, 0) + chunk.total_compressed_size
            )
    return sorted(sizes.items(), key=lambda item: -item[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--underlyings", type=int, default=4)
    parser.add_argument("--contracts", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=39)
    args = parser.parse_args()
    print(header("archive"))
    with benchmark_database() as dsn, tempfile.TemporaryDirectory() as directory:
        reset_database(dsn)
        rows = asyncio.run(store_day(dsn, args.underlyings, args.contracts, args.slots))
        postgres, _ = asyncio.run(day_sizes(dsn))
        env = {**os.environ, "DATABASE_URL": dsn, "ARCHIVE_URL": directory, "LOG_LEVEL": "WARNING"}
        before = (DAY + dt.timedelta(days=1)).isoformat()
        compact_seconds, code, compact_rss = run_child(
            "ingest_admin", env, "compact", "--before", before
        )
        assert code == 0, code
        compact, _ = asyncio.run(day_sizes(dsn, COMPACT))
        seconds, code, rss = run_child("ingest_admin", env, "archive", "--before", before)
        assert code == 0, code
        gone, parquet = asyncio.run(day_sizes(dsn))
        assert gone is None and parquet is not None
        location = open_archive(directory)
        path = location.day_file(DAY)
        started = time.perf_counter()
        found = read_digest(location, path)
        digest_seconds = time.perf_counter() - started
        assert found is not None and found[0].rows == rows
        print(
            f"{args.underlyings} underlyings x {args.contracts:,} contracts x {args.slots} "
            f"slots = {rows:,} snapshots of {DAY} (simulator)"
        )
        print(
            f"PostgreSQL as written (option_snapshots, table and indexes): {postgres:,} bytes, "
            f"{postgres / rows:.1f} B per snapshot"
        )
        print(
            f"PostgreSQL compacted (snapshot_rows, table and indexes): {compact:,} bytes, "
            f"{compact / rows:.1f} B per snapshot"
        )
        print(
            f"Parquet: {parquet:,} bytes, {parquet / rows:.1f} B per snapshot "
            f"({compact / parquet:.1f}x smaller than compacted)"
        )
        print(
            f"ingest_admin compact of the day (rewrite, verify, truncate, drop): "
            f"{compact_seconds:.2f} s, {rows / compact_seconds:,.0f} rows/s, "
            f"peak RSS {compact_rss} MB"
        )
        print(
            f"ingest_admin archive of the day (export, write, read back, verify, record, drop): "
            f"{seconds:.2f} s, {rows / seconds:,.0f} rows/s, peak RSS {rss} MB"
        )
        print(
            f"digest of every value, the file read back: {digest_seconds:.2f} s, "
            f"{rows / digest_seconds:,.0f} rows/s ({found[0].checksum})"
        )
        print("bytes per snapshot by column:")
        for name, size in column_bytes(path):
            print(f"  {name:20s} {size / rows:6.2f}")


if __name__ == "__main__":
    main()
