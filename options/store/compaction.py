"""The compact tier: finished days of ``option_snapshots`` rewritten into ``snapshot_rows``.

A snapshot in ``option_snapshots`` (the hot tier, which the jobs write by COPY) costs about 345
bytes with its indexes; in ``snapshot_rows`` about 145 (the encodings are in migration
``0008_compact.sql``: integer ids for the tickers, prices in 1e-4 dollars as integers, IV and
greeks as ``real``, quote and trade times as milliseconds from the slot, and the midpoint, day
change and break-even price computed on reading). A value an encoding cannot give back goes
into the row's ``extra`` as the API gave it. ``snapshot_reads`` reads both tiers.

One day at a time, oldest first, under the retention lock (one compaction, archive or
retention at a time per database). The day's state (:mod:`options.store.lifecycle`) moves from
hot to compact in the transaction that moves its rows:

1. The ids of the day's tickers and underlyings are added first, in a transaction of their own
   (an identity consumed by a move that rolls back would be lost for good).
2. In one transaction: the day's ``stored_days`` row is taken ``FOR UPDATE`` (a writer of the
   day, a late resume, holds it ``FOR SHARE``: the move waits for it, or leaves the day for a
   later run), and its ``option_snapshots`` partition locked against writers (SHARE: readers go
   on). Its rows are written, sorted by slot and underlying, into a new table then attached to
   ``snapshot_rows`` as the day's partition (or added to that partition, skipping any already
   there, when rows of a compacted day were left in ``option_snapshots`` by an older version).
3. **Verified**: every row of the day, read back decoded through ``compact_reads``, must equal
   the row it came from, to the precision the README states; otherwise the transaction rolls
   back and the day stays as it was.
4. The ``option_snapshots`` partition is emptied with ``DELETE`` (not ``TRUNCATE``, which is
   not MVCC-safe: a reader whose snapshot predates the move must still find the rows there) and
   the day recorded as compact.

After the commit the emptied partition is detached and dropped (as retention drops one, without
locking ``option_snapshots``) once no snapshot older than the move is left; one left by a busy
moment goes the next time. A reader sees the day's rows in one tier or the other, never both and
never neither.

A write into a compacted day (``ingest_snapshots --resume`` of one of its slots) is merged into
its compact partition by :func:`merge_into_compact`, verified the same way, in the writer's own
transaction.

Killed at any moment, the day's transaction rolls back: a rerun starts the day again. Only days
over both in UTC (the partition's day) and in New York are compacted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Final
from zoneinfo import ZoneInfo

import asyncpg

from options.errors import CompactionError
from options.store.db import bounded_db_connection
from options.store.lifecycle import (
    COMPACT as COMPACT_TIER,
)
from options.store.lifecycle import (
    lock_for_move,
    older_snapshots_left,
    set_tier,
    why_not_writable,
)
from options.store.partitions import (
    COMPACT,
    RETENTION_LOCK_KEY,
    RETENTION_LOCK_TIMEOUT,
    WIDE,
    DropOutcome,
    PartitionState,
    attach_table,
    drop_day_partition,
    partition_name,
    partition_states,
)

logger = logging.getLogger(__name__)

NEW_YORK: Final = ZoneInfo("America/New_York")
# A day's rewrite reads and writes the whole day: minutes for the whole market
COMPACTION_STATEMENT_TIMEOUT = 3600.0

# What happened to a day (DayCompaction.action)
COMPACTED = "compacted"
MERGED = "merged"  # rows written to an already compacted day, added to its compact partition
EMPTY = "empty"  # an empty partition (a weekend's, made ahead): dropped
WOULD_COMPACT = "would compact"
BUSY = "busy"  # its tables were in use: a later run does it
LEFT = "left"  # rows of a day no longer in PostgreSQL's tiers (archived): left where they are


@dataclass(frozen=True)
class DayCompaction:
    """What compacting one day did.

    Attributes:
        action: :data:`COMPACTED`, :data:`MERGED`, :data:`EMPTY`, :data:`WOULD_COMPACT`,
            :data:`BUSY` or :data:`LEFT`.
        rows: the snapshots moved.
        wide_bytes: the ``option_snapshots`` partition's size with its indexes, before.
        compact_bytes: the ``snapshot_rows`` partition's size with its indexes, after.
        extra_rows: rows that needed ``extra`` for a value the encodings could not hold.
        note: why a :data:`BUSY` day was left.
    """

    day: dt.date
    action: str
    rows: int = 0
    wide_bytes: int = 0
    compact_bytes: int | None = None
    extra_rows: int = 0
    note: str = ""

    @property
    def bytes_per_snapshot(self) -> float | None:
        """Bytes per snapshot in the compact tier, indexes included."""
        if self.compact_bytes is None or not self.rows:
            return None
        return self.compact_bytes / self.rows


def last_finished_day(now: dt.datetime) -> dt.date:
    """The last day over at ``now`` (or at the clock, if earlier): the day before today,
    today being the earlier of the UTC day and New York's day."""
    moment = min(now, dt.datetime.now(dt.UTC))
    today = min(moment.astimezone(dt.UTC).date(), moment.astimezone(NEW_YORK).date())
    return today - dt.timedelta(days=1)


