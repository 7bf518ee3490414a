"""ingest_options end to end: the simulator or the recorded fixtures in, real PostgreSQL out."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from options.config import Secret
from options.errors import (
    AlreadyRunningError,
    DatabaseError,
    ExitCode,
    KeyRejectedError,
    RunInterrupted,
)
from options.jobs.filters import market_today
from options.jobs.wiring import run_options_job
from options.simulator import SimulatorConfig, create_fixture_app, start_server
from options.store.runs_lease import open_run

FIXTURE_PAGES = (
    "v3/reference/options/contracts.json",
    "v3/reference/options/contracts&cursor=YXA9JTdCJTIySUQlMjIlM0ElMjIy.json",
)


async def contracts_by_ticker(pool: asyncpg.Pool) -> dict[str, dict[str, object]]:
    rows = await pool.fetch("SELECT * FROM option_contracts ORDER BY ticker")
    return {row["ticker"]: dict(row) for row in rows}


async def last_run(pool: asyncpg.Pool) -> asyncpg.Record:
    return await pool.fetchrow("SELECT * FROM ingest_runs ORDER BY id DESC LIMIT 1")


async def test_fixture_contracts_land_exactly(fixtures_dir: Path, pool, make_settings) -> None:
    """Every field of the 20 recorded contracts of underlying A is stored as the API sent it."""
    expected = []
    for name in FIXTURE_PAGES:
        expected += json.loads((fixtures_dir / name).read_text())["results"]
    async with await start_server(create_fixture_app(fixtures_dir)) as api:
        code = await run_options_job(make_settings(api.base_url, ("A",)))
    assert code == ExitCode.OK
    stored = await contracts_by_ticker(pool)
    assert len(expected) == 20
    assert sorted(stored) == sorted(c["ticker"] for c in expected)
    for contract in expected:
        row = stored[contract["ticker"]]
        for field, value in contract.items():
            if field == "additional_underlyings":
                assert json.loads(row[field]) == value
            elif field == "expiration_date":
                assert row[field] == dt.date.fromisoformat(value)
            elif field in ("strike_price", "shares_per_contract"):
                assert row[field] == Decimal(str(value)), field
            else:
                assert row[field] == value, field
        # the recorded contracts expired long ago: every run marks expired contracts inactive
        assert row["active"] is (
            dt.date.fromisoformat(contract["expiration_date"]) >= market_today()
        )
        assert row["first_seen_at"] == row["last_seen_at"]
        absent = {"additional_underlyings", "correction"} - contract.keys()
        assert all(row[field] is None for field in absent)


async def test_second_run_changes_only_last_seen_at(
    fixtures_dir: Path, pool, make_settings
) -> None:
    """Syncing the same listing twice changes nothing but last_seen_at."""
    async with await start_server(create_fixture_app(fixtures_dir)) as api:
        settings = make_settings(api.base_url, ("A",))
        assert await run_options_job(settings) == ExitCode.OK
        first = await contracts_by_ticker(pool)
        assert await run_options_job(settings) == ExitCode.OK
        second = await contracts_by_ticker(pool)
    assert first.keys() == second.keys()
    for ticker, before in first.items():
        after = second[ticker]
        assert after["last_seen_at"] > before["last_seen_at"]
        assert {k: v for k, v in after.items() if k != "last_seen_at"} == {
            k: v for k, v in before.items() if k != "last_seen_at"
        }
    runs = await pool.fetch("SELECT status, rows_written FROM ingest_runs ORDER BY id")
    assert [(r["status"], r["rows_written"]) for r in runs] == [("succeeded", 20)] * 2


async def test_failed_underlying_is_untouched_and_run_is_partial(
    simulator, pool, make_settings
) -> None:
    """An underlying whose listing breaks part-way keeps its rows; the others sync; exit 3."""
    names = ("AAA", "BBB", "CCC")
    async with simulator(underlyings=names, contracts_per_underlying=2500) as api:
        assert await run_options_job(make_settings(api.base_url, names)) == ExitCode.OK
    before = await contracts_by_ticker(pool)
    assert len(before) == 7500
    async with simulator(
        underlyings=names, contracts_per_underlying=2500, broken_pages={"BBB": 2}
    ) as api:
        code = await run_options_job(make_settings(api.base_url, names))
    assert code == ExitCode.PARTIAL
    after = await contracts_by_ticker(pool)
    assert after.keys() == before.keys()
    for ticker, row in after.items():
        if row["underlying_ticker"] == "BBB":
            assert row == before[ticker]
        else:
            assert row["last_seen_at"] > before[ticker]["last_seen_at"]
    assert all(row["active"] for row in after.values())
    run = await last_run(pool)
    assert run["status"] == "partial"
    assert (run["underlyings_succeeded"], run["underlyings_failed"]) == (2, 1)
    assert run["rows_written"] == 5000
    assert "BBB" in run["error"]


async def test_every_underlying_failing_ends_failed(simulator, pool, make_settings) -> None:
    """When no underlying syncs, the run is failed and exits 1."""
    async with simulator(
        underlyings=("AAA",), contracts_per_underlying=10, broken_pages={"AAA": 1}
    ) as api:
        code = await run_options_job(make_settings(api.base_url, ("AAA",)))
    assert code == ExitCode.FAILED
    assert (await last_run(pool))["status"] == "failed"


async def insert_contract(
    pool: asyncpg.Pool,
    ticker: str,
    underlying: str,
    contract_type: str,
    expiration: dt.date,
    strike: str = "100",
) -> None:
    await pool.execute(
        """
        INSERT INTO option_contracts (ticker, underlying_ticker, contract_type, expiration_date,
                                      strike_price, active, first_seen_at, last_seen_at)
        VALUES ($1, $2, $3, $4, $5::numeric, true, now() - interval '2 days',
                now() - interval '1 day')
        """,
        ticker,
        underlying,
        contract_type,
        expiration,
        strike,
    )


async def active_map(pool: asyncpg.Pool, tickers: list[str]) -> dict[str, bool]:
    rows = await pool.fetch(
        "SELECT ticker, active FROM option_contracts WHERE ticker = ANY($1)", tickers
    )
    return {row["ticker"]: row["active"] for row in rows}


async def test_vanished_contracts_are_deactivated_only_in_scope(
    simulator, pool, make_settings
) -> None:
    """Only unseen contracts of a completely listed underlying, within the filters, go inactive."""
    future = market_today() + dt.timedelta(days=400)
    past = market_today() - dt.timedelta(days=3)
    await insert_contract(pool, "O:AAA991231C00001000", "AAA", "call", future)
    await insert_contract(pool, "O:AAA991231P00001000", "AAA", "put", future)
    await insert_contract(pool, "O:AAA201231P00001000", "AAA", "put", past)
    await insert_contract(pool, "O:ZZZ991231C00001000", "ZZZ", "call", future)
    async with simulator(underlyings=("AAA",), contracts_per_underlying=50) as api:
        settings = make_settings(api.base_url, ("AAA",), contract_types=("call",))
        assert await run_options_job(settings) == ExitCode.OK
    assert await active_map(
        pool,
        [
            "O:AAA991231C00001000",
            "O:AAA991231P00001000",
            "O:AAA201231P00001000",
            "O:ZZZ991231C00001000",
        ],
    ) == {
        "O:AAA991231C00001000": False,  # a call, in scope, not listed
        "O:AAA991231P00001000": True,  # a put: outside the listing's scope
        "O:AAA201231P00001000": False,  # expired: inactive whatever the scope
        "O:ZZZ991231C00001000": True,  # another underlying
    }
    assert (await last_run(pool))["contracts_deactivated"] == 2


async def test_max_days_to_expiration_scopes_deactivation(simulator, pool, make_settings) -> None:
    """With MAX_DAYS_TO_EXPIRATION, contracts expiring after the window stay active."""
    await insert_contract(
        pool, "O:AAA991231C00001000", "AAA", "call", market_today() + dt.timedelta(days=400)
    )
    await insert_contract(
        pool, "O:AAA991231C00002000", "AAA", "call", market_today() + dt.timedelta(days=5)
    )
    async with simulator(underlyings=("AAA",), contracts_per_underlying=50) as api:
        settings = make_settings(api.base_url, ("AAA",), max_days_to_expiration=30)
        assert await run_options_job(settings) == ExitCode.OK
    assert await active_map(pool, ["O:AAA991231C00001000", "O:AAA991231C00002000"]) == {
        "O:AAA991231C00001000": True,
        "O:AAA991231C00002000": False,
    }


async def test_empty_listing_fails_the_underlying_and_deactivates_only_expired(
    simulator, pool, make_settings
) -> None:
    """A complete but empty listing is not trusted: the underlying fails loudly and keeps its
    unexpired contracts; expired contracts go inactive all the same."""
    await insert_contract(
        pool, "O:NOPE991231C00001000", "NOPE", "call", market_today() + dt.timedelta(days=30)
    )
    await insert_contract(
        pool, "O:NOPE201231C00001000", "NOPE", "call", market_today() - dt.timedelta(days=1)
    )
    async with simulator(underlyings=("AAA",), contracts_per_underlying=10) as api:
        assert await run_options_job(make_settings(api.base_url, ("NOPE",))) == ExitCode.FAILED
    assert await active_map(pool, ["O:NOPE991231C00001000", "O:NOPE201231C00001000"]) == {
        "O:NOPE991231C00001000": True,
        "O:NOPE201231C00001000": False,
    }
    run = await last_run(pool)
    assert (run["status"], run["underlyings_failed"], run["contracts_deactivated"]) == (
        "failed",
        1,
        1,
    )
    assert "NOPE: the API listed no contracts while 1 unexpired ones are active" in run["error"]


async def test_strike_band_is_pushed_down_and_scopes_deactivation(
    simulator, pool, make_settings
) -> None:
    """STRIKE_BAND_PERCENT lists only strikes near the previous close and deactivates only there."""
    async with simulator(underlyings=("AAA",), contracts_per_underlying=400) as api:
        full = make_settings(api.base_url, ("AAA",))
        assert await run_options_job(full) == ExitCode.OK
        all_rows = await contracts_by_ticker(pool)
        await insert_contract(
            pool,
            "O:AAA991231C99999000",
            "AAA",
            "call",
            market_today() + dt.timedelta(days=30),
            strike="99999",
        )
        banded = make_settings(api.base_url, ("AAA",), strike_band_percent=5.0)
        assert await run_options_job(banded) == ExitCode.OK
    run = await last_run(pool)
    assert 0 < run["rows_fetched"] < len(all_rows)
    assert run["contracts_deactivated"] == 0
    assert (await active_map(pool, ["O:AAA991231C99999000"]))["O:AAA991231C99999000"] is True


async def test_second_copy_is_refused(simulator, pool, make_settings) -> None:
    """While a live copy holds the run lease, a new run refuses to start (exit 4) and leaves
    the live run alone."""
    live = await open_run(pool, "options")
    async with simulator(underlyings=("AAA",), contracts_per_underlying=10) as api:
        with pytest.raises(AlreadyRunningError) as caught:
            await run_options_job(make_settings(api.base_url, ("AAA",)))
    assert caught.value.exit_code == ExitCode.ALREADY_RUNNING
    assert f"run {live.id}" in str(caught.value)
    rows = await pool.fetch("SELECT id, status FROM ingest_runs")
    assert [tuple(r) for r in rows] == [(live.id, "running")]


async def test_run_left_running_is_closed_as_interrupted(simulator, pool, make_settings) -> None:
    """A run row left 'running' by a killed process is closed 'interrupted' by the next run."""
    await pool.execute("INSERT INTO ingest_runs (job, started_at) VALUES ('options', now())")
    async with simulator(underlyings=("AAA",), contracts_per_underlying=10) as api:
        assert await run_options_job(make_settings(api.base_url, ("AAA",))) == ExitCode.OK
    statuses = await pool.fetch("SELECT status FROM ingest_runs ORDER BY id")
    assert [r["status"] for r in statuses] == ["interrupted", "succeeded"]


async def test_cli_exit_code_and_log_lines_of_a_partial_run(
    simulator, database_url: str, tmp_path: Path
) -> None:
    """The ingest_options process exits 3 on a partial run and logs its progress and totals."""
    import asyncio
    import os
    import sys

    async with simulator(
        underlyings=("AAA", "BBB"), contracts_per_underlying=1500, broken_pages={"BBB": 2}
    ) as api:
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "POLYGON_BASE_URL": api.base_url,
            "POLYGON_API_KEY": "test-key",
            "UNDERLYINGS": "AAA,BBB",
            "HTTP_MAX_RETRIES": "0",
            "LOG_LEVEL": "INFO",
        }
        child = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "ingest_options"),
            "--log-format",
            "text",
            env=env,
            cwd=tmp_path,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(child.communicate(), 60)
    log = stderr.decode()
    assert child.returncode == ExitCode.PARTIAL, log
    assert "Retrieved batch at offset 1000 for AAA" in log
    assert "Total contracts processed: 2500" in log
    assert "test-key" not in log


async def test_cli_writes_spans_to_stderr_only_when_asked(
    simulator, database_url: str, tmp_path: Path
) -> None:
    """OTEL_TRACES_EXPORTER=console prints a span for the run, one per underlying and one per
    API request, one JSON object a line, without the key; unset, no span is printed."""
    import asyncio
    import json
    import os
    import sys

    async def run(exporter: str | None) -> str:
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "POLYGON_BASE_URL": api.base_url,
            "POLYGON_API_KEY": "test-key",
            "UNDERLYINGS": "AAA",
            "LOG_LEVEL": "WARNING",
        }
        env.pop("OTEL_TRACES_EXPORTER", None)
        if exporter:
            env["OTEL_TRACES_EXPORTER"] = exporter
        child = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "ingest_options"),
            env=env,
            cwd=tmp_path,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(child.communicate(), 60)
        assert child.returncode == ExitCode.OK, stderr.decode()
        return stderr.decode()

    async with simulator(underlyings=("AAA",), contracts_per_underlying=1500) as api:
        traced = await run("console")
        untraced = await run(None)
    decoder = json.JSONDecoder()
    spans, position = [], traced.find("{")
    while position >= 0:
        span, end = decoder.raw_decode(traced, position)
        spans.append(span)
        position = traced.find("{", end)
    requests = [s for s in spans if s["name"] == "polygon.request"]
    assert [s["attributes"]["url.path"] for s in requests] == [
        "/v3/reference/options/contracts"
    ] * 2
    assert {s["name"] for s in spans} == {
        "ingest_options.run",
        "contracts.sync_underlying",
        "polygon.request",
    }
    run_span = next(s for s in spans if s["name"] == "ingest_options.run")
    assert run_span["attributes"]["options.run_id"] == 1
    assert run_span["resource"]["attributes"]["service.name"] == "ingest_options"
    assert all(line.startswith("{") for line in traced.splitlines() if "polygon" in line)
    assert "test-key" not in traced
    assert "polygon.request" not in untraced


async def requests_by_endpoint(base_url: str) -> dict[str, int]:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/_sim/stats") as response:
        return dict((await response.json())["by_endpoint"])


async def test_rejected_key_ends_the_run_at_once(simulator, pool, make_settings) -> None:
    """A 401 (unknown key) stops the run after the requests in flight, with one error that
    names the setting and not the key, instead of failing underlying after underlying."""
    names = tuple(f"U{c}" for c in "ABCDEFGH")
    async with simulator(underlyings=names, contracts_per_underlying=10) as api:
        settings = make_settings(
            api.base_url, names, api_key=Secret("pk_bad_0123456789"), underlying_concurrency=2
        )
        with pytest.raises(KeyRejectedError) as caught:
            await run_options_job(settings)
        requests = await requests_by_endpoint(api.base_url)
    message = str(caught.value)
    assert "the API refused the key (POLYGON_API_KEY)" in message
    assert "HTTP 401" in message
    assert "pk_bad_0123456789" not in message
    assert requests["/v3/reference/options/contracts"] <= 2
    run = await pool.fetchrow("SELECT status, error FROM ingest_runs")
    assert run["status"] == "failed"
    assert run["error"] == message


async def cut_connections(pool: asyncpg.Pool, application: str, *, every: float) -> None:
    """Terminate the job's backends (its pool is named ``application``) every ``every`` s."""
    import asyncio

    while True:
        await asyncio.sleep(every)
        await pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND split_part(application_name, '/', 1) = $1",
            application,
        )


async def test_database_going_away_fails_with_the_real_cause(
    simulator, pool, database_url: str, make_settings
) -> None:
    """When the database ends the job's sessions and refuses new ones, the run ends with one
    DatabaseError naming that cause (not a task group, not "released back to the pool"), and
    the run is recorded failed on a connection of its own once the database is back."""
    import asyncio

    from tests.conftest import black_out

    names = tuple(f"U{c}" for c in "ABCDEFGH")
    async with simulator(underlyings=names, contracts_per_underlying=3000, latency=0.02) as api:
        # the job waits 5 s for a database gone away; its final status lands when it is back
        settings = make_settings(
            api.base_url, names, underlying_concurrency=2, db_reconnect_seconds=5.0
        )
        outage = asyncio.create_task(black_out(database_url, after=0.3, seconds=3.0))
        with pytest.raises(DatabaseError) as caught:
            await asyncio.wait_for(run_options_job(settings), 60)
        await outage
    message = str(caught.value)
    assert "the database connection was lost" in message or "not currently accepting" in message
    assert "released back to the pool" not in message
    run = await pool.fetchrow("SELECT status, error FROM ingest_runs")
    assert run["status"] == "failed"
    assert run["error"].startswith(message.split(": ", 1)[0])


async def test_connections_lost_now_and_then_cost_nothing(simulator, pool, make_settings) -> None:
    """Backends terminated mid-run (a restart, a failover, idle_session_timeout) are replaced
    and the interrupted work is done again: the run succeeds and stores everything."""
    import asyncio

    names = tuple(f"U{c}" for c in "ABCD")
    async with simulator(underlyings=names, contracts_per_underlying=2000, latency=0.02) as api:
        settings = make_settings(api.base_url, names, underlying_concurrency=2)
        cutter = asyncio.create_task(cut_connections(pool, "ingest_options", every=0.3))
        try:
            code = await asyncio.wait_for(run_options_job(settings), 90)
        finally:
            cutter.cancel()
    assert code == ExitCode.OK
    assert await pool.fetchval("SELECT count(*) FROM option_contracts WHERE active") == 8000
    run = await last_run(pool)
    assert (run["status"], run["rows_written"], run["underlyings_succeeded"]) == (
        "succeeded",
        8000,
        4,
    )


async def test_contract_with_a_value_the_table_cannot_hold_is_rejected_alone(
    pool, make_settings
) -> None:
    """A contract with a value its column cannot hold is rejected and counted; the page's
    other contracts are stored and the underlying is not failed for it."""
    from aiohttp import web

    def contract(strike: int, **changes: object) -> dict[str, object]:
        return {
            "ticker": f"O:AAA300118C{strike * 1000:08d}",
            "underlying_ticker": "AAA",
            "contract_type": "call",
            "exercise_style": "american",
            "expiration_date": "2030-01-18",
            "strike_price": strike,
            "shares_per_contract": 100,
            **changes,
        }

    results = [
        contract(10),
        contract(11, strike_price="ten"),
        contract(12, correction=2**31),
        contract(13, ticker="AAA300118C00013000"),
        contract(14, contract_type="ca\x00ll"),
        contract(15, additional_underlyings=[{"type": "equity", "underlying": "B\x00"}]),
        contract(16, expiration_date="2030-13-01"),
        contract(17, correction=True),
        contract(18, strike_price="1e200000"),
    ]

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"status": "OK", "request_id": "r", "results": results})

    app = web.Application()
    app.router.add_get("/v3/reference/options/contracts", listing)
    async with await start_server(app) as api:
        code = await run_options_job(make_settings(api.base_url, ("AAA",)))
    assert code == ExitCode.OK
    stored = await pool.fetch("SELECT ticker FROM option_contracts")
    assert [r[0] for r in stored] == ["O:AAA300118C00010000"]
    run = await last_run(pool)
    assert (run["rows_fetched"], run["rows_written"], run["rows_rejected"]) == (9, 1, 8)


