"""The Polygon simulator: the recorded shapes, pagination, auth, filters and every fault knob."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from operator import eq, ge, gt, le, lt
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import aiohttp
import orjson
import pytest
import yarl

import options.simulator.app as simulator_app
from options.simulator import (
    SimulatorConfig,
    SimulatorProcess,
    create_app,
    create_fixture_app,
    describe,
    make_universe_names,
    start_server,
)
from options.simulator.market import snapshot_rows, stock_snapshot
from options.simulator.universe import Universe
from tests.conftest import require_fixtures

BIN = Path(sys.executable).parent
KEY = "sim-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
AS_OF = dt.date(2026, 3, 4)  # a Wednesday
TICKER_RE = re.compile(r"^O:([A-Z]+)(\d{6})([CP])(\d{8})$")
T = TypeVar("T")


@asynccontextmanager
async def simulator(**knobs: Any) -> AsyncIterator[str]:
    """Serve a simulator with ``knobs`` over the defaults; yield its base URL."""
    knobs.setdefault("as_of", AS_OF)
    knobs.setdefault("contracts_per_underlying", 120)
    async with await start_server(create_app(SimulatorConfig(**knobs))) as server:
        yield server.base_url


@pytest.fixture(scope="module")
async def base_url() -> AsyncIterator[str]:
    """A shared, well-behaved simulator: two stocks and one index, 300 contracts each."""
    async with simulator(underlyings=("AAA", "BBB", "I:SPX"), contracts_per_underlying=300) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session sending the simulator's key."""
    async with aiohttp.ClientSession(headers=AUTH) as session:
        yield session


