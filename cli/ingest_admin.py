"""``ingest_admin``: operator tasks (migrate the schema, run the simulator, run the demo)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from cli.common import configure_logging, env_file_option, fail, load_settings
from options.errors import OptionsError


@click.group()
def main() -> None:
    """Operator tasks for the options history database."""


@main.command()
@env_file_option
def migrate(env_file: Path | None) -> None:
    """Apply pending database migrations (the jobs also do this at start)."""
    from options.jobs import migrate as apply

    settings = load_settings(env_file)
    try:
        applied = asyncio.run(apply(settings))
    except OptionsError as exc:
        fail(exc)
    click.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--underlyings",
    "count",
    default=5,
    show_default=True,
    type=click.IntRange(1),
    help="How many simulated underlyings.",
)
@click.option(
    "--contracts",
    default=2000,
    show_default=True,
    type=click.IntRange(1),
    help="Contracts per underlying.",
)
@click.option(
    "--api-key",
    default="sim-key",
    show_default=True,
    help="The key clients must send; empty to accept any.",
)
@click.option("--latency", default=0.0, type=click.FloatRange(0), help="Seconds per response.")
@click.option(
    "--error-rate",
    default=0.0,
    type=click.FloatRange(0, 1),
    help="Fraction of requests answered 5xx.",
)
@click.option(
    "--rate-limit",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="Requests/second before answering 429.",
)
@click.option(
    "--truncate-rate",
    default=0.0,
    type=click.FloatRange(0, 1),
    help="Fraction of list pages cut short.",
)
def simulate(
    host: str,
    port: int,
    count: int,
    contracts: int,
    api_key: str,
    latency: float,
    error_rate: float,
    rate_limit: float | None,
    truncate_rate: float,
) -> None:
    """Serve a Polygon-compatible simulated API (for trials, tests and benchmarks)."""
    from options.simulator import SimulatorConfig, make_universe_names, serve_forever

    configure_logging("INFO")
    config = SimulatorConfig(
        underlyings=make_universe_names(count),
        contracts_per_underlying=contracts,
        api_key=api_key or None,
        latency=latency,
        error_rate=error_rate,
        requests_per_second=rate_limit,
        truncate_rate=truncate_rate,
    )
    serve_forever(
        config,
        host=host,
        port=port,
        on_ready=lambda url: click.echo(f"simulator listening on {url}", err=True),
    )


@main.command()
@env_file_option
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path(".local/pgdata"),
    show_default=True,
    help="Where the local PostgreSQL keeps its data when DATABASE_URL is not set.",
)
def demo(env_file: Path | None, data_dir: Path) -> None:
    """Run the jobs against the simulator and show what landed.

    Uses DATABASE_URL when it is set, otherwise a local PostgreSQL in --data-dir.
    """
    from options.demo import run_demo

    settings = load_settings(env_file)
    logging.getLogger().setLevel(logging.WARNING)
    try:
        raise SystemExit(run_demo(settings, data_dir=data_dir))
    except OptionsError as exc:
        fail(exc)
