"""Pure record builders: one API object in, one database row (a tuple) out.

Nothing here does I/O, so every rule about missing or malformed fields is unit-testable without
servers. A row the database cannot take is rejected with a reason rather than stored half-right.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, NamedTuple, TypeGuard

import msgspec
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
    ticker = contract_ticker(raw)
    if ticker is None:
        raise Rejected(f"ticker {raw.get('ticker')!r} is not an option ticker")
    additional = raw.get("additional_underlyings")
    additional_json = orjson.dumps(additional).decode() if additional is not None else None
    if additional_json is not None and "\\u0000" in additional_json:
        raise Rejected(f"{ticker}: additional_underlyings holds a NUL character (not in jsonb)")
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
        additional_json,
    )


class RefusedRecord(NamedTuple):
    """An API object that did not become a row: its ticker when readable, why, the object."""

    ticker: str | None
    reason: str
    raw: Any


def normalize_contracts(
    results: Iterable[Any], *, underlying: str
) -> tuple[list[ContractRow], list[RefusedRecord]]:
    """Normalize a page of contracts, keeping the last row of any ticker seen twice.

    Returns:
        The rows, and the refused objects (a refused object whose ticker could be read was
        listed all the same: its contract must not be taken for gone).
    """
    rows: dict[str, ContractRow] = {}
    refused = []
    for raw in results:
        try:
            row = normalize_contract(raw, underlying=underlying)
        except Rejected as exc:
            refused.append(RefusedRecord(contract_ticker(raw), str(exc), raw))
            continue
        rows[row[0]] = row
    return list(rows.values()), refused


def contract_ticker(raw: Any) -> str | None:
    """The option ticker of a contract object, when it has a readable one."""
    ticker = raw.get("ticker") if isinstance(raw, dict) else None
    return ticker if _is_text(ticker) and ticker.startswith("O:") else None


def _is_text(value: object) -> TypeGuard[str]:
    """A string PostgreSQL's text can hold: it has no NUL character."""
    return type(value) is str and "\x00" not in value


