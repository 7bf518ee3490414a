"""``ingest_admin status``: is the history whole and fresh? For people and for monitoring."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
from pathlib import Path

import click

from cli.common import COMMAND_SETTINGS, env_file_option, fail, load_settings, one_off_underlyings
from options.config import parse_duration
from options.errors import ExitCode, OptionsError
from options.ops.logs import journal_stream_matches

STALE_EXIT = ExitCode.FAILED
"""The exit status when something is stale or a run is stuck (one line each on stderr)."""


@click.command("status", context_settings=COMMAND_SETTINGS)
@env_file_option
@click.option(
    "--format",
    "output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table: for a person (New York times); json: one object (UTC times).",
)
@click.option(
    "--days",
    type=click.IntRange(1, 60),
    default=5,
    show_default=True,
    help="Trading days (XNYS sessions) to look for gaps in, today's once it has opened.",
)
@click.option(
    "--every",
    type=click.Choice(["5", "10", "15"]),
    default="10",
    show_default=True,
    help="Minutes between snapshot slots, as installed (install-units --snapshot-every).",
)
@click.option(
    "--max-age",
    metavar="DURATION",
    default="30m",
    show_default=True,
    help="Stale when an enabled underlying's last complete snapshot is older than this, in "
    "market time (nights, weekends and holidays do not count), before the latest slot.",
)
@click.option(
    "--max-sync-age",
    metavar="DURATION",
    default="26h",
    show_default=True,
    help="Stale when an enabled underlying's last contract sync is older than this.",
)
@click.option(
    "--underlying",
    "-u",
    "underlyings",
    multiple=True,
    metavar="TICKER",
    help="Show TICKER too (repeatable), tracked or not; only enabled tracked underlyings "
    "are judged for freshness.",
)
def status(
    env_file: Path | None,
    output: str,
    days: int,
    every: str,
    max_age: str,
    max_sync_age: str,
    underlyings: tuple[str, ...],
) -> None:
    """Show the last runs, each underlying's last snapshot and contract sync, the snapshot
    slots missing in the last trading days and why, data quality and the database's size.

    Exit status: 0 when fresh; 1 when a snapshot or a contract sync is older than its max
    age, or a run is left running without a heartbeat for over 60 s (one line per problem on
    stderr), or when the database cannot be read; 2 on a bad option or setting. Needs
    DATABASE_URL only.
    """
    from options.ops.status import read_status
    from options.ops.status_table import format_status

    settings = load_settings(env_file)
    tickers = one_off_underlyings(underlyings)
    try:
        limits = (
            parse_duration(max_age, name="--max-age"),
            parse_duration(max_sync_age, name="--max-sync-age"),
        )
        report = asyncio.run(
            read_status(
                settings,
                now=dt.datetime.now(dt.UTC),
                days=days,
                every=int(every),
                max_age=limits[0],
                max_sync_age=limits[1],
                underlyings=tickers,
            )
        )
    except OptionsError as exc:
        fail(exc)
    click.echo(report.to_json() if output == "json" else format_status(report))
    priority = "<4>" if journal_stream_matches(sys.stderr, os.environ) else ""
    for problem in report.problems:
        click.echo(f"{priority}{problem.kind}: {problem.message}", err=True)
    sys.exit(int(STALE_EXIT) if report.problems else int(ExitCode.OK))


if __name__ == "__main__":
    status()