async def get(
    http: aiohttp.ClientSession, url: str, **params: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """GET ``url``; return the status, the decoded JSON body and the response."""
    async with http.get(url, params=params or None) as response:
        return response.status, orjson.loads(await response.read()), response


async def walk(http: aiohttp.ClientSession, url: str, **params: Any) -> list[dict[str, Any]]:
    """Follow ``next_url`` from ``url`` to the end; return every page body."""
    pages = []
    status, body, _ = await get(http, url, **params)
    assert status == 200, body
    pages.append(body)
    while "next_url" in body:
        status, body, _ = await get(http, body["next_url"])
        assert status == 200, body
        pages.append(body)
    return pages


async def in_one_minute(make: Callable[[], Awaitable[T]]) -> T:
    """Run ``make`` until it starts and ends within one minute (values drift per minute)."""
    for _ in range(3):
        minute = time.time() // 60
        result = await make()
        if time.time() // 60 == minute:
            return result
    raise AssertionError("could not stay within one minute")


def shape_mismatches(recorded: Any, served: Any, path: str = "$") -> list[str]:
    """Key paths of ``recorded`` that ``served`` lacks or holds with another JSON type."""

    def kind(value: Any) -> str:
        if isinstance(value, bool):
            return "boolean"
        if isinstance(value, int | float):
            return "number"
        return type(value).__name__

    if recorded is None:  # a recorded null says nothing about the type
        return []
    if kind(recorded) != kind(served):
        return [f"{path}: recorded {kind(recorded)}, served {kind(served)}"]
    problems: list[str] = []
    if isinstance(recorded, dict):
        for key, value in recorded.items():
            if key not in served:
                problems.append(f"{path}.{key}: missing")
            else:
                problems.extend(shape_mismatches(value, served[key], f"{path}.{key}"))
    elif isinstance(recorded, list) and recorded and served:
        for item in recorded:
            problems.extend(shape_mismatches(item, served[0], f"{path}[]"))
    return problems


def fixture(relative: str) -> Any:
    """Load one recorded response (the fixtures must be there)."""
    return orjson.loads((require_fixtures() / relative).read_bytes())


def row_tickers(pages: list[dict[str, Any]]) -> list[str]:
    """The contract tickers of listing or chain pages, in order."""
    return [r.get("ticker") or r["details"]["ticker"] for page in pages for r in page["results"]]


def typical(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The first snapshot row that has every optional part (greeks, a trade today)."""
    return next(r for r in rows if "greeks" in r and "last_trade" in r and r["day"])


# --- the recorded shapes ----------------------------------------------------------------------


async def served_contracts(http: aiohttp.ClientSession, base: str) -> Any:
    """Contracts page, as the recorded one."""
    _, body, _ = await get(http, f"{base}/v3/reference/options/contracts", underlying_ticker="AAA")
    return body


async def served_contract(http: aiohttp.ClientSession, base: str) -> Any:
    """Single contract."""
    _, page, _ = await get(http, f"{base}/v3/reference/options/contracts", underlying_ticker="AAA")
    ticker = page["results"][0]["ticker"]
    _, body, _ = await get(http, f"{base}/v3/reference/options/contracts/{ticker}")
    return body


async def served_chain(http: aiohttp.ClientSession, base: str) -> Any:
    """Chain page, reduced to its most complete row like the recorded one."""
    _, body, _ = await get(http, f"{base}/v3/snapshot/options/AAA", limit=250)
    return {**body, "results": [typical(body["results"])]}


async def served_snapshot(http: aiohttp.ClientSession, base: str) -> Any:
    """Single-contract snapshot of a complete row."""
    _, page, _ = await get(http, f"{base}/v3/snapshot/options/AAA", limit=250)
    ticker = typical(page["results"])["details"]["ticker"]
    _, body, _ = await get(http, f"{base}/v3/snapshot/options/AAA/{ticker}")
    return body


async def served_prev(http: aiohttp.ClientSession, base: str) -> Any:
    """Previous-close bar."""
    return (await get(http, f"{base}/v2/aggs/ticker/AAA/prev"))[1]


async def served_stock(http: aiohttp.ClientSession, base: str) -> Any:
    """Single-stock snapshot."""
    return (await get(http, f"{base}/v2/snapshot/locale/us/markets/stocks/tickers/AAA"))[1]


@pytest.mark.parametrize(
    ("recorded", "serve"),
    [
        pytest.param("v3/reference/options/contracts.json", served_contracts, id="contracts"),
        pytest.param(
            "v3/reference/options/contracts/OEVRI240119C00002500.json",
            served_contract,
            id="contract",
        ),
        pytest.param("v3/snapshot/options/AAPL.json", served_chain, id="chain"),
        pytest.param(
            "v3/snapshot/options/AAPL/O;AAPL230616C00150000.json", served_snapshot, id="snapshot"
        ),
        pytest.param("v2/aggs/ticker/AAPL/prev.json", served_prev, id="prev"),
        pytest.param(
            "v2/snapshot/locale/us/markets/stocks/tickers/AAPL.json", served_stock, id="stock"
        ),
    ],
)
async def test_speaks_the_recorded_shape(
    base_url: str, http: aiohttp.ClientSession, recorded: str, serve: Any
) -> None:
    """Every key path of the recorded response exists in the simulator's with the same JSON type."""
    expected = fixture(recorded)
    served = await serve(http, base_url)
    assert shape_mismatches(expected, served) == []
    assert served["status"] == "OK" and served["request_id"]


# --- the universe -----------------------------------------------------------------------------


async def test_contracts_are_well_formed(base_url: str, http: aiohttp.ClientSession) -> None:
    """Exactly N distinct contracts, tickers agreeing with their fields, Friday expirations."""
    pages = await walk(
        http, f"{base_url}/v3/reference/options/contracts", underlying_ticker="AAA", limit=1000
    )
    contracts = [c for page in pages for c in page["results"]]
    tickers = [c["ticker"] for c in contracts]
    assert len(tickers) == len(set(tickers)) == 300
    assert tickers == sorted(tickers)
    for contract in contracts:
        root, yymmdd, letter, strike = TICKER_RE.match(contract["ticker"]).groups()  # type: ignore[union-attr]
        expiry = dt.date.fromisoformat(contract["expiration_date"])
        assert root == contract["underlying_ticker"] == "AAA"
        assert yymmdd == expiry.strftime("%y%m%d")
        assert expiry.weekday() == 4 and expiry >= AS_OF
        assert letter == {"call": "C", "put": "P"}[contract["contract_type"]]
        assert int(strike) == round(contract["strike_price"] * 1000)
        assert contract["strike_price"] > 0
        assert contract["exercise_style"] == "american"
    assert {c["contract_type"] for c in contracts} == {"call", "put"}
    assert len({c["expiration_date"] for c in contracts}) == 3


async def test_some_contracts_are_adjusted(base_url: str, http: aiohttp.ClientSession) -> None:
    """About one contract in 50 has a non-100 deliverable and additional_underlyings."""
    pages = await walk(
        http, f"{base_url}/v3/reference/options/contracts", underlying_ticker="BBB", limit=1000
    )
    adjusted = [c for page in pages for c in page["results"] if c["shares_per_contract"] != 100]
    assert 3 <= len(adjusted) <= 9
    for contract in adjusted:
        (extra,) = contract["additional_underlyings"]
        assert extra["type"] == "equity" and extra["amount"] > 0 and extra["underlying"]


@pytest.mark.parametrize("path_name", ["I:SPX", "SPX"], ids=["prefixed", "bare"])
async def test_index_underlying(base_url: str, http: aiohttp.ClientSession, path_name: str) -> None:
    """Index options are european, list under the bare root, and snapshots carry ``value``."""
    status, chain, _ = await get(http, f"{base_url}/v3/snapshot/options/{path_name}", limit=5)
    assert status == 200 and len(chain["results"]) == 5
    for row in chain["results"]:
        asset = row["underlying_asset"]
        assert "value" in asset and "price" not in asset and asset["ticker"] == "I:SPX"
        assert row["details"]["exercise_style"] == "european"
        assert row["details"]["ticker"].startswith("O:SPX")
    _, contracts, _ = await get(
        http, f"{base_url}/v3/reference/options/contracts", underlying_ticker=path_name
    )
    assert {c["underlying_ticker"] for c in contracts["results"]} == {"SPX"}
    _, prev, _ = await get(http, f"{base_url}/v2/aggs/ticker/I:SPX/prev")
    assert prev["results"][0]["c"] > 0


async def test_snapshot_values_are_plausible(base_url: str, http: aiohttp.ClientSession) -> None:
    """Prices >= 0.01, bid <= ask, |delta| <= 1, IV > 0, ns timestamps; a few rows never traded."""
    pages = await walk(http, f"{base_url}/v3/snapshot/options/AAA", limit=250)
    rows = [row for page in pages for row in page["results"]]
    assert len(rows) == 300
    for row in rows:
        quote = row["last_quote"]
        assert 0.01 <= quote["bid"] <= quote["midpoint"] <= quote["ask"]
        assert row["fmv"] >= 0.01 and row["open_interest"] >= 0
        assert quote["last_updated"] > 10**18
        if "greeks" in row:
            assert -1.0 <= row["greeks"]["delta"] <= 1.0
        if "implied_volatility" in row:
            assert row["implied_volatility"] > 0
        if row["day"]:
            assert row["day"]["low"] <= row["day"]["close"] <= row["day"]["high"]
            assert row["last_trade"]["sip_timestamp"] > 10**18
        else:
            assert "last_trade" not in row
    untraded = sum(1 for row in rows if not row["day"])
    assert 1 <= untraded <= 30


@pytest.mark.parametrize("enabled", [True, False], ids=["dropped", "kept"])
async def test_deep_itm_greeks(enabled: bool) -> None:
    """With the knob, contracts over 20% ITM lack greeks (half also the IV); without, all have."""
    async with (
        simulator(
            underlyings=("AAA",), contracts_per_underlying=400, deep_itm_without_greeks=enabled
        ) as url,
        aiohttp.ClientSession(headers=AUTH) as http,
    ):
        rows = [
            r
            for page in await walk(http, f"{url}/v3/snapshot/options/AAA", limit=250)
            for r in page["results"]
        ]
    deep = []
    for row in rows:
        spot, strike = row["underlying_asset"]["price"], row["details"]["strike_price"]
        is_call = row["details"]["contract_type"] == "call"
        if spot > 1.2 * strike if is_call else strike > 1.2 * spot:
            deep.append(row)
        else:
            assert "greeks" in row and "implied_volatility" in row
    assert deep
    if enabled:
        assert all("greeks" not in row for row in deep)
        without_iv = sum(1 for row in deep if "implied_volatility" not in row)
        assert 0.25 * len(deep) < without_iv < 0.75 * len(deep)
    else:
        assert all("greeks" in row for row in deep)


async def test_same_seed_same_answers() -> None:
    """Two simulators with one seed and as_of serve identical contracts and, per minute, quotes."""

    async def fetch(seed: int) -> tuple[Any, Any]:
        async with simulator(seed=seed) as url, aiohttp.ClientSession(headers=AUTH) as http:
            contracts = (await get(http, f"{url}/v3/reference/options/contracts", limit=1000))[1]
            chain = (await get(http, f"{url}/v3/snapshot/options/BBB", limit=250))[1]
        for body in (contracts, chain):
            del body["request_id"]
            body.pop("next_url", None)
        return contracts, chain

    async def both() -> tuple[Any, Any, Any]:
        return await fetch(7), await fetch(7), await fetch(8)

    first, second, other = await in_one_minute(both)
    assert first == second
    assert first[0] != other[0] and first[1] != other[1]


def test_values_drift_by_minute() -> None:
    """Snapshot values are fixed within a minute and move from one minute to the next."""
    universe = Universe(SimulatorConfig(contracts_per_underlying=50, as_of=AS_OF), AS_OF)
    chain = universe.chain("AAA")
    minute = 29_500_000

    def render(at: int) -> list[dict[str, Any]]:
        return orjson.loads(
            orjson.dumps(snapshot_rows(chain, range(50), at, deep_itm_without_greeks=True))
        )

    assert render(minute) == render(minute)
    later = render(minute + 1)
    assert later != render(minute)
    assert {r["details"]["ticker"] for r in later} == {
        r["details"]["ticker"] for r in render(minute)
    }


def test_universe_names() -> None:
    """make_universe_names gives distinct uppercase tickers in a fixed order."""
    names = make_universe_names(2000)
    assert names[:3] == ("AAAA", "AAAB", "AAAC") and names[26] == "AABA"
    assert len(set(names)) == 2000 and all(re.fullmatch(r"[A-Z]{4}", n) for n in names)
    assert make_universe_names(2000) == names


@pytest.mark.parametrize(
    "knobs",
    [
        pytest.param({"underlyings": ()}, id="no-underlyings"),
        pytest.param({"underlyings": ("SPX", "I:SPX")}, id="same-root"),
        pytest.param({"underlyings": ("aaa",)}, id="lowercase"),
        pytest.param({"contracts_per_underlying": 0}, id="no-contracts"),
        pytest.param({"error_rate": 1.5}, id="error-rate"),
        pytest.param({"requests_per_second": 0}, id="rps"),
        pytest.param({"broken_pages": {"ZZZ": 1}}, id="broken-unknown"),
        pytest.param({"broken_pages": {"AAA": 0}}, id="broken-page-0"),
        pytest.param({"latency": -0.1}, id="latency"),
        pytest.param({"latency_spike_rate": 1.5}, id="spike-rate"),
        pytest.param({"latency_spike": -1.0}, id="spike"),
        pytest.param({"throttle_bursts": -1}, id="bursts"),
        pytest.param({"throttle_burst_length": 0}, id="burst-length"),
        pytest.param({"looping_pages": {"ZZZ": 2}}, id="looping-unknown"),
        pytest.param({"looping_pages": {"AAA": 1}}, id="looping-page-1"),
        pytest.param({"malformed_contracts_rate": -0.1}, id="malformed-contracts"),
        pytest.param({"malformed_snapshots_rate": 2.0}, id="malformed-snapshots"),
        pytest.param({"hidden_contracts": {"ZZZ": 1}}, id="hidden-unknown"),
        pytest.param({"hidden_contracts": {"AAA": -1}}, id="hidden-negative"),
    ],
)
def test_config_rejects_nonsense(knobs: dict[str, Any]) -> None:
    """SimulatorConfig refuses values it cannot serve."""
    with pytest.raises(ValueError):
        SimulatorConfig(**knobs)


def test_config_round_trips_through_json() -> None:
    """to_json / from_json (the child process's input) keep every field."""
    config = SimulatorConfig(
        underlyings=("AAA", "I:SPX"),
        broken_pages={"AAA": 2},
        as_of=AS_OF,
        api_key=None,
        latency_spike_rate=0.1,
        latency_spike=0.5,
        throttle_bursts=7,
        throttle_burst_length=3,
        looping_pages={"SPX": 3},
        malformed_contracts_rate=0.2,
        malformed_snapshots_rate=0.3,
        hidden_contracts={"AAA": 4},
    )
    assert SimulatorConfig.from_json(config.to_json()) == config


# --- pagination, limits, filters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "count"),
    [
        pytest.param(
            "/v3/reference/options/contracts",
            {"underlying_ticker": "AAA", "limit": 70},
            300,
            id="contracts",
        ),
        pytest.param("/v3/reference/options/contracts", {"limit": 1000}, 900, id="contracts-all"),
        pytest.param("/v3/snapshot/options/AAA", {"limit": 250}, 300, id="chain"),
        pytest.param(
            "/v3/snapshot/options/AAA",
            {"limit": 50, "contract_type": "put"},
            150,
            id="chain-ends-on-full-page",
        ),
    ],
)
async def test_pagination_walks_everything_once(
    base_url: str, http: aiohttp.ClientSession, path: str, params: dict[str, Any], count: int
) -> None:
    """next_url is absolute, carries only the cursor (never the key), and visits each row once."""
    pages = await walk(http, f"{base_url}{path}", apiKey=KEY, **params)
    rows = [row for page in pages for row in page["results"]]
    tickers = [row.get("ticker") or row["details"]["ticker"] for row in rows]
    assert len(tickers) == len(set(tickers)) == count
    assert tickers == sorted(tickers)
    assert all(len(page["results"]) == params["limit"] for page in pages[:-1])
    assert pages[-1]["results"] and "next_url" not in pages[-1]
    for page in pages[:-1]:
        assert page["next_url"].startswith(f"{base_url}{path}?cursor=")
        assert list(parse_qs(urlsplit(page["next_url"]).query)) == ["cursor"]
        assert KEY not in page["next_url"]


async def test_cursor_ignores_other_params(base_url: str, http: aiohttp.ClientSession) -> None:
    """With a cursor, filters and limit sent alongside are ignored: the cursor holds them."""
    _, first, _ = await get(
        http, f"{base_url}/v3/snapshot/options/AAA", limit=10, contract_type="put"
    )
    cursor = parse_qs(urlsplit(first["next_url"]).query)["cursor"][0]
    _, second, _ = await get(
        http, f"{base_url}/v3/snapshot/options/AAA", cursor=cursor, contract_type="call", limit=3
    )
    assert len(second["results"]) == 10
    assert {r["details"]["contract_type"] for r in second["results"]} == {"put"}


@pytest.mark.parametrize(
    ("path", "limit", "status"),
    [
        pytest.param("/v3/reference/options/contracts", 1000, 200, id="contracts-1000"),
        pytest.param("/v3/reference/options/contracts", 1001, 400, id="contracts-1001"),
        pytest.param("/v3/snapshot/options/AAA", 250, 200, id="chain-250"),
        pytest.param("/v3/snapshot/options/AAA", 251, 400, id="chain-251"),
        pytest.param("/v3/snapshot/options/AAA", 0, 400, id="chain-0"),
    ],
)
async def test_limit_maximum(
    base_url: str, http: aiohttp.ClientSession, path: str, limit: int, status: int
) -> None:
    """Limits above 1000 (contracts) or 250 (chain) answer 400 with the API's error body."""
    got, body, _ = await get(http, f"{base_url}{path}", limit=limit)
    assert got == status
    if status == 400:
        assert body["status"] == "ERROR" and body["error"] and body["request_id"]
    else:
        assert body["status"] == "OK"


async def test_default_limit_is_ten(base_url: str, http: aiohttp.ClientSession) -> None:
    """Without limit, a page holds 10 rows, as the real API does."""
    _, body, _ = await get(http, f"{base_url}/v3/snapshot/options/AAA")
    assert len(body["results"]) == 10 and "next_url" in body


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"contract_type": "put"}, id="type"),
        pytest.param({"expiration_date": "2026-03-13"}, id="expiration"),
        pytest.param({"expiration_date.gt": "2026-03-06", "contract_type": "call"}, id="exp-gt"),
        pytest.param({"expiration_date.lte": "2026-03-13"}, id="exp-lte"),
        pytest.param({"strike_price.gte": "{low}", "strike_price.lt": "{high}"}, id="strikes"),
        pytest.param({"strike_price": "{mid}", "expiration_date.gte": "2026-03-13"}, id="strike"),
    ],
)
@pytest.mark.parametrize(
    "path",
    ["/v3/reference/options/contracts", "/v3/snapshot/options/AAA"],
    ids=["contracts", "chain"],
)
async def test_filters(
    base_url: str, http: aiohttp.ClientSession, path: str, params: dict[str, str]
) -> None:
    """Filters keep exactly the contracts that satisfy them, on both list endpoints."""
    everything = [
        c
        for page in await walk(
            http, f"{base_url}/v3/reference/options/contracts", underlying_ticker="AAA", limit=1000
        )
        for c in page["results"]
    ]
    strikes = sorted({c["strike_price"] for c in everything})
    marks = {"low": strikes[10], "mid": strikes[len(strikes) // 2], "high": strikes[-10]}
    params = {name: value.format(**marks) for name, value in params.items()}
    compare = {"": eq, "gt": gt, "gte": ge, "lt": lt, "lte": le}

    def passes(contract: dict[str, Any]) -> bool:
        for name, value in params.items():
            field, _, op = name.partition(".")
            wanted: Any = float(value) if field == "strike_price" else value
            if not compare[op](contract[field], wanted):
                return False
        return True

    expected = {c["ticker"] for c in everything if passes(c)}
    extra = {"underlying_ticker": "AAA"} if "contracts" in path else {}
    pages = await walk(http, f"{base_url}{path}", limit=100, **params, **extra)
    got = [r.get("ticker") or r["details"]["ticker"] for page in pages for r in page["results"]]
    assert expected and len(got) == len(set(got)) and set(got) == expected


@pytest.mark.parametrize(
    ("path", "params"),
    [
        pytest.param("/v3/reference/options/contracts", {"contract_type": "future"}, id="type"),
        pytest.param("/v3/reference/options/contracts", {"strike_price.gt": "abc"}, id="strike"),
        pytest.param("/v3/snapshot/options/AAA", {"expiration_date": "2026-13-01"}, id="date"),
        pytest.param("/v3/snapshot/options/AAA", {"limit": "ten"}, id="limit"),
        pytest.param("/v3/snapshot/options/AAA", {"cursor": "not-a-cursor"}, id="cursor"),
        pytest.param("/v3/reference/options/contracts", {"expired": "maybe"}, id="expired"),
    ],
)
async def test_bad_parameters(
    base_url: str, http: aiohttp.ClientSession, path: str, params: dict[str, str]
) -> None:
    """Malformed parameters answer 400 with an ``error`` text."""
    status, body, _ = await get(http, f"{base_url}{path}", **params)
    assert status == 400 and body["status"] == "ERROR" and body["error"]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        pytest.param(
            "/v3/reference/options/contracts", {"underlying_ticker": "ZZZ"}, id="contracts-unknown"
        ),
        pytest.param(
            "/v3/reference/options/contracts",
            {"underlying_ticker": "AAA", "expired": "true"},
            id="expired",
        ),
        pytest.param("/v3/snapshot/options/ZZZ", {}, id="chain-unknown"),
    ],
)
async def test_empty_listings(
    base_url: str, http: aiohttp.ClientSession, path: str, params: dict[str, str]
) -> None:
    """Unknown underlyings and expired=true give 200 with empty results and no next_url."""
    status, body, _ = await get(http, f"{base_url}{path}", **params)
    assert status == 200 and body["results"] == [] and "next_url" not in body


