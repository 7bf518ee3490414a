"""Asyncio client for the Polygon (Massive) REST API: the endpoints, pagination and page guard.

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

This module holds the endpoints. Each request goes through
:class:`options.api.transport.Transport` (session, rate limit, retries, a ``polygon.request``
span and request metrics per attempt), which reads what a response means with
:mod:`options.api.responses`; a list query is followed from page to page by
:func:`options.api.pagination.paginate`, each page checked by :mod:`options.api.pages`. The
endpoints' paths are in :mod:`options.api.endpoints`.

Usage::

    async with PolygonClient(base_url=DEFAULT_BASE_URL, api_key=key) as client:
        async for page in client.chain_snapshot("SPY"):
            ...
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncGenerator, Mapping
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

from options.api.endpoints import (
    CHAIN_PATH,
    CONTRACTS_PATH,
    DAILY_BARS_PATH,
    MARKET_HOLIDAYS_PATH,
    MARKET_STATUS_PATH,
    PREVIOUS_CLOSE_PATH,
    endpoint_of,
)
from options.api.pages import Decoder, Page, check_path, encode_params
from options.api.pagination import paginate
from options.api.responses import request_id_of
from options.api.transport import Transport
from options.errors import PageShapeError
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

DEFAULT_BASE_URL: Final = "https://api.massive.com"
CONTRACTS_PAGE_LIMIT: Final = 1000
CHAIN_PAGE_LIMIT: Final = 250


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
        self._transport = Transport(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            rate_limit=rate_limit,
            concurrency=concurrency,
        )
        self._max_pages = max_pages

    def __repr__(self) -> str:
        # Written out so that the key can never show up through a default or dataclass repr.
        return f"PolygonClient(base_url={self._base_url!r})"

    @property
    def requests_sent(self) -> int:
        """HTTP requests actually sent, retries included."""
        return self._transport.requests_sent

    async def __aenter__(self) -> PolygonClient:
        """Open the HTTP session."""
        await self._transport.open()
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
        await self._transport.aclose()

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
                request_id=request_id_of(body),
            )
        return float(close)

    async def daily_bars(
        self, ticker: str, start: dt.date, end: dt.date
    ) -> tuple[list[dict[str, Any]], str]:
        """The daily bars of option ``ticker`` from ``start`` to ``end`` (New York days),
        oldest first, as the API sent them, and the request path (for errors). A day without
        a trade has no bar; a range without any has no ``results`` at all.

        Raises:
            ConfigError: the ticker is malformed (checked before any request).
            PageShapeError: ``results`` that is not a list of objects.
        """
        normalized = validate_option_ticker(ticker)
        path = DAILY_BARS_PATH.format(
            ticker=_quote_segment(normalized), start=start.isoformat(), end=end.isoformat()
        )
        body = await self.get_object(path, {"adjusted": "true", "sort": "asc", "limit": 50_000})
        results = body.get("results", [])
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            raise PageShapeError(
                f"{path} returned results that are not a list of bars",
                endpoint=path,
                status=200,
                request_id=request_id_of(body),
            )
        return results, path

    async def market_status_now(self) -> dict[str, Any]:
        """Return the current market status object (``/v1/marketstatus/now``)."""
        return await self.get_object(MARKET_STATUS_PATH)

    async def market_holidays(self) -> list[dict[str, Any]]:
        """Return the upcoming market holidays and early closes (``/v1/marketstatus/upcoming``).

        Raises:
            PageShapeError: the body is not a JSON list of objects.
        """
        body, request_id = await self._transport.get(
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
        body, request_id = await self._transport.get(
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

    def paginate(
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
        return paginate(self._transport, path, params, max_pages=self._max_pages, decoder=decoder)


def _quote_segment(segment: str) -> str:
    """Percent-quote one validated path segment, keeping the ``:`` and ``.`` of tickers."""
    return quote(segment, safe=":.")


def _validate_any_ticker(ticker: str) -> str:
    """Validate a stock, index or option ticker, by its ``O:`` prefix."""
    if ticker.strip().upper().startswith("O:"):
        return validate_option_ticker(ticker)
    return validate_underlying(ticker)
