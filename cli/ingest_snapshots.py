"""``ingest_snapshots``: store a snapshot of every active contract."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import (
    deadline_option,
    env_file_option,
    load_settings,
    log_format_option,
    one_off_underlyings,
    parse_deadline,
    run,
    status_reporter,
    underlying_option,
)
from options.jobs.wiring import run_snapshots_job


@click.command()
@env_file_option
@underlying_option
@deadline_option
@log_format_option
@click.option(
    "--force",
    is_flag=True,
    help="Take the snapshot even when the market is closed (weekend, holiday, after an early "
    "close).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Complete the latest interrupted or failed snapshot slot under its own time, "
    "fetching only the chains it did not store completely.",
)
@click.option(
    "--retain-days",
    type=click.IntRange(min=1),
    default=None,
    help="Drop daily snapshot partitions older than N days (default: SNAPSHOT_RETAIN_DAYS, "
    "or keep everything).",
)
def main(
    env_file: Path | None,
    underlyings: tuple[str, ...],
    deadline: str | None,
    log_format: str,
    force: bool,
    resume: bool,
    retain_days: int | None,
) -> None:
    """Store a market snapshot (quote, trade, greeks, IV, open interest) of every active contract.

    Underlyings: the tracked ones (UNDERLYINGS and `ingest_admin underlyings add`), or
    --underlying for one run. Each chain is stored with its coverage row; --resume completes an
    interrupted slot. Outside market hours (weekends, NYSE holidays, after an early close) it
    exits 0 at once with a line saying why, unless --force.
    """
    seconds = parse_deadline(deadline)
    settings = load_settings(env_file, log_format)
    only = one_off_underlyings(underlyings)
    progress = status_reporter()
    run(
        lambda stop: run_snapshots_job(
            settings,
            only=only,
            resume=resume,
            retain_days=retain_days,
            stop=stop,
            force=force,
            progress=progress,
        ),
        deadline=seconds,
    )