async def test_single_objects(base_url: str, http: aiohttp.ClientSession) -> None:
    """One contract and one snapshot come back as objects, and match the listings."""
    _, page, _ = await get(
        http, f"{base_url}/v3/reference/options/contracts", underlying_ticker="BBB"
    )
    contract = page["results"][3]
    _, one, _ = await get(http, f"{base_url}/v3/reference/options/contracts/{contract['ticker']}")
    assert one["results"] == contract

    async def both() -> tuple[Any, Any]:
        chain = (await get(http, f"{base_url}/v3/snapshot/options/BBB", limit=5))[1]
        row = chain["results"][3]
        url = f"{base_url}/v3/snapshot/options/BBB/{row['details']['ticker']}"
        return row, (await get(http, url))[1]

    row, snapshot = await in_one_minute(both)
    assert snapshot["results"] == row


@pytest.mark.parametrize(
    "path",
    [
        "/v3/reference/options/contracts/O:AAA990101C00001000",
        "/v3/reference/options/contracts/nonsense",
        "/v3/snapshot/options/AAA/O:AAA990101C00001000",
        "/v3/snapshot/options/ZZZ/O:ZZZ990101C00001000",
        "/v2/snapshot/locale/us/markets/stocks/tickers/ZZZ",
        "/v9/nothing/here",
    ],
    ids=["contract", "contract-garbage", "snapshot", "snapshot-underlying", "stock", "path"],
)
async def test_not_found(base_url: str, http: aiohttp.ClientSession, path: str) -> None:
    """Unknown contracts, tickers and paths answer 404 with a JSON body."""
    status, body, response = await get(http, f"{base_url}{path}")
    assert status == 404 and response.content_type == "application/json"
    assert body["status"] == "NOT_FOUND" and body["request_id"]


