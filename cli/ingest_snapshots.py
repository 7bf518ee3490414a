"""``ingest_snapshots``: store a snapshot of every tracked underlying's chain."""

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
from options.jobs.wiring import preview_job, run_snapshots_job


@click.command(context_settings=COMMAND_SETTINGS)
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
    help="Days older than N leave PostgreSQL (default: SNAPSHOT_RETAIN_DAYS, or keep "
    "everything): archived first when ARCHIVE_URL is set; without an archive, deleted only "
    "with SNAPSHOT_DELETE_UNARCHIVED=true.",
)
@dry_run_options
@metrics_textfile_option
@version_option
def main(
    env_file: Path | None,
    underlyings: tuple[str, ...],
    deadline: str | None,
    log_format: str,
    force: bool,
    resume: bool,
    retain_days: int | None,
    dry_run: bool,
    output: str,
    limit: int,
    metrics_textfile: Path | None,
) -> None:
    """Store a market snapshot (quote, trade, greeks, IV, open interest) of every active contract.

    Underlyings: the tracked ones (UNDERLYINGS and `ingest_admin underlyings add`), or
    --underlying for one run. Each chain is stored with its coverage row; --resume completes an
    interrupted slot. Outside market hours (weekends, NYSE holidays, after an early close) it
    exits 0 at once with a line saying why, unless --force. --dry-run reads the chains now and
    shows what would be stored, whatever the hour.
    """
    seconds = parse_deadline(deadline)
    settings = load_settings(env_file, log_format, job="ingest_snapshots")
    only = one_off_underlyings(underlyings)
    if resume and only:
        refuse("--resume completes the chains the interrupted slot planned: it takes no -u")
    if dry_run:
        for given, name in (
            (resume, "--resume"),
            (retain_days is not None, "--retain-days"),
            (metrics_textfile is not None, "--metrics-textfile"),
        ):
            if given:
                refuse(f"--dry-run stores nothing: it does not go with {name}")
        try:
            preview = asyncio.run(preview_job(settings, "snapshots", only=only, limit=limit))
        except OptionsError as exc:
            fail(exc)
        sys.exit(show_preview(preview, output))
    progress = progress_display(log_format)
    run(
        lambda stop: run_snapshots_job(
            settings,
            only=only,
            resume=resume,
            retain_days=retain_days,
            stop=stop,
            force=force,
            progress=progress,
            on_end=reporter(metrics_textfile),
        ),
        deadline=seconds,
        progress=progress,
    )
