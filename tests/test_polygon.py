"""Tests of the asyncio Polygon client against small local aiohttp apps.

Each test serves exactly the responses it needs from 127.0.0.1, so retries, pagination guards,
timeouts and the key's confinement are checked on real HTTP without the simulator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from options.api import transport
from options.api.polygon import (
    CHAIN_PAGE_LIMIT,
    CONTRACTS_PAGE_LIMIT,
    Page,
    PolygonClient,
    validate_underlying,
)
from options.errors import (
    ApiError,
    AuthError,
    ConfigError,
    KeyRejectedError,
    PageShapeError,
    PaginationError,
    PayloadError,
    PermanentApiError,
    RateLimitedError,
    TransientApiError,
)
from tests.conftest import require_fixtures

API_KEY = "pk_SECRET_7f3a9c2e51d04b"
CONTRACTS = "/v3/reference/options/contracts"
FOREIGN = "https://api.massive.com"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """One request as the fake API received it."""

    path: str
    query: dict[str, str]
    query_string: str
    authorization: str | None


@dataclass
class FakeApi:
    """A running local app: its base URL and the requests it has received."""

    base_url: str
    seen: list[Seen] = field(default_factory=list)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[FakeApi]]]:
    """Start local apps that route every GET to one handler and record each request."""
    servers: list[TestServer] = []

    async def start(handler: Handler) -> FakeApi:
        api = FakeApi(base_url="")

        async def record(request: web.Request) -> web.StreamResponse:
            api.seen.append(
                Seen(
                    path=request.path,
                    query=dict(request.query),
                    query_string=request.query_string,
                    authorization=request.headers.get("Authorization"),
                )
            )
            return await handler(request)

        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", record)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        api.base_url = str(server.make_url("")).rstrip("/")
        return api

    yield start
    for server in servers:
        await server.close()


def make_client(api: FakeApi, **overrides: Any) -> PolygonClient:
    """A client on the fake API with backoff small enough for a fast test run."""
    options: dict[str, Any] = {
        "base_url": api.base_url + "/",
        "api_key": API_KEY,
        "timeout": 5.0,
        "max_retries": 3,
        "backoff_initial": 0.001,
        "backoff_max": 0.01,
        "rate_limit": None,
    }
    options.update(overrides)
    return PolygonClient(**options)


def page_body(
    rows: list[dict[str, Any]], next_url: str | None = None, request_id: str = "req"
) -> dict[str, Any]:
    """A list page shaped as the API sends it."""
    body: dict[str, Any] = {"status": "OK", "request_id": request_id, "results": rows}
    if next_url is not None:
        body["next_url"] = next_url
    return body


def one_page(rows: int = 1) -> Handler:
    """A handler answering every request with one last page."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(page_body([{"i": i} for i in range(rows)]))

    return handler


def failing_then_ok(failures: int, failure: Callable[[], web.StreamResponse]) -> Handler:
    """A handler that answers ``failure()`` ``failures`` times, then one last page."""
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls <= failures:
            return failure()
        return web.json_response(page_body([{"i": 0}]))

    return handler


async def collect(pages: AsyncIterator[Page]) -> list[Page]:
    """Drain a page iterator."""
    return [page async for page in pages]


# -- pagination -------------------------------------------------------------------------------


async def test_paginate_follows_next_url_by_path_and_query_only(serve):
    """Three pages are walked via absolute next_urls on another host, sending only the cursor."""

    async def handler(request: web.Request) -> web.StreamResponse:
        cursor = request.query.get("cursor")
        if cursor is None:
            return web.json_response(page_body([{"i": 1}], f"{FOREIGN}{CONTRACTS}?cursor=c2", "r1"))
        if cursor == "c2":
            return web.json_response(page_body([{"i": 2}], f"{FOREIGN}{CONTRACTS}?cursor=c3", "r2"))
        return web.json_response(page_body([{"i": 3}], None, "r3"))

    api = await serve(handler)
    async with make_client(api) as client:
        pages = await collect(client.list_contracts("AAPL"))

    assert [(p.number, p.request_id, p.has_next) for p in pages] == [
        (1, "r1", True),
        (2, "r2", True),
        (3, "r3", False),
    ]
    assert [row["i"] for p in pages for row in p.results] == [1, 2, 3]
    assert [s.path for s in api.seen] == [CONTRACTS] * 3
    assert api.seen[0].query == {
        "expired": "false",
        "limit": str(CONTRACTS_PAGE_LIMIT),
        "underlying_ticker": "AAPL",
    }
    assert [s.query for s in api.seen[1:]] == [{"cursor": "c2"}, {"cursor": "c3"}]