async def test_snapshot_checks_contract_belongs_to_underlying(
    base_url: str, http: aiohttp.ClientSession
) -> None:
    """A contract asked for under another underlying's path is not found."""
    _, page, _ = await get(http, f"{base_url}/v3/snapshot/options/AAA", limit=1)
    ticker = page["results"][0]["details"]["ticker"]
    status, _, _ = await get(http, f"{base_url}/v3/snapshot/options/BBB/{ticker}")
    assert status == 404


async def test_market_status(base_url: str, http: aiohttp.ClientSession) -> None:
    """marketstatus/now and /upcoming answer in the documented shapes."""
    _, now, _ = await get(http, f"{base_url}/v1/marketstatus/now")
    assert now["market"] in ("open", "closed", "extended-hours")
    assert isinstance(now["earlyHours"], bool) and isinstance(now["afterHours"], bool)
    assert set(now["exchanges"]) >= {"nyse", "nasdaq"}
    dt.datetime.fromisoformat(now["serverTime"])
    _, upcoming, _ = await get(http, f"{base_url}/v1/marketstatus/upcoming")
    assert isinstance(upcoming, list) and upcoming
    for day in upcoming:
        assert day["status"] in ("closed", "early-close") and day["exchange"] and day["name"]
        dt.date.fromisoformat(day["date"])
        assert ("open" in day) == ("close" in day) == (day["status"] == "early-close")


# --- auth and fault knobs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "params", "status"),
    [
        pytest.param({}, {}, 401, id="missing"),
        pytest.param({"Authorization": "Bearer wrong"}, {}, 401, id="wrong-bearer"),
        pytest.param({}, {"apiKey": "wrong"}, 401, id="wrong-query"),
        pytest.param(AUTH, {}, 200, id="bearer"),
        pytest.param({}, {"apiKey": KEY}, 200, id="query"),
    ],
)
async def test_auth(
    base_url: str, headers: dict[str, str], params: dict[str, str], status: int
) -> None:
    """A missing or wrong key answers 401 ``Unknown API Key``; bearer or apiKey both work."""
    async with aiohttp.ClientSession(headers=headers) as http:
        got, body, _ = await get(http, f"{base_url}/v3/snapshot/options/AAA", **params)
    assert got == status
    if status == 401:
        assert body == {
            "status": "ERROR",
            "request_id": body["request_id"],
            "error": "Unknown API Key",
        }