@bounded_db_connection("moving the finished days to the compact tier")
async def compact_days(
    conn: asyncpg.Connection,
    *,
    now: dt.datetime,
    before: dt.date | None = None,
    dry_run: bool = False,
    stop: asyncio.Event | None = None,
    lock_timeout: float = RETENTION_LOCK_TIMEOUT,
) -> list[DayCompaction] | None:
    """Compact every finished day still in ``option_snapshots``, oldest first.

    Args:
        now: the moment "today" is taken from (never later than the clock).
        before: only the days before this one (``None``: every finished day).
        dry_run: report the days and their sizes; change nothing.
        stop: when set, the days after the one in progress are left.
        lock_timeout: how long a lock on a day's tables is waited for.

    Returns:
        A report per day, or ``None`` when another session held the retention lock.

    Raises:
        CompactionError: a day's compact rows did not read back as its rows (it stays as it
            was; the days after it are left).
        DatabaseError: PostgreSQL failed.
    """
    last = last_finished_day(now)
    if before is not None:
        last = min(last, before - dt.timedelta(days=1))
    if dry_run:
        return [await _preview(conn, day) for day in await _days_to_compact(conn, last)]
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK_KEY):
        logger.info("Compaction: another session is compacting, archiving or dropping; skipped")
        return None
    reports = []
    try:
        for day in await _days_to_compact(conn, last):
            if stop is not None and stop.is_set():
                break
            reports.append(await compact_day(conn, day, lock_timeout=lock_timeout))
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_KEY)
    return reports


async def _days_to_compact(conn: asyncpg.Connection, last: dt.date) -> list[dt.date]:
    """The days up to ``last`` whose ``option_snapshots`` partition is attached."""
    states = await partition_states(conn, WIDE)
    return sorted(d for d, s in states.items() if d <= last and s is PartitionState.ATTACHED)


async def _preview(conn: asyncpg.Connection, day: dt.date) -> DayCompaction:
    wide = partition_name(day, WIDE)
    size = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", wide)
    rows = await conn.fetchval(f"SELECT count(*) FROM {wide}", timeout=COMPACTION_STATEMENT_TIMEOUT)
    return DayCompaction(day, WOULD_COMPACT if rows else EMPTY, rows, size)


