"""ingest_snapshots end to end: selection, exact fields, NULLs, partitions, coverage, retention."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
from pathlib import Path

import asyncpg
import pytest

from options.api.normalize import SNAPSHOT_COLUMNS, normalize_snapshot
from options.errors import DatabaseError, ExitCode, RunInterrupted
from options.jobs.filters import market_today
from options.jobs.snapshot_plan import SLICE_CONTRACTS
from options.jobs.wiring import run_options_job, run_snapshots_job
from options.simulator import create_fixture_app, start_server
from options.store.partitions import PARTITIONS_AHEAD
from tests.conftest import wait_for_value

AAPL_CHAIN = "v3/snapshot/options/AAPL.json"
NS = 1_000_000_000


def ns_to_datetime(ns: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ns // 1000)


async def last_run(pool: asyncpg.Pool) -> asyncpg.Record:
    return await pool.fetchrow("SELECT * FROM ingest_runs ORDER BY id DESC LIMIT 1")


async def coverage(pool: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT * FROM snapshot_coverage ORDER BY underlying_ticker")
    return {row["underlying_ticker"]: row for row in rows}


async def test_fixture_snapshot_lands_exactly(fixtures_dir: Path, pool, make_settings) -> None:
    """Every field of the recorded AAPL chain snapshot is stored as the API sent it."""
    raw = json.loads((fixtures_dir / AAPL_CHAIN).read_text())["results"][0]
    async with await start_server(create_fixture_app(fixtures_dir)) as api:
        code = await run_snapshots_job(make_settings(api.base_url, ("AAPL",)), force=True)
    assert code == ExitCode.OK
    row = await pool.fetchrow("SELECT * FROM option_snapshots")
    run = await last_run(pool)
    quote, trade, day, greeks = raw["last_quote"], raw["last_trade"], raw["day"], raw["greeks"]
    expected = {
        "ticker": raw["details"]["ticker"],
        "underlying_ticker": "AAPL",
        "captured_at": run["captured_at"],
        "bid": quote["bid"],
        "bid_size": quote["bid_size"],
        "ask": quote["ask"],
        "ask_size": quote["ask_size"],
        "midpoint": quote["midpoint"],
        "quote_updated_at": ns_to_datetime(quote["last_updated"]),
        "last_price": trade["price"],
        "last_size": trade["size"],
        "last_trade_at": ns_to_datetime(trade["sip_timestamp"]),
        "day_open": day["open"],
        "day_high": day["high"],
        "day_low": day["low"],
        "day_close": day["close"],
        "day_volume": day["volume"],
        "day_vwap": day["vwap"],
        "day_change": day["change"],
        "day_change_percent": day["change_percent"],
        "day_previous_close": day["previous_close"],
        "implied_volatility": raw["implied_volatility"],
        "delta": greeks["delta"],
        "gamma": greeks["gamma"],
        "theta": greeks["theta"],
        "vega": greeks["vega"],
        "open_interest": raw["open_interest"],
        "break_even_price": raw["break_even_price"],
        "underlying_price": raw["underlying_asset"]["price"],
        "fmv": raw["fmv"],
    }
    assert dict(row) == expected
    assert set(expected) == set(SNAPSHOT_COLUMNS)
    assert run["captured_at"] == run["started_at"]
    contract = await pool.fetchrow("SELECT * FROM option_contracts")
    assert contract["ticker"] == "O:AAPL230616C00150000"
    assert contract["underlying_ticker"] == "AAPL"
    assert contract["strike_price"] == 150
    assert contract["active"] is True
    cover = (await coverage(pool))["AAPL"]
    assert (cover["snapshots_stored"], cover["complete"], cover["pages"]) == (1, True, 1)


@pytest.mark.parametrize("section", ["greeks", "last_quote", "last_trade", "day", "fmv"])
def test_missing_sections_are_null_not_zero(fixtures_dir: Path, section: str) -> None:
    """A snapshot without greeks, quote, trade, day bar or fmv stores NULLs, never zeros."""
    raw = copy.deepcopy(json.loads((fixtures_dir / AAPL_CHAIN).read_text())["results"][0])
    del raw[section]
    row = dict(
        zip(
            SNAPSHOT_COLUMNS,
            normalize_snapshot(raw, underlying="AAPL", captured_at=1_700_000_000_000_000),
            strict=True,
        )
    )
    nulled = {
        "greeks": ["delta", "gamma", "theta", "vega"],
        "last_quote": ["bid", "bid_size", "ask", "ask_size", "midpoint", "quote_updated_at"],
        "last_trade": ["last_price", "last_size", "last_trade_at"],
        "day": [
            "day_open",
            "day_high",
            "day_low",
            "day_close",
            "day_volume",
            "day_vwap",
            "day_change",
            "day_change_percent",
            "day_previous_close",
        ],
        "fmv": ["fmv"],
    }[section]
    assert all(row[column] is None for column in nulled)
    others = [c for c in SNAPSHOT_COLUMNS if c not in nulled]
    assert all(row[column] is not None for column in others)


async def test_deep_itm_without_greeks_store_nulls(simulator, pool, make_settings) -> None:
    """Simulated deep in-the-money contracts arrive without greeks and are stored with NULLs."""
    async with simulator(underlyings=("AAA",), contracts_per_underlying=400) as api:
        code = await run_snapshots_job(make_settings(api.base_url, ("AAA",)), force=True)
    assert code == ExitCode.OK
    counts = await pool.fetchrow(
        "SELECT count(*) AS total, count(*) FILTER (WHERE delta IS NULL) AS no_greeks, "
        "count(*) FILTER (WHERE delta = 0 AND gamma = 0) AS zero_greeks FROM option_snapshots"
    )
    assert counts["total"] == 400
    assert 0 < counts["no_greeks"] < 400
    assert counts["zero_greeks"] == 0


async def seed_contracts(pool: asyncpg.Pool, base_url: str, names, make_settings) -> None:
    assert await run_options_job(make_settings(base_url, names)) == ExitCode.OK


async def test_tracked_underlyings_are_what_is_snapshotted(simulator, pool, make_settings) -> None:
    """Without -u: the tracked underlyings, as UNDERLYINGS now names them; one left out of
    UNDERLYINGS is no longer snapshotted although its contracts are active (I:SPX kept as such)."""
    async with simulator(
        underlyings=("AAA", "BBB", "CCC", "I:SPX"), contracts_per_underlying=60
    ) as api:
        await seed_contracts(pool, api.base_url, ("AAA", "BBB", "CCC", "I:SPX"), make_settings)
        settings = make_settings(api.base_url, ("I:SPX", "BBB"))
        assert await run_snapshots_job(settings, force=True) == ExitCode.OK
    assert sorted(await coverage(pool)) == ["BBB", "SPX"]
    stored = await pool.fetch(
        "SELECT underlying_ticker, count(*) FROM option_snapshots GROUP BY 1 ORDER BY 1"
    )
    assert [(r[0], r[1]) for r in stored] == [("BBB", 60), ("SPX", 60)]
    tracked = await pool.fetch(
        "SELECT ticker, enabled, disabled_by FROM tracked_underlyings ORDER BY ticker"
    )
    assert [tuple(r) for r in tracked] == [
        ("AAA", False, "UNDERLYINGS"),
        ("BBB", True, None),
        ("CCC", False, "UNDERLYINGS"),
        ("I:SPX", True, None),
    ]


async def test_one_off_underlying_is_snapshotted_but_never_tracked(
    simulator, pool, make_settings
) -> None:
    """With -u only those underlyings are snapshotted, even one with no known contracts, and
    it does not join the tracked set: the next scheduled run leaves it alone."""
    async with simulator(underlyings=("AAA", "BBB"), contracts_per_underlying=30) as api:
        await seed_contracts(pool, api.base_url, ("AAA",), make_settings)
        settings = make_settings(api.base_url, ("AAA",))
        assert await run_snapshots_job(settings, only=("BBB",), force=True) == ExitCode.OK
        cover = await coverage(pool)
        assert list(cover) == ["BBB"]
        assert (cover["BBB"]["contracts_active"], cover["BBB"]["snapshots_stored"]) == (0, 30)
        assert await run_snapshots_job(settings, force=True) == ExitCode.OK
    rows = await pool.fetch(
        "SELECT underlying_ticker, count(*) FROM snapshot_coverage GROUP BY 1 ORDER BY 1"
    )
    assert [tuple(r) for r in rows] == [("AAA", 1), ("BBB", 1)]
    assert [r[0] for r in await pool.fetch("SELECT ticker FROM tracked_underlyings")] == ["AAA"]
    # the snapshot's details made the unknown contracts known
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM option_contracts WHERE underlying_ticker = 'BBB' AND active"
        )
        == 30
    )


async def test_contract_in_two_chains_is_stored_once(pool, make_settings) -> None:
    """A contract both chains return (an adjusted contract can be) is stored once, the run
    succeeds, and the counts add up to the rows stored."""

    def result(ticker: str) -> dict[str, object]:
        return {
            "details": {
                "ticker": ticker,
                "contract_type": "call",
                "exercise_style": "american",
                "expiration_date": "2030-01-18",
                "shares_per_contract": 100,
                "strike_price": 10,
            },
            "last_quote": {"bid": 1.0, "ask": 1.1},
            "open_interest": 5,
        }

    shared = "O:AAA300118C00010000"
    chains = {
        "AAA": [result(shared), result("O:AAA300118C00011000")],
        "BBB": [result(shared), result("O:BBB300118C00010000")],
    }

    assert await snapshot_one_page_chains(chains, make_settings) == ExitCode.OK
    tickers = await pool.fetch("SELECT ticker FROM option_snapshots ORDER BY 1")
    assert [r[0] for r in tickers] == [shared, "O:AAA300118C00011000", "O:BBB300118C00010000"]
    cover = await coverage(pool)
    assert sorted(c["snapshots_stored"] for c in cover.values()) == [1, 2]
    assert all(c["complete"] for c in cover.values())
    run = await last_run(pool)
    assert (run["rows_fetched"], run["rows_written"]) == (4, 3)


async def test_rejected_key_ends_the_run_with_coverage(simulator, pool, make_settings) -> None:
    """A 401 (unknown key) stops the run after the requests in flight; every underlying gets
    a coverage row saying it was not read, and the run is recorded failed."""
    from options.config import Secret
    from options.errors import KeyRejectedError

    names = tuple(f"U{c}" for c in "ABCDEFGH")
    async with simulator(underlyings=names, contracts_per_underlying=10) as api:
        settings = make_settings(
            api.base_url, names, api_key=Secret("pk_bad_0123456789"), http_concurrency=2
        )
        with pytest.raises(KeyRejectedError, match=r"refused the key \(POLYGON_API_KEY\)"):
            await run_snapshots_job(settings, force=True)
        requests = await api_requests(api.base_url)
    cover = await coverage(pool)
    assert list(cover) == list(names)
    assert not any(c["complete"] for c in cover.values())
    assert await pool.fetchval("SELECT status FROM ingest_runs") == "failed"
    assert requests <= 3  # the market calendar, and the two chains in flight


async def test_empty_chain_is_complete_and_warned_about(
    simulator, pool, make_settings, caplog
) -> None:
    """A chain the API returns empty is complete with nothing stored, and a warning says so:
    a misspelled ticker must not pass in silence."""
    async with simulator(underlyings=("AAA",), contracts_per_underlying=10) as api:
        code = await run_snapshots_job(make_settings(api.base_url, ("ZZZZ",)), force=True)
    assert code == ExitCode.OK
    cover = (await coverage(pool))["ZZZZ"]
    assert (cover["snapshots_stored"], cover["complete"], cover["pages"]) == (0, True, 1)
    assert (
        "ZZZZ: the API returned an empty chain: no options are listed for it "
        "(a misspelled ticker?)" in caplog.text
    )


async def test_coverage_counts_missing_active_contracts(simulator, pool, make_settings) -> None:
    """Active contracts the chain did not return are counted missing, and the chain, read to
    its end, is not complete: complete means every active contract has its row."""
    async with simulator(underlyings=("AAA",), contracts_per_underlying=300) as api:
        await seed_contracts(pool, api.base_url, ("AAA",), make_settings)
        for strike in ("00001000", "00002000"):
            await pool.execute(
                "INSERT INTO option_contracts (ticker, underlying_ticker, contract_type, "
                "expiration_date, active, first_seen_at, last_seen_at) "
                "VALUES ($1, 'AAA', 'call', $2, true, now(), now())",
                f"O:AAA991231C{strike}",
                market_today() + dt.timedelta(days=60),
            )
        assert (
            await run_snapshots_job(make_settings(api.base_url, ("AAA",)), force=True)
            == ExitCode.PARTIAL
        )
    cover = (await coverage(pool))["AAA"]
    assert cover["contracts_active"] == 302
    assert cover["snapshots_stored"] == 300
    assert cover["contracts_missing"] == 2
    assert (cover["read_to_end"], cover["complete"]) == (True, False)
    assert cover["error"] == "2 active contracts missing from the chain"
    assert cover["pages"] == 2


async def test_chain_failing_on_page_3_keeps_rows_and_is_incomplete(
    simulator, pool, make_settings
) -> None:
    """A chain that breaks on page 3 keeps its first 500 rows, marked incomplete; run partial."""
    names = ("AAA", "BBB", "CCC")
    async with simulator(
        underlyings=names, contracts_per_underlying=1000, broken_pages={"BBB": 3}
    ) as api:
        code = await run_snapshots_job(make_settings(api.base_url, names), force=True)
    assert code == ExitCode.PARTIAL
    cover = await coverage(pool)
    assert {u: (c["snapshots_stored"], c["complete"]) for u, c in cover.items()} == {
        "AAA": (1000, True),
        "BBB": (500, False),
        "CCC": (1000, True),
    }
    assert "500" in cover["BBB"]["error"] or "HTTP" in cover["BBB"]["error"]
    run = await last_run(pool)
    assert run["status"] == "partial"
    assert (run["underlyings_succeeded"], run["underlyings_failed"]) == (2, 1)
    assert run["rows_written"] == 2500
    assert await pool.fetchval("SELECT count(*) FROM option_snapshots") == 2500


async def test_large_chain_is_sliced_and_read_completely(simulator, pool, make_settings) -> None:
    """A chain larger than the slice size is read as expiration slices, each row exactly once."""
    size = SLICE_CONTRACTS * 2 + 700
    async with simulator(underlyings=("AAA",), contracts_per_underlying=size) as api:
        await seed_contracts(pool, api.base_url, ("AAA",), make_settings)
        stats_before = await api_requests(api.base_url)
        assert (
            await run_snapshots_job(make_settings(api.base_url, ("AAA",)), force=True)
            == ExitCode.OK
        )
        requests = await api_requests(api.base_url) - stats_before
    cover = (await coverage(pool))["AAA"]
    assert (cover["snapshots_stored"], cover["contracts_missing"], cover["complete"]) == (
        size,
        0,
        True,
    )
    assert await pool.fetchval("SELECT count(DISTINCT ticker) FROM option_snapshots") == size
    # slices cost at most one extra partial page each
    assert size / 250 <= requests <= size / 250 + 4


async def snapshot_one_page_chains(
    chains: dict[str, list[dict[str, object]]], make_settings
) -> int:
    """Run ingest_snapshots -u on each of ``chains`` against a server answering each chain
    with its results as one page; return the exit code."""
    from aiohttp import web

    async def chain(request: web.Request) -> web.Response:
        results = chains[request.match_info["underlying"]]
        return web.json_response({"status": "OK", "request_id": "r", "results": results})

    async def upcoming(request: web.Request) -> web.Response:
        return web.json_response([])

    app = web.Application()
    app.router.add_get("/v3/snapshot/options/{underlying}", chain)
    app.router.add_get("/v1/marketstatus/upcoming", upcoming)
    async with await start_server(app) as api:
        settings = make_settings(api.base_url, tuple(chains))
        return await run_snapshots_job(settings, force=True)


async def api_requests(base_url: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/_sim/stats") as r:
        return int((await r.json())["requests"])


async def test_snapshot_is_stored_while_a_long_query_reads(
    simulator, database_url: str, pool, make_settings
) -> None:
    """A long query on option_snapshots neither delays nor fails the snapshot, and the
    partitions made ahead are made all the same (attaching takes no lock a reader holds)."""
    async with simulator(underlyings=("AAA",), contracts_per_underlying=300) as api:
        settings = make_settings(api.base_url, ("AAA",))
        assert await run_snapshots_job(settings, force=True) == 0
        ahead = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=PARTITIONS_AHEAD)
        await pool.execute(f"DROP TABLE option_snapshots_p{ahead:%Y%m%d}")
        reader = await asyncpg.connect(database_url)
        try:
            async with reader.transaction():
                await reader.fetchval("SELECT count(*) FROM option_snapshots")
                code = await asyncio.wait_for(run_snapshots_job(settings, force=True), 30)
        finally:
            await reader.close()
    assert code == ExitCode.OK
    assert await pool.fetchval("SELECT count(*) FROM option_snapshots") == 600
    assert await pool.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f"option_snapshots_p{ahead:%Y%m%d}"
    )


async def test_stop_flushes_fetched_rows_and_records_interrupted(
    simulator, pool, make_settings
) -> None:
    """A stop (signal or deadline) stores what was fetched, marks chains incomplete, exit 5."""
    names = tuple(f"U{c}" for c in "ABCDEFGH")
    stop = asyncio.Event()
    async with simulator(underlyings=names, contracts_per_underlying=2000, latency=0.05) as api:
        settings = make_settings(api.base_url, names, http_concurrency=2)
        asyncio.get_running_loop().call_later(0.5, stop.set)
        with pytest.raises(RunInterrupted) as caught:
            await run_snapshots_job(settings, stop=stop, force=True)
    assert caught.value.exit_code == ExitCode.INTERRUPTED
    run = await last_run(pool)
    assert run["status"] == "interrupted"
    stored = await pool.fetchval("SELECT count(*) FROM option_snapshots")
    assert 0 < stored < 16000
    assert run["rows_written"] == stored
    cover = await coverage(pool)
    assert sum(c["snapshots_stored"] for c in cover.values()) == stored
    assert not all(c["complete"] for c in cover.values())


SATURDAY = dt.datetime(2026, 11, 28, 15, 0, tzinfo=dt.UTC)
TUESDAY_MIDDAY = dt.datetime(2026, 11, 24, 16, 0, tzinfo=dt.UTC)  # 11:00 in New York


@pytest.mark.parametrize(
    ("now", "force", "stored"),
    [(SATURDAY, False, 0), (SATURDAY, True, 20), (TUESDAY_MIDDAY, False, 20)],
    ids=["closed-skips", "closed-forced", "open-runs"],
)
async def test_market_closed_skips_unless_forced(
    simulator, pool, make_settings, now, force, stored
) -> None:
    """When the market is closed the job exits 0 at once, storing nothing, unless --force."""
    async with simulator(underlyings=("AAA",), contracts_per_underlying=20) as api:
        code = await run_snapshots_job(
            make_settings(api.base_url, ("AAA",)),
            force=force,
            now=now,
        )
    assert code == ExitCode.OK
    assert await pool.fetchval("SELECT count(*) FROM option_snapshots") == stored
    assert await pool.fetchval("SELECT count(*) FROM ingest_runs") == (1 if stored else 0)


@pytest.mark.parametrize(
    ("values", "stored_count", "rejected"),
    [
        # "n/a" is refused by the driver too
        ([("bid", 1.25), ("bid", "n/a"), ("volume", 8.0)], 2, 1),
        # the driver would take these as 1.0 and 12
        ([("bid", 1.25), ("bid", True), ("volume", 12.5)], 1, 2),
        # past bigint: the driver refuses it on our side, before PostgreSQL sees it
        ([("bid", 1.25), ("volume", 2**63), ("volume", 2**64 - 1)], 1, 2),
        # PostgreSQL's text cannot hold a NUL character
        ([("bid", 1.25), ("ticker", "\x00"), ("volume", 8.0)], 2, 1),
    ],
    ids=["driver-refuses", "driver-would-accept", "past-bigint", "nul-in-ticker"],
)
async def test_row_with_bad_value_is_rejected_alone(
    fixtures_dir: Path,
    pool,
    make_settings,
    values: list[tuple[str, object]],
    stored_count: int,
    rejected: int,
) -> None:
    """A value the column cannot hold rejects its row only; the page's other rows are stored,
    the reject is kept with its reason and the chain is not complete. A boolean price or a
    fractional count is refused, not stored as 1.0 or truncated."""
    template = json.loads((fixtures_dir / AAPL_CHAIN).read_text())["results"][0]
    results = []
    for n, (field, value) in enumerate(values):
        row = copy.deepcopy(template)
        row["details"]["ticker"] = f"O:AAPL230616C0015{n}000"
        if field == "ticker":
            row["details"]["ticker"] += value
        else:
            (row["day"] if field == "volume" else row["last_quote"])[field] = value
        results.append(row)

    assert await snapshot_one_page_chains({"AAPL": results}, make_settings) == ExitCode.PARTIAL
    stored = await pool.fetch("SELECT ticker, bid, day_volume FROM option_snapshots ORDER BY 1")
    expected = [("O:AAPL230616C00150000", 1.25, template["day"]["volume"])]
    if stored_count == 2:  # the whole float 8.0 is a count of 8
        expected.append(("O:AAPL230616C00152000", template["last_quote"]["bid"], 8))
    assert [(r["ticker"], r["bid"], r["day_volume"]) for r in stored] == expected
    run = await last_run(pool)
    assert (run["rows_fetched"], run["rows_written"], run["rows_rejected"]) == (
        3,
        stored_count,
        rejected,
    )
    cover = (await coverage(pool))["AAPL"]
    assert (cover["snapshots_stored"], cover["rows_rejected"]) == (stored_count, rejected)
    assert (cover["read_to_end"], cover["complete"]) == (True, False)
    kept = await pool.fetch("SELECT run_id, underlying_ticker, reason, record FROM rejected_rows")
    assert len(kept) == rejected
    assert all(r["run_id"] == run["id"] and r["underlying_ticker"] == "AAPL" for r in kept)
    assert all(r["reason"] and r["record"].startswith(("{", "[")) for r in kept)


async def test_filters_are_pushed_down_and_scope_coverage(simulator, pool, make_settings) -> None:
    """CONTRACT_TYPES reaches the API and limits what coverage counts as expected."""
    async with simulator(underlyings=("AAA",), contracts_per_underlying=200) as api:
        await seed_contracts(pool, api.base_url, ("AAA",), make_settings)
        settings = make_settings(api.base_url, ("AAA",), contract_types=("put",))
        assert await run_snapshots_job(settings, force=True) == ExitCode.OK
    types = await pool.fetch(
        "SELECT c.contract_type, count(*) FROM option_snapshots s "
        "JOIN option_contracts c USING (ticker) GROUP BY 1"
    )
    assert [(r[0], r[1]) for r in types] == [("put", 100)]
    cover = (await coverage(pool))["AAA"]
    assert (cover["contracts_active"], cover["snapshots_stored"], cover["contracts_missing"]) == (
        100,
        100,
        0,
    )


async def test_smallest_pool_does_not_starve(simulator, pool, make_settings) -> None:
    """With DB_POOL_SIZE=3 (ledger, one writer, one for queries) the run completes."""
    async with simulator(underlyings=("AAA", "BBB"), contracts_per_underlying=600) as api:
        await seed_contracts(pool, api.base_url, ("AAA", "BBB"), make_settings)
        settings = make_settings(api.base_url, ("AAA", "BBB"), db_pool_size=3)
        code = await asyncio.wait_for(run_snapshots_job(settings, force=True), 30)
    assert code == ExitCode.OK
    assert await pool.fetchval("SELECT count(*) FROM option_snapshots") == 1200


async def test_database_going_away_fails_with_the_real_cause(
    simulator, pool, database_url: str, make_settings
) -> None:
    """When the database ends the job's sessions and refuses new ones, the job fails with one
    error naming that cause, the run is recorded failed once the database is back (within
    DB_RECONNECT_SECONDS of its going away), and every chain stored is whole with its coverage
    row."""
    from tests.conftest import black_out

    names = tuple(f"U{c}" for c in "ABCDEF")
    async with simulator(underlyings=names, contracts_per_underlying=3000, latency=0.02) as api:
        settings = make_settings(api.base_url, names, http_concurrency=2, db_reconnect_seconds=5.0)
        outage = asyncio.create_task(black_out(database_url, after=0.4, seconds=3.0))
        with pytest.raises(DatabaseError) as caught:
            await asyncio.wait_for(run_snapshots_job(settings, force=True), 60)
        await outage
    message = str(caught.value)
    assert "the database connection was lost" in message or "not currently accepting" in message
    assert "released back to the pool" not in message
    run = await last_run(pool)
    assert run["status"] == "failed"
    assert run["error"].startswith(message.split(": ", 1)[0])
    await assert_coverage_matches_rows(pool)


async def assert_coverage_matches_rows(pool: asyncpg.Pool) -> None:
    """Every (slot, underlying) with rows has a coverage row counting exactly those rows."""
    mismatched = await pool.fetch(
        """
        SELECT coalesce(c.captured_at, s.captured_at) AS slot,
               coalesce(c.underlying_ticker, s.underlying_ticker) AS underlying,
               c.snapshots_stored, s.rows
        FROM snapshot_coverage c
        FULL JOIN (SELECT captured_at, underlying_ticker, count(*) AS rows
                   FROM option_snapshots GROUP BY 1, 2) s
          ON s.captured_at = c.captured_at AND s.underlying_ticker = c.underlying_ticker
        WHERE c.snapshots_stored IS DISTINCT FROM coalesce(s.rows, 0)
        """
    )
    assert [tuple(r) for r in mismatched] == []


async def test_connections_lost_now_and_then_cost_nothing(simulator, pool, make_settings) -> None:
    """Backends terminated mid-run are replaced and the chain being stored is stored again:
    the run succeeds, every chain complete, no row twice."""
    names = tuple(f"U{c}" for c in "ABCDEF")

    async def cut_connections() -> None:
        while True:
            await asyncio.sleep(0.25)
            await pool.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() "
                "AND split_part(application_name, '/', 1) = 'ingest_snapshots'"
            )

    async with simulator(underlyings=names, contracts_per_underlying=3000, latency=0.02) as api:
        await seed_contracts(pool, api.base_url, names, make_settings)
        settings = make_settings(api.base_url, names, http_concurrency=4)
        cutter = asyncio.create_task(cut_connections())
        try:
            code = await asyncio.wait_for(run_snapshots_job(settings, force=True), 90)
        finally:
            cutter.cancel()
    assert code == ExitCode.OK
    cover = await coverage(pool)
    assert all(row["complete"] and row["snapshots_stored"] == 3000 for row in cover.values())
    assert await pool.fetchval("SELECT count(*) FROM option_snapshots") == 18000
    run = await last_run(pool)
    assert (run["status"], run["rows_written"], run["underlyings_succeeded"]) == (
        "succeeded",
        18000,
        6,
    )


async def test_contract_without_expiration_does_not_fail_a_sliced_chain(
    simulator, pool, make_settings
) -> None:
    """A contract with no expiration date in option_contracts neither fails the planning of a
    chain large enough to be sliced nor any other chain."""
    size = SLICE_CONTRACTS + 500
    async with simulator(underlyings=("AAA", "BBB"), contracts_per_underlying=size) as api:
        await seed_contracts(pool, api.base_url, ("AAA", "BBB"), make_settings)
        await pool.execute(
            "UPDATE option_contracts SET expiration_date = NULL WHERE ticker = "
            "(SELECT min(ticker) FROM option_contracts WHERE underlying_ticker = 'AAA')"
        )
        code = await run_snapshots_job(make_settings(api.base_url, ("AAA", "BBB")), force=True)
    assert code == ExitCode.OK
    cover = await coverage(pool)
    assert [(u, c["snapshots_stored"], c["complete"]) for u, c in cover.items()] == [
        ("AAA", size, True),
        ("BBB", size, True),
    ]


async def test_unexpected_shapes_fail_one_row_not_the_chain(pool, make_settings) -> None:
    """Unknown fields are ignored, and a section of an unexpected type rejects its row only,
    with the reason kept; the other chains are stored complete."""

    def result(n: int, **extra: object) -> dict[str, object]:
        return {
            "details": {"ticker": f"O:AAA300118C{n:08d}", "contract_type": "call"},
            "open_interest": 7,
            "brand_new_field": {"nested": [1, 2]},
            **extra,
        }

    chains = {
        "AAA": [result(1000), result(2000, greeks=[0.5, 0.1]), result(3000)],
        "BBB": [result(4000) | {"details": {"ticker": "O:BBB300118C00004000"}}],
    }
    assert await snapshot_one_page_chains(chains, make_settings) == ExitCode.PARTIAL
    cover = await coverage(pool)
    assert [
        (u, c["snapshots_stored"], c["rows_rejected"], c["complete"]) for u, c in cover.items()
    ] == [("AAA", 2, 1, False), ("BBB", 1, 0, True)]
    kept = await pool.fetchrow("SELECT ticker, reason FROM rejected_rows")
    assert tuple(kept) == (
        "O:AAA300118C00002000",
        "a section of O:AAA300118C00002000 is not an object",
    )


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.6, 0.9], ids=lambda d: f"stop-at-{d}s")
async def test_every_planned_chain_is_accounted_for_whenever_the_stop_comes(
    simulator, pool, make_settings, delay: float
) -> None:
    """However early the stop lands, every planned chain has its coverage row, each counts
    exactly the rows stored, and the run row counts what was committed."""
    names = tuple(f"U{c}" for c in "ABCDEFGH")
    stop = asyncio.Event()
    async with simulator(underlyings=names, contracts_per_underlying=1500, latency=0.03) as api:
        await seed_contracts(pool, api.base_url, names, make_settings)
        settings = make_settings(api.base_url, names, http_concurrency=3)
        asyncio.get_running_loop().call_later(delay, stop.set)
        try:
            await run_snapshots_job(settings, stop=stop, force=True)
        except RunInterrupted:
            pass
    run = await last_run(pool)
    cover = await coverage(pool)
    assert sorted(cover) == sorted(names)
    await assert_coverage_matches_rows(pool)
    complete = sum(c["complete"] for c in cover.values())
    assert (run["rows_written"], run["underlyings_succeeded"]) == (
        await pool.fetchval("SELECT count(*) FROM option_snapshots"),
        complete,
    )
    for row in cover.values():
        if row["committed_at"] is None:
            assert row["error"].startswith(f"not stored: run {run['id']} ended")
        assert row["complete"] == (row["snapshots_stored"] == 1500)


async def stop_after_first_chain(pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    """Set ``stop`` (as SIGTERM does) once the first chain of the run is stored."""
    await wait_for_value(
        pool, "SELECT count(*) FROM snapshot_coverage WHERE committed_at IS NOT NULL"
    )
    stop.set()


async def test_resume_completes_the_slot_under_its_own_captured_at(
    simulator, pool, make_settings
) -> None:
    """--resume fetches only the chains the interrupted slot did not store completely, stores
    them under the slot's captured_at, and leaves the chains already stored alone."""
    names = tuple(f"U{c}" for c in "ABCDEFGH")
    stop = asyncio.Event()
    async with simulator(underlyings=names, contracts_per_underlying=1500, latency=0.03) as api:
        await seed_contracts(pool, api.base_url, names, make_settings)
        settings = make_settings(api.base_url, names, http_concurrency=3)
        stopper = asyncio.create_task(stop_after_first_chain(pool, stop))
        with pytest.raises(RunInterrupted):
            await run_snapshots_job(settings, stop=stop, force=True)
        await stopper
        first = await last_run(pool)
        before = await coverage(pool)
        stored_before = {u for u, c in before.items() if c["complete"]}
        assert 0 < len(stored_before) < len(names)
        requests = await api_requests(api.base_url)
        assert await run_snapshots_job(settings, resume=True, force=True) == ExitCode.OK
        chain_pages = await api_requests(api.base_url) - requests - 1  # the market calendar
    second = await last_run(pool)
    assert second["resumed"] is True
    assert second["captured_at"] == first["captured_at"]
    assert second["underlyings_requested"] == len(names) - len(stored_before)
    cover = await coverage(pool)
    assert all(c["complete"] and c["snapshots_stored"] == 1500 for c in cover.values())
    for underlying in stored_before:
        assert cover[underlying]["run_id"] == first["id"]
        assert cover[underlying]["committed_at"] == before[underlying]["committed_at"]
    assert chain_pages <= 6 * (len(names) - len(stored_before))
    assert await pool.fetchval("SELECT count(DISTINCT captured_at) FROM option_snapshots") == 1
    await assert_coverage_matches_rows(pool)
    assert await run_snapshots_job(settings, resume=True, force=True) == ExitCode.OK
    assert (await last_run(pool))["id"] == second["id"]  # nothing left: no run at all


