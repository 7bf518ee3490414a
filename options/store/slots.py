"""Snapshot slots: one ``captured_at``, its planned chains, and each chain's durable commit.

A slot is planned in one transaction: the run's ``captured_at`` and one ``snapshot_coverage``
row per underlying, ``committed_at`` NULL ("not stored yet"). A chain is then stored by
:func:`commit_chains` in one transaction with its coverage row, its rejected rows, its
tracked-underlying row and the run's counts: however the process dies, a chain's rows and its
coverage agree, and a slot's chains are each stored whole, stored in part and marked
incomplete, or visibly not stored. A later run can resume the slot under the same
``captured_at`` (:func:`find_resumable_slot`).

The writer connection encodes ``timestamptz`` as epoch microseconds
(:func:`options.store.db.epoch_microsecond_timestamps`), so every timestamp passed in
:func:`commit_chains` is an int.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from options.store.compaction import merge_into_compact
from options.store.daily import reopen_sessions
from options.store.db import bounded_db_connection
from options.store.lifecycle import COMPACT, HOT, Tier, lock_for_write, utc_day
from options.store.rejects import Reject, keep_rejects
from options.store.runs import Run, count_committed

logger = logging.getLogger(__name__)

NOT_STORED_YET = "not stored yet"


@dataclass(frozen=True)
class PlannedChain:
    """One underlying of a slot: as the API is asked (``I:SPX``) and as the data names it."""

    requested: str
    key: str


@dataclass(frozen=True)
class Slot:
    """A slot to resume: its time and the chains not yet stored completely."""

    captured_at: dt.datetime
    chains: list[PlannedChain]


@dataclass
class ChainCommit:
    """What one chain brings to its commit, and (after it) what was stored.

    Attributes:
        key: ``underlying_ticker`` of its rows and coverage row.
        rows: the rows fetched, one per contract (a contract seen twice is kept once).
        expected: the active contracts in scope that the chain should hold.
        rejects: the records refused, kept up to the run's budget.
        rejected: how many were refused in all.
        pages: pages read.
        read_to_end: every query ended on a page without ``next_url``, every page parsed.
        error: why the chain was not read to the end, if it was not.
        resumed: the slot may already hold rows of this chain (a resumed slot): rows are
            added beside them, never over them.
        quality: the data-quality counts of the rows, in the order of the coverage columns
            ``crossed_quotes``, ``negative_prices``, ``iv_out_of_range``,
            ``negative_open_interest``, ``stale_quotes``, ``greeks_missing``.
    """

    key: str
    rows: list[tuple[Any, ...]]
    expected: set[str]
    rejects: list[Reject] = field(default_factory=list)
    rejected: int = 0
    pages: int = 0
    read_to_end: bool = False
    error: str | None = None
    resumed: bool = False
    quality: Sequence[int] = (0, 0, 0, 0, 0, 0)
    # set by commit_chains
    stored: int = 0
    stored_now: int = 0
    active: int = 0
    missing: int = 0
    complete: bool = False

    def release(self) -> None:
        """Drop the rows and ticker sets once stored, keeping the counts (a run holds every
        chain's result until it ends; it must not hold every chain's rows)."""
        self.rows, self.rejects, self.expected = [], [], set()

    def reason(self) -> str | None:
        """Why the chain is incomplete (``None`` when it is complete)."""
        if self.complete:
            return None
        if self.error:
            return self.error
        parts = []
        if self.missing:
            parts.append(f"{self.missing} active contracts missing from the chain")
        if self.rejected:
            parts.append(f"{self.rejected} rows rejected")
        return "; ".join(parts) or "not read to the end"


@bounded_db_connection("recording the slot of {captured_at} and its planned chains")
async def plan_slot(
    conn: asyncpg.Connection, run: Run, captured_at: dt.datetime, chains: Sequence[PlannedChain]
) -> None:
    """Record the slot: the run's ``captured_at`` and a not-yet-stored coverage row per chain."""
    async with conn.transaction():
        await conn.execute(
            "UPDATE ingest_runs SET captured_at = $2, underlyings_requested = $3 WHERE id = $1",
            run.id,
            captured_at,
            len(chains),
        )
        await conn.executemany(
            """
            INSERT INTO snapshot_coverage (captured_at, underlying_ticker, requested_ticker,
                run_id, contracts_active, snapshots_stored, contracts_missing, complete, pages,
                error)
            VALUES ($1, $2, $3, $4, 0, 0, 0, false, 0, $5)
            """,
            [(captured_at, c.key, c.requested, run.id, NOT_STORED_YET) for c in chains],
        )