async def test_pages_stream_before_next_request(serve):
    """A page is yielded as soon as it is parsed, before the next page is requested."""

    async def handler(request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("cursor", "1"))
        return web.json_response(page_body([{"i": n}], f"{FOREIGN}{CONTRACTS}?cursor={n + 1}"))

    api = await serve(handler)
    async with make_client(api) as client:
        pages = client.list_contracts("AAPL")
        first = await anext(pages)
        assert first.number == 1
        assert len(api.seen) == 1
        await pages.aclose()


@pytest.mark.parametrize(
    "cursors",
    [
        pytest.param({"": "a", "a": "a"}, id="self-loop"),
        pytest.param({"": "a", "a": "b", "b": "a"}, id="two-page-cycle"),
    ],
)
async def test_repeated_cursor_raises_pagination_error(serve, cursors):
    """A next_url whose cursor was already followed raises PaginationError instead of looping."""

    async def handler(request: web.Request) -> web.StreamResponse:
        nxt = cursors[request.query.get("cursor", "")]
        return web.json_response(page_body([{"i": 0}], f"{FOREIGN}{CONTRACTS}?cursor={nxt}"))

    api = await serve(handler)
    async with make_client(api) as client:
        with pytest.raises(PaginationError, match="repeats") as info:
            await collect(client.list_contracts("AAPL"))

    assert len(api.seen) == len(cursors)
    assert info.value.endpoint == CONTRACTS


async def test_page_cap_raises_pagination_error(serve):
    """More than max_pages pages raises PaginationError without requesting the extra page."""

    async def handler(request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("cursor", "1"))
        return web.json_response(page_body([{"i": n}], f"{FOREIGN}{CONTRACTS}?cursor={n + 1}"))

    api = await serve(handler)
    received: list[int] = []
    async with make_client(api, max_pages=3) as client:
        with pytest.raises(PaginationError, match="more than 3 pages"):
            async for page in client.list_contracts("AAPL"):
                received.append(page.number)

    assert received == [1, 2, 3]
    assert len(api.seen) == 3


@pytest.mark.parametrize(
    "next_url",
    [
        pytest.param(f"{FOREIGN}/v3/reference/tickers?cursor=x", id="other-endpoint"),
        pytest.param(f"{FOREIGN}{CONTRACTS}/../../../v1/x?cursor=x", id="dot-dot"),
        pytest.param(f"{FOREIGN}{CONTRACTS}", id="no-cursor"),
    ],
)
async def test_untrustworthy_next_url_raises_pagination_error(serve, next_url):
    """A next_url that leaves the query's path or carries no cursor raises PaginationError."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(page_body([{"i": 0}], next_url))

    api = await serve(handler)
    async with make_client(api) as client:
        with pytest.raises(PaginationError):
            await collect(client.list_contracts("AAPL"))

    assert len(api.seen) == 1


@pytest.mark.parametrize(
    "bad_page",
    [
        pytest.param({"status": "OK", "request_id": "bad"}, id="no-results"),
        pytest.param({"status": "OK", "request_id": "bad", "results": None}, id="null-results"),
        pytest.param({"status": "OK", "request_id": "bad", "results": {}}, id="object-results"),
        pytest.param([], id="list-body"),
        pytest.param(
            {"status": "OK", "request_id": "bad", "results": [], "next_url": 7}, id="bad-next-url"
        ),
    ],
)
async def test_page_without_results_list_raises_page_shape_error(serve, bad_page):
    """A 200 page without a results list raises PageShapeError, not an empty or last page."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if "cursor" not in request.query:
            return web.json_response(page_body([{"i": 1}], f"{FOREIGN}{CONTRACTS}?cursor=2"))
        return web.json_response(bad_page)

    api = await serve(handler)
    received: list[Page] = []
    async with make_client(api) as client:
        with pytest.raises(PageShapeError) as info:
            async for page in client.list_contracts("AAPL"):
                received.append(page)

    assert [p.number for p in received] == [1]
    assert len(api.seen) == 2, "a shape error is permanent: not retried"
    assert info.value.status == 200
    assert info.value.endpoint == CONTRACTS


