"""What ``ingest_admin status`` reads: runs, tracked underlyings, coverage, syncs and sizes.

One read-only, repeatable-read transaction, so every figure is of the same moment of the
database. :mod:`options.ops.status` makes the report of it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from options.errors import DatabaseError
from options.ops.market import NEW_YORK
from options.store.db import bounded_db_connection
from options.store.underlyings import root

JOBS: Final = ("options", "snapshots", "daily")
LAST_RUNS: Final = 5  # per job
SCHEMA_VERSION: Final = 9  # the daily table (daily_coverage)
QUALITY_COUNTS: Final = (
    "crossed_quotes",
    "negative_prices",
    "iv_out_of_range",
    "negative_open_interest",
    "stale_quotes",
    "greeks_missing",
    "rows_rejected",
)


@dataclass
class Observed:
    """What :func:`read_observed` found, as records."""

    subjects: list[dict[str, Any]]
    runs: dict[str, list[asyncpg.Record]]
    window_runs: list[asyncpg.Record]
    coverage: dict[str, list[asyncpg.Record]]
    last_complete: dict[str, dt.datetime]
    last_sync: dict[str, dt.datetime]
    tables: list[asyncpg.Record]
    partitions: list[dict[str, Any]]
    daily: dict[str, dict[dt.date, asyncpg.Record]]


_RUN_COLUMNS = """
    id, job, status, started_at, finished_at, heartbeat_at, captured_at, resumed,
    underlyings_requested, underlyings_succeeded, underlyings_failed, rows_fetched,
    rows_written, rows_rejected, contracts_deactivated, api_requests, error
