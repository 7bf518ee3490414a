"""``ingest_daily``: the daily table built from snapshots taken by the real jobs over several
sessions; open interest from the next session's first slot, closing values from the session's
last; coverage says what is missing; a rebuild changes nothing."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg

from options.config import Settings
from options.errors import ExitCode
from options.jobs.wiring import run_daily_job, run_options_job, run_snapshots_job
from options.simulator import RunningSimulator
from options.store.daily import NO_CLOSING_SLOT, NO_OI_SLOT
from options.store.partitions import ensure_partitions

UNDERLYINGS = ("AAA", "BBB")
SESSIONS = (dt.date(2026, 11, 17), dt.date(2026, 11, 18), dt.date(2026, 11, 19))
SLOT_TIMES = (dt.time(15, 0), dt.time(20, 55))  # UTC: 10:00 and 15:55 in New York
AFTER = dt.datetime(2026, 11, 20, 22, 0, tzinfo=dt.UTC)  # after the close of the 20th

CLOSING = (
    "bid", "ask", "midpoint", "last_price", "last_trade_at", "implied_volatility", "delta",
    "gamma", "theta", "vega", "underlying_price", "day_open", "day_high", "day_low",
    "day_close", "day_volume", "day_vwap",
)  # fmt: skip


GREEKS = ("implied_volatility", "delta", "gamma", "theta", "vega")


async def take(pool: asyncpg.Pool, settings: Settings, slots: list[dt.datetime]) -> None:
    """One snapshot by the real job per slot, each moved to its time."""
    for slot in slots:
        await ensure_partitions(pool, slot.date(), days_ahead=0)
        assert await run_snapshots_job(settings, force=True, now=slot) == ExitCode.OK
        taken = await pool.fetchval(
            "SELECT captured_at FROM ingest_runs WHERE job = 'snapshots' ORDER BY id DESC LIMIT 1"
        )
        async with pool.acquire() as conn, conn.transaction():
            for table in (
                "option_snapshots",
                "snapshot_coverage",
                "ingest_runs",
                "computed_greeks",
            ):
                await conn.execute(
                    f"UPDATE {table} SET captured_at = $1 WHERE captured_at = $2", slot, taken
                )


async def days_table(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in await pool.fetch(
            'SELECT * FROM contract_days ORDER BY session, ticker COLLATE "C"'
        )
    ]


async def test_the_daily_table_holds_each_sessions_close_and_open_interest(
    pool: asyncpg.Pool,
    simulator: Callable[..., AbstractAsyncContextManager[RunningSimulator]],
    make_settings: Callable[..., Settings],
) -> None:
    async with simulator(underlyings=UNDERLYINGS, contracts_per_underlying=60) as api:
        settings = make_settings(api.base_url, UNDERLYINGS)
        assert await run_options_job(settings) == ExitCode.OK
        await take(
            pool,
            settings,
            [dt.datetime.combine(day, at, dt.UTC) for day in SESSIONS for at in SLOT_TIMES],
        )

        assert await run_daily_job(settings, now=AFTER) == ExitCode.OK
        coverage = {
            (r["underlying_ticker"], r["session"]): r["reason"]
            for r in await pool.fetch("SELECT * FROM daily_coverage")
        }
        assert coverage == {
            **{(u, SESSIONS[0]): None for u in UNDERLYINGS},
            **{(u, SESSIONS[1]): None for u in UNDERLYINGS},
            **{(u, SESSIONS[2]): NO_OI_SLOT for u in UNDERLYINGS},  # the 20th has no slot
            **{(u, dt.date(2026, 11, 20)): NO_CLOSING_SLOT for u in UNDERLYINGS},
        }
        rows = await days_table(pool)
        assert len(rows) == len(SESSIONS) * 120
        assert {r["greeks_source"] for r in rows} >= {"snapshot", "computed"}
        for row in rows:
            session = row["session"]
            close_at = dt.datetime.combine(session, SLOT_TIMES[1], dt.UTC)
            closing = await pool.fetchrow(
                "SELECT * FROM snapshot_reads WHERE ticker = $1 AND captured_at = $2",
                row["ticker"],
                close_at,
            )
            assert row["close_captured_at"] == close_at
            greeks = await pool.fetchrow(
                "SELECT * FROM snapshot_greeks WHERE ticker = $1 AND captured_at = $2",
                row["ticker"],
                close_at,
            )
            for name in CLOSING:
                # IV and greeks: the API's, else those computed for the slot
                want = greeks[name] if name in GREEKS else closing[name]
                assert row[name] == want, (row["ticker"], session, name)
            assert row["greeks_source"] == greeks["source"]
            assert row["bar_source"] == ("snapshot" if closing["day_close"] is not None else None)
            if session == SESSIONS[-1]:
                assert (row["open_interest"], row["oi_source"]) == (None, None)
                continue
            next_open = dt.datetime.combine(
                SESSIONS[SESSIONS.index(session) + 1], SLOT_TIMES[0], dt.UTC
            )
            oi = await pool.fetchval(
                "SELECT open_interest FROM snapshot_reads WHERE ticker = $1 AND captured_at = $2",
                row["ticker"],
                next_open,
            )
            assert (row["open_interest"], row["oi_source"], row["oi_captured_at"]) == (
                oi,
                "snapshot",
                next_open,
            )
        written = await pool.fetchval(
            "SELECT rows_written FROM ingest_runs WHERE job = 'daily' ORDER BY id DESC LIMIT 1"
        )
        assert written == len(rows)

        # a second build changes nothing
        assert await run_daily_job(settings, now=AFTER) == ExitCode.OK
        assert await days_table(pool) == rows
        assert (
            await pool.fetchval(
                "SELECT rows_written FROM ingest_runs WHERE job = 'daily' ORDER BY id DESC LIMIT 1"
            )
            == 0
        )

        # the next session's first slot completes the last session: its open interest only
        await take(pool, settings, [dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC)])
        assert await run_daily_job(settings, now=AFTER) == ExitCode.OK
        after = [row for row in await days_table(pool) if row["session"] in SESSIONS]
        changed = [new for old, new in zip(rows, after, strict=True) if old != new]
        assert {row["session"] for row in changed} == {SESSIONS[-1]}
        assert all(row["open_interest"] is not None for row in changed)
        assert all(
            new[name] == old[name] for old, new in zip(rows, after, strict=True) for name in CLOSING
        )
        assert await pool.fetchval(
            "SELECT count(*) FROM daily_coverage WHERE session = $1 AND complete", SESSIONS[-1]
        ) == len(UNDERLYINGS)
        # and the 20th has its closing values now, waiting for the 23rd's open interest
        assert {
            r["reason"]
            for r in await pool.fetch(
                "SELECT reason FROM daily_coverage WHERE session = '2026-11-20'"
            )
        } == {NO_OI_SLOT}
