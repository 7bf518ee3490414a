"""``ingest_snapshots``: store a snapshot of every active contract."""

from __future__ import annotations

import click

from options.errors import ExitCode


@click.command()
def main() -> None:
    """Store a market snapshot of every active contract (not implemented yet)."""
    click.echo("error: ingest_snapshots is not implemented yet", err=True)
    raise SystemExit(int(ExitCode.FAILED))
