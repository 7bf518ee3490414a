"""The tracked underlyings (``tracked_underlyings``): the set both jobs work on.

A ticker is tracked because ``UNDERLYINGS`` names it (origin ``UNDERLYINGS``) or because an
operator added it (``ingest_admin underlyings add``, origin ``admin``). Its
``underlying_ticker`` is the underlying as its contracts and snapshots name it (``I:SPX`` is
tracked, ``SPX`` is in the data). Each job start mirrors ``UNDERLYINGS`` into the table
(:func:`sync_configured`): a ticker it names is added, or enabled again if it was only disabled
for being left out; a ticker of origin ``UNDERLYINGS`` that it no longer names is disabled. An
operator's ``disable`` sticks until ``enable``. A one-off run with ``--underlying`` never
changes the table. The jobs keep each row's last contract sync, last snapshot, last complete
snapshot and last error up to date, in the transactions that store the data.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from options.errors import ConfigError
from options.store.db import bounded_db_connection

logger = logging.getLogger(__name__)

_SYNC_LOCK_KEY = 0x6F7074686973_20  # serialises concurrent syncs of the table


@dataclass(frozen=True)
class Tracked:
    """One row of ``tracked_underlyings``, as ``ingest_admin underlyings list`` shows it."""

    ticker: str
    enabled: bool
    origin: str
    disabled_by: str | None
    last_contract_sync_at: dt.datetime | None
    last_snapshot_at: dt.datetime | None
    last_complete_snapshot_at: dt.datetime | None
    last_error: str | None
    last_error_at: dt.datetime | None


def root(ticker: str) -> str:
    """The underlying as its contracts name it (``I:SPX`` -> ``SPX``)."""
    return ticker.removeprefix("I:")


@bounded_db_connection("mirroring UNDERLYINGS into the tracked underlyings")
async def sync_configured(conn: asyncpg.Connection, configured: Sequence[str]) -> list[str]:
    """Mirror ``UNDERLYINGS`` into the table; return the enabled tickers afterwards.

    An empty ``UNDERLYINGS`` changes nothing (a shell without the usual environment must not
    disable every underlying); to stop tracking one, leave it out of a non-empty
    ``UNDERLYINGS`` or disable it.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SYNC_LOCK_KEY)
        if configured:
            rows = await conn.fetch(
                "SELECT ticker, origin, enabled, disabled_by FROM tracked_underlyings"
            )
            by_root = {root(row["ticker"]): row for row in rows}
            wanted = {root(t): t for t in configured}
            new, enable, disable = [], [], []
            for key, ticker in wanted.items():
                row = by_root.get(key)
                if row is None:
                    new.append(ticker)
                    continue
                if row["ticker"] != ticker:  # SPX became I:SPX or back: one underlying
                    await conn.execute(
                        "UPDATE tracked_underlyings SET ticker = $2, changed_at = now() "
                        "WHERE ticker = $1",
                        row["ticker"],
                        ticker,
                    )
                if row["disabled_by"] == "UNDERLYINGS":
                    enable.append(ticker)
            for key, row in by_root.items():
                if key not in wanted and row["origin"] == "UNDERLYINGS" and row["enabled"]:
                    disable.append(row["ticker"])
            await conn.execute(
                "INSERT INTO tracked_underlyings (ticker, origin) "
                "SELECT unnest($1::text[]), 'UNDERLYINGS'",
                new,
            )
            await _set_enabled(conn, enable, enabled=True, by=None)
            await _set_enabled(conn, disable, enabled=False, by="UNDERLYINGS")
            for what, tickers in (
                ("Tracking", new),
                ("Tracking again", enable),
                ("No longer tracking (not in UNDERLYINGS)", disable),
            ):
                if tickers:
                    shown = ", ".join(tickers[:10]) + (", ..." if len(tickers) > 10 else "")
                    logger.info("%s %d underlyings: %s", what, len(tickers), shown)
        return [
            row["ticker"]
            for row in await conn.fetch(
                "SELECT ticker FROM tracked_underlyings WHERE enabled ORDER BY ticker"
            )
        ]


async def _set_enabled(
    conn: asyncpg.Connection, tickers: Sequence[str], *, enabled: bool, by: str | None
) -> None:
    await conn.execute(
        "UPDATE tracked_underlyings SET enabled = $2, disabled_by = $3, changed_at = now() "
        "WHERE ticker = ANY($1::text[])",
        list(tickers),
        enabled,
        by,
    )


@bounded_db_connection("listing the tracked underlyings")
async def list_tracked(conn: asyncpg.Connection) -> list[Tracked]:
    """Every row, enabled first, then by ticker."""
    rows = await conn.fetch(
        f"SELECT {', '.join(Tracked.__dataclass_fields__)} FROM tracked_underlyings "
        "ORDER BY NOT enabled, ticker"
    )
    return [Tracked(**dict(row)) for row in rows]


@bounded_db_connection("adding {ticker} to the tracked underlyings")
async def add_tracked(conn: asyncpg.Connection, ticker: str) -> str:
    """Track ``ticker`` (or enable it again); returns what changed, for the operator."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SYNC_LOCK_KEY)
        row = await conn.fetchrow(
            "SELECT ticker, enabled FROM tracked_underlyings WHERE underlying_ticker = $1",
            root(ticker),
        )
        if row is None:
            await conn.execute(
                "INSERT INTO tracked_underlyings (ticker, origin) VALUES ($1, 'admin')", ticker
            )
            return f"{ticker} is tracked from now on"
        if row["ticker"] != ticker:
            raise ConfigError(
                f"{row['ticker']} is tracked already, the same underlying as {ticker}: "
                f"disable {row['ticker']} first to track {ticker} instead"
            )
        if row["enabled"]:
            return f"{ticker} was tracked already"
        await _set_enabled(conn, [ticker], enabled=True, by=None)
        return f"{ticker} is tracked again"


@bounded_db_connection("changing whether {ticker} is tracked")
async def set_tracked_enabled(conn: asyncpg.Connection, ticker: str, *, enabled: bool) -> str:
    """Enable or disable a tracked ticker by hand (a disable sticks until enabled).

    Raises:
        ConfigError: the ticker is not in the table.
    """
    row = await conn.fetchrow(
        "SELECT ticker, enabled FROM tracked_underlyings WHERE underlying_ticker = $1", root(ticker)
    )
    if row is None:
        raise ConfigError(
            f"{ticker} is not a tracked underlying: see `ingest_admin underlyings list`, or "
            f"`ingest_admin underlyings add {ticker}`"
        )
    await _set_enabled(conn, [row["ticker"]], enabled=enabled, by=None if enabled else "admin")
    state = "enabled" if enabled else "disabled: no more contract syncs or snapshots"
    return f"{row['ticker']} {state}"


async def note_error(conn: asyncpg.Connection, key: str, error: str) -> None:
    """``key``'s last job failed with ``error`` (its time is the transaction's)."""
    await conn.execute(
        "UPDATE tracked_underlyings SET last_error = $2, last_error_at = now() "
        "WHERE underlying_ticker = $1",
        key,
        error,
    )
