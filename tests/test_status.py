"""``ingest_admin status``: runs, freshness, gaps, data quality and sizes, judged on a database
prepared with known runs and coverage across a weekend, Thanksgiving 2026 (Thursday 11-26) and
the early close the day after (Friday 11-27, 13:00 New York time)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg

from options.ops.calendar import latest_slot, market_seconds, recent_sessions, sessions_between
from options.ops.status import NOT_BUILT, SNAPSHOT_TABLES, collect_status
from options.ops.status_table import format_status
from options.store.daily import NO_OI_SLOT

NY = ZoneInfo("America/New_York")
UTC = dt.UTC
PYTHON = Path(sys.executable)


def ny(day: int, hour: int, minute: int, second: int = 0) -> dt.datetime:
    """A moment of November 2026 in New York time, as the database keeps it (UTC)."""
    return dt.datetime(2026, 11, day, hour, minute, second, tzinfo=NY).astimezone(UTC)


# The sessions of the prepared week as the exchange has them (day, close hour): Thanksgiving
# (26) and the weekend (28, 29) have none, the 27th closes at 13:00.
SESSIONS = {23: 16, 24: 16, 25: 16, 27: 13, 30: 16}
NOW = ny(30, 10, 5)  # Monday, five minutes into the 10:00 slot, its run still working
ADDED = ny(1, 8, 0)
SPY_ADDED = ny(25, 12, 0)  # SPY is tracked from Wednesday noon: no gaps before
DB_LOST = "the database connection was lost (ConnectionRefusedError: [Errno 111] refused)"
SIGTERM = "SIGTERM received: stopped before every chain was stored"
INCOMPLETE = "3 contracts missing, 2 rows rejected"
# what happened at some slots; every other slot's run stored every chain complete
SPECIAL = {
    ny(23, 10, 0): "no run",
    ny(23, 10, 10): "no run",
    ny(23, 10, 20): "no run",
    ny(24, 11, 0): "failed",
    ny(25, 14, 0): "interrupted",
    ny(27, 10, 30): "partial",
    ny(30, 10, 0): "running",
}
# data-quality counts of some chains: (slot, underlying) -> columns
QUALITY = {
    (ny(25, 10, 0), "AAPL"): {
        "crossed_quotes": 2,
        "negative_prices": 1,
        "iv_out_of_range": 4,
        "stale_quotes": 7,
        "greeks_missing": 3,
    },
    (ny(24, 15, 0), "SPX"): {"crossed_quotes": 1, "negative_open_interest": 5},
}
QUALITY_COLUMNS = (
    "crossed_quotes",
    "negative_prices",
    "iv_out_of_range",
    "negative_open_interest",
    "stale_quotes",
    "greeks_missing",
)


def slots_of(day: int, close_hour: int) -> list[dt.datetime]:
    """The 10-minute slots of a session, 09:30 through its close."""
    found, moment = [], ny(day, 9, 30)
    while moment <= ny(day, close_hour, 0):
        found.append(moment)
        moment += dt.timedelta(minutes=10)
    return found


async def add_run(
    conn: asyncpg.Connection,
    job: str,
    status: str,
    started: dt.datetime,
    *,
    captured: dt.datetime | None = None,
    error: str | None = None,
    heartbeat: dt.datetime | None = None,
    counts: tuple[int, int, int] = (3, 3, 0),
) -> int:
    requested, succeeded, failed = counts
    run_id: int = await conn.fetchval(
        """
        INSERT INTO ingest_runs (job, status, started_at, finished_at, heartbeat_at, captured_at,
            error, underlyings_requested, underlyings_succeeded, underlyings_failed,
            rows_fetched, rows_written, api_requests)
        VALUES ($1, $2, $3::timestamptz,
                CASE WHEN $2 = 'running' THEN NULL ELSE $3::timestamptz + interval '48 s' END,
                coalesce($4, $3::timestamptz + interval '45 s'), $5, $6, $7, $8, $9, $10, $10,
                $11)
        RETURNING id
        """,
        job,
        status,
        started,
        heartbeat,
        captured,
        error,
        requested,
        succeeded,
        failed,
        succeeded * 1000,
        succeeded * 4,
    )
    return run_id


async def add_coverage(
    conn: asyncpg.Connection,
    captured: dt.datetime,
    key: str,
    run_id: int,
    *,
    stored: bool = True,
    complete: bool = True,
    error: str | None = None,
    missing: int = 0,
    rejected: int = 0,
    quality: dict[str, int] | None = None,
) -> None:
    counts = [(quality or {}).get(name, 0) for name in QUALITY_COLUMNS]
    await conn.execute(
        f"""
        INSERT INTO snapshot_coverage (captured_at, underlying_ticker, requested_ticker, run_id,
            contracts_active, snapshots_stored, contracts_missing, complete, pages, error,
            rows_rejected, read_to_end, committed_at, {", ".join(QUALITY_COLUMNS)})
        VALUES ($1, $2, $2, $3, 1000, $4, $5, $6, 4, $7, $8, $9, $10,
                $11, $12, $13, $14, $15, $16)
        """,
        captured,
        key,
        run_id,
        (1000 - missing) if stored else 0,
        missing,
        complete,
        error,
        rejected,
        stored,
        captured + dt.timedelta(seconds=30) if stored else None,
        *counts,
    )


async def prepare(pool: asyncpg.Pool) -> None:
    """The prepared week: tracked underlyings, daily contract syncs, a run per slot."""
    async with pool.acquire() as conn:
        await conn.execute(
            """
            INSERT INTO tracked_underlyings (ticker, origin, added_at, last_error, last_error_at)
            VALUES ('AAPL', 'UNDERLYINGS', $1, $3, $4), ('I:SPX', 'admin', $1, NULL, NULL),
                   ('SPY', 'admin', $2, NULL, NULL)
            """,
            ADDED,
            SPY_ADDED,
            INCOMPLETE,
            ny(27, 10, 30, 35),
        )
        await conn.execute(
            "INSERT INTO tracked_underlyings (ticker, origin, added_at, enabled, disabled_by) "
            "VALUES ('MSFT', 'admin', $1, false, 'admin')",
            ADDED,
        )
        # ingest_options every day at 07:00, also on the holiday and the weekend
        for day in range(23, 31):
            spx_fails = day == 29
            keys = ["AAPL", "SPX"] + (["SPY"] if day >= 26 else [])
            run_id = await add_run(
                conn,
                "options",
                "partial" if spx_fails else "succeeded",
                ny(day, 7, 0),
                error="SPX: HTTP 503 after 6 attempts" if spx_fails else None,
                counts=(len(keys), len(keys) - spx_fails, int(spx_fails)),
            )
            for key in keys:
                failed = spx_fails and key == "SPX"
                await conn.execute(
                    """
                    INSERT INTO contract_syncs (run_id, underlying_ticker, synced_at, succeeded,
                        contracts_listed, contracts_written, rows_rejected,
                        contracts_deactivated, error)
                    VALUES ($1, $2, $3, $4, 1000, 1000, 0, 0, $5)
                    """,
                    run_id,
                    key,
                    ny(day, 7, 0, 20),
                    not failed,
                    "HTTP 503 after 6 attempts" if failed else None,
                )
        # ingest_snapshots at every slot up to now, each capturing 5 s after its slot
        for day, close in SESSIONS.items():
            for slot in slots_of(day, close):
                kind = SPECIAL.get(slot, "ok")
                if slot > NOW or kind == "no run":
                    continue
                if kind == "failed":  # before it planned the slot: no captured_at, no coverage
                    await add_run(
                        conn, "snapshots", "failed", slot, error=DB_LOST, counts=(0, 0, 0)
                    )
                    continue
                captured = slot + dt.timedelta(seconds=5)
                keys = ["AAPL", "SPX"] + (["SPY"] if slot >= SPY_ADDED else [])
                status = {"partial": "partial", "interrupted": "interrupted"}.get(kind, "succeeded")
                run_id = await add_run(
                    conn,
                    "snapshots",
                    "running" if kind == "running" else status,
                    slot,
                    captured=captured,
                    error={"interrupted": SIGTERM, "partial": f"AAPL: {INCOMPLETE}"}.get(kind),
                    heartbeat=NOW - dt.timedelta(seconds=2) if kind == "running" else None,
                )
                for key in keys:
                    if kind == "running":
                        await add_coverage(
                            conn, captured, key, run_id, stored=False, complete=False,
                            error="not stored yet",
                        )  # fmt: skip
                    elif kind == "interrupted" and key == "AAPL":
                        await add_coverage(
                            conn, captured, key, run_id, stored=False, complete=False,
                            error=f"not stored: run {run_id} ended before this chain was read",
                        )  # fmt: skip
                    elif kind == "partial" and key == "AAPL":
                        await add_coverage(
                            conn, captured, key, run_id, complete=False, error=INCOMPLETE,
                            missing=3, rejected=2,
                        )  # fmt: skip
                    else:
                        await add_coverage(
                            conn, captured, key, run_id, quality=QUALITY.get((slot, key))
                        )
        # a forced run on Thanksgiving, and a chain from before the days shown
        for moment, stale in ((ny(26, 11, 0), 0), (ny(20, 10, 0), 100)):
            run_id = await add_run(conn, "snapshots", "succeeded", moment, captured=moment)
            await add_coverage(conn, moment, "AAPL", run_id, quality={"stale_quotes": stale})
        # a few stored snapshots, in a partition of their day and an empty one ahead
        for day in (30, 31):
            start = dt.datetime(2026, 11, 30, tzinfo=UTC) + dt.timedelta(days=day - 30)
            await conn.execute(
                f"CREATE TABLE option_snapshots_p{start:%Y%m%d} PARTITION OF option_snapshots "
                f"FOR VALUES FROM ('{start.isoformat()}') "
                f"TO ('{(start + dt.timedelta(days=1)).isoformat()}')"
            )
        await conn.executemany(
            "INSERT INTO option_snapshots (ticker, underlying_ticker, captured_at, bid, ask) "
            "VALUES ($1, 'AAPL', $2, 1.0, 1.1)",
            [(f"O:AAPL261218C00{strike}000", ny(30, 9, 30, 5)) for strike in ("200", "210", "220")],
        )


def gap(ticker: str, slot: dt.datetime, cause: str, detail: str | None = None) -> dict:
    return {"ticker": ticker, "slot": slot.isoformat(), "cause": cause, "detail": detail}


async def test_slots_follow_the_exchange_calendar() -> None:
    """Holidays and weekends have no session, the early close no afternoon slots."""
    days = {s.day.day: s for s in sessions_between(dt.date(2026, 11, 23), dt.date(2026, 11, 30))}
    assert sorted(days) == [23, 24, 25, 27, 30]
    assert [len(days[d].slots(10)) for d in sorted(days)] == [40, 40, 40, 22, 40]
    assert days[27].early_close and not days[25].early_close
    assert days[27].slots(10)[-1] == ny(27, 13, 0)
    assert days[25].slots(15)[:3] == [ny(25, 9, 30), ny(25, 9, 45), ny(25, 10, 0)]
    assert [s.day.day for s in recent_sessions(ny(30, 9, 0), 3)] == [24, 25, 27]
    assert latest_slot(ny(28, 12, 0), 10) == ny(27, 13, 0)  # Saturday: Friday's early close
    assert latest_slot(ny(26, 12, 0), 10) == ny(25, 16, 0)  # Thanksgiving: Wednesday's close
    assert latest_slot(ny(30, 9, 35), 10) == ny(30, 9, 30)


async def test_market_time_skips_nights_weekends_and_holidays() -> None:
    """Market time counts session time only: Friday 13:00 to Monday 09:30 is none."""
    assert market_seconds(ny(27, 13, 0), ny(30, 9, 30)) == 0
    assert market_seconds(ny(25, 15, 30), ny(30, 9, 40)) == (30 + 210 + 10) * 60
    assert market_seconds(ny(30, 10, 0), ny(30, 9, 0)) == 0


async def test_gaps_are_the_missing_slots_with_their_causes(pool: asyncpg.Pool) -> None:
    """Gaps are exactly the uncovered slots, each with its cause (see the prepared week)."""
    # not gaps: Thanksgiving, the weekend, the 27th after 13:00, SPY before it was tracked,
    # and Monday 10:00, whose run is still capturing
    await prepare(pool)
    status = (await collect_status(pool, now=NOW)).as_dict()
    found = [{k: g[k] for k in ("ticker", "slot", "cause", "detail")} for g in status["gaps"]]
    shared = [
        ("no run", ny(23, 10, 0), None),
        ("no run", ny(23, 10, 10), None),
        ("no run", ny(23, 10, 20), None),
        ("run failed", ny(24, 11, 0), DB_LOST),
    ]
    assert found == [
        *(gap("AAPL", slot, cause, detail) for cause, slot, detail in shared),
        gap("AAPL", ny(25, 14, 0), "run interrupted", SIGTERM),
        gap("AAPL", ny(27, 10, 30), f"incomplete: {INCOMPLETE}"),
        *(gap("I:SPX", slot, cause, detail) for cause, slot, detail in shared),
    ]
    assert {g["date"] for g in status["gaps"]} == {"2026-11-23", "2026-11-24", "2026-11-25",
                                                    "2026-11-27"}  # fmt: skip
    assert list(status) == [
        "now", "fresh", "problems", "settings", "calendar", "runs", "underlyings", "gaps",
        "daily_gaps", "quality", "storage",
    ]  # fmt: skip
    assert list(status["gaps"][0]) == ["ticker", "date", "slot", "cause", "detail", "run_id"]
    assert list(status["underlyings"][0]) == [
        "ticker", "underlying", "tracked", "enabled", "added_at", "last_complete_snapshot_at",
        "snapshot_age_seconds", "last_contract_sync_at", "contract_sync_age_seconds",
        "last_error", "last_error_at", "gaps",
    ]  # fmt: skip
    calendar = status["calendar"]
    assert [(s["date"], s["early_close"], s["slots"]) for s in calendar["sessions"]] == [
        ("2026-11-23", False, 40),
        ("2026-11-24", False, 40),
        ("2026-11-25", False, 40),
        ("2026-11-27", True, 22),
        ("2026-11-30", False, 40),
    ]
    assert calendar["latest_slot"] == "2026-11-30T15:00:00+00:00"
    assert [(u["ticker"], u["underlying"], u["gaps"]) for u in status["underlyings"]] == [
        ("AAPL", "AAPL", 6),
        ("I:SPX", "SPX", 4),
        ("SPY", "SPY", 0),
    ]


async def test_table_collapses_consecutive_gap_slots(pool: asyncpg.Pool) -> None:
    """The table shows New York times and one line per run of consecutive gap slots."""
    await prepare(pool)
    text = format_status(await collect_status(pool, now=NOW))
    lines = text.splitlines()
    assert lines[0] == "Status at 2026-11-30 10:05 EST: fresh"
    aapl = [
        line.split(None, 5)
        for line in lines
        if line.startswith("AAPL    Mon 2026-11-23") and "ingest_daily" not in line
    ]
    assert aapl == [["AAPL", "Mon", "2026-11-23", "10:00-10:20", "3", "no run"]]
    assert any("Fri 2026-11-27  10:30" in line and "incomplete: 3 contracts" in line
               for line in lines)  # fmt: skip


async def test_quality_sums_cover_the_days_shown(pool: asyncpg.Pool) -> None:
    """Data-quality counts are summed per underlying over the coverage rows of the days shown."""
    await prepare(pool)
    status = (await collect_status(pool, now=NOW)).as_dict()
    zero = dict.fromkeys((*QUALITY_COLUMNS, "rows_rejected"), 0)
    assert status["quality"] == [
        {
            "ticker": "AAPL",
            "chains": 141,
            **zero,
            "crossed_quotes": 2,
            "negative_prices": 1,
            "iv_out_of_range": 4,
            "stale_quotes": 7,
            "greeks_missing": 3,
            "rows_rejected": 2,
        },
        {
            "ticker": "I:SPX",
            "chains": 141,
            **zero,
            "crossed_quotes": 1,
            "negative_open_interest": 5,
        },
        {"ticker": "SPY", "chains": 50, **zero},
    ]


async def test_last_runs_and_last_times_per_underlying(pool: asyncpg.Pool) -> None:
    """The last runs of each job, and per underlying its last snapshot, sync and error."""
    await prepare(pool)
    status = (await collect_status(pool, now=NOW)).as_dict()
    snapshots = status["runs"]["snapshots"]
    assert [(r["status"], r["started_at"]) for r in snapshots] == [
        ("running", ny(30, 10, 0).isoformat()),
        ("succeeded", ny(30, 9, 50).isoformat()),
        ("succeeded", ny(30, 9, 40).isoformat()),
        ("succeeded", ny(30, 9, 30).isoformat()),
        ("succeeded", ny(27, 13, 0).isoformat()),
    ]
    assert snapshots[0]["heartbeat_age_seconds"] == 2.0
    assert snapshots[0]["duration_seconds"] == 300.0
    options = status["runs"]["options"]
    assert [r["started_at"][:10] for r in options] == [
        "2026-11-30", "2026-11-29", "2026-11-28", "2026-11-27", "2026-11-26"
    ]  # fmt: skip
    assert options[1]["status"] == "partial" and options[1]["error"].startswith("SPX: HTTP 503")
    aapl = status["underlyings"][0]
    assert aapl["last_complete_snapshot_at"] == ny(30, 9, 50, 5).isoformat()
    assert aapl["snapshot_age_seconds"] == 595.0
    assert aapl["last_contract_sync_at"] == ny(30, 7, 0, 20).isoformat()
    assert (aapl["last_error"], aapl["last_error_at"]) == (
        INCOMPLETE,
        ny(27, 10, 30, 35).isoformat(),
    )


async def test_sizes_per_table_and_per_snapshot(pool: asyncpg.Pool) -> None:
    """Every table's size, partitions summed, and the bytes of a stored snapshot."""
    await prepare(pool)
    storage = (await collect_status(pool, now=NOW)).as_dict()["storage"]
    tables = {t["table"]: t for t in storage["tables"]}
    assert {"option_snapshots", "snapshot_coverage", "ingest_runs", "tracked_underlyings",
            "contract_syncs", "rejected_rows", "option_contracts"} <= set(tables)  # fmt: skip
    assert tables["option_snapshots"]["partitions"] == 2
    assert tables["ingest_runs"]["partitions"] is None
    assert tables["snapshot_rows"]["partitions"] == 0  # no day compacted
    assert all(t["bytes"] > 0 for t in storage["tables"] if t["partitions"] != 0)
    assert storage["total_bytes"] == sum(t["bytes"] for t in storage["tables"])
    assert (storage["snapshot_rows"], storage["snapshot_rows_source"]) == (3, "count")
    assert storage["bytes_per_snapshot"] == sum(tables[t]["bytes"] for t in SNAPSHOT_TABLES) / 3
    await pool.execute("ANALYZE option_snapshots")
    analyzed = (await collect_status(pool, now=NOW)).storage
    assert (analyzed.snapshot_rows, analyzed.snapshot_rows_source) == (3, "estimate")