async def compact_day(
    conn: asyncpg.Connection,
    day: dt.date,
    *,
    lock_timeout: float = RETENTION_LOCK_TIMEOUT,
) -> DayCompaction:
    """Move ``day``'s rows from ``option_snapshots`` to ``snapshot_rows`` in one verified
    transaction that records the day as compact, then drop the emptied partition. The caller
    holds the retention lock.

    Raises:
        CompactionError: the compact rows did not read back as the day's rows; nothing changed.
    """
    wide = partition_name(day, WIDE)
    target = partition_name(day, COMPACT)
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    end = start + dt.timedelta(days=1)
    try:
        # ids first, kept whatever becomes of the move
        async with conn.transaction():
            await _set_timeouts(conn, lock_timeout)
            await _add_ids(conn, wide)
        async with conn.transaction():
            await _set_timeouts(conn, lock_timeout)
            await conn.execute("SELECT set_config('extra_float_digits', '3', true)")
            tier = await lock_for_move(conn, day)
            # writers of the day wait; readers go on
            await conn.execute(f"LOCK TABLE {wide} IN SHARE MODE")
            size = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", wide)
            rows = await conn.fetchval(
                f"SELECT count(*) FROM {wide}", timeout=COMPACTION_STATEMENT_TIMEOUT
            )
            if not rows:
                report = DayCompaction(day, EMPTY, 0, size)
            elif why_not_writable(tier) is not None:
                report = DayCompaction(day, LEFT, rows, size)
            else:
                report = await _move_rows(conn, day, wide, target, start, end, rows, size)
    except asyncpg.LockNotAvailableError:
        note = (
            f"{wide} was in use by another session for more than {lock_timeout:g} s; a later "
            "run compacts it"
        )
        logger.warning("Compaction: %s left: %s", day, note)
        return DayCompaction(day, BUSY, note=note)
    if report.action == LEFT:
        logger.error(
            "Compaction: %s is %s, yet %s holds %d rows (written by a version before the "
            "day's state was kept): they are left where they are",
            day,
            why_not_writable(tier),
            wide,
            rows,
        )
        return report
    if report.rows:
        await conn.execute(f"ANALYZE {target}")
        compact = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", target)
        report = DayCompaction(
            day, report.action, report.rows, report.wide_bytes, compact, report.extra_rows
        )
        logger.info(
            "Compacted %s: %d snapshots, %.1f B each (was %.1f), %d with extra values",
            day,
            report.rows,
            compact / report.rows,
            report.wide_bytes / report.rows,
            report.extra_rows,
        )
    await drop_emptied(conn, day, lock_timeout=lock_timeout)
    return report


async def drop_emptied(
    conn: asyncpg.Connection, day: dt.date, *, lock_timeout: float = RETENTION_LOCK_TIMEOUT
) -> bool:
    """Drop ``day``'s emptied ``option_snapshots`` partition once no snapshot older than the
    day's move is left (waiting for one at most ``lock_timeout`` seconds); returns whether it
    was dropped. A partition left here is dropped by a later compaction."""
    wide = partition_name(day, WIDE)
    waited = 0.0
    while await older_snapshots_left(conn, day):
        if waited >= lock_timeout:
            logger.info(
                "Compaction: a transaction older than the move of %s still runs; the emptied "
                "%s is dropped by a later run",
                day,
                wide,
            )
            return False
        await asyncio.sleep(0.1)
        waited += 0.1
    outcome = await drop_day_partition(conn, day, expected_rows=0, lock_timeout=lock_timeout)
    if outcome is not DropOutcome.DROPPED:
        logger.info("Compaction: the emptied %s is dropped by a later run (%s)", wide, outcome)
    return outcome is DropOutcome.DROPPED


async def _set_timeouts(conn: asyncpg.Connection, lock_timeout: float) -> None:
    for setting, value in (
        ("lock_timeout", f"{max(1, round(lock_timeout * 1000))}ms"),
        ("statement_timeout", f"{COMPACTION_STATEMENT_TIMEOUT:.0f}s"),
    ):
        await conn.execute("SELECT set_config($1, $2, true)", setting, value)


async def _add_ids(conn: asyncpg.Connection, source: str) -> None:
    """Give the tickers and underlyings of ``source`` (a table of ``option_snapshots`` rows)
    that have none their ids."""
    await conn.execute(ADD_TICKERS.format(wide=source), timeout=COMPACTION_STATEMENT_TIMEOUT)
    await conn.execute(ADD_UNDERLYINGS.format(wide=source), timeout=COMPACTION_STATEMENT_TIMEOUT)