async def test_no_key_configured_accepts_anything() -> None:
    """api_key=None turns the auth check off."""
    async with simulator(api_key=None) as url, aiohttp.ClientSession() as http:
        assert (await get(http, f"{url}/v3/snapshot/options/AAA"))[0] == 200


async def test_error_rate() -> None:
    """error_rate answers that fraction with 500/502/503, counted, in the same order per seed."""

    async def statuses() -> tuple[list[int], Any]:
        async with (
            simulator(error_rate=0.3, seed=3) as url,
            aiohttp.ClientSession(headers=AUTH) as http,
        ):
            got = [(await get(http, f"{url}/v2/aggs/ticker/AAA/prev"))[0] for _ in range(200)]
            stats = (await get(http, f"{url}/_sim/stats"))[1]
        return got, stats

    first, stats = await statuses()
    failures = [s for s in first if s != 200]
    assert set(failures) == {500, 502, 503}
    assert 30 <= len(failures) <= 90
    assert stats["errors_injected"] == len(failures) and stats["requests"] == 200
    assert (await statuses())[0] == first


async def test_rate_limit() -> None:
    """Beyond requests_per_second, 429 arrives with an integer Retry-After of at least 1 s."""
    async with simulator(requests_per_second=2) as url, aiohttp.ClientSession(headers=AUTH) as http:
        results = [await get(http, f"{url}/v2/aggs/ticker/AAA/prev") for _ in range(6)]
        stats = (await get(http, f"{url}/_sim/stats"))[1]
    statuses = [status for status, _, _ in results]
    assert statuses[:2] == [200, 200] and 429 in statuses
    for status, body, response in results:
        if status == 429:
            assert int(response.headers["Retry-After"]) >= 1 and body["status"] == "ERROR"
    assert stats["rate_limited"] == statuses.count(429)


@pytest.mark.parametrize(
    "path",
    ["/v3/reference/options/contracts", "/v3/snapshot/options/AAA"],
    ids=["contracts", "chain"],
)
async def test_truncated_pages(path: str) -> None:
    """truncate_rate cuts list bodies short: invalid JSON with a matching Content-Length."""
    async with simulator(truncate_rate=1.0) as url, aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(f"{url}{path}", params={"limit": 50}) as response:
            raw = await response.read()
            assert response.status == 200
            assert int(response.headers["Content-Length"]) == len(raw) > 0
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(raw)
        status, body, _ = await get(http, f"{url}/v2/aggs/ticker/AAA/prev")
        assert status == 200 and body["results"]  # single objects are never cut


@pytest.mark.parametrize(
    ("path", "params"),
    [
        pytest.param(
            "/v3/reference/options/contracts",
            {"underlying_ticker": "AAA", "limit": 40},
            id="contracts",
        ),
        pytest.param("/v3/snapshot/options/AAA", {"limit": 40}, id="chain"),
    ],
)
async def test_broken_pages(path: str, params: dict[str, Any]) -> None:
    """A broken page answers 500 every time; earlier pages and other underlyings are fine."""
    async with (
        simulator(broken_pages={"AAA": 2}) as url,
        aiohttp.ClientSession(headers=AUTH) as http,
    ):
        status, first, _ = await get(http, f"{url}{path}", **params)
        assert status == 200
        for _ in range(3):
            assert (await get(http, first["next_url"]))[0] == 500
        other = await walk(
            http, f"{url}{path.replace('AAA', 'BBB')}", **{**params, "underlying_ticker": "BBB"}
        )
        assert sum(len(page["results"]) for page in other) == 120


async def test_latency() -> None:
    """latency delays every response by at least that many seconds."""
    async with simulator(latency=0.2) as url, aiohttp.ClientSession(headers=AUTH) as http:
        started = time.monotonic()
        await asyncio.gather(*(get(http, f"{url}/v2/aggs/ticker/AAA/prev") for _ in range(5)))
        elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 5  # concurrent requests sleep side by side


async def test_latency_spikes() -> None:
    """latency_spike_rate delays that fraction of requests, counted, as many per seed."""

    async def spikes() -> int:
        async with (
            simulator(latency_spike_rate=0.4, latency_spike=0.01, seed=3) as url,
            aiohttp.ClientSession(headers=AUTH) as http,
        ):
            for _ in range(50):
                assert (await get(http, f"{url}/v2/aggs/ticker/AAA/prev"))[0] == 200
            stats = (await get(http, f"{url}/_sim/stats"))[1]
        return int(stats["latency_spikes"])

    first = await spikes()
    assert 8 <= first <= 35
    assert await spikes() == first


@pytest.mark.parametrize("requests_per_second", [None, 1000.0], ids=["alone", "with-bucket"])
async def test_throttle_bursts(requests_per_second: float | None) -> None:
    """After every N-th request the next throttle_burst_length answer 429 with Retry-After: 1."""
    async with (
        simulator(
            throttle_bursts=3, throttle_burst_length=2, requests_per_second=requests_per_second
        ) as url,
        aiohttp.ClientSession(headers=AUTH) as http,
    ):
        results = [await get(http, f"{url}/v2/aggs/ticker/AAA/prev") for _ in range(12)]
        stats = (await get(http, f"{url}/_sim/stats"))[1]
    statuses = [status for status, _, _ in results]
    assert statuses == [200, 200, 200, 429, 429, 200, 200, 200, 429, 429, 200, 200]
    for status, body, response in results:
        if status == 429:
            assert response.headers["Retry-After"] == "1" and body["status"] == "ERROR"
    assert stats["rate_limited"] == 4


@pytest.mark.parametrize(
    ("path", "params", "knobs"),
    [
        pytest.param(
            "/v3/reference/options/contracts",
            {"underlying_ticker": "AAA", "limit": 40},
            {},
            id="contracts",
        ),
        pytest.param("/v3/snapshot/options/AAA", {"limit": 40}, {}, id="chain"),
        pytest.param(
            "/v3/snapshot/options/AAA", {"limit": 40}, {"cache_chain_pages": True}, id="cached"
        ),
    ],
)
async def test_looping_pages(path: str, params: dict[str, Any], knobs: dict[str, Any]) -> None:
    """A looping page's next_url is the URL that led to it, every time; other underlyings end."""
    async with (
        simulator(looping_pages={"AAA": 2}, **knobs) as url,
        aiohttp.ClientSession(headers=AUTH) as http,
    ):
        _, first, _ = await get(http, f"{url}{path}", **params)
        loop = first["next_url"]
        _, second, _ = await get(http, loop)
        _, third, _ = await get(http, second["next_url"])
        assert second["next_url"] == third["next_url"] == loop
        assert row_tickers([third]) == row_tickers([second]) != row_tickers([first])
        other = await walk(
            http, f"{url}{path.replace('AAA', 'BBB')}", **{**params, "underlying_ticker": "BBB"}
        )
        stats = (await get(http, f"{url}/_sim/stats"))[1]
    assert len(row_tickers(other)) == 120
    assert stats["looped_pages"] == 2


