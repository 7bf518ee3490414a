"""What one HTTP response of the API means: its decoded JSON body, or the project error it is.

Pure functions, no I/O: :class:`options.api.transport.Transport` reads the response and these
decide what it holds. A 2xx body that is not JSON is a :class:`~options.errors.PayloadError`
(retried); 401, 403, 429, 5xx and the other 4xx map onto the error tree of
:mod:`options.errors`, each carrying the endpoint, status and the API's request id.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

import orjson

from options.errors import (
    AuthError,
    KeyRejectedError,
    PayloadError,
    PermanentApiError,
    RateLimitedError,
    TransientApiError,
)

# Server-provided text in error messages is capped so an HTML error page cannot flood a log line.
_MAX_DETAIL_CHARS: Final = 300


def classify_response(
    path: str,
    status: int,
    raw: bytes,
    *,
    reason: str | None,
    retry_after: str | None,
    header_request_id: str | None,
    page: int | None,
    redact: Callable[[str], str],
) -> tuple[Any, str | None]:
    """Return the decoded body of a 2xx response and its request id, or raise the error its
    status means.

    Args:
        path: the request path, named in the error.
        status: the HTTP status.
        raw: the response body.
        reason: the HTTP reason phrase, the detail when the body gives none.
        retry_after: the ``Retry-After`` header of a 429.
        header_request_id: the ``X-Request-Id`` header, when the body has no ``request_id``.
        page: the page number of a list query, or ``None``.
        redact: removes secrets from server text before it goes into a message.

    Raises:
        PayloadError: a 2xx body that is not valid JSON.
        KeyRejectedError: 401.
        AuthError: 403.
        RateLimitedError: 429.
        TransientApiError: 5xx.
        PermanentApiError: any other status.
    """
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
        decoded = False
    else:
        decoded = True
    request_id = request_id_of(body) or header_request_id
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

    detail = redact(_detail_of(body, reason))
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


def request_id_of(body: Any) -> str | None:
    """Return the ``request_id`` of a decoded JSON object, when it has a string one."""
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