async def test_fresh_until_max_age_and_not_over_weekends(pool: asyncpg.Pool) -> None:
    """Stale past --max-age of market time only: weekends, holidays and nights do not age."""
    await prepare(pool)
    fresh = await collect_status(pool, now=NOW)
    assert (fresh.fresh, fresh.problems) == (True, [])
    stale = await collect_status(pool, now=NOW, max_age=5 * 60)
    assert [(p.kind, p.subject) for p in stale.problems] == [
        ("snapshots_stale", "AAPL"),
        ("snapshots_stale", "I:SPX"),
        ("snapshots_stale", "SPY"),
    ]
    assert stale.problems[0].message == (
        "AAPL: last complete snapshot 2026-11-30 09:50 EST, 9m of market time before the "
        "latest slot 2026-11-30 10:00 EST (max 5m)"
    )
    for quiet in (ny(26, 12, 0), ny(28, 12, 0), ny(30, 9, 30, 30)):
        assert (await collect_status(pool, now=quiet)).problems == [], quiet
    sunday = await collect_status(pool, now=ny(29, 23, 0))  # SPX's Sunday sync failed
    assert [p.message for p in sunday.problems] == [
        "I:SPX: last contract sync 2026-11-28 07:00 EST, 39h59m ago (max 26h)"
    ]
    synced = await collect_status(pool, now=NOW, max_sync_age=3600)
    assert [p.kind for p in synced.problems] == ["contracts_stale"] * 3