async def test_malformed_contracts() -> None:
    """malformed_contracts_rate serves the same tickers with a datetime expiration, per seed."""

    async def malformed(seed: int) -> tuple[list[str], set[str]]:
        async with (
            simulator(malformed_contracts_rate=0.2, seed=seed) as url,
            aiohttp.ClientSession(headers=AUTH) as http,
        ):
            path = f"{url}/v3/reference/options/contracts"
            pages = await walk(http, path, underlying_ticker="AAA", limit=50)
            bad = {}
            for contract in (c for page in pages for c in page["results"]):
                root, yymmdd, _, _ = TICKER_RE.match(contract["ticker"]).groups()  # type: ignore[union-attr]
                expiry = contract["expiration_date"]
                if len(expiry) > 10:
                    day = dt.datetime.strptime(expiry, "%Y-%m-%dT%H:%M:%SZ").date()
                    bad[contract["ticker"]] = contract
                else:
                    day = dt.date.fromisoformat(expiry)
                assert root == "AAA" and day.strftime("%y%m%d") == yymmdd
            ticker = min(bad)
            _, one, _ = await get(http, f"{path}/{ticker}")
            assert one["results"] == bad[ticker]
        return row_tickers(pages), set(bad)

    tickers, first = await malformed(5)
    assert 10 <= len(first) <= 40
    assert await malformed(5) == (tickers, first)
    assert (await malformed(6))[1] != first
    config = SimulatorConfig(malformed_contracts_rate=0.2, seed=5)
    assert {t for t in tickers if config.malformed_contract(t)} == first


@pytest.mark.parametrize("cached", [False, True], ids=["live", "cached"])
async def test_malformed_snapshots(cached: bool) -> None:
    """malformed_snapshots_rate serves the same tickers with a string open_interest, per seed."""

    async def malformed(seed: int) -> tuple[list[str], set[str]]:
        async with (
            simulator(malformed_snapshots_rate=0.2, seed=seed, cache_chain_pages=cached) as url,
            aiohttp.ClientSession(headers=AUTH) as http,
        ):
            pages = await walk(http, f"{url}/v3/snapshot/options/AAA", limit=50)
            bad = set()
            for row in (r for page in pages for r in page["results"]):
                assert TICKER_RE.match(row["details"]["ticker"])
                interest = row["open_interest"]
                if isinstance(interest, str):
                    assert re.fullmatch(r"\d+x", interest)
                    bad.add(row["details"]["ticker"])
                else:
                    assert interest >= 0
            ticker = min(bad)
            _, one, _ = await get(http, f"{url}/v3/snapshot/options/AAA/{ticker}")
            assert isinstance(one["results"]["open_interest"], str)
        return row_tickers(pages), bad

    tickers, first = await malformed(5)
    assert 10 <= len(first) <= 40
    assert await malformed(5) == (tickers, first)
    assert (await malformed(6))[1] != first
    config = SimulatorConfig(malformed_snapshots_rate=0.2, seed=5)
    assert {t for t in tickers if config.malformed_snapshot(t)} == first


@pytest.mark.parametrize("cached", [False, True], ids=["live", "cached"])
async def test_hidden_contracts(cached: bool) -> None:
    """The chain snapshot omits the first k listed contracts, which the listing still lists."""
    async with (
        simulator(hidden_contracts={"AAA": 7}, cache_chain_pages=cached) as url,
        aiohttp.ClientSession(headers=AUTH) as http,
    ):
        listed = row_tickers(
            await walk(
                http, f"{url}/v3/reference/options/contracts", underlying_ticker="AAA", limit=1000
            )
        )
        chain = row_tickers(await walk(http, f"{url}/v3/snapshot/options/AAA", limit=50))
        puts = row_tickers(
            await walk(http, f"{url}/v3/snapshot/options/AAA", limit=50, contract_type="put")
        )
        hidden = (await get(http, f"{url}/v3/snapshot/options/AAA/{listed[0]}"))[0]
        shown = (await get(http, f"{url}/v3/snapshot/options/AAA/{listed[7]}"))[0]
        other = row_tickers(await walk(http, f"{url}/v3/snapshot/options/BBB", limit=250))
    assert len(listed) == 120 and chain == listed[7:]
    assert puts == [t for t in listed[7:] if TICKER_RE.match(t).group(3) == "P"]  # type: ignore[union-attr]
    assert (hidden, shown) == (404, 200)
    assert len(other) == 120


async def test_every_fault_at_once() -> None:
    """All knobs together: each fault happens, and one seed answers one client the same way."""
    knobs = {
        "latency_spike_rate": 0.2,
        "latency_spike": 0.001,
        "error_rate": 0.1,
        "throttle_bursts": 5,
        "throttle_burst_length": 2,
        "truncate_rate": 0.1,
        "broken_pages": {"BBB": 2},
        "looping_pages": {"AAA": 2},
        "malformed_contracts_rate": 0.2,
        "malformed_snapshots_rate": 0.2,
        "hidden_contracts": {"AAA": 5},
        "seed": 11,
    }

    async def crawl() -> tuple[list[int], list[str], list[str], dict[str, Any]]:
        log: list[int] = []
        async with simulator(**knobs) as url, aiohttp.ClientSession(headers=AUTH) as http:

            async def fetch(target: str, **params: Any) -> dict[str, Any] | None:
                for _ in range(30):
                    async with http.get(target, params=params or None) as response:
                        log.append(response.status)
                        raw = await response.read()
                    if response.status == 200:
                        try:
                            return dict(orjson.loads(raw))
                        except orjson.JSONDecodeError:
                            continue
                    if response.status == 500 and b"broken page" in raw:
                        return None
                raise AssertionError("no answer in 30 tries")

            async def pages(target: str, **params: Any) -> list[dict[str, Any]]:
                got, seen = [], set()
                body = await fetch(target, **params)
                while body is not None:
                    got.append(body)
                    if "next_url" not in body or body["next_url"] in seen:
                        break
                    seen.add(body["next_url"])
                    body = await fetch(body["next_url"])
                return got

            listed = row_tickers(
                await pages(
                    f"{url}/v3/reference/options/contracts", underlying_ticker="AAA", limit=50
                )
            )
            chain = row_tickers(await pages(f"{url}/v3/snapshot/options/AAA", limit=50))
            await pages(f"{url}/v3/snapshot/options/BBB", limit=50)
            full = await pages(f"{url}/v3/snapshot/options/CCC", limit=10)
            assert len(row_tickers(full)) == 120
            stats = (await get(http, f"{url}/_sim/stats"))[1]
        return log, listed, chain, stats

    log, listed, chain, stats = await crawl()
    assert len(listed) == len(chain) == 100 and chain[:95] == listed[5:]
    for key in ("errors_injected", "rate_limited", "truncated", "latency_spikes"):
        assert stats[key] > 0, key
    assert stats["broken_page_errors"] == 1 and stats["looped_pages"] >= 2
    again = await crawl()
    assert (again[0], again[1], again[2]) == (log, listed, chain)


