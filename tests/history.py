"""Stored history for the read tests, made by the real jobs against the simulator, and a Parquet
archive of it written as the archive layout says."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq

from options.config import Settings
from options.errors import ExitCode
from options.jobs.wiring import run_options_job, run_snapshots_job
from options.simulator import RunningSimulator
from options.store.archive_files import ARCHIVE_DATASET
from options.store.reads import Reader, utc_day

UNDERLYINGS = ("AAA", "BBB")
CONTRACTS = 300  # three expirations of 50 strikes, calls and puts


@dataclass(frozen=True)
class History:
    """Three slots: AAA complete at the first two and incomplete at the third (its chain
    snapshot answered 500), BBB complete at all three."""

    settings: Settings
    slots: tuple[dt.datetime, dt.datetime, dt.datetime]


async def make_history(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> History:
    """Sync the contracts, take two snapshots, then a third with AAA's chain broken."""
    async with simulator(underlyings=UNDERLYINGS, contracts_per_underlying=CONTRACTS) as api:
        settings = make_settings(api.base_url, UNDERLYINGS)
        assert await run_options_job(settings) == ExitCode.OK
        for _ in range(2):
            now = dt.datetime.now(dt.UTC)
            assert await run_snapshots_job(settings, force=True, now=now) == ExitCode.OK
    async with simulator(
        underlyings=UNDERLYINGS, contracts_per_underlying=CONTRACTS, broken_pages={"AAA": 1}
    ) as api:
        broken = make_settings(api.base_url, UNDERLYINGS)
        now = dt.datetime.now(dt.UTC)
        assert await run_snapshots_job(broken, force=True, now=now) == ExitCode.PARTIAL
    rows = await pool.fetch(
        "SELECT captured_at FROM ingest_runs WHERE job = 'snapshots' ORDER BY id"
    )
    first, second, third = (row["captured_at"] for row in rows)
    coverage = {
        (row["underlying_ticker"], row["captured_at"]): row["complete"]
        for row in await pool.fetch("SELECT * FROM snapshot_coverage")
    }
    assert coverage == {
        **{(u, s): True for u in UNDERLYINGS for s in (first, second, third)},
        ("AAA", third): False,
    }
    return History(settings, (first, second, third))


async def write_archive(
    reader: Reader,
    history: History,
    root: Path,
    *,
    schema: pa.Schema | None = None,
) -> list[dt.date]:
    """Write every stored complete chain of ``history`` to ``root/option_snapshots/date=DAY/``
    (UTC days), read through ``reader`` from PostgreSQL; return the days written.

    ``schema``: write with these column types instead of the read's own (an archive writer
    may choose other widths)."""
    tables: dict[dt.date, list[pa.Table]] = {}
    start, end = history.slots[0], history.slots[-1] + dt.timedelta(seconds=1)
    for underlying, slots in (await reader.complete_slots(start, end)).items():
        for slot in slots:
            chain = await reader.chain(underlying, slot)
            assert chain.captured_at == slot
            tables.setdefault(utc_day(slot), []).append(chain.table)
    for day, parts in tables.items():
        table = pa.concat_tables(parts)
        if schema is not None:
            table = table.cast(schema)
        directory = root / ARCHIVE_DATASET / f"date={day.isoformat()}"
        directory.mkdir(parents=True)
        pq.write_table(table, directory / "part-0.parquet", compression="zstd")
    return sorted(tables)


async def mark_dropped(pool: asyncpg.Pool, root: Path, days: list[dt.date]) -> bool:
    """Record ``days`` of the archive at ``root`` in ``archived_days`` as archived and dropped,
    and in ``stored_days`` as archived (their PostgreSQL rows stay); ``False`` when the table
    does not exist (the archive's migration is not there)."""
    if not await pool.fetchval("SELECT to_regclass('archived_days') IS NOT NULL"):
        return False
    rows = []
    for day in days:
        file = root / ARCHIVE_DATASET / f"date={day.isoformat()}" / "part-0.parquet"
        count = pq.ParquetFile(file).metadata.num_rows
        rows.append((day, str(file), count, file.stat().st_size))
    await pool.executemany(
        """
        INSERT INTO archived_days (day, url, rows, bytes, checksum, archived_at, dropped_at)
        VALUES ($1, $2, $3, $4, 'written by the test', now(), now())
        """,
        rows,
    )
    if await pool.fetchval("SELECT to_regclass('stored_days') IS NOT NULL"):
        await pool.executemany(
            "INSERT INTO stored_days (day, tier) VALUES ($1, 'archived') "
            "ON CONFLICT (day) DO UPDATE SET tier = 'archived'",
            [(day,) for day in days],
        )
    return True