@pytest.fixture
def recorded_contract_pages() -> dict[str, bytes]:
    """The two recorded contracts pages, keyed by cursor ("" for the first page)."""
    folder = require_fixtures() / "v3" / "reference" / "options"
    return {
        "": (folder / "contracts.json").read_bytes(),
        "YXA9JTdCJTIySUQlMjIlM0ElMjIy": (
            folder / "contracts&cursor=YXA9JTdCJTIySUQlMjIlM0ElMjIy.json"
        ).read_bytes(),
    }


async def test_recorded_contract_pages(serve, recorded_contract_pages):
    """The recorded pages, whose next_url points at api.massive.com, yield 20 contracts in order."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = recorded_contract_pages[request.query.get("cursor", "")]
        return web.Response(body=body, content_type="application/json")

    api = await serve(handler)
    async with make_client(api) as client:
        pages = await collect(client.list_contracts("A"))

    assert [(p.number, len(p.results), p.has_next) for p in pages] == [
        (1, 10, True),
        (2, 10, False),
    ]
    strikes = [row["strike_price"] for p in pages for row in p.results]
    assert strikes == list(range(65, 165, 5))
    assert pages[0].request_id == "30ece14c74dcfc5ad4785b08fd21456d"
    assert api.seen[0].query["underlying_ticker"] == "A"
    assert api.seen[1].query == {"cursor": "YXA9JTdCJTIySUQlMjIlM0ElMjIy"}


# -- retries and error classification -------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "expect_error"),
    [pytest.param(1, False, id="then-valid"), pytest.param(99, True, id="always-truncated")],
)
async def test_invalid_json_is_retried(serve, failures, expect_error):
    """A truncated JSON body is retried, and raises PayloadError once retries run out."""
    api = await serve(
        failing_then_ok(
            failures,
            lambda: web.Response(body=b'{"results": [{"i"', content_type="application/json"),
        )
    )
    async with make_client(api, max_retries=2) as client:
        if expect_error:
            with pytest.raises(PayloadError) as info:
                await collect(client.chain_snapshot("SPY"))
            assert info.value.status == 200
            assert len(api.seen) == 3
        else:
            pages = await collect(client.chain_snapshot("SPY"))
            assert [len(p.results) for p in pages] == [1]
            assert len(api.seen) == 2


@pytest.mark.parametrize("status", [500, 502, 503, 504], ids=str)
async def test_5xx_retried_then_success(serve, status):
    """A 5xx answer is retried and the next good answer is returned."""
    api = await serve(failing_then_ok(2, lambda: web.Response(status=status)))
    async with make_client(api) as client:
        pages = await collect(client.chain_snapshot("SPY"))

    assert len(pages) == 1
    assert len(api.seen) == 3


async def test_5xx_exhausted_raises_transient_error(serve, caplog):
    """Exhausted retries raise TransientApiError with status, endpoint and request_id, and warn."""
    caplog.set_level(logging.DEBUG, logger="options.api.transport")
    body = {"status": "ERROR", "request_id": "r503", "error": "upstream unavailable"}
    api = await serve(failing_then_ok(99, lambda: web.json_response(body, status=503)))
    async with make_client(api, max_retries=2) as client:
        with pytest.raises(TransientApiError) as info:
            await collect(client.chain_snapshot("SPY"))

    error = info.value
    assert type(error) is TransientApiError
    assert (error.status, error.endpoint, error.request_id) == (
        503,
        "/v3/snapshot/options/SPY",
        "r503",
    )
    assert "upstream unavailable" in str(error)
    assert len(api.seen) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("/v3/snapshot/options/SPY" in r.getMessage() for r in warnings)
    assert [
        "attempt 1 of 3" in warnings[0].getMessage(),
        "attempt 2 of 3" in warnings[1].getMessage(),
    ] == [True, True]


async def test_requests_sent_counts_retries(serve):
    """requests_sent counts every HTTP request, retries included."""
    api = await serve(failing_then_ok(2, lambda: web.Response(status=500)))
    async with make_client(api) as client:
        await client.get_object("/v1/marketstatus/now")
        await client.get_object("/v1/marketstatus/now")

    assert client.requests_sent == len(api.seen) == 4


async def test_429_retry_after_is_honoured(serve):
    """A 429 with Retry-After waits at least that long before the retry, then succeeds."""
    api = await serve(
        failing_then_ok(1, lambda: web.Response(status=429, headers={"Retry-After": "1"}))
    )
    loop = asyncio.get_running_loop()
    async with make_client(api, backoff_max=5.0) as client:
        start = loop.time()
        pages = await collect(client.chain_snapshot("SPY"))
        elapsed = loop.time() - start

    assert len(pages) == 1
    assert len(api.seen) == 2
    assert elapsed >= 0.9


async def test_429_retry_after_is_capped_by_backoff_max(serve):
    """A huge Retry-After is capped at backoff_max, so the retry still happens promptly."""
    api = await serve(
        failing_then_ok(1, lambda: web.Response(status=429, headers={"Retry-After": "3600"}))
    )
    async with make_client(api, backoff_max=0.05) as client:
        pages = await asyncio.wait_for(collect(client.chain_snapshot("SPY")), timeout=10)

    assert len(pages) == 1


async def test_429_exhausted_raises_rate_limited_error(serve):
    """Retries exhausted on 429 raise RateLimitedError carrying the server's Retry-After."""
    api = await serve(
        failing_then_ok(99, lambda: web.Response(status=429, headers={"Retry-After": "0"}))
    )
    async with make_client(api, max_retries=1) as client:
        with pytest.raises(RateLimitedError) as info:
            await client.market_status_now()

    assert (info.value.status, info.value.retry_after) == (429, 0.0)
    assert len(api.seen) == 2


