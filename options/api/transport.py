"""One GET to the Polygon (Massive) REST API: session, rate limit, concurrency cap and retries.

:class:`Transport` is what :class:`options.api.polygon.PolygonClient` sends its requests
through. It guarantees that

- every attempt has a real timeout, and exhausted retries raise the project's own errors
  (:mod:`options.errors`), never ``tenacity.RetryError`` or an aiohttp exception;
- only transient failures (timeouts, dropped connections, 429, 5xx, unreadable JSON) are retried,
  with jittered exponential backoff that honours ``Retry-After``;
- the API key travels only in the ``Authorization`` header, to the configured host, never
  through a redirect, and is redacted from any server or transport text put into a message.

Each attempt is a ``polygon.request`` span and counts in the request metrics of
:mod:`options.ops.telemetry` under the path template it is given (see
:func:`options.api.endpoints.endpoint_of`); both cost nothing while telemetry is off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import aiohttp
from aiolimiter import AsyncLimiter
from opentelemetry import trace
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from options.api.endpoints import endpoint_of
from options.api.pages import Decoder, Query
from options.api.responses import classify_response
from options.errors import ApiError, PayloadError, RateLimitedError, TransientApiError
from options.ops import telemetry

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

# Connecting should never take long; a dead host is better retried early than waited on for the
# whole request budget.
_MAX_CONNECT_TIMEOUT: Final = 10.0


class Transport:
    """Sends GET requests to one API host with a timeout, limits and retries.

    Open it with :meth:`open` and close it with :meth:`aclose`; nothing connects at
    construction time.

    Args:
        base_url: scheme and host of the API; every request goes to this host.
        api_key: sent as ``Authorization: Bearer ...`` and nowhere else.
        timeout: seconds allowed for one whole attempt (connect, send, read the body).
        max_retries: retries after the first attempt for transient errors.
        backoff_initial: multiplier of the jittered exponential backoff, in seconds.
        backoff_max: cap of one backoff wait, and of an honoured ``Retry-After``.
        rate_limit: ``(requests, per_seconds)`` allowed, retries included; ``None`` disables
            the limit.
        concurrency: most requests in flight at once (and connections in the pool).

    Attributes:
        requests_sent: HTTP requests actually sent, retries included.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        timeout: float,
        max_retries: int,
        backoff_initial: float,
        backoff_max: float,
        rate_limit: tuple[float, float] | None,
        concurrency: int,
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
        self._session: aiohttp.ClientSession | None = None
        self.requests_sent = 0

    def __repr__(self) -> str:
        # Written out so that the key can never show up through a default or dataclass repr.
        return f"Transport(base_url={self._base_url!r})"

    async def open(self) -> None:
        """Open the HTTP session, unless it is open already."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._concurrency),
                headers={
                    "Authorization": f"Bearer {self._api_key}",
                    "Accept": "application/json",
                },
                timeout=self._timeout,
            )

    async def aclose(self) -> None:
        """Close the HTTP session; safe to call twice."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def get(
        self,
        path: str,
        query: Query,
        *,
        page: int | None,
        endpoint: str,
        decoder: Decoder | None = None,
    ) -> tuple[Any, str | None]:
        """Send one GET with retries and return the decoded JSON body and its request id.

        Args:
            path: the request path, already checked and quoted.
            query: the query string.
            page: the page number of a list query (for spans and messages), or ``None``.
            endpoint: the path template the attempts are counted under.
            decoder: a typed fast path for a 2xx body (see
                :meth:`options.api.polygon.PolygonClient.paginate`).

        Raises:
            TransientApiError: retries exhausted (its subclasses say why).
            PermanentApiError: a 4xx other than 429.
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
                return classify_response(
                    path,
                    status,
                    raw,
                    reason=reason,
                    retry_after=retry_after,
                    header_request_id=header_request_id,
                    page=page,
                    redact=self._redact,
                )

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
