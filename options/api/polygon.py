"""Asyncio client for the Polygon (Massive) REST API: auth, rate limit, retries, page guard.

The client is the extract end of both pipelines. It yields raw pages and never interprets rows.
What it guarantees, and the official client does not:

- every request has a real timeout, and exhausted retries raise the project's own errors
  (:mod:`options.errors`), never ``tenacity.RetryError`` or an aiohttp exception;
- only transient failures (timeouts, dropped connections, 429, 5xx, unreadable JSON) are retried,
  with jittered exponential backoff that honours ``Retry-After``;
- a page without a ``results`` list, a ``next_url`` that loops or leaves the query's path, and
  an unbounded page count are errors, never a silent end of the chain;
- the API key travels only in the ``Authorization`` header, and only to the configured host:
  ``next_url`` contributes its path and query, never its host.

Each attempt is a ``polygon.request`` span and counts in the request metrics of
:mod:`options.ops.telemetry` by its path template (``/v3/snapshot/options/{underlying}``), never
by a path with a ticker or a query; both cost nothing while telemetry is off.

Usage::

    async with PolygonClient(base_url=DEFAULT_BASE_URL, api_key=key) as client:
        async for page in client.chain_snapshot("SPY"):
            ...
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, Mapping
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import orjson
from aiolimiter import AsyncLimiter
from opentelemetry import trace
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from options.api.pages import (
    Decoder,
    Page,
    Query,
    check_path,
    cursor_query,
    encode_params,
    parse_page,
)
from options.errors import (
    ApiError,
    AuthError,
    KeyRejectedError,
    PageShapeError,
    PaginationError,
    PayloadError,
    PermanentApiError,
    RateLimitedError,
    TransientApiError,
)
from options.ops import telemetry
from options.tickers import (
    OPTION_TICKER_PATTERN,
    UNDERLYING_PATTERN,
    validate_option_ticker,
    validate_underlying,
)

__all__ = [
    "CHAIN_PAGE_LIMIT",
    "CONTRACTS_PAGE_LIMIT",
    "DEFAULT_BASE_URL",
    "OPTION_TICKER_PATTERN",
    "UNDERLYING_PATTERN",
    "Page",
    "PolygonClient",
    "validate_option_ticker",
    "validate_underlying",
]

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

DEFAULT_BASE_URL: Final = "https://api.massive.com"
CONTRACTS_PAGE_LIMIT: Final = 1000
CHAIN_PAGE_LIMIT: Final = 250

CONTRACTS_PATH: Final = "/v3/reference/options/contracts"
CHAIN_PATH: Final = "/v3/snapshot/options/{underlying}"
PREVIOUS_CLOSE_PATH: Final = "/v2/aggs/ticker/{ticker}/prev"
MARKET_STATUS_PATH: Final = "/v1/marketstatus/now"
MARKET_HOLIDAYS_PATH: Final = "/v1/marketstatus/upcoming"
# What the request metrics are labelled with: a path template, so a ticker never becomes a label.
_ENDPOINTS: Final = tuple(
    (re.compile("[^/]+".join(map(re.escape, re.split(r"\{\w+\}", template))) + "$"), template)
    for template in (
        CONTRACTS_PATH,
        CHAIN_PATH,
        PREVIOUS_CLOSE_PATH,
        MARKET_STATUS_PATH,
        MARKET_HOLIDAYS_PATH,
    )
)
OTHER_ENDPOINT: Final = "other"

# Connecting should never take long; a dead host is better retried early than waited on for the
# whole request budget.
_MAX_CONNECT_TIMEOUT: Final = 10.0
# Server-provided text in error messages is capped so an HTML error page cannot flood a log line.
_MAX_DETAIL_CHARS: Final = 300


class PolygonClient:
    """Asyncio client for the Polygon (Massive) REST API.

    Use it as an async context manager: the HTTP session is opened in ``__aenter__``, so nothing
    connects at import or construction time.

    Args:
        base_url: scheme and host of the API, e.g. :data:`DEFAULT_BASE_URL`; every request,
            ``next_url`` pages included, goes to this host.
        api_key: sent as ``Authorization: Bearer ...`` and nowhere else.
        timeout: seconds allowed for one whole attempt (connect, send, read the body).
        max_retries: retries after the first attempt for transient errors.
        backoff_initial: multiplier of the jittered exponential backoff, in seconds.
        backoff_max: cap of one backoff wait, and of an honoured ``Retry-After``.
        rate_limit: ``(requests, per_seconds)`` allowed by the client, retries included;
            ``None`` disables the client-side limit.
        concurrency: most requests in flight at once (and connections in the pool).
        max_pages: most pages one query may have before it is taken for a loop.

    Attributes:
        requests_sent: HTTP requests actually sent, retries included.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        timeout: float = 30.0,
        max_retries: int = 6,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        rate_limit: tuple[float, float] | None = (100.0, 1.0),
        concurrency: int = 16,
        max_pages: int = 10_000,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout_seconds = timeout
        self._timeout = aiohttp.ClientTimeout(
            total=timeout, sock_connect=min(timeout, _MAX_CONNECT_TIMEOUT)
        )
        self._max_retries = max_retries
        self._backoff = wait_random_exponential(multiplier=backoff_initial, max=backoff_max)
        self._backoff_max = backoff_max
        self._limiter = AsyncLimiter(*rate_limit) if rate_limit is not None else None
        self._concurrency = concurrency
        self._semaphore = asyncio.Semaphore(concurrency)
        self._max_pages = max_pages
        self._session: aiohttp.ClientSession | None = None
        self.requests_sent = 0

    def __repr__(self) -> str:
        # Written out so that the key can never show up through a default or dataclass repr.
        return f"PolygonClient(base_url={self._base_url!r})"

    async def __aenter__(self) -> PolygonClient:
        """Open the HTTP session."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._concurrency),
                headers={
                    "Authorization": f"Bearer {self._api_key}",
                    "Accept": "application/json",
                },
                timeout=self._timeout,
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the HTTP session."""
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP session; safe to call twice."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- endpoint helpers ------------------------------------------------------------------

    def list_contracts(
        self, underlying: str, params: Mapping[str, str | int] | None = None
    ) -> AsyncGenerator[Page, None]:
        """Page through the active option contracts of one underlying.

        Sends ``underlying_ticker``, ``expired=false`` and ``limit=1000`` (the endpoint's maximum);
        ``params`` adds filters (``contract_type``, ``expiration_date.gte``, ...) and may override
        ``expired`` or ``limit``.

        Raises:
            ConfigError: at call time, before any request, when the ticker is malformed.
        """
        ticker = validate_underlying(underlying)
        query: dict[str, str | int] = {"expired": "false", "limit": CONTRACTS_PAGE_LIMIT}
        query.update(params or {})
        # Set last: a filter must never turn this into another underlying's listing.
        query["underlying_ticker"] = ticker
        return self.paginate(CONTRACTS_PATH, query)

    def chain_snapshot(
        self,
        underlying: str,
        params: Mapping[str, str | int] | None = None,
        *,
        decoder: Decoder | None = None,
    ) -> AsyncGenerator[Page, None]:
        """Page through the option chain snapshot of one underlying (``I:SPX`` for indices).

        Sends ``limit=250`` (the endpoint's maximum; the official client sends none and gets 10);
        ``params`` adds filters and may override ``limit``. ``decoder``: see :meth:`paginate`.

        Raises:
            ConfigError: at call time, before any request, when the ticker is malformed.
        """
        ticker = validate_underlying(underlying)
        query: dict[str, str | int] = {"limit": CHAIN_PAGE_LIMIT}
        query.update(params or {})
        return self.paginate(
            CHAIN_PATH.format(underlying=_quote_segment(ticker)), query, decoder=decoder
        )

    async def previous_close(self, ticker: str) -> float | None:
        """Return the previous session's close of a stock, index or option ticker.

        Returns:
            ``results[0]["c"]``, or ``None`` when the API has no bar (no ``results``).

        Raises:
            ConfigError: the ticker is malformed (checked before any request).
            PageShapeError: a bar without a numeric close.
        """
        normalized = _validate_any_ticker(ticker)
        path = PREVIOUS_CLOSE_PATH.format(ticker=_quote_segment(normalized))
        body = await self.get_object(path)
        results = body.get("results")
        if not results:
            return None
        bar = results[0] if isinstance(results, list) else None
        close = bar.get("c") if isinstance(bar, dict) else None
        if not isinstance(close, int | float) or isinstance(close, bool):
            raise PageShapeError(
                f"{path} returned a bar without a numeric close 'c'",
                endpoint=path,
                status=200,
                request_id=_request_id_of(body),
            )
        return float(close)

    async def market_status_now(self) -> dict[str, Any]:
        """Return the current market status object (``/v1/marketstatus/now``)."""
        return await self.get_object(MARKET_STATUS_PATH)

    async def market_holidays(self) -> list[dict[str, Any]]:
        """Return the upcoming market holidays and early closes (``/v1/marketstatus/upcoming``).

        Raises:
            PageShapeError: the body is not a JSON list of objects.
        """
        body, request_id = await self._get(
            MARKET_HOLIDAYS_PATH, [], page=None, endpoint=MARKET_HOLIDAYS_PATH
        )
        if not isinstance(body, list) or not all(isinstance(item, dict) for item in body):
            raise PageShapeError(
                f"{MARKET_HOLIDAYS_PATH} returned {type(body).__name__}, expected a list",
                endpoint=MARKET_HOLIDAYS_PATH,
                status=200,
                request_id=request_id,
            )
        return body

    # -- generic access ---------------------------------------------------------------------

    async def get_object(
        self, path: str, params: Mapping[str, str | int] | None = None
    ) -> dict[str, Any]:
        """Return the whole JSON object of a single-object endpoint.

        Args:
            path: the request path, already quoted, e.g. ``/v1/marketstatus/now``.
            params: query parameters.

        Raises:
            TransientApiError: retries exhausted (its subclasses say why).
            PermanentApiError: a 4xx other than 429, or a body that is not a JSON object.
        """
        check_path(path)
        body, request_id = await self._get(
            path, encode_params(params or {}), page=None, endpoint=endpoint_of(path)
        )
        if not isinstance(body, dict):
            raise PageShapeError(
                f"{path} returned {type(body).__name__}, expected a JSON object",
                endpoint=path,
                status=200,
                request_id=request_id,
            )
        return body

    async def paginate(
        self, path: str, params: Mapping[str, str | int], *, decoder: Decoder | None = None
    ) -> AsyncGenerator[Page, None]:
        """Yield the pages of one list query, following ``next_url``, as each one is parsed.

        The first request is ``path`` with ``params``; each later one is the configured base URL
        plus the path and query of the previous page's ``next_url`` (its host is ignored, so the
        key never leaves the configured host), with no other parameters.

        ``decoder`` is a typed fast path (a ``msgspec`` decoder of the page): its result must
        have ``results``, ``next_url`` and ``request_id`` attributes. A body it refuses (a field
        of an unexpected type, a missing ``results``) is parsed the generic way instead, so the
        rows then arrive as dicts and every shape check below still applies.

        Raises:
            PageShapeError: a page without a ``results`` list; never taken for the last page.
            PaginationError: a ``next_url`` on another path, a repeated cursor, or more than
                ``max_pages`` pages.
            TransientApiError: retries exhausted on some page.
            PermanentApiError: a 4xx other than 429.
        """
        check_path(path)
        query = encode_params(params)
        endpoint = endpoint_of(path)
        seen_cursors: set[tuple[tuple[str, str], ...]] = set()
        number = 0
        while True:
            number += 1
            body, request_id = await self._get(
                path, query, page=number, decoder=decoder, endpoint=endpoint
            )
            page, next_url = parse_page(path, body, number, request_id)
            logger.debug(
                "Polygon %s page %d: %d rows%s",
                path,
                number,
                len(page.results),
                ", more to follow" if page.has_next else ", last page",
            )
            yield page
            if next_url is None:
                return
            if number >= self._max_pages:
                raise PaginationError(
                    f"{path} has more than {self._max_pages} pages; taken for a next_url loop",
                    endpoint=path,
                    status=200,
                    request_id=request_id,
                )
            query = cursor_query(path, next_url, number, request_id)
            cursor_key = tuple(query)
            if cursor_key in seen_cursors:
                raise PaginationError(
                    f"{path} page {number} repeats an earlier cursor; next_url loops",
                    endpoint=path,
                    status=200,
                    request_id=request_id,
                )
            seen_cursors.add(cursor_key)

    # -- one request, with retries ------------------------------------------------------------

    async def _get(
        self,
        path: str,
        query: Query,
        *,
        page: int | None,
        endpoint: str,
        decoder: Decoder | None = None,
    ) -> tuple[Any, str | None]:
        """Send one GET with retries and return the decoded JSON body and its request id.

        ``endpoint`` is the path template the attempts are counted under.
        """
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientApiError),
            stop=stop_after_attempt(self._max_retries + 1),
            wait=self._wait,
            before_sleep=self._log_retry,
            # The caller gets the last project error itself, not tenacity.RetryError.
            reraise=True,
        )
        return await retrying(self._attempt, path, query, page, decoder, endpoint)

    async def _attempt(
        self, path: str, query: Query, page: int | None, decoder: Decoder | None, endpoint: str
    ) -> tuple[Any, str | None]:
        """Send one HTTP attempt and classify its outcome."""
        session = self._require_session()
        # The semaphore is taken first so a request waiting for a slot does not spend a rate
        # token that would then let a burst through once slots free up.
        async with self._semaphore:
            if self._limiter is not None:
                await self._limiter.acquire()
            with tracer.start_as_current_span("polygon.request") as span:
                span.set_attribute("http.request.method", "GET")
                span.set_attribute("url.path", path)
                if page is not None:
                    span.set_attribute("polygon.page", page)
                status: int | None = None
                answered: int | None = None  # the status once the whole response arrived
                self.requests_sent += 1
                started = time.perf_counter()
                try:
                    async with session.get(
                        self._base_url + path,
                        params=query,
                        timeout=self._timeout,
                        # A redirect could carry the bearer header to a host we did not choose.
                        allow_redirects=False,
                    ) as response:
                        status = response.status
                        span.set_attribute("http.response.status_code", status)
                        raw = await response.read()
                        retry_after = response.headers.get("Retry-After")
                        header_request_id = response.headers.get("X-Request-Id")
                        reason = response.reason
                    answered = status
                except TimeoutError as exc:
                    raise TransientApiError(
                        f"{path} timed out after {self._timeout_seconds:g}s",
                        endpoint=path,
                        status=status,
                    ) from exc
                except aiohttp.ClientError as exc:
                    raise TransientApiError(
                        f"{path} failed: {type(exc).__name__}: {self._redact(str(exc))}",
                        endpoint=path,
                        status=status,
                    ) from exc
                finally:
                    telemetry.record_request(endpoint, answered, time.perf_counter() - started)
                if decoder is not None and 200 <= status < 300:
                    try:
                        typed = decoder(raw)
                    except ValueError:
                        pass  # msgspec's errors are ValueErrors: take the generic path
                    else:
                        return typed, getattr(typed, "request_id", None) or header_request_id
                return self._classify(
                    path, status, raw, reason, retry_after, header_request_id, page
                )

    def _classify(
        self,
        path: str,
        status: int,
        raw: bytes,
        reason: str | None,
        retry_after: str | None,
        header_request_id: str | None,
        page: int | None,
    ) -> tuple[Any, str | None]:
        """Return the decoded body of a 2xx response, or raise the error its status means."""
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
            decoded = False
        else:
            decoded = True
        request_id = _request_id_of(body) or header_request_id
        where = path if page is None else f"{path} page {page}"

        if 200 <= status < 300:
            if not decoded:
                raise PayloadError(
                    f"{where} returned a body that is not valid JSON ({len(raw)} bytes)",
                    endpoint=path,
                    status=status,
                    request_id=request_id,
                )
            return body, request_id

        detail = self._redact(_detail_of(body, reason))
        message = f"{where} answered HTTP {status}: {detail}"
        if status == 401:
            raise KeyRejectedError(
                f"the API refused the key (POLYGON_API_KEY): {message}",
                endpoint=path,
                status=status,
                request_id=request_id,
            )
        if status == 403:
            raise AuthError(message, endpoint=path, status=status, request_id=request_id)
        if status == 429:
            raise RateLimitedError(
                message,
                retry_after=_parse_retry_after(retry_after),
                endpoint=path,
                status=status,
                request_id=request_id,
            )
        if status >= 500:
            raise TransientApiError(message, endpoint=path, status=status, request_id=request_id)
        raise PermanentApiError(message, endpoint=path, status=status, request_id=request_id)

    def _wait(self, state: RetryCallState) -> float:
        """Return the backoff before the next attempt, at least a 429's Retry-After (capped)."""
        delay = self._backoff(state)
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, RateLimitedError) and error.retry_after is not None:
            delay = max(delay, min(error.retry_after, self._backoff_max))
        return delay

    def _log_retry(self, state: RetryCallState) -> None:
        """Log one WARNING per retry, naming the endpoint, status and attempt."""
        error = state.outcome.exception() if state.outcome is not None else None
        sleep = state.next_action.sleep if state.next_action is not None else 0.0
        if isinstance(error, ApiError):
            telemetry.count_retry(endpoint_of(error.endpoint or ""), _retry_reason(error))
        logger.warning(
            "Polygon %s failed (status %s, attempt %d of %d); retrying in %.2fs: %s",
            error.endpoint if isinstance(error, ApiError) else None,
            error.status if isinstance(error, ApiError) else None,
            state.attempt_number,
            self._max_retries + 1,
            sleep,
            error,
        )

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("PolygonClient is not open: use 'async with PolygonClient(...)'")
        return self._session

    def _redact(self, text: str) -> str:
        # Server text and transport errors are echoed into messages; a proxy that reflects the
        # request headers must still not leak the key into logs.
        if self._api_key:
            text = text.replace(self._api_key, "<redacted>")
        return text


