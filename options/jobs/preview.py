"""A look without storing (``--dry-run``): what a job would store, read from the API and shown,
with no database at all.

Each underlying's listing or chain is read to its end, normalized by the same code the jobs use
and counted; the first rows are kept for display (:func:`options.ops.output.format_rows`).
Refused rows are counted and their reasons kept, as the jobs would keep them.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from options.api.normalize import (
    CONTRACT_COLUMNS,
    SNAPSHOT_COLUMNS,
    Rejected,
    SnapshotResult,
    decode_chain_page,
    epoch_microseconds,
    normalize_contracts,
    normalize_snapshot,
    snapshot_row,
)
from options.api.polygon import PolygonClient
from options.config import Settings
from options.errors import ApiError, KeyRejectedError
from options.jobs.filters import contract_underlying, listing_scope, market_today

logger = logging.getLogger(__name__)

SHOWN_SNAPSHOT_COLUMNS = (
    "ticker",
    "bid",
    "ask",
    "last_price",
    "implied_volatility",
    "delta",
    "gamma",
    "theta",
    "vega",
    "open_interest",
    "quote_updated_at",
    "underlying_price",
)


@dataclass
class Preview:
    """What a dry run read: per underlying its counts or error, and the first rows."""

    columns: tuple[str, ...]
    shown: tuple[str, ...]  # the columns a table shows
    rows: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every underlying was read to its end."""
        return not self.errors


async def preview_contracts(
    settings: Settings, client: PolygonClient, underlyings: Sequence[str], *, limit: int
) -> Preview:
    """List the contracts ``ingest_options`` would upsert for ``underlyings``.

    Args:
        limit: rows kept for display in all (0: every row).

    Raises:
        KeyRejectedError: the API refused the key.
    """
    preview = Preview(CONTRACT_COLUMNS, CONTRACT_COLUMNS[:7])
    today = market_today()
    for underlying in underlyings:
        try:
            scope = await listing_scope(settings, client, underlying, today=today)
            async for page in client.list_contracts(
                contract_underlying(underlying), scope.api_params()
            ):
                rows, refused = normalize_contracts(page.results, underlying=underlying)
                _count(preview, underlying, len(rows), [r.reason for r in refused])
                _keep(
                    preview, (dict(zip(CONTRACT_COLUMNS, row, strict=True)) for row in rows), limit
                )
        except KeyRejectedError:
            raise
        except ApiError as exc:
            preview.errors[underlying] = str(exc)
    return preview


async def preview_snapshots(
    settings: Settings, client: PolygonClient, underlyings: Sequence[str], *, limit: int
) -> Preview:
    """Read the chains ``ingest_snapshots`` would store for ``underlyings``, as of now.

    Args:
        limit: rows kept for display in all (0: every row).

    Raises:
        KeyRejectedError: the API refused the key.
    """
    preview = Preview(SNAPSHOT_COLUMNS, SHOWN_SNAPSHOT_COLUMNS)
    now = epoch_microseconds(dt.datetime.now(dt.UTC))
    today = market_today()
    for underlying in underlyings:
        key = contract_underlying(underlying)
        try:
            scope = await listing_scope(settings, client, underlying, today=today)
            async for page in client.chain_snapshot(
                underlying, scope.api_params(), decoder=decode_chain_page
            ):
                rows, reasons = _snapshot_rows(page.results, key, now)
                _count(preview, underlying, len(rows), reasons)
                _keep(preview, (_snapshot_dict(row) for row in rows), limit)
        except KeyRejectedError:
            raise
        except ApiError as exc:
            preview.errors[underlying] = str(exc)
    return preview


def _snapshot_rows(
    results: list[Any], key: str, captured_at: int
) -> tuple[list[tuple[Any, ...]], list[str]]:
    build = snapshot_row if results and type(results[0]) is SnapshotResult else normalize_snapshot
    rows, reasons = [], []
    for raw in results:
        try:
            rows.append(build(raw, underlying=key, captured_at=captured_at))
        except Rejected as exc:
            reasons.append(str(exc))
    return rows, reasons


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_TIMES = {i for i, name in enumerate(SNAPSHOT_COLUMNS) if name.endswith("_at")}


def _snapshot_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    """A snapshot row with its epoch-microsecond timestamps as datetimes."""
    return {
        name: (
            _EPOCH + dt.timedelta(microseconds=value)
            if i in _TIMES and value is not None
            else value
        )
        for i, (name, value) in enumerate(zip(SNAPSHOT_COLUMNS, row, strict=True))
    }


def _count(preview: Preview, underlying: str, stored: int, reasons: list[str]) -> None:
    preview.counts[underlying] = preview.counts.get(underlying, 0) + stored
    if reasons:
        preview.rejected[underlying] = preview.rejected.get(underlying, 0) + len(reasons)
        preview.reasons.extend(f"{underlying}: {reason}" for reason in reasons[:5])


def _keep(preview: Preview, rows: Any, limit: int) -> None:
    for row in rows:
        if limit and len(preview.rows) >= limit:
            return
        preview.rows.append(row)