@pytest.mark.parametrize(
    ("window", "resumes"), [(600.0, True), (0.0, False)], ids=["within-window", "window-off"]
)
async def test_next_run_resumes_a_fresh_interrupted_slot_by_itself(
    simulator, pool, make_settings, window: float, resumes: bool
) -> None:
    """A run started while the interrupted slot is younger than SNAPSHOT_RESUME_WINDOW
    completes that slot; otherwise it takes a new one."""
    names = tuple(f"U{c}" for c in "ABCDEF")
    stop = asyncio.Event()
    async with simulator(underlyings=names, contracts_per_underlying=1500, latency=0.03) as api:
        await seed_contracts(pool, api.base_url, names, make_settings)
        settings = make_settings(
            api.base_url, names, http_concurrency=2, snapshot_resume_window=window
        )
        stopper = asyncio.create_task(stop_after_first_chain(pool, stop))
        with pytest.raises(RunInterrupted):
            await run_snapshots_job(settings, stop=stop, force=True)
        await stopper
        assert await run_snapshots_job(settings, force=True) == ExitCode.OK
    slots = await pool.fetch(
        "SELECT captured_at, bool_and(complete) AS complete FROM snapshot_coverage "
        "GROUP BY 1 ORDER BY 1"
    )
    assert [r["complete"] for r in slots] == ([True] if resumes else [False, True])