@bounded_db_connection("looking for a snapshot slot left unfinished")
async def find_resumable_slot(
    conn: asyncpg.Connection, *, max_age: float | None, only_latest: bool
) -> Slot | None:
    """The latest slot with chains not stored, or not read to the end, or ``None``.

    Args:
        max_age: ignore slots older than this many seconds (``None``: any age).
        only_latest: look at the latest slot only (a scheduled run must not go back past a
            newer slot); otherwise the latest slot that has such chains.
    """
    captured_at = await conn.fetchval(
        """
        SELECT max(c.captured_at) FROM snapshot_coverage c
        WHERE (c.committed_at IS NULL OR NOT c.read_to_end)
          AND ($1::float8 IS NULL OR c.captured_at > now() - make_interval(secs => $1))
          AND (NOT $2 OR c.captured_at = (SELECT max(captured_at) FROM snapshot_coverage))
        """,
        max_age,
        only_latest,
    )
    if captured_at is None:
        return None
    rows = await conn.fetch(
        """
        SELECT underlying_ticker, coalesce(requested_ticker, underlying_ticker) AS requested
        FROM snapshot_coverage
        WHERE captured_at = $1 AND (committed_at IS NULL OR NOT read_to_end)
        ORDER BY underlying_ticker
        """,
        captured_at,
    )
    return Slot(captured_at, [PlannedChain(r["requested"], r["underlying_ticker"]) for r in rows])


@bounded_db_connection("taking over the unfinished slot")
async def adopt_slot(conn: asyncpg.Connection, run: Run, slot: Slot) -> None:
    """Make ``run`` the run that resumes ``slot``."""
    await conn.execute(
        "UPDATE ingest_runs SET captured_at = $2, underlyings_requested = $3 WHERE id = $1",
        run.id,
        slot.captured_at,
        len(slot.chains),
    )


@bounded_db_connection("noting the chains of the slot of {captured_at} left unstored")
async def close_slot(conn: asyncpg.Connection, run: Run, captured_at: dt.datetime) -> int:
    """Say why the chains the run did not store are missing; returns how many there are."""
    status = await conn.execute(
        """
        UPDATE snapshot_coverage SET error = $3
        WHERE captured_at = $1 AND committed_at IS NULL AND run_id = $2
        """,
        captured_at,
        run.id,
        f"not stored: run {run.id} ended before this chain was read",
    )
    return int(status.rsplit(" ", 1)[1])


async def commit_chains(
    conn: asyncpg.Connection,
    run: Run,
    chains: Sequence[ChainCommit],
    *,
    partition: str,
    columns: Sequence[str],
    captured_at: int,
    now: int,
    retry: bool = False,
) -> list[ChainCommit]:
    """Store ``chains`` in one transaction: rows, coverage, rejects, tracked rows, run counts.

    A contract another chain of the slot already stored (an adjusted contract listed under two
    underlyings) keeps its first row: the transaction is done again, skipping such rows.

    Args:
        partition: the slot's day partition of ``option_snapshots``, where the rows go while
            the day is hot (those of a compacted day are merged into its compact partition).
        columns: the columns of the rows, in order.
        captured_at: the slot, in epoch microseconds (the connection's timestamptz codec).
        now: the commit time, in epoch microseconds.
        retry: an earlier attempt lost its connection, maybe after committing: a chain whose
            coverage row says this run stored it already is not stored again.

    Returns:
        The chains, with ``stored``, ``missing`` and ``complete`` set (read back from the
        coverage row for a chain an earlier attempt stored).

    Raises:
        LeaseLostError: the run no longer holds its lease; nothing was stored.
        DayRefusedError: the slot's day was archived (or deleted) meanwhile; nothing was stored.
        CompactionError: rows merged into a compacted day did not read back; nothing was stored.
        asyncpg.DataError, TypeError, ValueError, OverflowError: a value the table cannot
            hold; nothing was stored (check the rows and call again without it).
    """
    resumed = any(c.resumed for c in chains)
    args = (conn, run, chains, partition, columns, captured_at, now)
    try:
        return await _commit(*args, look_back=retry or resumed, skip_stored=resumed)
    except asyncpg.UniqueViolationError:
        return await _commit(*args, look_back=retry or resumed, skip_stored=True)