async def _move_rows(
    conn: asyncpg.Connection,
    day: dt.date,
    wide: str,
    target: str,
    start: dt.datetime,
    end: dt.datetime,
    rows: int,
    size: int,
) -> DayCompaction:
    """Steps 2 to 4 of the module docstring, in the caller's transaction."""
    await _add_ids(conn, wide)  # rows written since the ids were added, if any
    state = (await partition_states(conn, COMPACT)).get(day, PartitionState.ABSENT)
    if state is PartitionState.ABSENT:
        action = COMPACTED
        await conn.execute(f"CREATE TABLE {target} (LIKE snapshot_rows INCLUDING DEFAULTS)")
        await conn.execute(
            INSERT_COMPACT.format(target=target, wide=wide, skip=""),
            timeout=COMPACTION_STATEMENT_TIMEOUT,
        )
        # the indexes are built once, after the rows, by ATTACH
        await attach_table(conn, target, day, COMPACT)
    elif state is PartitionState.ATTACHED:
        action = MERGED
        await conn.execute(
            INSERT_COMPACT.format(target=target, wide=wide, skip=SKIP_STORED.format(target=target)),
            timeout=COMPACTION_STATEMENT_TIMEOUT,
        )
    else:
        # a retention or an archive is dropping the day's compact partition: it finishes first
        raise asyncpg.LockNotAvailableError(f"{target} is being detached")
    await _verify(conn, wide, start, end, what=f"{day}", rows=rows)
    extra = await conn.fetchval(
        f"SELECT count(*) FROM {target} WHERE extra IS NOT NULL AND "
        "captured_at >= $1 AND captured_at < $2",
        start,
        end,
        timeout=COMPACTION_STATEMENT_TIMEOUT,
    )
    # MVCC-safe, unlike TRUNCATE: an older snapshot still reads the day here
    await conn.execute(f"DELETE FROM {wide}", timeout=COMPACTION_STATEMENT_TIMEOUT)
    await set_tier(conn, day, COMPACT_TIER)
    return DayCompaction(day, action, rows, size, None, extra)


async def _verify(
    conn: asyncpg.Connection,
    source: str,
    start: dt.datetime | int,
    end: dt.datetime | int,
    *,
    what: str,
    rows: int,
) -> None:
    """Every row of ``source`` must read back from ``compact_reads`` (within ``[start, end)``)
    as it is in ``source``.

    Raises:
        CompactionError: some did not; the caller's transaction is to be rolled back.
    """
    differing = await conn.fetchval(
        VERIFY.format(wide=source), start, end, timeout=COMPACTION_STATEMENT_TIMEOUT
    )
    if differing:
        sample = await conn.fetchval(
            VERIFY_SAMPLE.format(wide=source), start, end, timeout=COMPACTION_STATEMENT_TIMEOUT
        )
        raise CompactionError(
            f"{what}: {differing} of {rows} snapshots did not read back from snapshot_rows as "
            f"stored in {source} (first: {sample}); nothing was moved"
        )


