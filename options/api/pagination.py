"""Following a list query from page to page by its ``next_url``, with the guards against loops.

:func:`paginate` sends each page's request through a :class:`~options.api.transport.Transport`
and checks each page with :mod:`options.api.pages`. A ``next_url`` contributes only its path and
query, never its host, so the API key never leaves the configured host; a cursor seen before, or
more pages than allowed, is a :class:`~options.errors.PaginationError`, never a silent end.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping

from options.api.endpoints import endpoint_of
from options.api.pages import Decoder, Page, check_path, cursor_query, encode_params, parse_page
from options.api.transport import Transport
from options.errors import PaginationError

logger = logging.getLogger(__name__)


async def paginate(
    transport: Transport,
    path: str,
    params: Mapping[str, str | int],
    *,
    max_pages: int,
    decoder: Decoder | None = None,
) -> AsyncGenerator[Page, None]:
    """Yield the pages of one list query, following ``next_url``, as each one is parsed.

    See :meth:`options.api.polygon.PolygonClient.paginate`, which this implements.

    Args:
        transport: sends each page's request.
        path: the request path of the first page, already quoted.
        params: the query parameters of the first page.
        max_pages: most pages the query may have before it is taken for a loop.
        decoder: a typed fast path for a page's body.

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
        body, request_id = await transport.get(
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
        if number >= max_pages:
            raise PaginationError(
                f"{path} has more than {max_pages} pages; taken for a next_url loop",
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