async def _commit(
    conn: asyncpg.Connection,
    run: Run,
    chains: Sequence[ChainCommit],
    partition: str,
    columns: Sequence[str],
    captured_at: int,
    now: int,
    *,
    look_back: bool,
    skip_stored: bool,
) -> list[ChainCommit]:
    async with conn.transaction():
        # the day's tier, held until the commit: the rows land where the day is
        target = _Target(await lock_for_write(conn, _day(captured_at)), partition, captured_at)
        previous: dict[str, asyncpg.Record] = {}
        if look_back:  # a retry, or a resumed slot: what is stored already counts
            previous = {
                row["underlying_ticker"]: row
                for row in await conn.fetch(
                    """
                    SELECT underlying_ticker, run_id, committed_at, snapshots_stored,
                           rows_rejected, contracts_active, contracts_missing, complete
                    FROM snapshot_coverage
                    WHERE captured_at = $1 AND underlying_ticker = ANY($2)
                    FOR UPDATE
                    """,
                    captured_at,
                    [c.key for c in chains],
                )
            }
        todo = []
        for chain in chains:
            before = previous.get(chain.key)
            if before is not None and before["run_id"] == run.id and before["committed_at"]:
                # an earlier attempt of this call committed it; only its answer was lost
                chain.stored = chain.stored_now = before["snapshots_stored"]
                chain.active, chain.missing = (
                    before["contracts_active"],
                    before["contracts_missing"],
                )
                chain.rejected, chain.complete = before["rows_rejected"], before["complete"]
                continue
            todo.append(chain)
        if not todo:
            return list(chains)
        stored = await _store_rows(conn, todo, target, columns, skip_stored=skip_stored)
        for chain in todo:
            before = previous.get(chain.key)
            tickers = stored[chain.key]
            chain.stored_now = len(tickers)
            chain.stored = chain.stored_now + (before["snapshots_stored"] if before else 0)
            if before is not None and before["committed_at"] is not None:
                # a resumed chain: what the slot held before counts, rejects included
                chain.rejected += before["rows_rejected"]
                if chain.expected:
                    tickers = tickers | await _stored_tickers(conn, target, chain)
            chain.active = len(chain.expected)
            chain.missing = len(chain.expected - tickers)
            chain.complete = chain.read_to_end and not chain.missing and not chain.rejected
            if chain.resumed and chain.complete and chain.stored_now:
                # an older slot completed: the daily rows built around it are built again
                await reopen_sessions(conn, chain.key, captured_at)
        await conn.execute(
            STORE_COVERAGE,
            captured_at,
            run.id,
            now,
            [c.key for c in todo],
            [c.active for c in todo],
            [c.stored for c in todo],
            [c.missing for c in todo],
            [c.complete for c in todo],
            [c.pages for c in todo],
            [c.reason() for c in todo],
            [c.rejected for c in todo],
            [c.read_to_end for c in todo],
            [c.error for c in todo],
            *([c.quality[i] for c in todo] for i in range(6)),
        )
        for chain in todo:
            await keep_rejects(
                conn, run.id, chain.rejects, underlying=chain.key, captured_at=captured_at
            )
        complete = sum(c.complete for c in todo)
        await count_committed(
            conn,
            run,
            {
                "underlyings_succeeded": complete,
                "underlyings_failed": len(todo) - complete,
                "rows_written": sum(c.stored_now for c in todo),
                "rows_rejected": sum(c.rejected for c in todo),
            },
            failures=[f"{c.key}: {c.reason()}" for c in todo if not c.complete],
        )
    return list(chains)


# The chains' coverage rows and their tracked underlyings, in one statement: $1 the slot,
# $2 the run, $3 the commit time, then one array per column.
STORE_COVERAGE = """
WITH chain AS (
    SELECT * FROM unnest($4::text[], $5::int[], $6::int[], $7::int[], $8::bool[], $9::int[],
                         $10::text[], $11::int[], $12::bool[], $13::text[], $14::int[],
                         $15::int[], $16::int[], $17::int[], $18::int[], $19::int[])
        AS u(key, active, stored, missing, complete, pages, reason, rejected, read_to_end,
             error, crossed, negative, iv_out, oi_negative, stale, no_greeks)
), tracked AS (
    UPDATE tracked_underlyings t SET last_snapshot_at = greatest(t.last_snapshot_at, $1),
        -- a resumed older slot never moves the times back
        last_complete_snapshot_at = CASE WHEN chain.complete
                                         THEN greatest(t.last_complete_snapshot_at, $1)
                                         ELSE t.last_complete_snapshot_at END,
        last_error = coalesce(chain.error, t.last_error),
        last_error_at = CASE WHEN chain.error IS NULL THEN t.last_error_at ELSE $3 END
    FROM chain WHERE t.underlying_ticker = chain.key
)
INSERT INTO snapshot_coverage AS c (captured_at, underlying_ticker, run_id, contracts_active,
    snapshots_stored, contracts_missing, complete, pages, error, rows_rejected, read_to_end,
    committed_at, crossed_quotes, negative_prices, iv_out_of_range, negative_open_interest,
    stale_quotes, greeks_missing)
SELECT $1, key, $2, active, stored, missing, complete, pages, reason, rejected, read_to_end, $3,
       crossed, negative, iv_out, oi_negative, stale, no_greeks
FROM chain
ON CONFLICT (captured_at, underlying_ticker) DO UPDATE SET
    run_id = EXCLUDED.run_id, contracts_active = EXCLUDED.contracts_active,
    snapshots_stored = EXCLUDED.snapshots_stored,
    contracts_missing = EXCLUDED.contracts_missing, complete = EXCLUDED.complete,
    pages = c.pages + EXCLUDED.pages, error = EXCLUDED.error,
    rows_rejected = EXCLUDED.rows_rejected, read_to_end = EXCLUDED.read_to_end,
    committed_at = EXCLUDED.committed_at,
    crossed_quotes = c.crossed_quotes + EXCLUDED.crossed_quotes,
    negative_prices = c.negative_prices + EXCLUDED.negative_prices,
    iv_out_of_range = c.iv_out_of_range + EXCLUDED.iv_out_of_range,
    negative_open_interest = c.negative_open_interest + EXCLUDED.negative_open_interest,
    stale_quotes = c.stale_quotes + EXCLUDED.stale_quotes,
    greeks_missing = c.greeks_missing + EXCLUDED.greeks_missing
"""