async def test_contract_in_a_rejected_row_is_still_listed(simulator, pool, make_settings) -> None:
    """A contract whose row the normalizer refuses (an expiration sent as a datetime) was
    listed all the same: it stays active, its last_seen_at moves, and the reject is kept."""
    async with simulator(underlyings=("AAA",), contracts_per_underlying=200) as api:
        settings = make_settings(api.base_url, ("AAA",))
        assert await run_options_job(settings) == ExitCode.OK
    before = await contracts_by_ticker(pool)
    config = SimulatorConfig(malformed_contracts_rate=0.1)
    bad = sorted(t for t in before if config.malformed_contract(t))
    assert 5 < len(bad) < 50
    async with simulator(
        underlyings=("AAA",), contracts_per_underlying=200, malformed_contracts_rate=0.1
    ) as api:
        assert await run_options_job(make_settings(api.base_url, ("AAA",))) == ExitCode.OK
    after = await contracts_by_ticker(pool)
    assert all(row["active"] for row in after.values())
    assert all(after[t]["last_seen_at"] > before[t]["last_seen_at"] for t in bad)
    run = await last_run(pool)
    assert (run["rows_rejected"], run["contracts_deactivated"]) == (len(bad), 0)
    kept = await pool.fetch("SELECT ticker, reason, record FROM rejected_rows ORDER BY ticker")
    assert [r["ticker"] for r in kept] == bad
    assert all("not a YYYY-MM-DD date" in r["reason"] for r in kept)
    assert all("T00:00:00Z" in r["record"] for r in kept)


