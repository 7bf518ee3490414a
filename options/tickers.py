"""Ticker validation: the only door through which a ticker reaches a URL or a query.

A ticker is checked against a strict pattern before any request is built, so input such as
``../x`` or ``AAPL/..`` can never become part of a request path.
"""

from __future__ import annotations

import re

from options.errors import ConfigError

UNDERLYING_PATTERN = re.compile(r"(?:I:)?[A-Z][A-Z0-9]{0,9}(?:\.[A-Z0-9]{1,3})?")
OPTION_TICKER_PATTERN = re.compile(r"O:[A-Z][A-Z0-9]{0,9}\d{6}[CP]\d{8}")
UNDERLYING_FORM = (
    "up to 10 letters and digits starting with a letter, an optional class suffix "
    "such as BRK.B, or an index such as I:SPX"
)
OPTION_TICKER_FORM = "O:<root><YYMMDD><C|P><strike x 1000 as 8 digits>, e.g. O:AAPL230616C00150000"


def validate_underlying(ticker: str) -> str:
    """Return the underlying ticker normalized to upper case.

    Raises:
        ConfigError: the ticker does not have the accepted form.
    """
    normalized = ticker.strip().upper()
    if not UNDERLYING_PATTERN.fullmatch(normalized):
        raise ConfigError(f"invalid underlying ticker {ticker!r}: expected {UNDERLYING_FORM}")
    return normalized


def validate_option_ticker(ticker: str) -> str:
    """Return the option contract ticker normalized to upper case.

    Raises:
        ConfigError: the ticker does not have the accepted form.
    """
    normalized = ticker.strip().upper()
    if not OPTION_TICKER_PATTERN.fullmatch(normalized):
        raise ConfigError(f"invalid option ticker {ticker!r}: expected {OPTION_TICKER_FORM}")
    return normalized
