"""``ingest_options``: sync the active option contracts of the configured underlyings."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import (
    deadline_option,
    env_file_option,
    load_settings,
    parse_deadline,
    run,
    underlying_option,
)
from options.jobs import run_options_job


@click.command()
@env_file_option
@underlying_option
@deadline_option
@click.option("--dry-run", is_flag=True, help="Fetch and report, write nothing.")
def main(
    env_file: Path | None, underlyings: tuple[str, ...], deadline: str | None, dry_run: bool
) -> None:
    """Sync all active option contracts of the configured underlyings into PostgreSQL."""
    seconds = parse_deadline(deadline)
    settings = load_settings(env_file, underlyings)
    run(lambda stop: run_options_job(settings, dry_run=dry_run, stop=stop), deadline=seconds)