async def test_listing_with_every_row_rejected_deactivates_nothing(
    simulator, pool, make_settings
) -> None:
    """A listing whose every row is refused stores nothing, deactivates nothing, and fails its
    underlying loudly instead of ending the run succeeded."""
    async with simulator(underlyings=("AAA",), contracts_per_underlying=120) as api:
        assert await run_options_job(make_settings(api.base_url, ("AAA",))) == ExitCode.OK
    async with simulator(
        underlyings=("AAA",), contracts_per_underlying=120, malformed_contracts_rate=1.0
    ) as api:
        code = await run_options_job(make_settings(api.base_url, ("AAA",)))
    assert code == ExitCode.FAILED
    assert await pool.fetchval("SELECT count(*) FROM option_contracts WHERE active") == 120
    run = await last_run(pool)
    assert (run["status"], run["underlyings_failed"], run["rows_rejected"]) == ("failed", 1, 120)
    assert "all 120 contracts of the listing were rejected" in run["error"]


@pytest.mark.parametrize(
    ("percent", "code", "deactivated"),
    [(20.0, ExitCode.FAILED, 0), (50.0, ExitCode.OK, 40)],
    ids=["refused", "allowed"],
)
async def test_guard_refuses_to_deactivate_too_large_a_share(
    simulator, pool, make_settings, percent: float, code: ExitCode, deactivated: int
) -> None:
    """A listing that would deactivate more than MAX_DEACTIVATION_PERCENT of an underlying's
    unexpired active contracts fails that underlying and changes nothing of it."""
    for n in range(40):
        await insert_contract(
            pool, f"O:AAA991231C{n:08d}", "AAA", "call", market_today() + dt.timedelta(days=30)
        )
    async with simulator(underlyings=("AAA",), contracts_per_underlying=50) as api:
        settings = make_settings(api.base_url, ("AAA",), max_deactivation_percent=percent)
        assert await run_options_job(settings) == code
    assert await pool.fetchval("SELECT count(*) FROM option_contracts WHERE NOT active") == (
        deactivated
    )
    run = await last_run(pool)
    assert run["contracts_deactivated"] == deactivated
    if code == ExitCode.FAILED:
        assert "would deactivate 40 of 90 unexpired active contracts" in run["error"]
        assert "MAX_DEACTIVATION_PERCENT=20" in run["error"]
        # the whole underlying rolled back: the 50 listed contracts were not stored either
        assert await pool.fetchval("SELECT count(*) FROM option_contracts") == 40


