"""``ingest_options``: sync the active option contracts of the tracked underlyings."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from cli.common import (
    COMMAND_SETTINGS,
    deadline_option,
    dry_run_options,
    env_file_option,
    fail,
    load_settings,
    log_format_option,
    metrics_textfile_option,
    one_off_underlyings,
    parse_deadline,
    progress_display,
    refuse,
    reporter,
    run,
    show_preview,
    underlying_option,
    version_option,
)
from options.errors import OptionsError
from options.jobs.wiring import preview_job, run_options_job


@click.command(context_settings=COMMAND_SETTINGS)
@env_file_option
@underlying_option
@deadline_option
@log_format_option
@dry_run_options
@metrics_textfile_option
@version_option
def main(
    env_file: Path | None,
    underlyings: tuple[str, ...],
    deadline: str | None,
    log_format: str,
    dry_run: bool,
    output: str,
    limit: int,
    metrics_textfile: Path | None,
) -> None:
    """Sync all active option contracts of the tracked underlyings into PostgreSQL.

    Underlyings: the tracked ones (UNDERLYINGS and `ingest_admin underlyings add`), or
    --underlying for one run. Expired contracts of every underlying are marked inactive.
    """
    seconds = parse_deadline(deadline)
    settings = load_settings(env_file, log_format, job="ingest_options")
    only = one_off_underlyings(underlyings)
    if dry_run:
        if metrics_textfile is not None:
            refuse("--metrics-textfile describes a run: a --dry-run records none")
        try:
            preview = asyncio.run(preview_job(settings, "options", only=only, limit=limit))
        except OptionsError as exc:
            fail(exc)
        sys.exit(show_preview(preview, output))
    progress = progress_display(log_format)
    run(
        lambda stop: run_options_job(
            settings, only=only, stop=stop, progress=progress, on_end=reporter(metrics_textfile)
        ),
        deadline=seconds,
        progress=progress,
    )
