"""Rows the jobs refused, kept in ``rejected_rows`` with the record as received and the reason.

Rejects are written inside the transaction that stores the rest of their chain or underlying,
so they are kept exactly when the data around them is. Each run keeps at most
:data:`KEPT_PER_RUN` of them (the counts in ``ingest_runs`` and ``snapshot_coverage`` are
complete either way): a page of garbage should not fill the disk.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import orjson

KEPT_PER_RUN = 1000
MAX_RECORD_CHARS = 10_000


@dataclass(frozen=True)
class Reject:
    """One refused record: its ticker when it could be read, why, and the record itself."""

    ticker: str | None
    reason: str
    record: str

    @classmethod
    def of(cls, raw: Any, reason: str, *, ticker: str | None = None) -> Reject:
        """A reject of ``raw`` (a decoded API object, a typed struct or a row tuple)."""
        return cls(ticker, reason, record_text(raw))


def record_text(raw: Any) -> str:
    """``raw`` as JSON text PostgreSQL's text can hold (a NUL stays escaped), cut short when
    very long."""
    try:
        text = msgspec.json.encode(raw).decode()
    except (TypeError, ValueError, OverflowError):
        text = orjson.dumps(raw, default=repr).decode()
    if len(text) > MAX_RECORD_CHARS:
        text = text[: MAX_RECORD_CHARS - 1] + "…"
    return text


class RejectBudget:
    """How many more rejects this run may keep (the rest are only counted)."""

    def __init__(self, limit: int = KEPT_PER_RUN) -> None:
        self.left = limit

    def take_one(self) -> bool:
        """Whether one more reject may be kept (and spend it)."""
        if self.left <= 0:
            return False
        self.left -= 1
        return True


async def keep_rejects(
    conn: asyncpg.Connection,
    run_id: int,
    rejects: Sequence[Reject],
    *,
    underlying: str | None,
    captured_at: dt.datetime | int | None = None,
) -> None:
    """Insert ``rejects`` (already cut to the run's budget) in the caller's transaction.

    ``captured_at`` is whatever the connection's ``timestamptz`` codec takes (an int on the
    snapshot writer's connection).
    """
    if not rejects:
        return
    await conn.executemany(
        """
        INSERT INTO rejected_rows (run_id, underlying_ticker, captured_at, ticker, reason, record)
        VALUES ($1, $2, $3, $4, $5, $6)
        """,
        [(run_id, underlying, captured_at, r.ticker, r.reason, r.record) for r in rejects],
    )
