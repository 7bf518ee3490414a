"""The simulated API as an aiohttp application: routes, auth, pagination and fault injection."""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import datetime as dt
import math
import random
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from aiohttp import web

from options.simulator.config import SimulatorConfig
from options.simulator.history import bars_of, holidays, listed_then
from options.simulator.market import prev_bar, snapshot_rows, stock_snapshot
from options.simulator.universe import Chain, ContractFilter, Universe

CONTRACTS_MAX_LIMIT = 1000
CHAIN_MAX_LIMIT = 250
DEFAULT_LIMIT = 10
JSON = "application/json"
NEW_YORK = ZoneInfo("America/New_York")

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiFailure(Exception):
    """Raised by a handler to answer with a JSON error body."""

    def __init__(self, status: int, message: str, *, api_status: str = "ERROR") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.api_status = api_status


class TokenBucket:
    """A token bucket refilled at ``rate`` per second, holding at most ``max(1, rate)`` tokens."""

    def __init__(self, rate: float) -> None:
        """Start full."""
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self) -> float:
        """Take one token; return 0 on success, else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class SimulatorState:
    """Per-app mutable state: the universe, the fault generators and the counters."""

    def __init__(self, config: SimulatorConfig) -> None:
        """Seed every random knob from ``config.seed``."""
        self.config = config
        self.universe = Universe(config, config.as_of or dt.datetime.now(dt.UTC).date())
        self.error_rng = random.Random(f"{config.seed}:errors")
        self.truncate_rng = random.Random(f"{config.seed}:truncate")
        self.spike_rng = random.Random(f"{config.seed}:spikes")
        self.bucket = (
            TokenBucket(config.requests_per_second) if config.requests_per_second else None
        )
        resolve = self.universe.resolve
        self.broken_pages = {resolve(name): page for name, page in config.broken_pages.items()}
        self.looping_pages = {resolve(name): page for name, page in config.looping_pages.items()}
        self.hidden_contracts = {
            resolve(name): count for name, count in config.hidden_contracts.items() if count
        }
        # Throttle bursts: requests let through since the last burst, and 429s left in this one.
        self.since_burst = 0
        self.burst_left = 0
        # (underlying, filter, offset, limit) -> (rendered results, more pages follow)
        self.chain_pages: dict[tuple[Any, ...], tuple[bytes, bool]] = {}
        self.reset()

    def reset(self) -> None:
        """Zero the counters."""
        self.requests = 0
        self.by_endpoint: Counter[str] = Counter()
        self.errors_injected = 0
        self.rate_limited = 0
        self.truncated = 0
        self.broken_page_errors = 0
        self.latency_spikes = 0
        self.looped_pages = 0

    def stats(self) -> dict[str, Any]:
        """Return the counters as ``/_sim/stats`` shows them."""
        return {
            "requests": self.requests,
            "by_endpoint": dict(self.by_endpoint),
            "errors_injected": self.errors_injected,
            "rate_limited": self.rate_limited,
            "truncated": self.truncated,
            "broken_page_errors": self.broken_page_errors,
            "latency_spikes": self.latency_spikes,
            "looped_pages": self.looped_pages,
        }


STATE = web.AppKey("simulator_state", SimulatorState)


def create_app(config: SimulatorConfig) -> web.Application:
    """Build the simulated Polygon API for ``config`` (nothing is generated until asked)."""
    app = web.Application(middlewares=[_api_middleware])
    app[STATE] = SimulatorState(config)
    app.router.add_get("/v3/reference/options/contracts", _list_contracts)
    app.router.add_get("/v3/reference/options/contracts/{options_ticker}", _get_contract)
    app.router.add_get("/v3/snapshot/options/{underlying}", _chain_snapshot)
    app.router.add_get("/v3/snapshot/options/{underlying}/{option_contract}", _option_snapshot)
    app.router.add_get("/v2/aggs/ticker/{ticker}/prev", _previous_close)
    app.router.add_get(
        "/v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{start}/{end}", _daily_bars
    )
    app.router.add_get("/v2/snapshot/locale/us/markets/stocks/tickers/{ticker}", _stock_snapshot)
    app.router.add_get("/v1/marketstatus/now", _market_status_now)
    app.router.add_get("/v1/marketstatus/upcoming", _market_status_upcoming)
    app.router.add_get("/_sim/stats", _sim_stats)
    app.router.add_post("/_sim/reset", _sim_reset)
    return app


def json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """Answer with ``body`` (bytes are sent as they are) as ``application/json``."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return web.Response(body=raw, status=status, content_type=JSON, headers=headers)