async def test_a_run_silent_past_its_lease_is_a_problem(pool: asyncpg.Pool) -> None:
    """A run left running with a heartbeat older than 60 s is reported stuck."""
    await prepare(pool)
    await pool.execute(
        "UPDATE ingest_runs SET heartbeat_at = $1 WHERE status = 'running'",
        NOW - dt.timedelta(seconds=125),
    )
    status = await collect_status(pool, now=NOW)
    assert [(p.kind, p.subject) for p in status.problems] == [("run_stuck", "snapshots")]
    assert "last sent a heartbeat 2m ago" in status.problems[0].message


async def test_named_underlyings_are_shown_not_judged(pool: asyncpg.Pool) -> None:
    """-u shows disabled and untracked underlyings; only enabled tracked ones are judged."""
    await prepare(pool)
    status = await collect_status(pool, now=NOW, underlyings=["MSFT", "TSLA"], max_sync_age=60)
    shown = {u.ticker: u for u in status.underlyings}
    assert (shown["MSFT"].tracked, shown["MSFT"].enabled) == (True, False)
    assert (shown["TSLA"].tracked, shown["TSLA"].added_at) == (False, None)
    causes = {g.cause for g in status.gaps if g.ticker == "MSFT"}
    assert causes == {"not in the run", "no run", "run failed"}
    assert {p.subject for p in status.problems} == {"AAPL", "I:SPX", "SPY"}