async def test_expired_contracts_of_every_underlying_are_deactivated(
    simulator, pool, make_settings
) -> None:
    """Each run marks inactive the expired contracts of every underlying, also of those it does
    not sync (a one-off ticker, one left out of UNDERLYINGS)."""
    yesterday = market_today() - dt.timedelta(days=1)
    await insert_contract(pool, "O:ZZZ201231C00001000", "ZZZ", "call", yesterday)
    await insert_contract(pool, "O:ZZZ991231C00001000", "ZZZ", "call", market_today())
    async with simulator(underlyings=("AAA",), contracts_per_underlying=10) as api:
        assert await run_options_job(make_settings(api.base_url, ("AAA",))) == ExitCode.OK
    assert await active_map(pool, ["O:ZZZ201231C00001000", "O:ZZZ991231C00001000"]) == {
        "O:ZZZ201231C00001000": False,
        "O:ZZZ991231C00001000": True,  # expires today: still trading
    }


async def test_first_seen_at_never_moves(simulator, pool, make_settings) -> None:
    """first_seen_at is the first sighting, by the snapshot job or the daily sync, and no
    later sync moves it."""
    from options.jobs.wiring import run_snapshots_job

    async with simulator(underlyings=("AAA",), contracts_per_underlying=30) as api:
        settings = make_settings(api.base_url, ("AAA",))
        assert await run_snapshots_job(settings, force=True) == ExitCode.OK
        first = {t: r["first_seen_at"] for t, r in (await contracts_by_ticker(pool)).items()}
        assert len(first) == 30
        for _ in range(2):
            assert await run_options_job(settings) == ExitCode.OK
    after = await contracts_by_ticker(pool)
    assert {t: r["first_seen_at"] for t, r in after.items()} == first
    assert all(r["last_seen_at"] > r["first_seen_at"] for r in after.values())


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3, 0.5, 0.8], ids=lambda d: f"stop-at-{d}s")
async def test_ledger_counts_what_was_committed_whenever_the_stop_comes(
    simulator, pool, make_settings, delay: float
) -> None:
    """Whenever the stop lands (between pages, while a transaction commits), the run row
    counts exactly the underlyings and contracts that were committed."""
    import asyncio

    names = tuple(f"U{c}" for c in "ABCDEF")
    stop = asyncio.Event()
    async with simulator(underlyings=names, contracts_per_underlying=1500, latency=0.01) as api:
        settings = make_settings(api.base_url, names, underlying_concurrency=3)
        asyncio.get_running_loop().call_later(delay, stop.set)
        try:
            code = await run_options_job(settings, stop=stop)
        except RunInterrupted as exc:
            code = exc.exit_code
    run = await last_run(pool)
    seen = await pool.fetchval(
        "SELECT count(*) FROM option_contracts WHERE last_seen_at = $1", run["started_at"]
    )
    synced = await pool.fetchval(
        "SELECT count(*) FROM tracked_underlyings WHERE last_contract_sync_at = $1",
        run["started_at"],
    )
    assert (run["rows_written"], run["underlyings_succeeded"]) == (seen, synced)
    assert seen == 1500 * synced
    assert run["status"] == ("succeeded" if code == ExitCode.OK else "interrupted")
    if code == ExitCode.INTERRUPTED:
        assert f"{6 - synced} left untouched" in run["error"]


async def test_an_underlying_without_contracts_is_warned_about(
    simulator, pool, make_settings, caplog
) -> None:
    """A ticker the API lists no contracts for (a misspelling such as APPL) is warned about,
    and its sync row says it listed none."""
    async with simulator(underlyings=("AAPL",), contracts_per_underlying=10) as api:
        code = await run_options_job(make_settings(api.base_url, ("AAPL",)), only=("APPL",))
    assert code == ExitCode.OK
    assert "APPL: the API lists no option contracts for it (a misspelled ticker" in caplog.text
    row = await pool.fetchrow("SELECT underlying_ticker, contracts_listed FROM contract_syncs")
    assert tuple(row) == ("APPL", 0)