def error_response(
    status: int, message: str, *, api_status: str = "ERROR", headers: dict[str, str] | None = None
) -> web.Response:
    """Answer with the API's error body: ``error`` for ERROR, ``message`` for other statuses."""
    key = "error" if api_status == "ERROR" else "message"
    body = {"status": api_status, "request_id": _request_id(), key: message}
    return json_response(body, status=status, headers=headers)


def _request_id() -> str:
    return secrets.token_hex(16)


def _minute() -> int:
    return int(time.time() // 60)


@web.middleware
async def _api_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    route_error = request.match_info.http_exception
    if route_error is None and request.path.startswith("/_sim/"):
        return await handler(request)
    state = request.app[STATE]
    config = state.config
    resource = request.match_info.route.resource
    state.requests += 1
    state.by_endpoint[resource.canonical if resource and route_error is None else "unmatched"] += 1
    delay = config.latency
    if config.latency_spike_rate and state.spike_rng.random() < config.latency_spike_rate:
        state.latency_spikes += 1
        delay += config.latency_spike
    if delay:
        await asyncio.sleep(delay)
    if route_error is not None:
        api_status = "NOT_FOUND" if route_error.status == 404 else "ERROR"
        return error_response(route_error.status, route_error.reason, api_status=api_status)
    if config.api_key is not None and _api_key(request) != config.api_key:
        return error_response(401, "Unknown API Key")
    if config.throttle_bursts and _in_burst(state):
        state.rate_limited += 1
        return _too_many_requests(1)
    if state.bucket is not None:
        wait = state.bucket.take()
        if wait:
            state.rate_limited += 1
            return _too_many_requests(max(1, math.ceil(wait)))
    if config.error_rate and state.error_rng.random() < config.error_rate:
        state.errors_injected += 1
        status = state.error_rng.choice((500, 502, 503))
        return error_response(status, f"Simulated server error {status}.")
    try:
        return await handler(request)
    except ApiFailure as exc:
        return error_response(exc.status, exc.message, api_status=exc.api_status)


def _in_burst(state: SimulatorState) -> bool:
    """Advance the burst cycle by one request; return whether this request is throttled."""
    if state.burst_left:
        state.burst_left -= 1
        return True
    state.since_burst += 1
    if state.since_burst == state.config.throttle_bursts:
        state.since_burst = 0
        state.burst_left = state.config.throttle_burst_length
    return False


def _too_many_requests(retry_after: int) -> web.Response:
    return error_response(
        429,
        "You've exceeded the maximum requests per second, please wait.",
        headers={"Retry-After": str(retry_after)},
    )


def _api_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[7:].strip()
    return request.query.get("apiKey")


# --- pagination --------------------------------------------------------------------------------


def _encode_cursor(payload: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=").decode()


def _decode_cursor(cursor: str, kind: str, max_limit: int) -> dict[str, Any]:
    try:
        payload = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(payload, dict) or payload.get("k") != kind:
            raise ValueError(kind)
        for key in ("l", "o", "n", "i"):
            if not isinstance(payload.get(key), int) or payload[key] < 0:
                raise ValueError(key)
        if not 1 <= payload["l"] <= max_limit:
            raise ValueError("l")
        if not isinstance(payload.get("f"), dict):
            raise ValueError("f")
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        raise ApiFailure(400, "The cursor is not valid.") from None
    return payload


def _first_page(request: web.Request, kind: str, max_limit: int) -> dict[str, Any]:
    """Turn a first-page query into the cursor payload later pages carry."""
    query = request.query
    raw_limit = query.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(raw_limit)
    except ValueError:
        raise ApiFailure(400, "limit must be an integer.") from None
    if not 1 <= limit <= max_limit:
        raise ApiFailure(400, f"limit must be between 1 and {max_limit}.")
    try:
        flt = ContractFilter.from_query(query)
    except ValueError as exc:
        raise ApiFailure(400, str(exc)) from None
    payload: dict[str, Any] = {"k": kind, "f": dict(flt.key), "l": limit, "i": 0, "o": 0, "n": 1}
    if kind == "contracts":
        expired = query.get("expired", "false").lower()
        if expired not in ("true", "false"):
            raise ApiFailure(400, "expired must be true or false.")
        payload["x"] = expired == "true"
        payload["u"] = query.get("underlying_ticker")
        as_of = query.get("as_of")
        if as_of is not None:
            try:
                payload["a"] = dt.date.fromisoformat(as_of).isoformat()
            except ValueError:
                raise ApiFailure(400, "as_of must be a date (YYYY-MM-DD).") from None
    return payload


def _page_state(
    request: web.Request, kind: str, max_limit: int
) -> tuple[dict[str, Any], ContractFilter]:
    cursor = request.query.get("cursor")
    page = (
        _decode_cursor(cursor, kind, max_limit) if cursor else _first_page(request, kind, max_limit)
    )
    try:
        flt = ContractFilter({str(k): str(v) for k, v in page["f"].items()})
    except ValueError as exc:
        raise ApiFailure(400, str(exc)) from None
    return page, flt


def _next_url(request: web.Request, page: dict[str, Any], *, underlying: int, offset: int) -> str:
    cursor = _encode_cursor({**page, "i": underlying, "o": offset, "n": page["n"] + 1})
    return _cursor_url(request, cursor)


def _cursor_url(request: web.Request, cursor: str) -> str:
    # Built from the request's own host so it works on any port; it never carries the key.
    return f"{request.scheme}://{request.host}{request.rel_url.raw_path}?cursor={cursor}"


def _list_body(results: Sequence[bytes], request_id: str, next_url: str | None) -> bytes:
    tail = b'"' if next_url is None else b'","next_url":' + orjson.dumps(next_url)
    return b"".join(
        (
            b'{"results":[',
            b",".join(results),
            b'],"status":"OK","request_id":"',
            request_id.encode(),
            tail,
            b"}",
        )
    )


def _list_response(state: SimulatorState, body: bytes) -> web.Response:
    if state.config.truncate_rate and state.truncate_rng.random() < state.config.truncate_rate:
        state.truncated += 1
        body = body[: len(body) // 2]
    return json_response(body)


def _check_broken(state: SimulatorState, name: str | None, page: int) -> None:
    if name is not None and state.broken_pages.get(name) == page:
        state.broken_page_errors += 1
        raise ApiFailure(500, f"Simulated broken page {page} of {name}.")


def _loop_url(
    request: web.Request, state: SimulatorState, name: str | None, page: int
) -> str | None:
    """Return the URL that led to a looping page (its own ``next_url``), else ``None``."""
    if name is None or state.looping_pages.get(name) != page:
        return None
    state.looped_pages += 1
    # Page n >= 2 always comes from a cursor: hand the same one back.
    return _cursor_url(request, request.query["cursor"])


def _chain_positions(state: SimulatorState, chain: Chain, flt: ContractFilter) -> Sequence[int]:
    """Return the positions the chain snapshot serves: those passing ``flt``, less hidden ones."""
    positions = chain.select(flt)
    hidden = state.hidden_contracts.get(chain.name)
    if hidden:
        # Positions are ascending, so the hidden ones (below ``hidden``) lead.
        positions = positions[bisect.bisect_left(positions, hidden) :]
    return positions


# --- handlers ----------------------------------------------------------------------------------


async def _list_contracts(request: web.Request) -> web.Response:
    state = request.app[STATE]
    universe = state.universe
    page, flt = _page_state(request, "contracts", CONTRACTS_MAX_LIMIT)
    as_of = dt.date.fromisoformat(page["a"]) if page.get("a") else None
    if page.get("x") and as_of is None:
        return _list_response(state, _list_body((), _request_id(), None))
    loop_url = None
    if page.get("u") is None:
        names: Sequence[str] = universe.names
    else:
        name = universe.resolve(str(page["u"]))
        names = () if name is None else (name,)
        _check_broken(state, name, page["n"])
        loop_url = _loop_url(request, state, name, page["n"])
    limit, index, offset = page["l"], page["i"], page["o"]
    results: list[bytes] = []
    next_url = None
    while index < len(names):
        chain = universe.chain(names[index], as_of)
        positions = chain.select(flt)
        if as_of is not None:
            # the listing of a past day: expired=true gives its contracts expired since
            positions = listed_then(chain, positions, today=universe.as_of, expired=page["x"])
        if offset < len(positions):
            if len(results) == limit:
                next_url = _next_url(request, page, underlying=index, offset=offset)
                break
            rendered = chain.contract_json()
            take = positions[offset : offset + limit - len(results)]
            results.extend(rendered[i] for i in take)
            offset += len(take)
            continue
        index, offset = index + 1, 0
    return _list_response(state, _list_body(results, _request_id(), loop_url or next_url))


async def _get_contract(request: web.Request) -> web.Response:
    state = request.app[STATE]
    found = state.universe.locate(request.match_info["options_ticker"])
    if found is None:
        raise ApiFailure(404, "Contract not found.", api_status="NOT_FOUND")
    chain, position = found
    body = b"".join(
        (
            b'{"results":',
            chain.contract_json()[position],
            b',"status":"OK","request_id":"',
            _request_id().encode(),
            b'"}',
        )
    )
    return json_response(body)


async def _chain_snapshot(request: web.Request) -> web.Response:
    state = request.app[STATE]
    page, flt = _page_state(request, "chain", CHAIN_MAX_LIMIT)
    name = state.universe.resolve(request.match_info["underlying"])
    if state.config.cache_chain_pages and name is not None:
        return _cached_chain_page(request, state, page, flt, name)
    body: dict[str, Any] = {"request_id": _request_id(), "results": [], "status": "OK"}
    if name is not None:
        _check_broken(state, name, page["n"])
        loop_url = _loop_url(request, state, name, page["n"])
        chain = state.universe.chain(name)
        positions = _chain_positions(state, chain, flt)
        start, stop = page["o"], page["o"] + page["l"]
        body["results"] = snapshot_rows(
            chain,
            positions[start:stop],
            _minute(),
            deep_itm_without_greeks=state.config.deep_itm_without_greeks,
        )
        if loop_url is not None:
            body["next_url"] = loop_url
        elif stop < len(positions):
            body["next_url"] = _next_url(request, page, underlying=0, offset=stop)
    return _list_response(state, orjson.dumps(body))


def _cached_chain_page(
    request: web.Request,
    state: SimulatorState,
    page: dict[str, Any],
    flt: ContractFilter,
    name: str,
) -> web.Response:
    _check_broken(state, name, page["n"])
    loop_url = _loop_url(request, state, name, page["n"])
    key = (name, orjson.dumps(page["f"], option=orjson.OPT_SORT_KEYS), page["o"], page["l"])
    cached = state.chain_pages.get(key)
    if cached is None:
        chain = state.universe.chain(name)
        positions = _chain_positions(state, chain, flt)
        start, stop = page["o"], page["o"] + page["l"]
        rows = snapshot_rows(
            chain,
            positions[start:stop],
            _minute(),
            deep_itm_without_greeks=state.config.deep_itm_without_greeks,
        )
        cached = (orjson.dumps(rows)[1:-1], stop < len(positions))
        state.chain_pages[key] = cached
    results, more = cached
    next_url = loop_url
    if next_url is None and more:
        next_url = _next_url(request, page, underlying=0, offset=page["o"] + page["l"])
    return _list_response(state, _list_body([results] if results else [], _request_id(), next_url))


async def _option_snapshot(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = state.universe.resolve(request.match_info["underlying"])
    found = state.universe.locate(request.match_info["option_contract"])
    if name is None or found is None or found[0].name != name:
        raise ApiFailure(404, "Option contract not found.", api_status="NOT_FOUND")
    chain, position = found
    if position < state.hidden_contracts.get(name, 0):
        raise ApiFailure(404, "Option contract not found.", api_status="NOT_FOUND")
    (row,) = snapshot_rows(
        chain, (position,), _minute(), deep_itm_without_greeks=state.config.deep_itm_without_greeks
    )
    return json_response({"request_id": _request_id(), "results": row, "status": "OK"})


def _stock_chain(request: web.Request) -> Chain | None:
    state = request.app[STATE]
    ticker = request.match_info["ticker"]
    return state.universe.chain(ticker) if ticker in state.config.underlyings else None


async def _previous_close(request: web.Request) -> web.Response:
    chain = _stock_chain(request)
    results = [] if chain is None else [prev_bar(chain, _minute())]
    body = {
        "ticker": request.match_info["ticker"],
        "queryCount": len(results),
        "resultsCount": len(results),
        "adjusted": True,
        "results": results,
        "status": "OK",
        "request_id": _request_id(),
        "count": len(results),
    }
    return json_response(body)


async def _stock_snapshot(request: web.Request) -> web.Response:
    chain = _stock_chain(request)
    if chain is None or chain.is_index:
        raise ApiFailure(404, "Ticker not found.", api_status="NOT_FOUND")
    body = {"request_id": _request_id(), "status": "OK", "ticker": stock_snapshot(chain, _minute())}
    return json_response(body)


async def _market_status_now(request: web.Request) -> web.Response:
    now = dt.datetime.now(NEW_YORK)
    minutes = now.hour * 60 + now.minute
    trading_day = now.weekday() < 5 and now.date() not in holidays(now.year)
    early = trading_day and 4 * 60 <= minutes < 9 * 60 + 30
    after = trading_day and 16 * 60 <= minutes < 20 * 60
    is_open = trading_day and 9 * 60 + 30 <= minutes < 16 * 60
    market = "open" if is_open else "extended-hours" if early or after else "closed"
    groups = ("s_and_p", "societe_generale", "msci", "ftse_russell", "mstar", "mstarc", "cccy")
    body = {
        "afterHours": after,
        "currencies": {"crypto": "open", "fx": "closed" if now.weekday() == 5 else "open"},
        "earlyHours": early,
        "exchanges": {"nasdaq": market, "nyse": market, "otc": market},
        "indicesGroups": dict.fromkeys(groups, "open" if is_open else "closed"),
        "market": market,
        "serverTime": now.isoformat(timespec="seconds"),
    }
    return json_response(body)


async def _market_status_upcoming(request: web.Request) -> web.Response:
    today = dt.datetime.now(NEW_YORK).date()
    body = []
    for year in (today.year, today.year + 1):
        for day, (name, early_close) in sorted(holidays(year).items()):
            if day < today:
                continue
            for exchange in ("NYSE", "NASDAQ"):
                entry: dict[str, Any] = {
                    "date": day.isoformat(),
                    "exchange": exchange,
                    "name": name,
                }
                if early_close:
                    open_at = dt.datetime.combine(day, dt.time(9, 30), NEW_YORK)
                    close_at = dt.datetime.combine(day, dt.time(13), NEW_YORK)
                    entry["open"] = open_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
                    entry["close"] = close_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
                    entry["status"] = "early-close"
                else:
                    entry["status"] = "closed"
                body.append(entry)
    return json_response(body)


async def _daily_bars(request: web.Request) -> web.Response:
    """``/v2/aggs/ticker/{ticker}/range/1/day/{from}/{to}``: one bar a session the contract
    traded on, as its snapshot at that session's close gives the day (see ``bars_of``)."""
    state = request.app[STATE]
    info, query = request.match_info, request.query
    if (info["multiplier"], info["timespan"]) != ("1", "day"):
        raise ApiFailure(400, "Only 1/day aggregates are simulated.")
    order = query.get("sort", "asc")
    if order not in ("asc", "desc"):
        raise ApiFailure(400, "sort must be asc or desc.")
    try:
        start, end = (_bar_day(info[key]) for key in ("start", "end"))
        limit = int(query.get("limit", "5000"))
    except ValueError:
        raise ApiFailure(400, "from and to must be dates (YYYY-MM-DD) or Unix ms.") from None
    if not 1 <= limit <= 50_000:
        raise ApiFailure(400, "limit must be between 1 and 50000.")
    bars = bars_of(state.universe, info["ticker"], start, end, state.config)[:limit]
    if order == "desc":
        bars.reverse()
    body: dict[str, Any] = {
        "ticker": info["ticker"],
        "queryCount": len(bars),
        "resultsCount": len(bars),
        "adjusted": query.get("adjusted", "true") != "false",
        "status": "OK",
        "request_id": _request_id(),
    }
    if bars:  # as the API answers a range without trades: no results key at all
        body["results"] = bars
    return json_response(body)


def _bar_day(raw: str) -> dt.date:
    if raw.isdigit():
        return dt.datetime.fromtimestamp(int(raw) / 1000, NEW_YORK).date()
    return dt.date.fromisoformat(raw)


async def _sim_stats(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].stats())


async def _sim_reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return json_response({"status": "OK"})