@pytest.mark.parametrize(
    ("status", "body", "error_type", "text"),
    [
        pytest.param(
            401,
            {"status": "ERROR", "request_id": "r", "error": "Unknown API Key"},
            KeyRejectedError,
            "the API refused the key (POLYGON_API_KEY): /v3/snapshot/options/SPY page 1 "
            "answered HTTP 401: ERROR: Unknown API Key",
            id="401-unknown-key",
        ),
        pytest.param(
            403,
            {
                "status": "NOT_AUTHORIZED",
                "request_id": "r",
                "message": "You are not entitled to this data. Please upgrade your plan.",
            },
            AuthError,
            "NOT_AUTHORIZED: You are not entitled",
            id="403-not-authorized",
        ),
        pytest.param(
            400,
            {"status": "ERROR", "request_id": "r", "error": "limit must be at most 250"},
            PermanentApiError,
            "limit must be at most 250",
            id="400-bad-parameter",
        ),
        pytest.param(
            404,
            {"status": "NOT_FOUND", "request_id": "r", "message": "Not found"},
            PermanentApiError,
            "Not found",
            id="404",
        ),
    ],
)
async def test_client_errors_are_not_retried(serve, status, body, error_type, text):
    """A 4xx other than 429 raises its permanent error after exactly one request."""
    api = await serve(failing_then_ok(99, lambda: web.json_response(body, status=status)))
    async with make_client(api) as client:
        with pytest.raises(error_type) as info:
            await collect(client.chain_snapshot("SPY"))

    assert type(info.value) is error_type
    assert (info.value.status, info.value.request_id) == (status, "r")
    assert text in str(info.value)
    assert len(api.seen) == 1