def _text(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None or _is_text(value):
        return value
    raise Rejected(f"{raw.get('ticker')!r}: {key} is {value!r}, not a string PostgreSQL can hold")


_INTEGER = range(-(2**31), 2**31)  # PostgreSQL's integer, as option_contracts.correction is


def _int(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None or (type(value) is int and value in _INTEGER):
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
    # numeric holds 131,072 digits before the point and 16,383 after: far from any price
    if not number.is_finite() or not -16_000 < number.adjusted() < 130_000:
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


SNAPSHOT_COLUMNS = (
    "ticker",
    "underlying_ticker",
    "captured_at",
    "bid",
    "bid_size",
    "ask",
    "ask_size",
    "midpoint",
    "quote_updated_at",
    "last_price",
    "last_size",
    "last_trade_at",
    "day_open",
    "day_high",
    "day_low",
    "day_close",
    "day_volume",
    "day_vwap",
    "day_change",
    "day_change_percent",
    "day_previous_close",
    "implied_volatility",
    "delta",
    "gamma",
    "theta",
    "vega",
    "open_interest",
    "break_even_price",
    "underlying_price",
    "fmv",
)

SnapshotRow = tuple[Any, ...]
"""A row of ``option_snapshots`` in :data:`SNAPSHOT_COLUMNS` order. Its three timestamps are
ints, microseconds since the Unix epoch: the COPY writer's connection encodes them as
``timestamptz`` (:func:`options.store.db.epoch_microsecond_timestamps`), four times faster than
``datetime`` objects."""
_EMPTY: dict[str, Any] = {}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)
_MAX_NANOSECONDS = 2**63 - 1  # 2262-04-11: any later "timestamp" is garbage


def epoch_microseconds(moment: dt.datetime) -> int:
    """``moment`` (timezone-aware) as microseconds since the Unix epoch, a row's timestamp."""
    return (moment - _EPOCH) // _MICROSECOND


def normalize_snapshot(raw: Any, *, underlying: str, captured_at: int) -> SnapshotRow:
    """Build an ``option_snapshots`` row from one ``/v3/snapshot/options/{underlying}`` result.

    Every market-data field may be missing (deep in-the-money contracts have no greeks, plans
    without quotes have no ``last_quote``, ``day`` is ``{}`` before the first trade): a missing
    field is NULL, never zero. Nanosecond timestamps become microseconds since the epoch.

    This is the snapshot job's path for a page the typed decoder refused (see
    :func:`snapshot_row` for the fast path), so every value is checked here
    (:func:`check_snapshot_row`): asyncpg would store a JSON ``true`` as 1.0 and truncate a
    fractional count without complaint.

    Args:
        raw: the result object as parsed from JSON.
        underlying: the ``underlying_ticker`` to store (as ``option_contracts`` has it).
        captured_at: the run's one timestamp, in microseconds since the epoch.

    Raises:
        Rejected: no ``details.ticker``, a section that is not an object, or a bad timestamp.
    """
    try:
        get = raw.get
        details = get("details") or _EMPTY
        ticker = details.get("ticker")
        if type(ticker) is not str or not ticker.startswith("O:"):
            raise Rejected(f"details.ticker {ticker!r} is not an option ticker")
        quote = get("last_quote") or _EMPTY
        trade = get("last_trade") or _EMPTY
        day = get("day") or _EMPTY
        greeks = get("greeks") or _EMPTY
        asset = get("underlying_asset") or _EMPTY
        spot = asset.get("price")
        quoted = quote.get("last_updated")
        traded = trade.get("sip_timestamp")
        row = (
            ticker,
            underlying,
            captured_at,
            quote.get("bid"),
            quote.get("bid_size"),
            quote.get("ask"),
            quote.get("ask_size"),
            quote.get("midpoint"),
            _ns(quoted) if quoted else None,
            trade.get("price"),
            trade.get("size"),
            _ns(traded) if traded else None,
            day.get("open"),
            day.get("high"),
            day.get("low"),
            day.get("close"),
            day.get("volume"),
            day.get("vwap"),
            day.get("change"),
            day.get("change_percent"),
            day.get("previous_close"),
            get("implied_volatility"),
            greeks.get("delta"),
            greeks.get("gamma"),
            greeks.get("theta"),
            greeks.get("vega"),
            get("open_interest"),
            get("break_even_price"),
            spot if spot is not None else asset.get("value"),
            get("fmv"),
        )
    except AttributeError:
        raise Rejected(f"a section of {_describe(raw)} is not an object") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise Rejected(f"{_describe(raw)}: {exc}") from None
    return check_snapshot_row(row)


_SNAPSHOT_KINDS = tuple(
    "text"
    if column in ("ticker", "underlying_ticker")
    else "int"
    if column.endswith(("_at", "_size", "_volume", "open_interest"))
    else "float"
    for column in SNAPSHOT_COLUMNS
)


def check_snapshot_row(row: SnapshotRow) -> SnapshotRow:
    """Validate a row from :func:`normalize_snapshot` column by column.

    Whole floats are accepted for integer columns, integers for float columns; a boolean, a
    string, a fractional count, a count past bigint and text with a NUL character are refused.

    Raises:
        Rejected: naming the ticker, the column and the value.
    """
    checked = list(row)
    for index, (kind, value) in enumerate(zip(_SNAPSHOT_KINDS, row, strict=True)):
        if value is None:
            continue
        try:
            if kind == "text":
                if not _is_text(value):
                    raise TypeError(f"{value!r} is not a string PostgreSQL can hold")
            else:
                checked[index] = _f(value) if kind == "float" else _i(value)
        except TypeError as exc:
            raise Rejected(f"{row[0]!r}: {SNAPSHOT_COLUMNS[index]} {exc}") from None
    return tuple(checked)


def _describe(raw: Any) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("details"), dict):
        return str(raw["details"].get("ticker"))
    return f"a {type(raw).__name__} result"


