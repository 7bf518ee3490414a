"""Read latencies on a month of history: a chain at a time, a contract's month, the latest chain.

Fills a benchmark database with 30 trading days x 39 slots x 10,000 contracts of one underlying
(11.7 million snapshots, written by SQL straight into the day partitions the jobs use, each slot
with its complete coverage row, then compacted as ``ingest_options`` compacts finished days:
the reads decode the compact tier), then times the three reads through the SQL functions every
client uses (psql, pandas, `options_read`): `chain_at`, `contract_history` over the month and
`latest_chain`. Each is run 30 times after one warm-up, on fresh arguments each time; the
median and the 95th percentile are printed, then each plan (EXPLAIN ANALYZE, BUFFERS).

    .venv/bin/python benchmarks/bench_reads.py [--days 30] [--contracts 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from zoneinfo import ZoneInfo

import asyncpg
from harness import benchmark_database, reset_database

from options.ops.calendar import sessions_between
from options.store.compaction import compact_days
from options.store.db import apply_migrations
from options.store.partitions import COMPACT, WIDE, ensure_partitions

NEW_YORK = ZoneInfo("America/New_York")
UNDERLYING = "BENCH"
RUNS = 30


def contract_tickers(count: int) -> list[tuple[str, str, dt.date, float]]:
    """``count`` contracts: calls and puts at 50-cent strikes over as many expirations as needed."""
    contracts = []
    expiration = dt.date(2026, 12, 18)
    strikes = 250
    while len(contracts) < count:
        for n in range(strikes):
            strike = 50 + n * 0.5
            for kind, letter in (("call", "C"), ("put", "P")):
                ticker = f"O:{UNDERLYING}{expiration:%y%m%d}{letter}{round(strike * 1000):08d}"
                contracts.append((ticker, kind, expiration, strike))
        expiration += dt.timedelta(days=28)
    return contracts[:count]


async def fill(pool: asyncpg.Pool, days: int, count: int) -> list[dt.datetime]:
    """The contracts, the partitions, the snapshots and the coverage; returns the slots."""
    async with pool.acquire() as conn:
        return await _fill(pool, conn, days, count)


async def _fill(
    pool: asyncpg.Pool, conn: asyncpg.Connection, days: int, count: int
) -> list[dt.datetime]:
    contracts = contract_tickers(count)
    await conn.executemany(
        "INSERT INTO option_contracts (ticker, underlying_ticker, contract_type, "
        "expiration_date, strike_price, first_seen_at, last_seen_at) "
        "VALUES ($1, $2, $3, $4, $5, now(), now())",
        [(t, UNDERLYING, kind, exp, strike) for t, kind, exp, strike in contracts],
    )
    end = dt.date(2026, 11, 30)
    sessions = sessions_between(end - dt.timedelta(days=days * 2), end)[-days:]
    run_id = await conn.fetchval(
        "INSERT INTO ingest_runs (job, started_at, finished_at, status) "
        "VALUES ('snapshots', now(), now(), 'succeeded') RETURNING id"
    )
    slots: list[dt.datetime] = []
    for session in sessions:
        day_slots = []
        moment = session.open
        while moment < session.close:
            day_slots.append(moment)
            moment += dt.timedelta(minutes=10)
        day = day_slots[0].astimezone(dt.UTC).date()
        await ensure_partitions(pool, day, days_ahead=0)
        started = time.perf_counter()
        await conn.execute(
            """
            INSERT INTO option_snapshots (ticker, underlying_ticker, captured_at, bid, bid_size,
                ask, ask_size, midpoint, quote_updated_at, last_price, last_size, last_trade_at,
                day_open, day_high, day_low, day_close, day_volume, day_vwap,
                day_previous_close, day_change, day_change_percent, implied_volatility, delta,
                gamma, theta, vega, open_interest, break_even_price, underlying_price)
            -- prices in whole cents, the midpoint, day change and break-even as the API
            -- computes them
            SELECT c.ticker, $1, s.at, p.bid, 10, p.ask, 12, p.mid,
                   s.at - interval '3 seconds', p.close, 1, s.at - interval '5 minutes',
                   p.bid, p.high, p.low, p.close, 100, p.vwap, p.bid, p.close - p.bid,
                   (p.close - p.bid) / p.bid * 100,
                   0.2 + random() * 0.3, random(), random() / 10, -random() / 10, random(),
                   1000,
                   CASE c.contract_type WHEN 'call' THEN c.strike_price::float8 + p.mid
                                        ELSE c.strike_price::float8 - p.mid END,
                   100.25
            FROM unnest($2::timestamptz[]) AS s(at)
            CROSS JOIN option_contracts c
            CROSS JOIN LATERAL (SELECT 1 + floor(random() * 2000)::int AS cents) r
            CROSS JOIN LATERAL (
                SELECT r.cents / 100.0::float8 AS bid, (r.cents + 10) / 100.0::float8 AS ask,
                       (2 * r.cents + 10) / 200.0::float8 AS mid,
                       (r.cents + 5) / 100.0::float8 AS close,
                       (r.cents + 20) / 100.0::float8 AS high,
                       greatest(r.cents - 10, 1) / 100.0::float8 AS low,
                       (r.cents + 4) / 100.0::float8 AS vwap
            ) p
            WHERE c.underlying_ticker = $1
            ORDER BY s.at, c.ticker
            """,
            UNDERLYING,
            day_slots,
        )
        await conn.executemany(
            "INSERT INTO snapshot_coverage (captured_at, underlying_ticker, run_id, "
            "contracts_active, snapshots_stored, contracts_missing, complete, pages, "
            "read_to_end, committed_at) VALUES ($1, $2, $3, $4, $4, 0, true, 1, true, $1)",
            [(at, UNDERLYING, run_id, count) for at in day_slots],
        )
        print(
            f"  {day}: {len(day_slots)} slots x {count:,} contracts in "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
        slots.extend(day_slots)
    return slots


async def tier_size(conn: asyncpg.Connection, table: str) -> str:
    """The size of ``table``'s partitions with their indexes, for people."""
    return str(
        await conn.fetchval(
            "SELECT pg_size_pretty(sum(pg_total_relation_size(relid))) "
            "FROM pg_partition_tree($1) WHERE isleaf",
            table,
        )
    )