async def test_data_quality_is_counted_per_chain(fixtures_dir: Path, pool, make_settings) -> None:
    """Crossed quotes, negative prices, IV outside (0, 10], negative open interest, quotes older
    than 15 minutes before the slot and greeks missing beside a quote are counted in the chain's
    coverage row; the rows are stored as they came."""
    import time

    template = json.loads((fixtures_dir / AAPL_CHAIN).read_text())["results"][0]
    now_ns = time.time_ns()
    changes = [
        {},
        {"last_quote": {"bid": 2.0, "ask": 1.5, "last_updated": now_ns}},  # crossed
        {"last_trade": {"price": -0.5, "size": 1, "sip_timestamp": now_ns}},  # negative
        {"implied_volatility": 12.0},  # IV out of range
        {"open_interest": -3},
        {"last_quote": {"bid": 1.0, "ask": 1.1, "last_updated": now_ns - 3600 * NS}},  # stale
        {"greeks": None},  # a quote, no greeks
    ]
    results = []
    for n, change in enumerate(changes):
        row = copy.deepcopy(template)
        row["details"]["ticker"] = f"O:AAPL230616C0015{n}000"
        row["last_quote"]["last_updated"] = now_ns
        row.update(change)
        if row.get("greeks") is None:
            del row["greeks"]
        results.append(row)
    await snapshot_one_page_chains({"AAPL": results}, make_settings)
    cover = (await coverage(pool))["AAPL"]
    assert cover["snapshots_stored"] == len(changes)
    assert [
        cover[name]
        for name in (
            "crossed_quotes",
            "negative_prices",
            "iv_out_of_range",
            "negative_open_interest",
            "stale_quotes",
            "greeks_missing",
        )
    ] == [1, 1, 1, 1, 1, 1]
