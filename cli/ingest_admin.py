"""``ingest_admin``: operator tasks (migrate the schema, run the simulator, run the demo)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import click

from cli.common import env_file_option, fail, load_settings, one_off_underlyings
from options.errors import OptionsError
from options.ops.logs import configure_logging


@click.group()
def main() -> None:
    """Operator tasks for the options history database."""


@main.command()
@env_file_option
def migrate(env_file: Path | None) -> None:
    """Apply pending database migrations (the jobs also do this at start)."""
    from options.jobs.wiring import migrate as apply

    settings = load_settings(env_file)
    try:
        applied = asyncio.run(apply(settings))
    except OptionsError as exc:
        fail(exc)
    click.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@main.group()
def underlyings() -> None:
    """The tracked underlyings: those both jobs work on."""


@underlyings.command("list")
@env_file_option
def underlyings_list(env_file: Path | None) -> None:
    """Show every tracked underlying: status, origin, last sync, last complete snapshot, error.

    The jobs add what UNDERLYINGS names when they start; this lists the table as it is."""
    _underlyings(env_file, "list", ())


@underlyings.command("add")
@env_file_option
@click.argument("tickers", nargs=-1, required=True, metavar="TICKER...")
def underlyings_add(env_file: Path | None, tickers: tuple[str, ...]) -> None:
    """Track TICKER from now on (both jobs), whatever UNDERLYINGS says."""
    _underlyings(env_file, "add", tickers)


@underlyings.command("disable")
@env_file_option
@click.argument("tickers", nargs=-1, required=True, metavar="TICKER...")
def underlyings_disable(env_file: Path | None, tickers: tuple[str, ...]) -> None:
    """Stop syncing and snapshotting TICKER (its history stays) until `enable`."""
    _underlyings(env_file, "disable", tickers)


@underlyings.command("enable")
@env_file_option
@click.argument("tickers", nargs=-1, required=True, metavar="TICKER...")
def underlyings_enable(env_file: Path | None, tickers: tuple[str, ...]) -> None:
    """Track a disabled TICKER again."""
    _underlyings(env_file, "enable", tickers)


def _underlyings(env_file: Path | None, action: str, tickers: tuple[str, ...]) -> None:
    from options.jobs.wiring import manage_underlyings

    settings = load_settings(env_file)
    validated = one_off_underlyings(tickers) if tickers else ()
    try:
        lines = asyncio.run(manage_underlyings(settings, action, validated))
    except OptionsError as exc:
        fail(exc)
    for line in lines:
        click.echo(line)


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

    configure_logging("INFO", environ=os.environ)
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
    from options.dev.demo import run_demo

    settings = load_settings(env_file)
    logging.getLogger().setLevel(logging.WARNING)
    try:
        raise SystemExit(run_demo(settings, data_dir=data_dir))
    except OptionsError as exc:
        fail(exc)


@main.command("install-units")
@click.option(
    "--system",
    "scope",
    flag_value="system",
    default=True,
    help="System units in /etc/systemd/system, hardened (needs root; the default).",
)
@click.option(
    "--user",
    "scope",
    flag_value="user",
    help="User units in ~/.config/systemd/user (less sandboxing; see the README).",
)
@click.option("--dry-run", is_flag=True, help="Print the rendered files, write and run nothing.")
@env_file_option
@click.option(
    "--snapshot-every",
    type=click.Choice(["5", "10", "15"]),
    default="10",
    show_default=True,
    help="Minutes between snapshots, 09:30 to 16:00 New York time.",
)
@click.option(
    "--user-name",
    metavar="NAME",
    default=None,
    help="Run the system units as this existing user instead of a dynamic one.",
)
def install_units(
    scope: str, dry_run: bool, env_file: Path | None, snapshot_every: str, user_name: str | None
) -> None:
    """Render the systemd units for this installation, install them and start the timers."""
    from options.ops import units

    unit_scope = units.Scope(scope)
    unit_dir = units.default_unit_dir(unit_scope)
    try:
        installation = units.Installation.detect(env_file=env_file)
        rendered = units.render_units(
            installation,
            scope=unit_scope,
            snapshot_every=int(snapshot_every),
            user_name=user_name,
        )
        if dry_run:
            click.echo(units.format_units(rendered, unit_dir), nl=False)
            return
        written = units.install_units(rendered, scope=unit_scope, unit_dir=unit_dir)
    except OptionsError as exc:
        fail(exc)
    flag = " --user" if unit_scope is units.Scope.USER else ""
    click.echo(f"installed {len(written)} units in {unit_dir}; timers enabled and started")
    click.echo(f"next runs: systemctl{flag} list-timers 'ingest_*'")
    name = units.user_without_linger() if unit_scope is units.Scope.USER else None
    if name:
        click.echo(
            f"warning: the timers stop when you log out: run `loginctl enable-linger {name}`",
            err=True,
        )


@main.command("uninstall-units")
@click.option(
    "--system", "scope", flag_value="system", default=True, help="System units (default)."
)
@click.option("--user", "scope", flag_value="user", help="User units.")
def uninstall_units(scope: str) -> None:
    """Stop and disable the timers, remove the unit files, reload systemd."""
    from options.ops import units

    unit_scope = units.Scope(scope)
    unit_dir = units.default_unit_dir(unit_scope)
    try:
        removed = units.uninstall_units(scope=unit_scope, unit_dir=unit_dir)
    except OptionsError as exc:
        fail(exc)
    click.echo(f"removed {len(removed)} units from {unit_dir}" if removed else "nothing installed")