async def timed(label: str, call: Callable[[], Awaitable[int]]) -> None:
    await call()  # warm-up
    times, rows = [], 0
    for _ in range(RUNS):
        started = time.perf_counter()
        rows = await call()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    print(
        f"{label:<44} median {statistics.median(times):6.1f} ms  "
        f"p95 {times[int(len(times) * 0.95) - 1]:6.1f} ms  ({rows:,} rows)",
        flush=True,
    )


async def bench(dsn: str, days: int, count: int) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3)
    await apply_migrations(pool)
    conn = await pool.acquire()
    try:
        print(f"filling {days} trading days x 39 slots x {count:,} contracts ...", flush=True)
        slots = await fill(pool, days, count)
        total = await conn.fetchval("SELECT count(*) FROM option_snapshots")
        print(f"{total:,} snapshots, {await tier_size(conn, WIDE)} with indexes", flush=True)
        started = time.perf_counter()
        compacted = await compact_days(pool, now=dt.datetime.now(dt.UTC))
        assert compacted is not None and sum(day.rows for day in compacted) == total
        print(
            f"compacted (as ingest_options does each day) in {time.perf_counter() - started:.0f} s:"
            f" {await tier_size(conn, COMPACT)} with indexes, "
            f"{sum(day.extra_rows for day in compacted):,} rows with extra values",
            flush=True,
        )
        await conn.execute("VACUUM ANALYZE")
        tickers = [row[0] for row in await conn.fetch("SELECT ticker FROM option_contracts")]
        rng = random.Random(7)
        first, last = slots[0], slots[-1] + dt.timedelta(minutes=1)

        def moment() -> dt.datetime:
            return rng.choice(slots) + dt.timedelta(minutes=rng.randrange(10))

        async def chain() -> int:
            return len(await conn.fetch("SELECT * FROM chain_at($1, $2)", UNDERLYING, moment()))

        async def chain_in_database() -> int:
            query = "SELECT count(*) FROM chain_at($1, $2)"
            return int(await conn.fetchval(query, UNDERLYING, moment()))

        async def history() -> int:
            rows = await conn.fetch(
                "SELECT * FROM contract_history($1, $2, $3)", rng.choice(tickers), first, last
            )
            return len(rows)

        async def latest() -> int:
            return len(await conn.fetch("SELECT * FROM latest_chain($1)", UNDERLYING))

        async def latest_in_database() -> int:
            return int(await conn.fetchval("SELECT count(*) FROM latest_chain($1)", UNDERLYING))

        print("in the database (SELECT count(*) FROM f(...)):")
        await timed("  chain_at(underlying, T)", chain_in_database)
        await timed("  latest_chain(underlying)", latest_in_database)
        print("to a Python client (asyncpg, every column of every row decoded):")
        await timed("  chain_at(underlying, T)", chain)
        await timed(f"  contract_history(ticker, {days} trading days)", history)
        await timed("  latest_chain(underlying)", latest)
        at = slots[len(slots) // 2] + dt.timedelta(minutes=3)
        await conn.execute("SET jit = off")  # as the functions run
        for label, query, args in (
            (
                "chain_at (its body)",
                "SELECT r.* FROM snapshot_reads r WHERE r.underlying_ticker = $1 "
                "AND r.captured_at = (SELECT snapshot_slot_at($1, $2)) "
                'ORDER BY r.expiration_date, r.strike_price, r.contract_type COLLATE "C", '
                'r.ticker COLLATE "C"',
                (UNDERLYING, at),
            ),
            (
                "contract_history (its body)",
                "SELECT r.* FROM snapshot_reads r WHERE r.ticker = $1 "
                "AND r.captured_at >= $2 AND r.captured_at < $3 ORDER BY r.captured_at",
                (tickers[0], first, last),
            ),
        ):
            plan = [
                line for (line,) in await conn.fetch(f"EXPLAIN (ANALYZE, COSTS OFF) {query}", *args)
            ]
            print(f"\nplan of {label} (the first lines):")
            for line in [*plan[:12], "  ...", *plan[-2:]] if len(plan) > 14 else plan:
                print(f"  {line}")
    finally:
        await pool.release(conn)
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--contracts", type=int, default=10_000)
    args = parser.parse_args()
    with benchmark_database() as dsn:
        reset_database(dsn)
        asyncio.run(bench(dsn, args.days, args.contracts))


if __name__ == "__main__":
    main()
