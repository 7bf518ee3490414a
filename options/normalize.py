"""Pure record builders: one API object in, one database row (a tuple) out.

Nothing here does I/O, so every rule about missing or malformed fields is unit-testable without
servers. A row the database cannot take is rejected with a reason rather than stored half-right.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

CONTRACT_COLUMNS = (
    "ticker",
    "underlying_ticker",
    "contract_type",
    "exercise_style",
    "expiration_date",
    "strike_price",
    "shares_per_contract",
    "primary_exchange",
    "cfi",
    "correction",
    "additional_underlyings",
)

ContractRow = tuple[
    str,
    str,
    str | None,
    str | None,
    dt.date | None,
    Decimal | None,
    Decimal | None,
    str | None,
    str | None,
    int | None,
    str | None,
]


class Rejected(ValueError):
    """An API object that cannot become a row; the message says why."""


def normalize_contract(raw: Any, *, underlying: str) -> ContractRow:
    """Build an ``option_contracts`` row from one ``/v3/reference/options/contracts`` result.

    Args:
        raw: the result object as parsed from JSON.
        underlying: the underlying the listing was asked for; used when the object has no
            ``underlying_ticker`` of its own.

    Raises:
        Rejected: the object has no usable ticker or a field of the wrong type.
    """
    if not isinstance(raw, dict):
        raise Rejected(f"result is a {type(raw).__name__}, not an object")
    ticker = raw.get("ticker")
    if not isinstance(ticker, str) or not ticker.startswith("O:"):
        raise Rejected(f"ticker {ticker!r} is not an option ticker")
    additional = raw.get("additional_underlyings")
    return (
        ticker,
        _text(raw, "underlying_ticker") or underlying,
        _text(raw, "contract_type"),
        _text(raw, "exercise_style"),
        _date(raw, "expiration_date"),
        _decimal(raw, "strike_price"),
        _decimal(raw, "shares_per_contract"),
        _text(raw, "primary_exchange"),
        _text(raw, "cfi"),
        _int(raw, "correction"),
        orjson.dumps(additional).decode() if additional is not None else None,
    )


def normalize_contracts(
    results: Iterable[Any], *, underlying: str
) -> tuple[list[ContractRow], list[str]]:
    """Normalize a page of contracts, keeping the last row of any ticker seen twice.

    Returns:
        The rows, and one reason per rejected object.
    """
    rows: dict[str, ContractRow] = {}
    rejects = []
    for raw in results:
        try:
            row = normalize_contract(raw, underlying=underlying)
        except Rejected as exc:
            rejects.append(str(exc))
            continue
        rows[row[0]] = row
    return list(rows.values()), rejects


def _text(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None or isinstance(value, str):
        return value
    raise Rejected(f"{raw.get('ticker')}: {key} is {value!r}, not a string")


def _int(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise Rejected(f"{raw.get('ticker')}: {key} is {value!r}, not an integer")


def _decimal(raw: dict[str, Any], key: str) -> Decimal | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise Rejected(f"{raw.get('ticker')}: {key} is {value!r}, not a number")
    try:
        # str() first: Decimal(0.1) would keep the binary float's noise
        number = Decimal(str(value))
    except InvalidOperation:
        raise Rejected(f"{raw.get('ticker')}: {key} is {value!r}, not a number") from None
    if not number.is_finite():
        raise Rejected(f"{raw.get('ticker')}: {key} is {value!r}, not a finite number")
    return number


def _date(raw: dict[str, Any], key: str) -> dt.date | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise Rejected(f"{raw.get('ticker')}: {key} is {value!r}, not a YYYY-MM-DD date")
