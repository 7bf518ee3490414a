"""The paths of the Polygon (Massive) REST endpoints the client calls, and their metric labels.

Request metrics and retry counts (:mod:`options.ops.telemetry`) are labelled with a path
template (``/v3/snapshot/options/{underlying}``), never with a path that holds a ticker or a
query: :func:`endpoint_of` maps a request path back to its template.
"""

from __future__ import annotations

import re
from typing import Final

CONTRACTS_PATH: Final = "/v3/reference/options/contracts"
CHAIN_PATH: Final = "/v3/snapshot/options/{underlying}"
PREVIOUS_CLOSE_PATH: Final = "/v2/aggs/ticker/{ticker}/prev"
DAILY_BARS_PATH: Final = "/v2/aggs/ticker/{ticker}/range/1/day/{start}/{end}"
MARKET_STATUS_PATH: Final = "/v1/marketstatus/now"
MARKET_HOLIDAYS_PATH: Final = "/v1/marketstatus/upcoming"
# What the request metrics are labelled with: a path template, so a ticker never becomes a label.
_ENDPOINTS: Final = tuple(
    (re.compile("[^/]+".join(map(re.escape, re.split(r"\{\w+\}", template))) + "$"), template)
    for template in (
        CONTRACTS_PATH,
        CHAIN_PATH,
        PREVIOUS_CLOSE_PATH,
        DAILY_BARS_PATH,
        MARKET_STATUS_PATH,
        MARKET_HOLIDAYS_PATH,
    )
)
OTHER_ENDPOINT: Final = "other"


def endpoint_of(path: str) -> str:
    """Return the path template ``path`` was made from, or ``"other"`` for a path not known."""
    for pattern, template in _ENDPOINTS:
        if pattern.match(path):
            return template
    return OTHER_ENDPOINT