def status_command(database_url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the real command, as its own process, against the test's database."""
    return subprocess.run(
        [str(PYTHON), "-m", "cli.status", *args],
        env={**os.environ, "DATABASE_URL": database_url},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_exit_status_follows_max_age(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """The real command exits 0 when fresh, 1 past --max-age (a line on stderr), 2 if bad."""
    now = dt.datetime.now(UTC)
    latest = latest_slot(now, 10)
    assert latest is not None
    opened = [s for s in recent_sessions(now, 3) if s.open <= latest]
    previous = opened[-2]  # the session before the latest slot's
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO tracked_underlyings (ticker, origin, added_at) VALUES "
            "('AAPL', 'admin', $1), ('QQQ', 'admin', $1)",
            now - dt.timedelta(days=30),
        )
        run_id = await add_run(conn, "options", "succeeded", now - dt.timedelta(hours=1))
        for key in ("AAPL", "QQQ"):
            await conn.execute(
                "INSERT INTO contract_syncs (run_id, underlying_ticker, synced_at, succeeded, "
                "contracts_listed, contracts_written, rows_rejected, contracts_deactivated) "
                "VALUES ($1, $2, $3, true, 1, 1, 0, 0)",
                run_id,
                key,
                now - dt.timedelta(hours=1),
            )
        # AAPL captured at the latest slot; QQQ last at the open of the session before it
        for key, captured in (("AAPL", latest), ("QQQ", previous.open)):
            run_id = await add_run(conn, "snapshots", "succeeded", captured, captured=captured)
            await add_coverage(conn, captured, key, run_id)

    lenient = status_command(database_url, "--format", "json", "--max-age", "30h", cwd=tmp_path)
    assert (lenient.returncode, lenient.stderr) == (0, ""), lenient.stderr
    shown = json.loads(lenient.stdout)
    assert shown["fresh"] is True
    assert [u["ticker"] for u in shown["underlyings"]] == ["AAPL", "QQQ"]

    strict = status_command(database_url, "--max-age", "30m", cwd=tmp_path)
    assert strict.returncode == 1
    problems = strict.stderr.splitlines()
    assert len(problems) == 1
    assert problems[0].startswith("snapshots_stale: QQQ: last complete snapshot "), problems
    assert strict.stdout.startswith("Status at ") and "STALE: 1 problem" in strict.stdout

    bad = status_command(database_url, "--max-age", "soon", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: --max-age 'soon' is invalid: expected a duration such as 540s, 9m, 1h30m or 90"
    ]


async def test_a_later_capture_in_the_window_covers_the_slot(pool: asyncpg.Pool) -> None:
    """With --every 15, a slot is covered by any complete capture within its 15 minutes."""
    await prepare(pool)
    status = await collect_status(pool, now=NOW, every=15)
    assert [(g.ticker, g.slot, g.cause) for g in status.gaps if g.ticker == "AAPL"] == [
        ("AAPL", ny(23, 10, 0), "no run"),
        ("AAPL", ny(23, 10, 15), "no run"),
    ]


async def test_closed_sessions_without_complete_daily_rows_are_shown(pool: asyncpg.Pool) -> None:
    """A closed session with snapshots but no complete daily rows is listed with its reason:
    the coverage row's, or that no build covered it; today's open session is not."""
    await prepare(pool)
    run_id = await pool.fetchval(
        "INSERT INTO ingest_runs (job, started_at, finished_at, status) "
        "VALUES ('daily', $1, $1, 'succeeded') RETURNING id",
        NOW,
    )
    await pool.executemany(
        "INSERT INTO daily_coverage (underlying_ticker, session, run_id, contracts, complete, "
        "reason, built_at) VALUES ($1, $2, $3, 10, $4::text IS NULL, $4::text, $5)",
        [
            ("AAPL", dt.date(2026, 11, 23), run_id, None, NOW),
            ("AAPL", dt.date(2026, 11, 24), run_id, NO_OI_SLOT, NOW),
        ],
    )
    status = await collect_status(pool, now=NOW)
    aapl = [(g.session, g.reason) for g in status.daily_gaps if g.ticker == "AAPL"]
    snapshotted = sorted(
        {
            row["captured_at"].astimezone(NY).date()
            for row in await pool.fetch(
                "SELECT captured_at FROM snapshot_coverage WHERE underlying_ticker = 'AAPL'"
            )
        }
    )
    assert dt.date(2026, 11, 24) in snapshotted and NOW.date() in snapshotted
    assert aapl == [(dt.date(2026, 11, 24), NO_OI_SLOT)] + [
        (day, NOT_BUILT)
        for day in snapshotted
        if day in {s.day for s in status.sessions}
        and day not in (dt.date(2026, 11, 23), dt.date(2026, 11, 24), NOW.date())
    ]
    text = format_status(status)
    assert "Daily rows: closed sessions not complete" in text
    assert NO_OI_SLOT[:40] in text
    assert next(g["reason"] for g in status.as_dict()["daily_gaps"]) == NO_OI_SLOT
