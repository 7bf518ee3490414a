"""A read's rows for a person or a program: an aligned table, CSV, JSON or Parquet.

Every time is shown in New York time:

- ``table``: the columns a person reads (:data:`CHAIN_COLUMNS`, :data:`HISTORY_COLUMNS`) under
  short headers, times as ``2026-11-20 15:30:02 EST``, numbers to six significant digits;
- ``csv``: every column of ``snapshot_read`` under its own name, times in ISO 8601 with New
  York's offset and microseconds (``2026-11-20T15:30:02.123456-05:00``), numbers as Python
  writes them (the shortest text that reads back to the same double), empty for NULL;
- ``json``: an array of objects, every column, times as in CSV, NULL as ``null``;
- ``parquet``: every column with its type, times as ``timestamp[us, tz=America/New_York]``
  (instants; the zone is the column's metadata), zstd-compressed.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.parquet as pq

from options.ops.output import format_rows

MARKET_TZ = ZoneInfo("America/New_York")
READ_FORMATS = ("table", "csv", "json", "parquet")
EXPORT_FORMATS = ("parquet", "csv")
TABLE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S %Z"

CHAIN_COLUMNS: Mapping[str, str] = {
    "ticker": "ticker",
    "expiration": "expiration_date",
    "strike": "strike_price",
    "type": "contract_type",
    "bid": "bid",
    "ask": "ask",
    "last": "last_price",
    "volume": "day_volume",
    "oi": "open_interest",
    "iv": "implied_volatility",
    "delta": "delta",
    "gamma": "gamma",
    "theta": "theta",
    "vega": "vega",
}
"""The table of a chain: header -> column."""
HISTORY_COLUMNS: Mapping[str, str] = {
    "captured_at": "captured_at",
    "bid": "bid",
    "ask": "ask",
    "last": "last_price",
    "volume": "day_volume",
    "oi": "open_interest",
    "iv": "implied_volatility",
    "delta": "delta",
    "gamma": "gamma",
    "theta": "theta",
    "vega": "vega",
    "spot": "underlying_price",
}
"""The table of one contract's history: header -> column."""


def format_table(table: pa.Table, columns: Mapping[str, str]) -> str:
    """``columns`` (header -> column) of ``table`` as an aligned text table."""
    rows = [
        {header: table_cell(row[column]) for header, column in columns.items()}
        for row in table.to_pylist()
    ]
    return format_rows(rows, list(columns), "table")


def table_cell(value: Any) -> Any:
    """What :func:`format_table` hands to the table for ``value``: a time as New York text,
    anything else as it is (the table shows floats to six significant digits)."""
    if isinstance(value, dt.datetime):
        return value.astimezone(MARKET_TZ).strftime(TABLE_TIME_FORMAT)
    return value


def format_csv(table: pa.Table) -> str:
    """Every column of ``table`` as CSV with a header line."""
    out = io.StringIO()
    _write_csv(table, out, header=True)
    return out.getvalue()


def format_json(table: pa.Table) -> str:
    """Every column of ``table`` as a JSON array of objects."""
    rows = [{k: _in_new_york(v) for k, v in row.items()} for row in table.to_pylist()]
    return format_rows(rows, table.column_names, "json")


def write_parquet(table: pa.Table, path: Path) -> None:
    """``table`` as one zstd Parquet file at ``path``, times in New York; written to a
    temporary file beside it and renamed, so ``path`` is never half-written."""
    _atomically(path, lambda tmp: pq.write_table(in_new_york(table), tmp, compression="zstd"))


def write_csv(table: pa.Table, path: Path) -> None:
    """``table`` as CSV at ``path``, written atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as out:
            _write_csv(table, out, header=True)

    _atomically(path, write)


def render(
    table: pa.Table, fmt: str, *, columns: Mapping[str, str], out: Path | None
) -> str | None:
    """Show ``table`` in ``fmt``: return the text for stdout, or write ``out`` and return
    ``None``. ``parquet`` needs ``out`` (the caller checks)."""
    if fmt == "parquet":
        assert out is not None, "parquet needs a file"
        write_parquet(table, out)
        return None
    if fmt == "table":
        text = format_table(table, columns)
    elif fmt == "csv":
        text = format_csv(table)
    else:
        text = format_json(table)
    if out is None:
        return text
    _atomically(out, lambda tmp: Path(tmp).write_text(_with_newline(text), encoding="utf-8"))
    return None


def in_new_york(table: pa.Table) -> pa.Table:
    """``table`` with its timestamp columns in New York (the same instants)."""
    fields = [
        pa.field(f.name, pa.timestamp(f.type.unit, tz=str(MARKET_TZ)))
        if pa.types.is_timestamp(f.type)
        else f
        for f in table.schema
    ]
    return table.cast(pa.schema(fields))


def _write_csv(table: pa.Table, out: Any, *, header: bool) -> None:
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(table.column_names)
    for batch in table.to_batches(max_chunksize=10_000):
        writer.writerows([_csv_value(v) for v in row.values()] for row in batch.to_pylist())


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.astimezone(MARKET_TZ).isoformat(timespec="microseconds")
    if isinstance(value, float):
        return repr(value)
    return value


def _in_new_york(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(MARKET_TZ)
    return value


def _with_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _atomically(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
