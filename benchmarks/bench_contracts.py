"""Benchmark ``ingest_options`` end to end against the simulator.

Runs the real console script as a child process (so the figures include start-up, migrations and
the run ledger) on simulated universes of different sizes, twice each (a first sync that inserts,
then a re-sync that updates every row), and prints contracts/s, API requests and the job's peak
memory. Uses BENCH_DATABASE_URL when set (a database it may drop tables in), else a throwaway
local PostgreSQL.

    .venv/bin/python benchmarks/bench_contracts.py [--sizes 100x1000,1000x1000]
"""

from __future__ import annotations

import argparse
import asyncio

from harness import (
    KEY,
    api_requests,
    benchmark_database,
    fetch_value,
    header,
    job_env,
    reset_database,
    run_child,
)

from options.simulator import SimulatorConfig, SimulatorProcess, make_universe_names


def bench(dsn: str, underlyings: int, contracts: int) -> None:
    names = make_universe_names(underlyings)
    config = SimulatorConfig(underlyings=names, contracts_per_underlying=contracts, api_key=KEY)
    reset_database(dsn)
    with SimulatorProcess(config) as simulator:
        env = job_env(dsn, simulator.base_url, names)
        for label in ("first sync", "re-sync"):
            before = api_requests(simulator.base_url)
            seconds, code, peak_mb = run_child("ingest_options", env)
            requests = api_requests(simulator.base_url) - before
            stored = asyncio.run(
                fetch_value(dsn, "SELECT count(*) FROM option_contracts WHERE active")
            )
            print(
                f"{underlyings:>5} x {contracts:<5} {label:<10} exit {code}  "
                f"{stored:>9,} contracts in {seconds:6.2f} s = "
                f"{stored / seconds:>9,.0f} contracts/s  "
                f"{requests:>6,} API requests  peak RSS {peak_mb} MB",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="100x1000,1000x1000",
        help="comma-separated UNDERLYINGSxCONTRACTS (default: %(default)s)",
    )
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")]
    print(header("ingest_options"))
    with benchmark_database() as dsn:
        for underlyings, contracts in sizes:
            bench(dsn, underlyings, contracts)


if __name__ == "__main__":
    main()
