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
from options.jobs.snapshots import SLICE_CONTRACTS
from options.jobs.wiring import run_options_job, run_snapshots_job
from options.simulator import create_fixture_app, start_server
from options.store.partitions import create_next_partition, drop_old_partitions, ensure_partition

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
        code = await run_snapshots_job(
            make_settings(api.base_url, ("AAPL",)), explicit_underlyings=True, force=True
        )
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
        code = await run_snapshots_job(
            make_settings(api.base_url, ("AAA",)), explicit_underlyings=True, force=True
        )
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


async def test_selection_without_flag_adds_known_underlyings(
    simulator, pool, make_settings
) -> None:
    """Without -u: UNDERLYINGS plus every underlying with active contracts, I:SPX kept as such."""
    async with simulator(
        underlyings=("AAA", "BBB", "CCC", "I:SPX"), contracts_per_underlying=60
    ) as api:
        await seed_contracts(pool, api.base_url, ("AAA", "BBB", "CCC", "I:SPX"), make_settings)
        await pool.execute(
            "UPDATE option_contracts SET active = false WHERE underlying_ticker = 'CCC'"
        )
        settings = make_settings(api.base_url, ("I:SPX", "DDD"))
        assert await run_snapshots_job(settings, force=True) == ExitCode.OK
    assert sorted(await coverage(pool)) == ["AAA", "BBB", "DDD", "SPX"]
    stored = await pool.fetch(
        "SELECT underlying_ticker, count(*) FROM option_snapshots GROUP BY 1 ORDER BY 1"
    )
    assert [(r[0], r[1]) for r in stored] == [("AAA", 60), ("BBB", 60), ("SPX", 60)]


async def test_explicit_underlying_even_when_unknown(simulator, pool, make_settings) -> None:
    """With -u only those underlyings are snapshotted, even one with no known contracts."""
    async with simulator(underlyings=("AAA", "BBB"), contracts_per_underlying=30) as api:
        await seed_contracts(pool, api.base_url, ("AAA",), make_settings)
        code = await run_snapshots_job(
            make_settings(api.base_url, ("BBB",)), explicit_underlyings=True, force=True
        )
    assert code == ExitCode.OK
    cover = await coverage(pool)
    assert list(cover) == ["BBB"]
    assert (cover["BBB"]["contracts_active"], cover["BBB"]["snapshots_stored"]) == (0, 30)
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
            await run_snapshots_job(settings, explicit_underlyings=True, force=True)
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
        code = await run_snapshots_job(
            make_settings(api.base_url, ("ZZZZ",)), explicit_underlyings=True, force=True
        )
    assert code == ExitCode.OK
    cover = (await coverage(pool))["ZZZZ"]
    assert (cover["snapshots_stored"], cover["complete"], cover["pages"]) == (0, True, 1)
    assert (
        "ZZZZ: the API returned an empty chain: no options are listed for it "
        "(a misspelled ticker?)" in caplog.text
    )


async def test_coverage_counts_missing_active_contracts(simulator, pool, make_settings) -> None:
    """Active contracts the chain did not return are counted missing; the chain is complete."""
    async with simulator(underlyings=("AAA",), contracts_per_underlying=300) as api:
        await seed_contracts(pool, api.base_url, ("AAA",), make_settings)
        for strike in ("00001000", "00002000"):
            await pool.execute(
                "INSERT INTO option_contracts (ticker, underlying_ticker, contract_type, "
                "expiration_date, active, first_seen_at, last_seen_at) "
                "VALUES ($1, 'AAA', 'call', $2, true, now(), now())",
                f"O:AAA991231C{strike}",
                dt.date.today() + dt.timedelta(days=60),
            )
        assert (
            await run_snapshots_job(make_settings(api.base_url, ("AAA",)), force=True)
            == ExitCode.OK
        )
    cover = (await coverage(pool))["AAA"]
    assert cover["contracts_active"] == 302
    assert cover["snapshots_stored"] == 300
    assert cover["contracts_missing"] == 2
    assert cover["complete"] is True
    assert cover["pages"] == 2


