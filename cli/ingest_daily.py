"""``ingest_daily``: the daily history per contract (open interest, closing quote, greeks, IV and
day bar), built from the stored snapshots after each session."""

from __future__ import annotations

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
    reporter,
    run,
    underlying_option,
    version_option,
)
from options.jobs.wiring import run_daily_job


@click.command(context_settings=COMMAND_SETTINGS)
@env_file_option
@underlying_option
@deadline_option
@log_format_option
@metrics_textfile_option
@version_option
def main(
    env_file: Path | None,
    underlyings: tuple[str, ...],
    deadline: str | None,
    log_format: str,
    metrics_textfile: Path | None,
) -> None:
    """Build the daily rows (contract_days) of the sessions not complete yet.

    For each tracked underlying (or --underlying) and each closed session since its first
    snapshot: the closing quote, IV, greeks and day bar from the session's last complete slot,
    the open interest from the next session's first. A session waits for that next slot; a
    rebuild changes nothing.
    """
    seconds = parse_deadline(deadline)
    settings = load_settings(env_file, log_format, job="ingest_daily")
    only = one_off_underlyings(underlyings)
    progress = progress_display(log_format)
    run(
        lambda stop: run_daily_job(
            settings, only=only, stop=stop, progress=progress, on_end=reporter(metrics_textfile)
        ),
        deadline=seconds,
        progress=progress,
    )