"""


@bounded_db_connection("reading the runs, coverage and syncs since {since}")
async def read_observed(
    conn: asyncpg.Connection, *, now: dt.datetime, since: dt.datetime, requested: list[str]
) -> Observed:
    """Everything the status needs, in one read-only snapshot of the database.

    Args:
        now: nothing later is read (runs, coverage, syncs).
        since: the start of the days shown: coverage rows and runs from then on.
        requested: tickers to show besides the enabled tracked ones.

    Raises:
        DatabaseError: the schema is older than :data:`SCHEMA_VERSION`.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await _check_schema(conn)
        subjects = await _subjects(conn, requested)
        keys = [s["underlying"] for s in subjects]
        runs: dict[str, list[asyncpg.Record]] = {}
        for job in JOBS:
            runs[job] = await conn.fetch(
                f"""
                SELECT {_RUN_COLUMNS} FROM ingest_runs
                WHERE job = $1 AND (status = 'running' OR id IN (
                    SELECT id FROM ingest_runs WHERE job = $1 AND started_at <= $2
                    ORDER BY started_at DESC, id DESC LIMIT $3))
                ORDER BY started_at DESC, id DESC
                """,
                job,
                now,
                LAST_RUNS,
            )
        coverage: dict[str, list[asyncpg.Record]] = {key: [] for key in keys}
        for row in await conn.fetch(
            f"""
            SELECT captured_at, underlying_ticker, run_id, complete, committed_at, error,
                   {", ".join(QUALITY_COUNTS)}
            FROM snapshot_coverage
            WHERE captured_at >= $1 AND captured_at <= $2 AND underlying_ticker = ANY($3::text[])
            ORDER BY captured_at
            """,
            since,
            now,
            keys,
        ):
            coverage[row["underlying_ticker"]].append(row)
        # the runs of the period, and any older run a coverage row of it names (a resumed slot)
        window_runs = await conn.fetch(
            """
            SELECT id, status, started_at, captured_at, error FROM ingest_runs
            WHERE job = 'snapshots' AND (
                (started_at BETWEEN $1 AND $2 AND coalesce(captured_at, started_at) >= $1)
                OR id = ANY($3::bigint[]))
            """,
            since,
            now,
            sorted({row["run_id"] for rows in coverage.values() for row in rows}),
        )
        # before the period, only for those with nothing newer to go by
        unknown = [
            s["underlying"]
            for s in subjects
            if not any(r["complete"] for r in coverage[s["underlying"]])
            and _until(s["last_complete_snapshot_at"], now) is None
        ]
        last_complete = {
            row["key"]: row["at"]
            for row in await conn.fetch(
                """
                SELECT k AS key, (SELECT max(captured_at) FROM snapshot_coverage c
                                  WHERE c.underlying_ticker = k AND c.complete
                                    AND c.captured_at < $2) AS at
                FROM unnest($1::text[]) AS k
                """,
                unknown,
                since,
            )
            if row["at"] is not None
        }
        last_sync = {
            row["key"]: row["at"]
            for row in await conn.fetch(
                """
                SELECT k AS key, (SELECT max(synced_at) FROM contract_syncs s
                                  WHERE s.underlying_ticker = k AND s.succeeded
                                    AND s.synced_at <= $2) AS at
                FROM unnest($1::text[]) AS k
                """,
                keys,
                now,
            )
            if row["at"] is not None
        }
        daily: dict[str, dict[dt.date, asyncpg.Record]] = {key: {} for key in keys}
        for row in await conn.fetch(
            """
            SELECT underlying_ticker, session, complete, reason FROM daily_coverage
            WHERE session >= $1 AND underlying_ticker = ANY($2::text[])
            """,
            since.astimezone(NEW_YORK).date(),
            keys,
        ):
            daily[row["underlying_ticker"]][row["session"]] = row
        tables = await conn.fetch(
            """
            SELECT c.relname AS table,
                   CASE WHEN c.relkind = 'p' THEN
                       (SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0)::bigint
                        FROM pg_partition_tree(c.oid) t WHERE t.isleaf)
                   ELSE pg_total_relation_size(c.oid) END AS bytes,
                   CASE WHEN c.relkind = 'p' THEN
                       (SELECT count(*) FROM pg_partition_tree(c.oid) t WHERE t.isleaf)::int
                   END AS partitions
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
              AND NOT c.relispartition
            ORDER BY bytes DESC, c.relname
            """
        )
        partitions = await conn.fetch(
            """
            SELECT t.relid::regclass::text AS name, c.reltuples::bigint AS estimate
            FROM (SELECT * FROM pg_partition_tree('option_snapshots')
                  UNION ALL SELECT * FROM pg_partition_tree('snapshot_rows')) t
            JOIN pg_class c ON c.oid = t.relid
            WHERE t.isleaf
            """
        )
        counted: list[dict[str, Any]] = []
        for part in partitions:
            if part["estimate"] < 0:  # never vacuumed nor analyzed: no estimate yet
                rows = await conn.fetchval(f"SELECT count(*) FROM {part['name']}")
                counted.append({"name": part["name"], "estimate": None, "count": rows})
            else:
                counted.append({"name": part["name"], "estimate": part["estimate"], "count": None})
    return Observed(
        subjects=subjects,
        runs=runs,
        window_runs=list(window_runs),
        coverage=coverage,
        last_complete=last_complete,
        last_sync=last_sync,
        tables=list(tables),
        partitions=counted,
        daily=daily,
    )


async def _check_schema(conn: asyncpg.Connection) -> None:
    version = None
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        version = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    if version is None or version < SCHEMA_VERSION:
        shown = "empty" if version is None else f"at version {version}"
        raise DatabaseError(
            f"the database schema is {shown}, status needs version {SCHEMA_VERSION}: run "
            "`ingest_admin migrate` (the jobs migrate when they start)"
        )


async def _subjects(conn: asyncpg.Connection, requested: Sequence[str]) -> list[dict[str, Any]]:
    """The enabled tracked underlyings and the ``requested`` ones, by ticker."""
    rows = await conn.fetch(
        """
        SELECT ticker, underlying_ticker AS underlying, true AS tracked, enabled, added_at,
               last_contract_sync_at, last_complete_snapshot_at, last_error, last_error_at
        FROM tracked_underlyings
        WHERE enabled OR underlying_ticker = ANY($1::text[])
        """,
        [root(t) for t in requested],
    )
    subjects = {row["underlying"]: dict(row) for row in rows}
    for ticker in requested:
        subjects.setdefault(
            root(ticker),
            {
                "ticker": ticker,
                "underlying": root(ticker),
                "tracked": False,
                "enabled": False,
                "added_at": None,
                "last_contract_sync_at": None,
                "last_complete_snapshot_at": None,
                "last_error": None,
                "last_error_at": None,
            },
        )
    return sorted(subjects.values(), key=lambda s: s["ticker"])


def _until(moment: dt.datetime | None, now: dt.datetime) -> dt.datetime | None:
    return moment if moment is not None and moment <= now else None
