"""``ingest_options``: sync the active option contracts of the configured underlyings."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import (
    deadline_option,
    env_file_option,
    load_settings,
    log_format_option,
    parse_deadline,
    run,
    status_reporter,
    underlying_option,
)
from options.jobs.wiring import run_options_job


@click.command()
@env_file_option
@underlying_option
@deadline_option
@log_format_option
@click.option("--dry-run", is_flag=True, help="Fetch and report, write nothing.")
def main(
    env_file: Path | None,
    underlyings: tuple[str, ...],
    deadline: str | None,
    log_format: str,
    dry_run: bool,
) -> None:
    """Sync all active option contracts of the configured underlyings into PostgreSQL."""
    seconds = parse_deadline(deadline)
    settings = load_settings(env_file, underlyings, log_format)
    progress = status_reporter()
    run(
        lambda stop: run_options_job(settings, dry_run=dry_run, stop=stop, progress=progress),
        deadline=seconds,
    )