async def merge_into_compact(
    conn: asyncpg.Connection,
    day: dt.date,
    *,
    source: str,
    slot: dt.datetime | int,
    slot_end: dt.datetime | int,
) -> list[asyncpg.Record]:
    """Store the rows of ``source`` (a temporary table of ``option_snapshots`` rows of one slot
    of the compacted ``day``) into the day's compact partition, in the caller's transaction:
    rows whose contract the slot already holds, in either tier, are skipped (and removed from
    ``source``), the rest encoded, added and verified.

    ``slot`` and ``slot_end`` bound the slot's ``captured_at`` in the connection's timestamp
    form. The caller holds the day ``FOR SHARE`` (:func:`~options.store.lifecycle.lock_for_write`).

    Returns:
        The ``(ticker, underlying_ticker)`` of the rows stored.

    Raises:
        CompactionError: the rows did not read back as given; nothing is to be committed.
    """
    target = partition_name(day, COMPACT)
    # a contract given twice keeps its first row; one the slot holds keeps the stored one
    await conn.execute(
        f"DELETE FROM {source} a USING {source} b "
        "WHERE a.ticker = b.ticker AND a.captured_at = b.captured_at AND a.ctid > b.ctid"
    )
    await conn.execute(
        f"""
        DELETE FROM {source} w
        WHERE EXISTS (SELECT 1 FROM option_snapshots s
                      WHERE s.ticker = w.ticker AND s.captured_at = w.captured_at
                        AND s.captured_at >= $1 AND s.captured_at < $2)
           OR EXISTS (SELECT 1 FROM snapshot_rows r
                      JOIN snapshot_tickers t ON t.id = r.contract_id
                      WHERE t.ticker = w.ticker AND r.captured_at = w.captured_at
                        AND r.captured_at >= $1 AND r.captured_at < $2)
        """,
        slot,
        slot_end,
    )
    stored = await conn.fetch(f"SELECT ticker, underlying_ticker FROM {source}")
    if not stored:
        return []
    await conn.execute("SELECT set_config('extra_float_digits', '3', true)")
    await _add_ids(conn, source)
    if (await partition_states(conn, COMPACT)).get(day) is not PartitionState.ATTACHED:
        # a day compacted empty (its partition dropped): its compact partition is made now
        await conn.execute(f"CREATE TABLE {target} (LIKE snapshot_rows INCLUDING DEFAULTS)")
        await attach_table(conn, target, day, COMPACT)
    await conn.execute(
        INSERT_COMPACT.format(target=target, wide=source, skip=""),
        timeout=COMPACTION_STATEMENT_TIMEOUT,
    )
    await _verify(conn, source, slot, slot_end, what=f"a chain of {day}", rows=len(stored))
    return stored


# The day's tickers and underlyings that have no id yet. The type and strike a ticker spells
# (OCC symbology: root, YYMMDD, C or P, strike x 1000 in 8 digits) give the break-even price.
ADD_TICKERS = """
INSERT INTO snapshot_tickers (ticker, is_call, strike)
SELECT w.ticker, m[1] = 'C', m[2]::float8 / 1000
FROM (SELECT DISTINCT ticker FROM {wide}) w
LEFT JOIN LATERAL (SELECT regexp_match(w.ticker, '^O:.+\\d{{6}}([CP])(\\d{{8}})$') AS m) p ON true
WHERE NOT EXISTS (SELECT 1 FROM snapshot_tickers t WHERE t.ticker = w.ticker)
ORDER BY w.ticker
ON CONFLICT (ticker) DO NOTHING
"""

ADD_UNDERLYINGS = """
INSERT INTO snapshot_underlyings (ticker)
SELECT DISTINCT underlying_ticker FROM {wide} w
WHERE NOT EXISTS (SELECT 1 FROM snapshot_underlyings u WHERE u.ticker = w.underlying_ticker)
ON CONFLICT (ticker) DO NOTHING
"""

