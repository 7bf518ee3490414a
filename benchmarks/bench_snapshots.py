"""Benchmark ``ingest_snapshots`` end to end against the simulator, and a baseline.

For each scenario: the contracts are synced first (not timed), then the real ``ingest_snapshots``
console script runs as a child process; rows/s is rows stored divided by the wall time of that
whole process (start-up, migrations and the run ledger included). It runs once against a
simulator that renders every page live, and, for universes small enough for the baseline, once
against one whose pages were rendered by an earlier, untimed run; the baseline reads those same
pre-rendered pages, so the ratio compares clients and inserts. The baseline is written the
way the official client invites: ``massive.RESTClient.list_snapshot_options_chain(u,
params={"limit": 250})`` underlying after underlying, each chain inserted with asyncpg
``executemany``. Needs ``pip install massive==2.9.1`` for the baseline (``make bench`` does it).
Uses BENCH_DATABASE_URL when set (a database it may drop tables in), else a throwaway local
PostgreSQL.

    .venv/bin/python benchmarks/bench_snapshots.py [--scenarios 200x1000@20ms,1000x1000@0ms]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time
from typing import Any

import asyncpg
from harness import (
    KEY,
    api_requests,
    benchmark_database,
    header,
    job_env,
    reset_database,
    run_child,
)

from options.api.normalize import SNAPSHOT_COLUMNS
from options.simulator import SimulatorConfig, SimulatorProcess, make_universe_names

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def ns(value: int | None) -> dt.datetime | None:
    return None if not value else EPOCH + dt.timedelta(microseconds=value // 1000)


def baseline_row(snap: Any, underlying: str, captured_at: dt.datetime) -> tuple[Any, ...]:
    """One row from a massive OptionContractSnapshot model, the same columns as ours."""
    quote, trade, day = snap.last_quote, snap.last_trade, snap.day
    greeks, asset = snap.greeks, snap.underlying_asset

    def get(obj: Any, name: str) -> Any:
        return getattr(obj, name, None) if obj is not None else None

    return (
        snap.details.ticker,
        underlying,
        captured_at,
        get(quote, "bid"),
        get(quote, "bid_size"),
        get(quote, "ask"),
        get(quote, "ask_size"),
        get(quote, "midpoint"),
        ns(get(quote, "last_updated")),
        get(trade, "price"),
        get(trade, "size"),
        ns(get(trade, "sip_timestamp")),
        get(day, "open"),
        get(day, "high"),
        get(day, "low"),
        get(day, "close"),
        get(day, "volume"),
        get(day, "vwap"),
        get(day, "change"),
        get(day, "change_percent"),
        get(day, "previous_close"),
        snap.implied_volatility,
        get(greeks, "delta"),
        get(greeks, "gamma"),
        get(greeks, "theta"),
        get(greeks, "vega"),
        snap.open_interest,
        snap.break_even_price,
        get(asset, "price") if get(asset, "price") is not None else get(asset, "value"),
        getattr(snap, "fmv", None),  # the models have no fmv field
    )


async def run_baseline(dsn: str, base_url: str, names: tuple[str, ...]) -> tuple[float, int]:
    """The official client's way: sequential chains, executemany per chain."""
    from massive import RESTClient

    client = RESTClient(api_key=KEY, base=base_url)
    conn = await asyncpg.connect(dsn)
    columns = ", ".join(SNAPSHOT_COLUMNS)
    placeholders = ", ".join(f"${i}" for i in range(1, len(SNAPSHOT_COLUMNS) + 1))
    try:
        await conn.execute("DROP TABLE IF EXISTS baseline_snapshots")
        await conn.execute(
            "CREATE TABLE baseline_snapshots (LIKE option_snapshots INCLUDING DEFAULTS, "
            "PRIMARY KEY (ticker, captured_at))"
        )
        insert = f"INSERT INTO baseline_snapshots ({columns}) VALUES ({placeholders})"
        captured_at = dt.datetime.now(dt.UTC)
        started = time.perf_counter()
        stored = 0
        for underlying in names:
            rows = [
                baseline_row(snap, underlying, captured_at)
                for snap in client.list_snapshot_options_chain(underlying, params={"limit": 250})
            ]
            await conn.executemany(insert, rows)
            stored += len(rows)
        return time.perf_counter() - started, stored
    finally:
        await conn.close()