async def test_chain_failing_on_page_3_keeps_rows_and_is_incomplete(
    simulator, pool, make_settings
) -> None:
    """A chain that breaks on page 3 keeps its first 500 rows, marked incomplete; run partial."""
    names = ("AAA", "BBB", "CCC")
    async with simulator(
        underlyings=names, contracts_per_underlying=1000, broken_pages={"BBB": 3}
    ) as api:
        code = await run_snapshots_job(
            make_settings(api.base_url, names), explicit_underlyings=True, force=True
        )
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
        return await run_snapshots_job(settings, explicit_underlyings=True, force=True)


async def api_requests(base_url: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/_sim/stats") as r:
        return int((await r.json())["requests"])


async def test_partitions_across_midnight_utc(pool) -> None:
    """A run just before midnight UTC creates that day's and the next day's partitions."""
    captured = dt.datetime(2026, 11, 23, 23, 59, 59, tzinfo=dt.UTC)
    assert await ensure_partition(pool, captured.date()) == "option_snapshots_p20261123"
    assert await create_next_partition(pool, captured) is True
    names = await pool.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'option_snapshots'::regclass ORDER BY 1"
    )
    assert [r[0] for r in names] == ["option_snapshots_p20261123", "option_snapshots_p20261124"]
    for moment in (captured, captured + dt.timedelta(seconds=2)):
        await pool.execute(
            "INSERT INTO option_snapshots (ticker, underlying_ticker, captured_at) "
            "VALUES ('O:AAA261231C00001000', 'AAA', $1)",
            moment,
        )
    rows = await pool.fetch(
        "SELECT tableoid::regclass::text AS part, captured_at FROM option_snapshots ORDER BY 2"
    )
    assert [r["part"] for r in rows] == ["option_snapshots_p20261123", "option_snapshots_p20261124"]
    # idempotent: a second run on the same day creates nothing new and fails nothing
    assert await ensure_partition(pool, captured.date()) == "option_snapshots_p20261123"
    assert await create_next_partition(pool, captured) is True


async def test_retention_drops_only_whole_old_partitions(pool) -> None:
    """--retain-days drops partitions whose whole day is older than N days, and nothing else."""
    now = dt.datetime(2026, 11, 23, 15, 0, tzinfo=dt.UTC)
    for days_ago in (0, 2, 4, 10):
        await ensure_partition(pool, (now - dt.timedelta(days=days_ago)).date())
        await create_next_partition(pool, now - dt.timedelta(days=days_ago))
    dropped = await drop_old_partitions(pool, retain_days=3, now=now)
    assert dropped == [
        "option_snapshots_p20261113",
        "option_snapshots_p20261114",
        "option_snapshots_p20261119",
    ]
    left = await pool.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'option_snapshots'::regclass ORDER BY 1"
    )
    assert [r[0] for r in left] == [
        "option_snapshots_p20261120",
        "option_snapshots_p20261121",
        "option_snapshots_p20261122",
        "option_snapshots_p20261123",
        "option_snapshots_p20261124",
    ]