async def test_stats_and_reset() -> None:
    """/_sim/stats counts requests per endpoint without auth; POST /_sim/reset zeroes them."""
    async with simulator() as url, aiohttp.ClientSession() as http:
        await get(http, f"{url}/v3/snapshot/options/AAA")  # 401, still counted
        await get(http, f"{url}/v3/snapshot/options/AAA", apiKey=KEY)
        stats = (await get(http, f"{url}/_sim/stats"))[1]
        assert stats["requests"] == 2
        assert stats["by_endpoint"] == {"/v3/snapshot/options/{underlying}": 2}
        async with http.post(f"{url}/_sim/reset") as response:
            assert response.status == 200
        stats = (await get(http, f"{url}/_sim/stats"))[1]
    assert stats["requests"] == 0 and stats["by_endpoint"] == {}


# --- the fixture app and the child process ------------------------------------------------------


def recorded_bytes(relative: str) -> bytes:
    """One recorded file's bytes (the fixtures must be there)."""
    return (require_fixtures() / relative).read_bytes()


@pytest.mark.parametrize(
    ("url", "recorded"),
    [
        pytest.param(
            "/v3/reference/options/contracts?underlying_ticker=A&limit=10",
            "v3/reference/options/contracts.json",
            id="contracts-page-1",
        ),
        pytest.param(
            "/v3/reference/options/contracts?cursor=YXA9JTdCJTIySUQlMjIlM0ElMjIy&apiKey=x",
            "v3/reference/options/contracts&cursor=YXA9JTdCJTIySUQlMjIlM0ElMjIy.json",
            id="contracts-page-2",
        ),
        pytest.param(
            "/v3/snapshot/options/AAPL/O:AAPL230616C00150000",
            "v3/snapshot/options/AAPL/O;AAPL230616C00150000.json",
            id="option-snapshot",
        ),
        pytest.param(
            "/v3/snapshot/options/AAPL/O%3AAAPL230616C00150000",
            "v3/snapshot/options/AAPL/O;AAPL230616C00150000.json",
            id="option-snapshot-encoded",
        ),
        pytest.param(
            "/v2/snapshot/locale/us/markets/stocks/tickers",
            "v2/snapshot/locale/us/markets/stocks/tickers/index.json",
            id="index-file",
        ),
        pytest.param(
            "/v3/snapshot/indices?ticker.any_of=SPX%2CAPx%2CAPy",
            "v3/snapshot/indices&ticker.any_of=SPX%2CAPx%2CAPy.json",
            id="query-in-name",
        ),
        pytest.param(
            "/v3/snapshot/indices?ticker.any_of=SPX,APx,APy&apiKey=x",
            "v3/snapshot/indices&ticker.any_of=SPX%2CAPx%2CAPy.json",
            id="query-in-name-decoded",
        ),
    ],
)
async def test_fixture_app_serves_recordings(url: str, recorded: str) -> None:
    """The fixture app answers each URL with its recorded file, byte for byte."""
    expected = recorded_bytes(recorded)
    async with await start_server(create_fixture_app(require_fixtures())) as server:
        async with aiohttp.ClientSession() as http:
            async with http.get(yarl.URL(f"{server.base_url}{url}", encoded=True)) as response:
                assert response.status == 200 and response.content_type == "application/json"
                assert await response.read() == expected


async def test_fixture_app_unknown_url() -> None:
    """A URL without a recording answers 404 JSON, including an unrecorded cursor."""
    recorded_bytes("v3/reference/options/contracts.json")
    async with await start_server(create_fixture_app(require_fixtures())) as server:
        async with aiohttp.ClientSession() as http:
            for url in ("/v3/nothing", "/v3/reference/options/contracts?cursor=other"):
                status, body, _ = await get(http, f"{server.base_url}{url}")
                assert status == 404 and body["status"] == "NOT_FOUND"


def test_simulator_process() -> None:
    """SimulatorProcess starts a child on a free port, answers, and stops on exit."""
    config = SimulatorConfig(underlyings=("AAA",), contracts_per_underlying=20, as_of=AS_OF)
    with SimulatorProcess(config) as process:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", process.base_url)
        url = f"{process.base_url}/v3/snapshot/options/AAA?limit=250&apiKey={KEY}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = orjson.loads(response.read())
    assert len(body["results"]) == 20
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


async def test_cached_chain_pages_serve_the_same_rows(http: aiohttp.ClientSession) -> None:
    """cache_chain_pages serves the rows and pagination live rendering serves, frozen."""

    async def both() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        async with (
            simulator(contracts_per_underlying=600) as live_url,
            simulator(contracts_per_underlying=600, cache_chain_pages=True) as cached_url,
        ):
            path = "/v3/snapshot/options/AAA"
            live = await walk(http, live_url + path, limit=250)
            first = await walk(http, cached_url + path, limit=250)
            again = await walk(http, cached_url + path, limit=250)
            return live, first, again

    live, first, again = await in_one_minute(both)
    assert [len(p["results"]) for p in first] == [250, 250, 100]
    assert [p["results"] for p in first] == [p["results"] for p in live]
    assert [p["results"] for p in again] == [p["results"] for p in first]
    assert all("next_url" in p for p in first[:-1]) and "next_url" not in first[-1]


# --- times never in the future -----------------------------------------------------------------


def served_times(value: Any, path: str = "$") -> list[tuple[str, int]]:
    """Every time a body serves, with its path: nanosecond ``*timestamp``, ``last_updated``,
    ``updated`` and single-stock ``t`` values (``min.t`` is in milliseconds: scaled)."""
    found: list[tuple[str, int]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}"
            if isinstance(item, int) and (
                key.endswith("timestamp") or key in ("last_updated", "updated", "t")
            ):
                scale = 1_000_000 if path.endswith(".min") else 1
                found.append((where, item * scale))
            else:
                found.extend(served_times(item, where))
    elif isinstance(value, list):
        for item in value:
            found.extend(served_times(item, f"{path}[]"))
    return found


@pytest.mark.parametrize("index", [False, True], ids=["stock", "index"])
def test_rendered_times_are_never_after_the_minute_starts(index: bool) -> None:
    """Quote, trade, bar and underlying times of a minute's rows lie at or before the minute's
    start: the app renders the current minute, so nothing it serves is later than its answer."""
    name = "I:SPX" if index else "AAA"
    config = SimulatorConfig(underlyings=(name,), contracts_per_underlying=400, as_of=AS_OF)
    chain = Universe(config, AS_OF).chain(name)
    start = int(dt.datetime.combine(AS_OF, dt.time(14, 30), dt.UTC).timestamp()) // 60
    for minute in range(start, start + 60):
        rows = snapshot_rows(chain, range(400), minute, deep_itm_without_greeks=True)
        times = served_times(rows)
        kinds = {path.split(".", 1)[1] for path, _ in times}
        assert {"last_quote.last_updated", "underlying_asset.last_updated"} <= kinds
        assert "last_trade.sip_timestamp" in kinds
        late = [(path, t) for path, t in times if t > minute * 60_000_000_000]
        assert late == [], late[:3]
        if not index:
            stock = served_times(stock_snapshot(chain, minute))
            assert len(stock) >= 3
            assert all(t <= minute * 60_000_000_000 for _, t in stock), stock