async def last_run(dsn: str) -> tuple[int, bool]:
    """Rows written by the latest snapshot run, and whether every chain was complete."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT r.rows_written, bool_and(c.complete) AS complete FROM ingest_runs r "
            "JOIN snapshot_coverage c ON c.run_id = r.id "
            "WHERE r.id = (SELECT max(id) FROM ingest_runs WHERE job = 'snapshots') "
            "GROUP BY r.rows_written"
        )
        return int(row["rows_written"]), bool(row["complete"])
    finally:
        await conn.close()


def scenario(dsn: str, underlyings: int, contracts: int, latency_ms: int, baseline: bool) -> None:
    """Sync contracts, then time ingest_snapshots with live and pre-rendered simulator pages."""
    names = make_universe_names(underlyings)
    reset_database(dsn)
    label = f"{underlyings} x {contracts} @ {latency_ms} ms"
    ideal = underlyings * -(-contracts // 250)

    def simulator(pre_rendered: bool) -> SimulatorProcess:
        # the same universe either way; pre-rendered pages are rendered by the first run
        return SimulatorProcess(
            SimulatorConfig(
                underlyings=names,
                contracts_per_underlying=contracts,
                api_key=KEY,
                latency=latency_ms / 1000,
                cache_chain_pages=pre_rendered,
            )
        )

    def timed_run(env: dict[str, str], base_url: str, how: str) -> float:
        before = api_requests(base_url)
        # --force: the benchmark must not depend on the market being open
        seconds, code, peak_mb = run_child("ingest_snapshots", env, "--force")
        requests = api_requests(base_url) - before
        stored, complete = asyncio.run(last_run(dsn))
        print(
            f"{label:<22} ingest_snapshots ({how}): exit {code}, {stored:,} rows in "
            f"{seconds:.2f} s = {stored / seconds:,.0f} rows/s, {requests:,} API requests "
            f"(chain pages needed: {ideal:,}), complete={complete}, peak RSS {peak_mb} MB",
            flush=True,
        )
        return stored / seconds

    with simulator(pre_rendered=False) as live:
        env = job_env(dsn, live.base_url, names)
        _, code, _ = run_child("ingest_options", env)
        assert code == 0, f"ingest_options exited {code}"
        env.pop("UNDERLYINGS")  # the tracked underlyings ingest_options recorded, as in production
        timed_run(env, live.base_url, "simulator renders live")
    if not baseline:
        return
    # Against the baseline, both sides read pages the simulator has rendered before, so the
    # comparison is of the clients and the inserts, not of the simulator's rendering.
    with simulator(pre_rendered=True) as cached:
        env = job_env(dsn, cached.base_url, names)
        env.pop("UNDERLYINGS")
        _, code, _ = run_child("ingest_snapshots", env, "--force")  # renders the pages once
        assert code == 0, f"ingest_snapshots exited {code} while pre-rendering"
        ours = timed_run(env, cached.base_url, "pages pre-rendered")
        before = api_requests(cached.base_url)
        base_seconds, base_stored = asyncio.run(run_baseline(dsn, cached.base_url, names))
        base_requests = api_requests(cached.base_url) - before
        theirs = base_stored / base_seconds
        print(
            f"{label:<22} baseline, massive + executemany (pages pre-rendered): "
            f"{base_stored:,} rows in {base_seconds:.2f} s = {theirs:,.0f} rows/s, "
            f"{base_requests:,} API requests; ingest_snapshots is {ours / theirs:.1f}x faster",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios",
        default="200x1000@20ms,1000x1000@0ms",
        help="UNDERLYINGSxCONTRACTS@LATENCYms, comma-separated (%(default)s)",
    )
    parser.add_argument(
        "--baseline-max-rows",
        type=int,
        default=300_000,
        help="run the baseline only for universes up to this size",
    )
    args = parser.parse_args()
    print(header("ingest_snapshots"))
    with benchmark_database() as dsn:
        for spec in args.scenarios.split(","):
            size, latency = spec.split("@")
            underlyings, contracts = (int(n) for n in size.split("x"))
            scenario(
                dsn,
                underlyings,
                contracts,
                int(latency.removesuffix("ms")),
                baseline=underlyings * contracts <= args.baseline_max_rows,
            )


if __name__ == "__main__":
    main()