@dataclass(frozen=True)
class _Target:
    """Where a slot's rows go: the day's tier, its hot partition, the slot (epoch us)."""

    tier: Tier
    partition: str
    captured_at: int


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _day(captured_at: int) -> dt.date:
    return utc_day(_EPOCH + dt.timedelta(microseconds=captured_at))


async def _store_rows(
    conn: asyncpg.Connection,
    chains: Sequence[ChainCommit],
    target: _Target,
    columns: Sequence[str],
    *,
    skip_stored: bool,
) -> dict[str, set[str]]:
    """Insert the chains' rows (all, or with ``skip_stored`` those whose contract the slot
    does not hold yet) into the day's tier; returns the tickers stored per chain."""
    stored: dict[str, set[str]] = {c.key: set() for c in chains}
    rows = [row for c in chains for row in c.rows]
    if not rows:
        return stored
    if target.tier is HOT and not skip_stored:
        await conn.copy_records_to_table(target.partition, records=rows, columns=columns)
        for chain in chains:
            stored[chain.key] = {row[0] for row in chain.rows}
        return stored
    for ticker, key in await _insert_skipping_stored(conn, rows, target, columns):
        stored[key].add(ticker)
    for chain in chains:
        lost = len(chain.rows) - len(stored[chain.key])
        if lost and not chain.resumed:
            logger.warning(
                "%s: %d snapshots skipped, of contracts another underlying's chain already "
                "returned in this slot",
                chain.key,
                lost,
            )
    return stored


async def _insert_skipping_stored(
    conn: asyncpg.Connection,
    rows: list[tuple[Any, ...]],
    target: _Target,
    columns: Sequence[str],
) -> list[asyncpg.Record]:
    """Insert ``rows`` except those whose (ticker, captured_at) the slot already holds: into
    the hot partition, or merged into the compact tier of a compacted day."""
    names = ", ".join(columns)
    await conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS snapshot_batch (LIKE option_snapshots) "
        "ON COMMIT DELETE ROWS"
    )
    await conn.copy_records_to_table("snapshot_batch", records=rows, columns=columns)
    if target.tier is COMPACT:
        inserted = await merge_into_compact(
            conn,
            _day(target.captured_at),
            source="snapshot_batch",
            slot=target.captured_at,
            slot_end=target.captured_at + 1,
        )
    else:
        inserted = await conn.fetch(
            f"INSERT INTO {target.partition} ({names}) SELECT {names} FROM snapshot_batch "
            "ON CONFLICT DO NOTHING RETURNING ticker, underlying_ticker"
        )
    await conn.execute("DELETE FROM snapshot_batch")
    return inserted


async def _stored_tickers(
    conn: asyncpg.Connection, target: _Target, chain: ChainCommit
) -> set[str]:
    """The expected contracts of a resumed chain that the slot held before this commit."""
    if target.tier is COMPACT:
        rows = await conn.fetch(
            """
            SELECT t.ticker FROM snapshot_rows r
            JOIN snapshot_tickers t ON t.id = r.contract_id
            JOIN snapshot_underlyings u ON u.id = r.underlying_id
            WHERE r.captured_at = $1 AND t.ticker = ANY($2) AND u.ticker = $3
            """,
            target.captured_at,
            list(chain.expected),
            chain.key,
        )
        # and any an older version left in the hot tier of the compacted day
        rows += await conn.fetch(
            "SELECT ticker FROM option_snapshots WHERE captured_at = $1 AND ticker = ANY($2) "
            "AND underlying_ticker = $3",
            target.captured_at,
            list(chain.expected),
            chain.key,
        )
    else:
        rows = await conn.fetch(
            f"SELECT ticker FROM {target.partition} WHERE captured_at = $1 AND ticker = ANY($2) "
            "AND underlying_ticker = $3",
            target.captured_at,
            list(chain.expected),
            chain.key,
        )
    return {row[0] for row in rows}
