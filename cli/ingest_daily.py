"""``ingest_daily``: the daily history per contract (open interest, closing quote, greeks, IV and
day bar), built from the stored snapshots after each session."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from cli.common import (
    COMMAND_SETTINGS,
    deadline_option,
    env_file_option,
    load_settings,
    log_format_option,
    metrics_textfile_option,
    one_off_underlyings,
    parse_deadline,
    progress_display,
    refuse,
    reporter,
    run,
    underlying_option,
    version_option,
)
from options.jobs.wiring import run_daily_job

DEFAULT_BUDGET = 10_000


@click.command(context_settings=COMMAND_SETTINGS)
@env_file_option
@underlying_option
@click.option(
    "--from",
    "first",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    metavar="DATE",
    help="Backfill the sessions from DATE (YYYY-MM-DD, New York) that have no snapshots.",
)
@click.option(
    "--to",
    "last",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    metavar="DATE",
    help="The last session to backfill (YYYY-MM-DD; with --from).",
)
@click.option(
    "--budget",
    type=click.IntRange(min=1),
    default=DEFAULT_BUDGET,
    show_default=True,
    metavar="REQUESTS",
    help="At most this many API requests for the backfill; the rest is left for the next run.",
)
@deadline_option
@log_format_option
@metrics_textfile_option
@version_option
def main(
    env_file: Path | None,
    underlyings: tuple[str, ...],
    first: dt.datetime | None,
    last: dt.datetime | None,
    budget: int,
    deadline: str | None,
    log_format: str,
    metrics_textfile: Path | None,
) -> None:
    """Build the daily rows (contract_days) of the sessions not complete yet.

    For each tracked underlying (or --underlying) and each closed session since its first
    snapshot: the closing quote, IV, greeks and day bar from the session's last complete slot,
    the open interest from the next session's first. A session waits for that next slot; a
    rebuild changes nothing.

    With --from and --to, then the sessions of that range without snapshots: the contracts
    listed on each (as_of) and their daily bars. Resumable: a killed or budget-bound backfill
    goes on from where it stopped, and skips the sessions already complete.
    """
    if (first is None) != (last is None):
        refuse("--from DATE and --to DATE go together: give both, or neither")
    if first is not None and last is not None and first > last:
        refuse(f"--from {first:%Y-%m-%d} is after --to {last:%Y-%m-%d}")
    seconds = parse_deadline(deadline)
    settings = load_settings(env_file, log_format, job="ingest_daily")
    only = one_off_underlyings(underlyings)
    progress = progress_display(log_format)
    span = (first.date(), last.date()) if first is not None and last is not None else None
    run(
        lambda stop: run_daily_job(
            settings,
            only=only,
            stop=stop,
            progress=progress,
            backfill_range=span,
            budget=budget,
            on_end=reporter(metrics_textfile),
        ),
        deadline=seconds,
        progress=progress,
    )
