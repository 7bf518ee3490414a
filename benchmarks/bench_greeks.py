"""Computed IV and greeks: rows per second of the vectorised model, and a snapshot run's time
with and without the step.

1. ``compute`` (:mod:`options.jobs.greeks`) on ``--rows`` synthetic quotes (strikes 50-150% of
   the spot, 2 days to 2 years, volatilities 5-200%, half calls; the mid is the model price
   plus a random spread): rows per second, the best of 3.
2. What the snapshot service runs, against the simulator (pre-rendered pages, so the API side
   is the same each time), ``--repeats`` times: ``ingest_snapshots --force``, then
   ``ingest_admin greeks`` (its ``ExecStartPost=``): the wall time of each, and the rows
   computed.

    .venv/bin/python benchmarks/bench_greeks.py [--rows 1000000] [--underlyings 200]
        [--contracts 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
from harness import (
    KEY,
    benchmark_database,
    fetch_value,
    header,
    job_env,
    reset_database,
    run_child,
)

from options.jobs.greeks import bsm_price, compute
from options.simulator import SimulatorConfig, SimulatorProcess, make_universe_names


def model_speed(rows: int) -> None:
    rng = np.random.default_rng(11)
    spot = np.full(rows, 100.0)
    strike = rng.uniform(50.0, 150.0, rows)
    years = rng.uniform(2 / 365, 2.0, rows)
    vol = rng.uniform(0.05, 2.0, rows)
    is_call = rng.random(rows) < 0.5
    price = bsm_price(spot, strike, years, vol, is_call, 0.04, 0.0)
    half = 0.005 + 0.01 * price * rng.random(rows)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        result = compute(
            price - half, price + half, spot, strike, years, is_call, rate=0.04, dividend=0.0
        )
        best = min(best, time.perf_counter() - started)
    done = sum(reason is None for reason in result.reason)
    print(
        f"compute: {rows:,} rows in {best:.2f} s = {rows / best:,.0f} rows/s "
        f"({done:,} computed, {rows - done:,} with a reason)",
        flush=True,
    )


def snapshot_runs(dsn: str, underlyings: int, contracts: int, repeats: int) -> None:
    names = make_universe_names(underlyings)
    reset_database(dsn)
    config = SimulatorConfig(
        underlyings=names,
        contracts_per_underlying=contracts,
        api_key=KEY,
        cache_chain_pages=True,
    )
    with SimulatorProcess(config) as api:
        env = job_env(dsn, api.base_url, names)
        _, code, _ = run_child("ingest_options", env)
        assert code == 0, code
        run_child("ingest_snapshots", env, "--force")  # renders the pages once
        run_child("ingest_admin", env, "greeks", "--since", "1h")
        for n in range(repeats):
            before = asyncio.run(fetch_value(dsn, "SELECT count(*) FROM computed_greeks"))
            job, code, job_peak = run_child("ingest_snapshots", env, "--force")
            assert code == 0, code
            step, code, step_peak = run_child("ingest_admin", env, "greeks", "--since", "1h")
            assert code == 0, code
            after = asyncio.run(fetch_value(dsn, "SELECT count(*) FROM computed_greeks"))
            print(
                f"run {n + 1}: ingest_snapshots {job:.2f} s (peak RSS {job_peak} MB); then "
                f"ingest_admin greeks {step:.2f} s (peak RSS {step_peak} MB, "
                f"{after - before:,} rows): {job + step:.2f} s with the step",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--underlyings", type=int, default=200)
    parser.add_argument("--contracts", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(header("greeks"))
    # the jobs first: a child's peak RSS counts from the parent's size when it was forked
    with benchmark_database() as dsn:
        snapshot_runs(dsn, args.underlyings, args.contracts, args.repeats)
    model_speed(args.rows)


if __name__ == "__main__":
    main()
