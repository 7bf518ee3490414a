"""Contract syncs (``contract_syncs``): what ``ingest_options`` did per run and underlying.

A row is written in the transaction that stores the underlying's contracts, or alone for a
failure that stored nothing. Its primary key (run, underlying) also makes a commit whose answer
was lost count once: a retry finds the row and stops.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import asyncpg

from options.store.runs import Run, count_committed
from options.store.underlyings import note_error


@dataclass
class SyncCounts:
    """One underlying's sync, as stored."""

    listed: int = 0
    written: int = 0
    rejected: int = 0
    deactivated: int = 0
    error: str | None = None


async def committed_sync(conn: asyncpg.Connection, run: Run, key: str) -> SyncCounts | None:
    """The sync of ``key`` this run committed already (an earlier attempt), if any."""
    row = await conn.fetchrow(
        """
        SELECT contracts_listed, contracts_written, rows_rejected, contracts_deactivated, error
        FROM contract_syncs WHERE run_id = $1 AND underlying_ticker = $2
        """,
        run.id,
        key,
    )
    return None if row is None else SyncCounts(*row)


async def record_sync(
    conn: asyncpg.Connection, run: Run, key: str, counts: SyncCounts, *, seen_at: dt.datetime
) -> None:
    """In the transaction that stored them, in one statement: the sync's row, the tracked
    underlying's last sync (or error), and the run's counts (which also checks the lease).

    Raises:
        LeaseLostError: the run no longer holds its lease; roll back.
    """
    await count_committed(
        conn,
        run,
        {
            "underlyings_succeeded": int(counts.error is None),
            "underlyings_failed": int(counts.error is not None),
            "rows_written": counts.written,
            "rows_rejected": counts.rejected,
            "contracts_deactivated": counts.deactivated,
        },
        failures=[f"{key}: {counts.error}"] if counts.error else (),
        before="""
        WITH sync AS (
            INSERT INTO contract_syncs (run_id, underlying_ticker, succeeded, contracts_listed,
                contracts_written, rows_rejected, contracts_deactivated, error)
            VALUES ($1, $2, $3::text IS NULL, $4, $5, $6, $7, $3)
        ), tracked AS (
            UPDATE tracked_underlyings SET
                last_contract_sync_at = CASE WHEN $3::text IS NULL THEN $8
                                             ELSE last_contract_sync_at END,
                last_error = coalesce($3, last_error),
                last_error_at = CASE WHEN $3::text IS NULL THEN last_error_at ELSE now() END
            WHERE underlying_ticker = $2
        )
        """,
        before_args=(
            run.id,
            key,
            counts.error,
            counts.listed,
            counts.written,
            counts.rejected,
            counts.deactivated,
            seen_at,
        ),
    )


async def record_failed_sync(
    conn: asyncpg.Connection, run: Run, key: str, counts: SyncCounts
) -> bool:
    """A sync that failed and stored nothing: its row, the tracked underlying's error, one
    failed underlying in the run's counts. Returns False when it was recorded already."""
    async with conn.transaction():
        if await committed_sync(conn, run, key) is not None:
            return False
        await conn.execute(
            """
            INSERT INTO contract_syncs (run_id, underlying_ticker, succeeded, contracts_listed,
                contracts_written, rows_rejected, contracts_deactivated, error)
            VALUES ($1, $2, false, $3, 0, $4, 0, $5)
            """,
            run.id,
            key,
            counts.listed,
            counts.rejected,
            counts.error,
        )
        assert counts.error is not None
        await note_error(conn, key, counts.error)
        await count_committed(
            conn, run, {"underlyings_failed": 1}, failures=[f"{key}: {counts.error}"]
        )
    return True