def endpoint_of(path: str) -> str:
    """Return the path template ``path`` was made from, or ``"other"`` for a path not known."""
    for pattern, template in _ENDPOINTS:
        if pattern.match(path):
            return template
    return OTHER_ENDPOINT


def _retry_reason(error: ApiError) -> str:
    """Why an attempt is retried, for the retry metric: ``timeout``, ``connection``,
    ``payload`` (a 2xx body that is not JSON) or the HTTP status."""
    if isinstance(error.__cause__, TimeoutError):
        return "timeout"
    if isinstance(error.__cause__, aiohttp.ClientError):
        return "connection"
    if isinstance(error, PayloadError):
        return "payload"
    return str(error.status)


def _quote_segment(segment: str) -> str:
    """Percent-quote one validated path segment, keeping the ``:`` and ``.`` of tickers."""
    return quote(segment, safe=":.")


def _validate_any_ticker(ticker: str) -> str:
    """Validate a stock, index or option ticker, by its ``O:`` prefix."""
    if ticker.strip().upper().startswith("O:"):
        return validate_option_ticker(ticker)
    return validate_underlying(ticker)


def _request_id_of(body: Any) -> str | None:
    if isinstance(body, dict):
        request_id = body.get("request_id")
        if isinstance(request_id, str):
            return request_id
    return None


def _detail_of(body: Any, reason: str | None) -> str:
    """Return the API's own words for an error: its ``status`` and ``error`` or ``message``."""
    if isinstance(body, dict):
        parts = [
            text
            for text in (body.get("status"), body.get("error") or body.get("message"))
            if isinstance(text, str) and text
        ]
        if parts:
            return ": ".join(parts)[:_MAX_DETAIL_CHARS]
    return reason or "no detail"


def _parse_retry_after(value: str | None) -> float | None:
    """Return a numeric Retry-After in seconds; the HTTP-date form is ignored."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds
