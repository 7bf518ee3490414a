"""One page of a list endpoint: its shape check and the ``next_url`` cursor to the next.

Pure functions, no I/O: :class:`options.api.polygon.PolygonClient` sends the requests, and these
decide what a page holds, whether it is the last, and what the next request may ask for. A page
that does not look like a page is an error here, never taken for the end of a chain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from options.errors import PageShapeError, PaginationError

Query = list[tuple[str, str]]
"""A request's query string as ordered ``(name, value)`` pairs."""

Decoder = Callable[[bytes], Any]
"""Turns a 2xx body into a typed page, or raises ValueError
(see :meth:`options.api.polygon.PolygonClient.paginate`)."""

_JSON_TYPES = (dict, list, str, int, float, bool, type(None))


@dataclass(frozen=True)
class Page:
    """One parsed page of a list endpoint.

    Attributes:
        results: the page's rows, as the API sent them.
        number: the 1-based page number within this query.
        request_id: the API's ``request_id`` for this page, when it sent one.
        has_next: the page carried a ``next_url``, so it is not the last page.
    """

    results: list[dict[str, Any]]
    number: int
    request_id: str | None
    has_next: bool


def check_path(path: str) -> None:
    """Refuse a path that could leave the API's tree or smuggle a query."""
    segments = path.split("/")
    if (
        not path.startswith("/")
        or "?" in path
        or "#" in path
        or any(unquote(segment) in (".", "..") for segment in segments)
    ):
        raise ValueError(f"not an API path: {path!r}")


def encode_params(params: Mapping[str, str | int]) -> Query:
    """Turn query parameters into string pairs, the way the API spells booleans."""
    query: Query = []
    for key, value in params.items():
        if key.lower() == "apikey":
            # The key goes in the Authorization header only; a URL ends up in logs and traces.
            raise ValueError("the API key must not be sent as a query parameter")
        if isinstance(value, bool):
            query.append((key, "true" if value else "false"))
        else:
            query.append((key, str(value)))
    return query


def parse_page(
    path: str, body: Any, number: int, request_id: str | None
) -> tuple[Page, str | None]:
    """Check a list page's shape and return it with its ``next_url``."""
    if not isinstance(body, _JSON_TYPES):  # a typed page from a decoder: its types are checked
        page = Page(
            results=body.results,
            number=number,
            request_id=request_id,
            has_next=body.next_url is not None,
        )
        return page, body.next_url
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list):
        what = "no results list" if results is None else f"results of type {type(results).__name__}"
        raise PageShapeError(
            f"{path} page {number} has {what}; not taken for an empty or last page",
            endpoint=path,
            status=200,
            request_id=request_id,
        )
    assert isinstance(body, dict)
    next_url = body.get("next_url")
    # Only absence or null means "last page": anything else unexpected must stop the walk
    # rather than silently truncate the chain.
    if next_url is not None and (not isinstance(next_url, str) or not next_url):
        raise PageShapeError(
            f"{path} page {number} has an unusable next_url ({next_url!r})",
            endpoint=path,
            status=200,
            request_id=request_id,
        )
    page = Page(
        results=results, number=number, request_id=request_id, has_next=next_url is not None
    )
    return page, next_url


def cursor_query(path: str, next_url: str, number: int, request_id: str | None) -> Query:
    """Return the query of ``next_url``, after checking it continues the same query."""
    parts = urlsplit(next_url)
    if unquote(parts.path) != unquote(path):
        raise PaginationError(
            f"{path} page {number} has a next_url on another path ({parts.path!r})",
            endpoint=path,
            status=200,
            request_id=request_id,
        )
    # Dropping apiKey defends against a server that echoes a query-string key into next_url.
    query = [
        (key, value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
        if key.lower() != "apikey"
    ]
    if not query:
        raise PaginationError(
            f"{path} page {number} has a next_url without a cursor",
            endpoint=path,
            status=200,
            request_id=request_id,
        )
    return query