# a nanosecond timestamp: refused at decode time when out of range, so conversion cannot fail
Nanoseconds = Annotated[int, msgspec.Meta(ge=0, le=_MAX_NANOSECONDS)]


class _Quote(msgspec.Struct, gc=False):
    bid: float | None = None
    bid_size: int | None = None
    ask: float | None = None
    ask_size: int | None = None
    midpoint: float | None = None
    last_updated: Nanoseconds | None = None


class _Trade(msgspec.Struct, gc=False):
    price: float | None = None
    size: int | None = None
    sip_timestamp: Nanoseconds | None = None


class _Day(msgspec.Struct, gc=False):
    open: float | None = None
    high: float | None = None
    low: float | None = None
    close: float | None = None
    volume: int | None = None
    vwap: float | None = None
    change: float | None = None
    change_percent: float | None = None
    previous_close: float | None = None


class _Greeks(msgspec.Struct, gc=False):
    delta: float | None = None
    gamma: float | None = None
    theta: float | None = None
    vega: float | None = None


class _Asset(msgspec.Struct, gc=False):
    price: float | None = None
    value: float | None = None


class SnapshotDetails(msgspec.Struct, gc=False):
    """``details`` of a chain snapshot result: enough to make a contract row."""

    ticker: str
    contract_type: str | None = None
    exercise_style: str | None = None
    expiration_date: str | None = None
    shares_per_contract: float | None = None
    strike_price: float | None = None


class SnapshotResult(msgspec.Struct, gc=False):
    """One chain snapshot result with the types the API documents; unknown fields ignored."""

    details: SnapshotDetails
    last_quote: _Quote | None = None
    last_trade: _Trade | None = None
    day: _Day | None = None
    greeks: _Greeks | None = None
    underlying_asset: _Asset | None = None
    implied_volatility: float | None = None
    open_interest: int | None = None
    break_even_price: float | None = None
    fmv: float | None = None


class ChainPage(msgspec.Struct):
    """A ``/v3/snapshot/options/{underlying}`` page, decoded and type-checked in one pass."""

    results: list[SnapshotResult]
    next_url: str | None = None
    request_id: str | None = None


decode_chain_page = msgspec.json.Decoder(ChainPage).decode
"""The snapshot job's fast path: bytes to :class:`ChainPage`; raises ValueError on any
surprise (then the page is parsed as plain JSON and checked row by row)."""

_NO_QUOTE, _NO_TRADE, _NO_DAY, _NO_GREEKS, _NO_ASSET = (
    _Quote(),
    _Trade(),
    _Day(),
    _Greeks(),
    _Asset(),
)


def snapshot_row(result: SnapshotResult, *, underlying: str, captured_at: int) -> SnapshotRow:
    """Build an ``option_snapshots`` row from a typed result (see :func:`normalize_snapshot`).

    Raises:
        Rejected: the ticker is not an option ticker.
    """
    ticker = result.details.ticker
    if not ticker.startswith("O:"):
        raise Rejected(f"details.ticker {ticker!r} is not an option ticker")
    quote = result.last_quote or _NO_QUOTE
    trade = result.last_trade or _NO_TRADE
    day = result.day or _NO_DAY
    greeks = result.greeks or _NO_GREEKS
    asset = result.underlying_asset or _NO_ASSET
    quoted = quote.last_updated
    traded = trade.sip_timestamp
    # inline _ns(): this runs for every row of every snapshot; 0 means unset
    quoted_at = quoted // 1000 if quoted else None
    traded_at = traded // 1000 if traded else None
    return (
        ticker,
        underlying,
        captured_at,
        quote.bid,
        quote.bid_size,
        quote.ask,
        quote.ask_size,
        quote.midpoint,
        quoted_at,
        trade.price,
        trade.size,
        traded_at,
        day.open,
        day.high,
        day.low,
        day.close,
        day.volume,
        day.vwap,
        day.change,
        day.change_percent,
        day.previous_close,
        result.implied_volatility,
        greeks.delta,
        greeks.gamma,
        greeks.theta,
        greeks.vega,
        result.open_interest,
        result.break_even_price,
        asset.price if asset.price is not None else asset.value,
        result.fmv,
    )