async def test_timeout_really_applies(serve):
    """A server that never answers raises TransientApiError after the timeout, per attempt."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(release.wait(), timeout=30)
        return web.json_response(page_body([]))

    api = await serve(handler)
    loop = asyncio.get_running_loop()
    try:
        async with make_client(api, timeout=0.2, max_retries=1) as client:
            start = loop.time()
            with pytest.raises(TransientApiError, match="timed out") as info:
                await client.get_object("/v1/marketstatus/now")
            elapsed = loop.time() - start
    finally:
        release.set()

    assert type(info.value) is TransientApiError
    assert isinstance(info.value.__cause__, TimeoutError)
    assert len(api.seen) == 2
    assert elapsed >= 0.4
    assert elapsed < 10, "the hung handler would wait 30 s: the timeout did not apply"


async def test_dropped_connection_is_retried(serve):
    """A connection dropped mid-body is retried as a transient error."""
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            response = web.StreamResponse(headers={"Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b'{"results": [')
            assert request.transport is not None
            request.transport.close()
            return response
        return web.json_response({"market": "open"})

    api = await serve(handler)
    async with make_client(api) as client:
        status = await client.market_status_now()

    assert status == {"market": "open"}
    assert len(api.seen) == 2


async def test_redirect_is_not_followed(serve):
    """A redirect is an error and is not followed, so the key cannot reach another host."""
    elsewhere = await serve(one_page())

    async def handler(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(elsewhere.base_url + request.path)

    api = await serve(handler)
    async with make_client(api) as client:
        with pytest.raises(PermanentApiError) as info:
            await client.market_status_now()

    assert info.value.status == 302
    assert elsewhere.seen == []


# -- the key --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 503], ids=["auth-error", "retried-5xx"])
async def test_key_only_in_bearer_header(serve, caplog, status):
    """The key is sent as a Bearer header only: never in a URL, error text, log line or repr."""
    caplog.set_level(logging.DEBUG)

    async def handler(request: web.Request) -> web.StreamResponse:
        # A proxy that reflects the request headers back in its error body.
        reflected = request.headers.get("Authorization", "")
        return web.json_response(
            {"status": "ERROR", "error": f"rejected {reflected}"}, status=status
        )

    api = await serve(handler)
    client = make_client(api, max_retries=1)
    async with client:
        with pytest.raises(ApiError) as info:
            await collect(client.list_contracts("AAPL", {"contract_type": "call"}))

    assert {s.authorization for s in api.seen} == {f"Bearer {API_KEY}"}
    assert all(API_KEY not in s.path + s.query_string for s in api.seen)
    assert API_KEY not in str(info.value)
    assert API_KEY not in repr(info.value)
    assert API_KEY not in caplog.text
    assert API_KEY not in repr(client)


async def test_key_as_query_parameter_is_refused(serve):
    """An apiKey query parameter is refused before any request, so the key stays out of URLs."""
    api = await serve(one_page())
    async with make_client(api) as client:
        with pytest.raises(ValueError, match="API key"):
            await client.get_object("/v1/marketstatus/now", {"apiKey": API_KEY})

    assert api.seen == []


# -- endpoints and parameters ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "limit"),
    [
        pytest.param("list_contracts", CONTRACTS, CONTRACTS_PAGE_LIMIT, id="contracts-1000"),
        pytest.param(
            "chain_snapshot", "/v3/snapshot/options/AAPL", CHAIN_PAGE_LIMIT, id="chain-250"
        ),
    ],
)
async def test_page_limit_is_sent(serve, method, path, limit):
    """Each list helper asks for its endpoint's maximum page size."""
    api = await serve(one_page())
    async with make_client(api) as client:
        await collect(getattr(client, method)("AAPL"))

    assert api.seen[0].path == path
    assert api.seen[0].query["limit"] == str(limit)


async def test_contract_filters_are_passed(serve):
    """Filters reach the query, the ticker is upper-cased, and a filter cannot change it."""
    api = await serve(one_page())
    filters: dict[str, str | int] = {
        "contract_type": "call",
        "expiration_date.gte": "2025-01-17",
        "strike_price.lte": 200,
        "expired": True,
        "underlying_ticker": "MSFT",
    }
    async with make_client(api) as client:
        await collect(client.list_contracts("brk.b", filters))

    assert api.seen[0].query == {
        "contract_type": "call",
        "expiration_date.gte": "2025-01-17",
        "strike_price.lte": "200",
        "expired": "true",
        "limit": "1000",
        "underlying_ticker": "BRK.B",
    }


async def test_chain_filters_and_index_path(serve):
    """An index chain keeps its I: prefix in the path, and filters reach the query."""
    api = await serve(one_page())
    async with make_client(api) as client:
        await collect(
            client.chain_snapshot("I:SPX", {"expiration_date": "2025-03-21", "limit": 50})
        )

    assert api.seen[0].path == "/v3/snapshot/options/I:SPX"
    assert api.seen[0].query == {"expiration_date": "2025-03-21", "limit": "50"}


@pytest.mark.parametrize("ticker", ["../x", "AAPL/..", "", "A B", "AAPL?x=1", "%2e%2e", "O:../x"])
@pytest.mark.parametrize("method", ["list_contracts", "chain_snapshot", "previous_close"])
async def test_bad_tickers_rejected_before_any_request(serve, method, ticker):
    """A malformed ticker raises ConfigError naming it, before any request is sent."""
    api = await serve(one_page())
    async with make_client(api) as client:
        with pytest.raises(ConfigError) as info:
            result = getattr(client, method)(ticker)
            if method == "previous_close":
                await result
            else:
                await collect(result)

    assert repr(ticker) in str(info.value)
    assert "expected" in str(info.value)
    assert api.seen == []


@pytest.mark.parametrize(
    ("given", "normalized"),
    [("aapl", "AAPL"), ("BRK.B", "BRK.B"), ("i:spx", "I:SPX"), (" SPY ", "SPY")],
    ids=["lower-case", "class-suffix", "index", "padded"],
)
def test_validate_underlying_normalizes(given, normalized):
    """validate_underlying accepts the documented forms and returns them upper-cased."""
    assert validate_underlying(given) == normalized


