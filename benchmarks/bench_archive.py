"""Benchmark the Parquet archive on a realistic simulated day: bytes per snapshot, and speed.

A day of the simulator's market is stored by the real jobs: contracts synced, then
``ingest_snapshots`` (in-process) once per slot, 39 slots ten minutes apart (09:30 to 15:50
New York), the simulator's clock set to each slot's minute so prices, greeks and IV move as
they would through a day; each slot is then moved to its time on a past day (the job stamps
slots with the database's clock). The day is then archived to a temporary directory by the
real ``ingest_admin archive --before`` as a child process (its wall time and peak RSS are
measured): written, read back, verified, recorded, dropped. Prints the file's bytes per
snapshot (and per column), the partition's bytes per row before it was dropped, and the
archive's speed.

Uses BENCH_DATABASE_URL when set (a database whose public schema it may drop), else a
throwaway local PostgreSQL.

    .venv/bin/python benchmarks/bench_archive.py [--underlyings 4] [--contracts 2000] [--slots 39]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import os
import tempfile

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq
from harness import benchmark_database, header, reset_database, run_child

import options.simulator.app as simulator_app
from options.config import Secret, Settings
from options.errors import ExitCode
from options.jobs.wiring import run_options_job, run_snapshots_job
from options.simulator import SimulatorConfig, create_app, make_universe_names, start_server
from options.store.archive_files import WRITER_OPTIONS, open_archive
from options.store.partitions import ensure_partitions, partition_name

DAY = dt.date(2026, 11, 20)  # a Friday, before the clock's today
FIRST_SLOT = dt.datetime(2026, 11, 20, 14, 30, tzinfo=dt.UTC)  # 09:30 in New York
KEY = "bench-key"
FLOAT32_WHAT_IF = ("implied_volatility", "delta", "gamma", "theta", "vega")


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


async def day_sizes(dsn: str) -> tuple[int, int | None]:
    """The partition's size with its primary key, and the archived file's size (if any)."""
    conn = await asyncpg.connect(dsn)
    try:
        size = await conn.fetchval(
            "SELECT pg_total_relation_size(to_regclass($1))", partition_name(DAY)
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


def float32_what_if(path: str) -> int:
    """The file's size if the greeks and IV carried a float's precision (7 digits) instead of
    a double's: what a PostgreSQL ``real`` column would hand the archive. Not what is written."""
    table = pq.read_table(path)
    for name in FLOAT32_WHAT_IF:
        column = table[name].cast(pa.float32()).cast(pa.float64())
        table = table.set_column(table.schema.get_field_index(name), name, column)
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=table.num_rows, **WRITER_OPTIONS)
    return len(sink.getvalue())


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
        seconds, code, rss = run_child("ingest_admin", env, "archive", "--before", before)
        assert code == 0, code
        gone, parquet = asyncio.run(day_sizes(dsn))
        assert gone is None and parquet is not None
        path = open_archive(directory).day_file(DAY)
        print(
            f"{args.underlyings} underlyings x {args.contracts:,} contracts x {args.slots} "
            f"slots = {rows:,} snapshots of {DAY} (simulator)"
        )
        print(f"PostgreSQL partition (table and primary key): {postgres / rows:.1f} B per row")
        print(
            f"Parquet: {parquet:,} bytes, {parquet / rows:.1f} B per snapshot "
            f"({postgres / parquet:.1f}x smaller)"
        )
        print(
            f"ingest_admin archive of the day (export, write, read back, verify, record, drop): "
            f"{seconds:.2f} s, {rows / seconds:,.0f} rows/s, peak RSS {rss} MB"
        )
        print("bytes per snapshot by column:")
        for name, size in column_bytes(path):
            print(f"  {name:20s} {size / rows:6.2f}")
        what_if = float32_what_if(path)
        print(
            f"what if greeks and IV kept 7 digits (float4 in PostgreSQL; not what is written): "
            f"{what_if / rows:.1f} B per snapshot"
        )


if __name__ == "__main__":
    main()
