"""``ingest_options``: sync the active option contracts of the configured underlyings."""

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
    """Sync all active option contracts of the tracked underlyings into PostgreSQL.

    Underlyings: the tracked ones (UNDERLYINGS and `ingest_admin underlyings add`), or
    --underlying for one run. Expired contracts of every underlying are marked inactive.
    """
    seconds = parse_deadline(deadline)
    settings = load_settings(env_file, log_format)
    only = one_off_underlyings(underlyings)
    progress = status_reporter()
    run(
        lambda stop: run_options_job(
            settings, only=only, dry_run=dry_run, stop=stop, progress=progress
        ),
        deadline=seconds,
    )