QUALITY_CHECKS = (
    "crossed_quotes",
    "negative_prices",
    "iv_out_of_range",
    "negative_open_interest",
    "stale_quotes",
    "greeks_missing",
)
"""What :func:`count_quality` counts, in its order (the ``snapshot_coverage`` columns)."""

_BID, _ASK, _LAST, _QUOTED, _IV, _DELTA, _OI = (
    SNAPSHOT_COLUMNS.index(name)
    for name in (
        "bid",
        "ask",
        "last_price",
        "quote_updated_at",
        "implied_volatility",
        "delta",
        "open_interest",
    )
)


def count_quality(rows: Iterable[SnapshotRow], *, quoted_after: int) -> tuple[int, ...]:
    """Count the rows with each problem of :data:`QUALITY_CHECKS`: a crossed quote (bid above
    ask), a negative bid, ask or last price, an IV outside (0, 10], a negative open interest, a
    quote older than ``quoted_after`` (epoch microseconds), greeks missing where a quote exists.

    The rows are stored as they are: these counts only say how much of a chain to trust.
    """
    crossed = negative = iv_out = oi_negative = stale = no_greeks = 0
    for row in rows:
        bid, ask = row[_BID], row[_ASK]
        if bid is not None and ask is not None:
            if bid > ask:
                crossed += 1
        if (
            (bid is not None and bid < 0)
            or (ask is not None and ask < 0)
            or (row[_LAST] is not None and row[_LAST] < 0)
        ):
            negative += 1
        iv = row[_IV]
        if iv is not None and not 0 < iv <= 10:
            iv_out += 1
        if row[_OI] is not None and row[_OI] < 0:
            oi_negative += 1
        quoted = row[_QUOTED]
        if quoted is not None:
            if quoted < quoted_after:
                stale += 1
            if row[_DELTA] is None:
                no_greeks += 1
    return crossed, negative, iv_out, oi_negative, stale, no_greeks


def snapshot_contract(raw: dict[str, Any] | SnapshotResult, *, underlying: str) -> ContractRow:
    """Build an ``option_contracts`` row from a snapshot's ``details``, for a contract the daily
    sync has not seen yet.

    Raises:
        Rejected: the details do not make a valid contract row.
    """
    if isinstance(raw, SnapshotResult):
        details: Any = msgspec.structs.asdict(raw.details)
    else:
        details = raw.get("details")
        if not isinstance(details, dict):
            raise Rejected("snapshot without a details object")
        details = dict(details)
    details.setdefault("underlying_ticker", underlying)
    return normalize_contract(details, underlying=underlying)


_BIGINT = range(-(2**63), 2**63)


def _f(value: Any) -> float | None:
    # type() rather than isinstance(): bool is an int, and must not pass as a price
    kind = type(value)
    if kind is float or value is None:
        return value
    if kind is int and abs(value) < 2**1023:
        return float(value)
    raise TypeError(f"{value!r} is not a number")


def _i(value: Any) -> int | None:
    kind = type(value)
    if kind is float and value.is_integer():
        value = int(value)
    elif kind is not int:
        if value is None:
            return None
        raise TypeError(f"{value!r} is not a whole number")
    if value not in _BIGINT:
        raise TypeError(f"{value!r} is out of the bigint range")
    return value


def _ns(value: Any) -> int | None:
    """Nanoseconds since the epoch to microseconds; 0 is how an unset timestamp arrives: it
    is unknown, not 1970."""
    if value is None or value == 0:
        return None
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int or not 0 < value <= _MAX_NANOSECONDS:
        raise ValueError(f"{value!r} is not a nanosecond timestamp")
    return value // 1000