@pytest.mark.parametrize(
    ("ticker", "path", "body", "expected"),
    [
        pytest.param(
            "AAPL",
            "/v2/aggs/ticker/AAPL/prev",
            {"status": "OK", "resultsCount": 1, "results": [{"T": "AAPL", "c": 156.8}]},
            156.8,
            id="stock",
        ),
        pytest.param(
            "O:AAPL230616C00150000",
            "/v2/aggs/ticker/O:AAPL230616C00150000/prev",
            {"status": "OK", "resultsCount": 1, "results": [{"c": 3}]},
            3.0,
            id="option",
        ),
        pytest.param(
            "AAPL",
            "/v2/aggs/ticker/AAPL/prev",
            {"status": "OK", "resultsCount": 0},
            None,
            id="no-bar",
        ),
    ],
)
async def test_previous_close(serve, ticker, path, body, expected):
    """previous_close returns results[0].c as a float, or None when there is no bar."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(body)

    api = await serve(handler)
    async with make_client(api) as client:
        assert await client.previous_close(ticker) == expected

    assert api.seen[0].path == path


async def test_market_status_endpoints(serve):
    """market_status_now returns the object and market_holidays the list."""
    holidays = [{"date": "2025-12-25", "exchange": "NYSE", "status": "closed"}]

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/marketstatus/upcoming":
            return web.json_response(holidays)
        return web.json_response({"market": "closed", "afterHours": False})

    api = await serve(handler)
    async with make_client(api) as client:
        assert await client.market_status_now() == {"market": "closed", "afterHours": False}
        assert await client.market_holidays() == holidays

    assert [s.path for s in api.seen] == ["/v1/marketstatus/now", "/v1/marketstatus/upcoming"]


@pytest.mark.parametrize(
    ("method", "body"),
    [
        pytest.param("market_status_now", [1, 2], id="object-endpoint-gets-list"),
        pytest.param("market_holidays", {"results": []}, id="list-endpoint-gets-object"),
    ],
)
async def test_unexpected_body_shape_raises_page_shape_error(serve, method, body):
    """A single-object or list endpoint that returns the other JSON shape raises PageShapeError."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(body)

    api = await serve(handler)
    async with make_client(api) as client:
        with pytest.raises(PageShapeError):
            await getattr(client, method)()


# -- limits ---------------------------------------------------------------------------------


async def test_rate_limiter_spaces_requests(serve):
    """rate_limit=(2, 0.5) makes six requests take at least about one second."""
    api = await serve(one_page())
    loop = asyncio.get_running_loop()
    async with make_client(api, rate_limit=(2, 0.5)) as client:
        start = loop.time()
        await asyncio.gather(*(client.get_object("/v1/marketstatus/now") for _ in range(6)))
        elapsed = loop.time() - start

    assert len(api.seen) == 6
    assert elapsed >= 0.9


async def test_concurrency_bounds_requests_in_flight(serve):
    """No more than `concurrency` requests are in flight at once."""
    in_flight = 0
    peak = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return web.json_response({"market": "open"})

    api = await serve(handler)
    async with make_client(api, concurrency=2) as client:
        await asyncio.gather(*(client.get_object("/v1/marketstatus/now") for _ in range(8)))

    assert len(api.seen) == 8
    assert peak <= 2


# -- lifecycle and telemetry ----------------------------------------------------------------


async def test_client_must_be_opened():
    """A request outside `async with` fails clearly instead of connecting implicitly."""
    client = PolygonClient(base_url="http://127.0.0.1:9", api_key=API_KEY, rate_limit=None)
    with pytest.raises(RuntimeError, match="async with"):
        await client.market_status_now()


async def test_span_per_attempt(serve, monkeypatch):
    """Each HTTP attempt is one polygon.request span with path, status and page number."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(transport, "tracer", provider.get_tracer("test"))
    api = await serve(failing_then_ok(1, lambda: web.Response(status=503)))

    async with make_client(api) as client:
        await collect(client.chain_snapshot("SPY"))

    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == ["polygon.request"] * 2
    assert [dict(span.attributes or {}) for span in spans] == [
        {
            "http.request.method": "GET",
            "url.path": "/v3/snapshot/options/SPY",
            "polygon.page": 1,
            "http.response.status_code": status,
        }
        for status in (503, 200)
    ]
    provider.shutdown()
