"""``ingest_snapshots``: store a snapshot of every active contract."""

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
from options.jobs import run_snapshots_job


@click.command()
@env_file_option
@underlying_option
@deadline_option
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
    retain_days: int | None,
) -> None:
    """Store a market snapshot (quote, trade, greeks, IV, open interest) of every active contract.

    Underlyings: --underlying when given, otherwise UNDERLYINGS plus every underlying with
    active contracts in the database.
    """
    seconds = parse_deadline(deadline)
    settings = load_settings(env_file, underlyings)
    run(
        lambda stop: run_snapshots_job(
            settings,
            explicit_underlyings=bool(underlyings),
            retain_days=retain_days,
            stop=stop,
        ),
        deadline=seconds,
    )