async def test_served_times_are_never_after_the_answer(
    base_url: str, http: aiohttp.ClientSession
) -> None:
    """Over HTTP, every time in a chain page, a contract snapshot and a stock snapshot is no
    later than the moment the answer arrived (the issue: quotes up to 43 s in the future)."""
    for path, params in (
        ("/v3/snapshot/options/AAA", {"limit": 250}),
        ("/v3/snapshot/options/I:SPX", {"limit": 250}),
        ("/v2/snapshot/locale/us/markets/stocks/tickers/AAA", {}),
    ):
        status, body, _ = await get(http, base_url + path, **params)
        answered = time.time_ns()
        assert status == 200
        times = served_times(body)
        assert times
        assert [(p, t) for p, t in times if t > answered] == []
    _, page, _ = await get(http, f"{base_url}/v3/snapshot/options/AAA", limit=1)
    ticker = page["results"][0]["details"]["ticker"]
    _, body, _ = await get(http, f"{base_url}/v3/snapshot/options/AAA/{ticker}")
    assert all(t <= time.time_ns() for _, t in served_times(body))


# --- what the simulator says when it starts ---------------------------------------------------


@pytest.mark.parametrize(
    ("names", "key", "expected"),
    [
        (
            ("AAPL", "SPY", "I:SPX"),
            "sim-key",
            "simulator listening on http://127.0.0.1:8080; key: sim-key; 3 underlyings: "
            "AAPL, SPY, I:SPX (2,000 contracts each)\nfor the jobs: "
            "POLYGON_BASE_URL=http://127.0.0.1:8080 POLYGON_API_KEY=sim-key "
            "UNDERLYINGS=AAPL,SPY,I:SPX",
        ),
        (
            make_universe_names(2000),
            None,
            "simulator listening on http://127.0.0.1:8080; key: any (none checked); 2,000 "
            "underlyings: AAAA, AAAB, AAAC, AAAD, AAAE, ... (2,000 contracts each)\nfor the "
            "jobs: POLYGON_BASE_URL=http://127.0.0.1:8080 UNDERLYINGS=AAAA,AAAB,AAAC,AAAD,AAAE",
        ),
    ],
    ids=["named", "large-no-key"],
)
def test_describe_names_key_and_tickers(
    names: tuple[str, ...], key: str | None, expected: str
) -> None:
    """The start-up lines say where it listens, the key to send, how many underlyings and the
    first few, and the settings a job needs."""
    config = SimulatorConfig(underlyings=names, api_key=key)
    assert describe(config, "http://127.0.0.1:8080") == expected


def read_banner(argv: list[str]) -> tuple[str, str]:
    """Start a simulator command, wait for its two stderr lines, stop it; return them and the
    command's stdout so far."""
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        lines = [process.stderr.readline(), process.stderr.readline()]
    finally:
        process.terminate()
        stdout, _ = process.communicate(timeout=30)
    return "".join(lines), stdout


@pytest.mark.parametrize(
    "argv",
    [
        [str(BIN / "ingest_admin"), "simulate", "--port", "0", "--tickers", "aapl,spy"],
        [
            sys.executable,
            "-m",
            "options.simulator",
            "--port",
            "0",
            "--config-json",
            '{"underlyings": ["AAPL", "SPY"]}',
        ],
    ],
    ids=["ingest_admin", "python-m"],
)
def test_started_by_hand_it_says_key_and_tickers(argv: list[str]) -> None:
    """`ingest_admin simulate` and `python -m options.simulator` print the key and the tickers
    on stderr; the child run by SimulatorProcess (--quiet) does not."""
    banner, _ = read_banner(argv)
    assert re.match(
        r"simulator listening on http://127\.0\.0\.1:\d+; key: sim-key; 2 underlyings: "
        r"AAPL, SPY \(2,000 contracts each\)\n",
        banner,
    ), banner
    assert "POLYGON_API_KEY=sim-key UNDERLYINGS=AAPL,SPY\n" in banner


def test_simulate_refuses_a_count_with_tickers() -> None:
    """--underlyings N and --tickers both say what is served: one line, exit 2."""
    result = subprocess.run(
        [str(BIN / "ingest_admin"), "simulate", "--underlyings", "3", "--tickers", "AAPL"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: --underlyings N and --tickers")
    assert result.stderr.count("\n") == 1


async def test_past_listings_and_daily_bars_agree_with_the_snapshots(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A past day's listing is the chain laid out from that day; a contract's daily bar of a
    session is the day bar its snapshot gives at that session's close; no trade, no bar."""
    past = AS_OF - dt.timedelta(days=9)  # a Monday
    async with simulator(underlyings=("AAA",), as_of=past) as then_url:
        then = {
            row["details"]["ticker"]: row
            for page in await walk(http, f"{then_url}/v3/snapshot/options/AAA", limit=250)
            for row in page["results"]
        }
        close = dt.datetime.combine(past, dt.time(16), tzinfo=ZoneInfo("America/New_York"))
        minute = int(close.timestamp() // 60)
        monkeypatch.setattr(simulator_app, "_minute", lambda: minute)
        at_close = {
            row["details"]["ticker"]: row
            for page in await walk(http, f"{then_url}/v3/snapshot/options/AAA", limit=250)
            for row in page["results"]
        }
        monkeypatch.undo()
    async with simulator(underlyings=("AAA",)) as url:
        listed = [
            c["ticker"]
            for expired in ("true", "false")
            for page in await walk(
                http,
                f"{url}/v3/reference/options/contracts",
                underlying_ticker="AAA",
                as_of=past.isoformat(),
                expired=expired,
                limit=1000,
            )
            for c in page["results"]
        ]
        assert sorted(listed) == sorted(then)
        traded = [t for t, row in at_close.items() if row.get("day")]
        untraded = [t for t, row in at_close.items() if not row.get("day")]
        assert traded and untraded
        for ticker in traded[:5] + untraded[:2]:
            status, body, _ = await get(
                http, f"{url}/v2/aggs/ticker/{ticker}/range/1/day/{past}/{past}"
            )
            assert status == 200, body
            day = at_close[ticker].get("day")
            if not day:
                assert body["resultsCount"] == 0 and "results" not in body
                continue
            (bar,) = body["results"]
            assert (bar["o"], bar["h"], bar["l"], bar["c"], bar["v"], bar["vw"]) == (
                day["open"], day["high"], day["low"], day["close"], day["volume"], day["vwap"]
            )  # fmt: skip
            midnight = dt.datetime.combine(past, dt.time(0), tzinfo=ZoneInfo("America/New_York"))
            assert bar["t"] == int(midnight.timestamp() * 1000)
        status, body, _ = await get(http, f"{url}/v2/aggs/ticker/{traded[0]}/range/1/week/a/b")
        assert status == 400
        status, body, _ = await get(
            http, f"{url}/v3/reference/options/contracts", underlying_ticker="AAA", as_of="x"
        )
        assert (status, body["status"]) == (400, "ERROR")
