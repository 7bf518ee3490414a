"""Rows shown to a person or a program: an aligned table, JSON, or one compact line per row."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

OUTPUT_FORMATS = ("table", "json", "compact")


def format_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], fmt: str) -> str:
    """``rows`` as text in ``fmt``: ``table`` and ``compact`` show ``columns``, ``json`` every
    field (a JSON array; timestamps ISO 8601, exact decimals as strings)."""
    if fmt == "json":
        return json.dumps([dict(row) for row in rows], default=_json_value, indent=1)
    if fmt == "compact":
        return "\n".join(
            " ".join(
                [str(row[columns[0]])]
                + [f"{c}={_cell(row[c])}" for c in columns[1:] if row.get(c) is not None]
            )
            for row in rows
        )
    table = [list(columns)] + [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