async def test_partition_ddl_gives_way_to_a_long_reader(database_url: str, pool, caplog) -> None:
    """While a query holds option_snapshots, partition DDL waits only its lock timeout: the
    next day's partition and retention are left for a later run, an existing partition is
    used at once, and a missing one the run needs fails with a clear error."""
    today = dt.date(2026, 11, 23)
    now = dt.datetime.combine(today, dt.time(15), dt.UTC)
    await ensure_partition(pool, today - dt.timedelta(days=10))
    await ensure_partition(pool, today)
    reader = await asyncpg.connect(database_url)
    try:
        transaction = reader.transaction()
        await transaction.start()
        await reader.fetchval("SELECT count(*) FROM option_snapshots")
        assert await ensure_partition(pool, today, lock_timeout=0.2) == "option_snapshots_p20261123"
        assert await create_next_partition(pool, now, lock_timeout=0.2) is False
        assert await drop_old_partitions(pool, retain_days=3, now=now, lock_timeout=0.2) == []
        with pytest.raises(DatabaseError, match="another session held option_snapshots"):
            await ensure_partition(pool, today - dt.timedelta(days=1), lock_timeout=0.2)
        await transaction.commit()
    finally:
        await reader.close()
    assert "Partition option_snapshots_p20261124 not created yet" in caplog.text
    assert "Retention: option_snapshots_p20261113 is in use by another session" in caplog.text
    assert await create_next_partition(pool, now, lock_timeout=0.2) is True
    assert await drop_old_partitions(pool, retain_days=3, now=now) == ["option_snapshots_p20261113"]


async def test_snapshot_is_stored_while_a_long_query_reads(
    simulator, database_url: str, pool, make_settings
) -> None:
    """A long query on option_snapshots neither delays nor fails the snapshot: only the next
    day's partition waits for a later run."""
    async with simulator(underlyings=("AAA",), contracts_per_underlying=300) as api:
        settings = make_settings(api.base_url, ("AAA",))
        assert await run_snapshots_job(settings, explicit_underlyings=True, force=True) == 0
        tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
        await pool.execute(f"DROP TABLE option_snapshots_p{tomorrow:%Y%m%d}")
        reader = await asyncpg.connect(database_url)
        try:
            async with reader.transaction():
                await reader.fetchval("SELECT count(*) FROM option_snapshots")
                code = await asyncio.wait_for(
                    run_snapshots_job(settings, explicit_underlyings=True, force=True), 30
                )
        finally:
            await reader.close()
    assert code == ExitCode.OK
    assert await pool.fetchval("SELECT count(*) FROM option_snapshots") == 600
    assert not await pool.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f"option_snapshots_p{tomorrow:%Y%m%d}"
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
            await run_snapshots_job(settings, explicit_underlyings=True, stop=stop, force=True)
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
            explicit_underlyings=True,
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
    """A value the column cannot hold rejects its row only; the page's other rows are stored.
    A boolean price or a fractional count is refused, not stored as 1.0 or truncated."""
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

    assert await snapshot_one_page_chains({"AAPL": results}, make_settings) == ExitCode.OK
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


async def test_database_going_away_fails_the_run_without_hanging(
    simulator, database_url: str, pool, make_settings
) -> None:
    """When PostgreSQL drops the job's connections mid-run, the job fails with one error."""
    from options.errors import DatabaseError

    names = tuple(f"U{c}" for c in "ABCDEF")

    async def cut_connections() -> None:
        await asyncio.sleep(0.4)
        await pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name = 'options-history'"
        )

    async with simulator(underlyings=names, contracts_per_underlying=3000, latency=0.02) as api:
        settings = make_settings(api.base_url, names, http_concurrency=2)
        cutter = asyncio.create_task(cut_connections())
        with pytest.raises(DatabaseError):
            await asyncio.wait_for(
                run_snapshots_job(settings, explicit_underlyings=True, force=True), 60
            )
        await cutter


async def test_closing_a_full_queue_whose_writers_died_returns() -> None:
    """Ending the run never waits on a full page queue that no writer will drain."""
    from options.jobs.snapshots import QUEUE_PAGES, SnapshotRun

    run = SnapshotRun.__new__(SnapshotRun)
    run.pages = asyncio.Queue(QUEUE_PAGES)
    for _ in range(QUEUE_PAGES):
        run.pages.put_nowait(None)

    async def dead_writer() -> None:
        raise ConnectionError("server closed the connection")

    writers = [asyncio.create_task(dead_writer()) for _ in range(2)]
    await asyncio.gather(*writers, return_exceptions=True)
    await asyncio.wait_for(run._close_queue(writers), 5)
    assert run.pages.full()