# The encoded row, and in extra each value its encoding could not give back: a NULL code for a
# value, or a computed column (midpoint, day change and percent, break-even) that would read
# back other than the API gave it.
INSERT_COMPACT = """
INSERT INTO {target} (captured_at, contract_id, bid, ask, last_price, day_open, day_high,
    day_low, day_close, day_vwap, day_previous_close, underlying_price, fmv, day_volume,
    open_interest, quote_ms, trade_ms, implied_volatility, delta, gamma, theta, vega,
    underlying_id, bid_size, ask_size, last_size, extra)
SELECT w.captured_at, t.id, e.bid, e.ask, e.last_price, e.day_open, e.day_high, e.day_low,
       e.day_close, e.day_vwap, e.day_previous_close, e.underlying_price, e.fmv, e.day_volume,
       e.open_interest, e.quote_ms, e.trade_ms, e.implied_volatility, e.delta, e.gamma,
       e.theta, e.vega, u.id, e.bid_size, e.ask_size, e.last_size, nullif(x.extra, '{{}}')
FROM {wide} w
JOIN snapshot_tickers t ON t.ticker = w.ticker
JOIN snapshot_underlyings u ON u.ticker = w.underlying_ticker
CROSS JOIN LATERAL (
    SELECT snapshot_price_code(w.bid) AS bid, snapshot_price_code(w.ask) AS ask,
           snapshot_price_code(w.last_price) AS last_price,
           snapshot_price_code(w.day_open) AS day_open,
           snapshot_price_code(w.day_high) AS day_high,
           snapshot_price_code(w.day_low) AS day_low,
           snapshot_price_code(w.day_close) AS day_close,
           snapshot_price_code(w.day_vwap) AS day_vwap,
           snapshot_price_code(w.day_previous_close) AS day_previous_close,
           snapshot_price_code(w.underlying_price) AS underlying_price,
           snapshot_price_code(w.fmv) AS fmv,
           snapshot_int_code(w.day_volume) AS day_volume,
           snapshot_int_code(w.open_interest) AS open_interest,
           snapshot_ms_code(w.quote_updated_at, w.captured_at) AS quote_ms,
           snapshot_ms_code(w.last_trade_at, w.captured_at) AS trade_ms,
           snapshot_real_code(w.implied_volatility) AS implied_volatility,
           snapshot_real_code(w.delta) AS delta, snapshot_real_code(w.gamma) AS gamma,
           snapshot_real_code(w.theta) AS theta, snapshot_real_code(w.vega) AS vega,
           snapshot_size_code(w.bid_size) AS bid_size,
           snapshot_size_code(w.ask_size) AS ask_size,
           snapshot_size_code(w.last_size) AS last_size
) e
CROSS JOIN LATERAL (
    SELECT (e.bid::int8 + e.ask)::float8 / 20000 AS midpoint
) m
CROSS JOIN LATERAL (
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'bid', CASE WHEN e.bid IS NULL THEN to_jsonb(w.bid) END,
        'ask', CASE WHEN e.ask IS NULL THEN to_jsonb(w.ask) END,
        'last_price', CASE WHEN e.last_price IS NULL THEN to_jsonb(w.last_price) END,
        'day_open', CASE WHEN e.day_open IS NULL THEN to_jsonb(w.day_open) END,
        'day_high', CASE WHEN e.day_high IS NULL THEN to_jsonb(w.day_high) END,
        'day_low', CASE WHEN e.day_low IS NULL THEN to_jsonb(w.day_low) END,
        'day_close', CASE WHEN e.day_close IS NULL THEN to_jsonb(w.day_close) END,
        'day_vwap', CASE WHEN e.day_vwap IS NULL THEN to_jsonb(w.day_vwap) END,
        'day_previous_close', CASE WHEN e.day_previous_close IS NULL
                                   THEN to_jsonb(w.day_previous_close) END,
        'underlying_price', CASE WHEN e.underlying_price IS NULL
                                 THEN to_jsonb(w.underlying_price) END,
        'fmv', CASE WHEN e.fmv IS NULL THEN to_jsonb(w.fmv) END,
        'day_volume', CASE WHEN e.day_volume IS NULL THEN to_jsonb(w.day_volume) END,
        'open_interest', CASE WHEN e.open_interest IS NULL THEN to_jsonb(w.open_interest) END,
        'quote_updated_at', CASE WHEN e.quote_ms IS NULL THEN to_jsonb(w.quote_updated_at) END,
        'last_trade_at', CASE WHEN e.trade_ms IS NULL THEN to_jsonb(w.last_trade_at) END,
        'implied_volatility', CASE WHEN e.implied_volatility IS NULL
                                   THEN to_jsonb(w.implied_volatility) END,
        'delta', CASE WHEN e.delta IS NULL THEN to_jsonb(w.delta) END,
        'gamma', CASE WHEN e.gamma IS NULL THEN to_jsonb(w.gamma) END,
        'theta', CASE WHEN e.theta IS NULL THEN to_jsonb(w.theta) END,
        'vega', CASE WHEN e.vega IS NULL THEN to_jsonb(w.vega) END,
        'bid_size', CASE WHEN e.bid_size IS NULL THEN to_jsonb(w.bid_size) END,
        'ask_size', CASE WHEN e.ask_size IS NULL THEN to_jsonb(w.ask_size) END,
        'last_size', CASE WHEN e.last_size IS NULL THEN to_jsonb(w.last_size) END
    ))
    -- a computed column that would read back otherwise: kept as given, a NULL as JSON null
    || CASE WHEN m.midpoint IS DISTINCT FROM w.midpoint
            THEN jsonb_build_object('midpoint', w.midpoint) ELSE '{{}}' END
    || CASE WHEN (w.day_close - w.day_previous_close) IS DISTINCT FROM w.day_change
            THEN jsonb_build_object('day_change', w.day_change) ELSE '{{}}' END
    || CASE WHEN (w.day_close - w.day_previous_close) / nullif(w.day_previous_close, 0) * 100
                 IS DISTINCT FROM w.day_change_percent
            THEN jsonb_build_object('day_change_percent', w.day_change_percent) ELSE '{{}}' END
    || CASE WHEN (CASE WHEN t.is_call THEN t.strike + m.midpoint ELSE t.strike - m.midpoint END)
                 IS DISTINCT FROM w.break_even_price
            THEN jsonb_build_object('break_even_price', w.break_even_price) ELSE '{{}}' END
    AS extra
) x
{skip}
ORDER BY w.captured_at, u.id, t.id
"""

SKIP_STORED = """
WHERE NOT EXISTS (
    SELECT 1 FROM {target} s WHERE s.contract_id = t.id AND s.captured_at = w.captured_at)
"""

# The rows of the day that do not read back from compact_reads as stored: exactly, except IV
# and greeks (as a real holds them) and quote and trade times (to the millisecond, rounded
# down).
_DIFFERING = """
FROM {wide} w
LEFT JOIN compact_reads r
    ON r.ticker = w.ticker AND r.captured_at = w.captured_at
   AND r.captured_at >= $1 AND r.captured_at < $2
WHERE r.ticker IS NULL
   OR (r.underlying_ticker, r.bid, r.bid_size, r.ask, r.ask_size, r.midpoint, r.last_price,
       r.last_size, r.day_open, r.day_high, r.day_low, r.day_close, r.day_volume, r.day_vwap,
       r.day_change, r.day_change_percent, r.day_previous_close, r.open_interest,
       r.break_even_price, r.underlying_price, r.fmv)
      IS DISTINCT FROM
      (w.underlying_ticker, w.bid, w.bid_size, w.ask, w.ask_size, w.midpoint, w.last_price,
       w.last_size, w.day_open, w.day_high, w.day_low, w.day_close, w.day_volume, w.day_vwap,
       w.day_change, w.day_change_percent, w.day_previous_close, w.open_interest,
       w.break_even_price, w.underlying_price, w.fmv)
   OR (r.implied_volatility, r.delta, r.gamma, r.theta, r.vega)
      IS DISTINCT FROM
      (coalesce(snapshot_real_code(w.implied_volatility)::float8, w.implied_volatility),
       coalesce(snapshot_real_code(w.delta)::float8, w.delta),
       coalesce(snapshot_real_code(w.gamma)::float8, w.gamma),
       coalesce(snapshot_real_code(w.theta)::float8, w.theta),
       coalesce(snapshot_real_code(w.vega)::float8, w.vega))
   OR NOT coalesce(r.quote_updated_at <= w.quote_updated_at
                   AND w.quote_updated_at - r.quote_updated_at < interval '1 millisecond',
                   r.quote_updated_at IS NULL AND w.quote_updated_at IS NULL)
   OR NOT coalesce(r.last_trade_at <= w.last_trade_at
                   AND w.last_trade_at - r.last_trade_at < interval '1 millisecond',
                   r.last_trade_at IS NULL AND w.last_trade_at IS NULL)
"""
VERIFY = "SELECT count(*)" + _DIFFERING
VERIFY_SAMPLE = "SELECT w.ticker || ' at ' || w.captured_at" + _DIFFERING + " LIMIT 1"
