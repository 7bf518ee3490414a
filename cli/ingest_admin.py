"""``ingest_admin``: operator tasks (migrate the schema, compact and archive old days, the tracked
underlyings, the systemd units, the simulator, the demo)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from cli.common import (
    COMMAND_SETTINGS,
    deadline_option,
    env_file_option,
    fail,
    load_settings,
    one_off_underlyings,
    parse_deadline,
    refuse,
    run,
    version_option,
)
from cli.status import status
from options.errors import ExitCode, OptionsError
from options.ops.logs import configure_logging

if TYPE_CHECKING:
    from options.ops.units import Scope

F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings=COMMAND_SETTINGS)
@version_option
def main() -> None:
    """Operator tasks for the options history database."""


@main.command()
@env_file_option
@version_option
def migrate(env_file: Path | None) -> None:
    """Apply pending database migrations (the jobs also do this at start)."""
    from options.jobs.wiring import migrate as apply

    settings = load_settings(env_file)
    try:
        applied = asyncio.run(apply(settings))
    except OptionsError as exc:
        fail(exc)
    click.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@main.command()
@env_file_option
@click.option(
    "--before",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    metavar="DATE",
    help="Archive the days before DATE (YYYY-MM-DD; days are UTC, like the partitions).",
)
@click.option(
    "--older-than",
    type=click.IntRange(min=1),
    default=None,
    metavar="DAYS",
    help="Archive the days older than DAYS days (default: ARCHIVE_AFTER_DAYS).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Show the days that would be archived, their rows and size; write and drop nothing.",
)
@click.option(
    "--keep-in-postgres",
    is_flag=True,
    help="Write, verify and record the days, but drop nothing from PostgreSQL.",
)
@version_option
def archive(
    env_file: Path | None,
    before: dt.datetime | None,
    older_than: int | None,
    dry_run: bool,
    keep_in_postgres: bool,
) -> None:
    """Move old days of snapshots to Parquet at ARCHIVE_URL, then drop them from PostgreSQL.

    Each day is written under ARCHIVE_URL/.staging, read back and verified (a digest of every
    value of every row against PostgreSQL's), moved into place, and recorded in archived_days
    before its partition is dropped; a file in place is replaced only by a verified one.
    Run it again at will: archived days are skipped, an interrupted day is finished. Today's
    and future days are never archived. Prints each day's rows, Parquet bytes and bytes per
    snapshot, then the total. Exit 4 when another archive or retention is running.
    """
    from options.jobs.retention import format_archive_run
    from options.jobs.wiring import archive_snapshots

    if before is not None and older_than is not None:
        refuse("--before DATE and --older-than DAYS both say which days: give one")
    if dry_run and keep_in_postgres:
        refuse("--dry-run drops nothing anyway: it does not go with --keep-in-postgres")
    settings = load_settings(env_file)

    async def archive_days(stop: asyncio.Event) -> int:
        result = await archive_snapshots(
            settings,
            before=before.date() if before is not None else None,
            older_than=older_than,
            dry_run=dry_run,
            keep_in_postgres=keep_in_postgres,
            stop=stop,
        )
        for line in format_archive_run(result):
            click.echo(line)
        if result.busy:
            return ExitCode.ALREADY_RUNNING
        if result.failed is not None:
            return ExitCode.FAILED
        return ExitCode.INTERRUPTED if result.interrupted else ExitCode.OK

    run(archive_days)


@main.command()
@env_file_option
@click.option(
    "--before",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    metavar="DATE",
    help="Compact only the days before DATE (YYYY-MM-DD, UTC days like the partitions).",
)
@click.option(
    "--dry-run", is_flag=True, help="Show the days that would be compacted; change nothing."
)
@version_option
def compact(env_file: Path | None, before: dt.datetime | None, dry_run: bool) -> None:
    """Move the finished days of snapshots to the compact tier (about 145 bytes a snapshot
    instead of 345), each day in one transaction, verified before it commits.

    ingest_options does this after each sync; this command does it now, for instance after
    an upgrade. Interrupt it at will: a first signal stops after the day in progress, a
    second rolls that day back; a rerun goes on from there. Today's and future days are
    never compacted. Exit 3 when a day was left because another session kept it in use (a
    line names it; the other days are compacted, a rerun does it), 4 when another
    compaction, archive or retention is running.
    """
    from options.jobs.retention import busy_days, format_compaction
    from options.jobs.wiring import compact_snapshots

    settings = load_settings(env_file)

    async def compact_days(stop: asyncio.Event) -> int:
        reports = await compact_snapshots(
            settings,
            before=before.date() if before is not None else None,
            dry_run=dry_run,
            stop=stop,
        )
        for line in format_compaction(reports):
            click.echo(line)
        if reports is None:
            return ExitCode.ALREADY_RUNNING
        return ExitCode.PARTIAL if busy_days(reports) else ExitCode.OK

    run(compact_days)


@main.command()
@env_file_option
@click.option(
    "--since",
    default="24h",
    show_default=True,
    metavar="DURATION",
    help="Compute the slots taken in the last DURATION (90m, 24h, 168h).",
)
@deadline_option
@version_option
def greeks(env_file: Path | None, since: str, deadline: str | None) -> None:
    """Compute IV and greeks for the snapshots the API left without them (computed_greeks).

    The slots of the last --since not computed yet, or with chains stored since, one slot per
    transaction. The snapshot service runs this right after each ingest_snapshots run; it does
    nothing when COMPUTE_GREEKS=false. Prints one line per slot and the total.
    """
    from options.config import parse_duration
    from options.jobs.wiring import greeks_command

    try:
        seconds = parse_duration(since, name="--since")
    except OptionsError as exc:
        fail(exc)
    settings = load_settings(env_file)

    async def compute(stop: asyncio.Event) -> int:
        moment = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
        result = await greeks_command(settings, since=moment, stop=stop)
        if result is None:
            click.echo("COMPUTE_GREEKS=false: nothing computed")
            return ExitCode.OK
        slots, done, failed = result
        click.echo(
            f"{slots} slots: IV and greeks computed for {done:,} snapshots, "
            f"{failed:,} could not be (see computed_greeks.reason)"
        )
        return ExitCode.INTERRUPTED if stop.is_set() else ExitCode.OK

    run(compute, deadline=parse_deadline(deadline))


@main.group()
@version_option
def underlyings() -> None:
    """The tracked underlyings: those both jobs work on."""


@underlyings.command("list")
@env_file_option
@version_option
def underlyings_list(env_file: Path | None) -> None:
    """Show every tracked underlying: status, origin, last sync, last complete snapshot, error.

    The jobs add what UNDERLYINGS names when they start; this lists the table as it is."""
    _underlyings(env_file, "list", ())


@underlyings.command("add")
@env_file_option
@version_option
@click.argument("tickers", nargs=-1, required=True, metavar="TICKER...")
def underlyings_add(env_file: Path | None, tickers: tuple[str, ...]) -> None:
    """Track TICKER from now on (both jobs), whatever UNDERLYINGS says."""
    _underlyings(env_file, "add", tickers)


@underlyings.command("disable")
@env_file_option
@version_option
@click.argument("tickers", nargs=-1, required=True, metavar="TICKER...")
def underlyings_disable(env_file: Path | None, tickers: tuple[str, ...]) -> None:
    """Stop syncing and snapshotting TICKER (its history stays) until `enable`."""
    _underlyings(env_file, "disable", tickers)


@underlyings.command("enable")
@env_file_option
@version_option
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
    default=None,
    type=click.IntRange(1),
    help="How many simulated underlyings, named AAAA, AAAB, ... (default 5).",
)
@click.option(
    "--tickers",
    default=None,
    metavar="TICKER,...",
    help="Serve these underlyings instead (e.g. AAPL,SPY,I:SPX: what UNDERLYINGS names).",
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
@version_option
def simulate(
    host: str,
    port: int,
    count: int | None,
    tickers: str | None,
    contracts: int,
    api_key: str,
    latency: float,
    error_rate: float,
    rate_limit: float | None,
    truncate_rate: float,
) -> None:
    """Serve a Polygon-compatible simulated API (for trials, tests and benchmarks).

    Once listening it prints the URL, the key clients must send and the tickers it serves.
    """
    from options.config import parse_underlyings
    from options.simulator import SimulatorConfig, describe, make_universe_names, serve_forever

    if count is not None and tickers is not None:
        refuse("--underlyings N and --tickers name the served underlyings twice: give one")
    configure_logging("INFO", environ=os.environ)
    try:
        names = parse_underlyings(tickers, variable="--tickers") if tickers else ()
    except OptionsError as exc:
        fail(exc)
    try:
        config = SimulatorConfig(
            underlyings=names or make_universe_names(5 if count is None else count),
            contracts_per_underlying=contracts,
            api_key=api_key or None,
            latency=latency,
            error_rate=error_rate,
            requests_per_second=rate_limit,
            truncate_rate=truncate_rate,
        )
    except ValueError as exc:
        refuse(f"--tickers: {exc}")
    serve_forever(
        config,
        host=host,
        port=port,
        on_ready=lambda url: click.echo(describe(config, url), err=True),
    )


@main.command()
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path(".local/pgdata"),
    show_default=True,
    help="Where the demo's own PostgreSQL keeps its data (unless --database-url).",
)
@click.option(
    "--database-url",
    metavar="URL",
    default=None,
    help="Write into this PostgreSQL database instead of the demo's own (simulated contracts "
    "and snapshots land there). DATABASE_URL is never used by the demo.",
)
@version_option
def demo(data_dir: Path, database_url: str | None) -> None:
    """Run the jobs against the simulator and show what landed.

    Writes into its own local PostgreSQL in --data-dir, or into --database-url; never into
    DATABASE_URL, and the jobs it runs read no .env.
    """
    from options.config import parse_database_url
    from options.dev.demo import run_demo
    from options.dev.localdb import LocalPostgresError

    data_dir_given = (
        click.get_current_context().get_parameter_source("data_dir")
        is click.core.ParameterSource.COMMANDLINE
    )
    if database_url is not None and data_dir_given:
        refuse(
            "--data-dir is where the demo's own database lives: it does not go with --database-url"
        )
    try:
        url = parse_database_url(database_url, name="--database-url") if database_url else None
        configure_logging("WARNING", environ=os.environ)
    except OptionsError as exc:
        fail(exc)
    logging.getLogger().setLevel(logging.WARNING)
    try:
        code = run_demo(data_dir=data_dir, database_url=url, environ=os.environ)
    except OptionsError as exc:
        fail(exc)
    except LocalPostgresError as exc:
        first = str(exc).splitlines()[0]
        fail(OptionsError(f"{first} (or give the demo a database: --database-url URL)"))
    raise SystemExit(code)


def scope_options(func: F) -> F:
    """``--system`` (the default) or ``--user``: which service manager's units."""
    func = click.option("--user", is_flag=True, help="User units in ~/.config/systemd/user.")(func)
    return click.option(
        "--system", is_flag=True, help="System units in /etc/systemd/system (the default)."
    )(func)


def chosen_scope(system: bool, user: bool) -> Scope:
    """The scope the flags ask for; both at once is refused in one line (exit 2)."""
    from options.ops.units import Scope

    if system and user:
        refuse("--system and --user do not go together: give one (--system is the default)")
    return Scope.USER if user else Scope.SYSTEM


@main.command("install-units")
@scope_options
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
    help="Run the system units as this existing user instead of options-history.",
)
@click.option(
    "--metrics-dir",
    type=click.Path(path_type=Path),
    metavar="DIR",
    default=None,
    help="Each job writes its run's figures to DIR/<job>.prom for node_exporter's textfile "
    "collector (/var/lib/options-history/metrics: made by systemd).",
)
@version_option
def install_units(
    system: bool,
    user: bool,
    dry_run: bool,
    env_file: Path | None,
    snapshot_every: str,
    user_name: str | None,
    metrics_dir: Path | None,
) -> None:
    """Render the systemd units for this installation, install them and start the timers.

    --system (the default): hardened units in /etc/systemd/system, run as the options-history
    system user (made with systemd-sysusers; needs root), writing only the directories the env
    file's settings name (a local ARCHIVE_URL) and --metrics-dir, readable by the
    options-history group. --user: units in ~/.config/systemd/user, less sandboxing (see the
    README).
    """
    from options.config import Settings
    from options.ops import service_access, units

    unit_scope = chosen_scope(system, user)
    unit_dir = units.default_unit_dir(unit_scope)
    system_scope = unit_scope is units.Scope.SYSTEM
    try:
        installation = units.Installation.detect(env_file=env_file)
        # the units' settings: the env file alone (systemd gives the jobs nothing else)
        settings = Settings.from_env({}, env_file=installation.env_file)
        outputs = service_access.Outputs.from_settings(settings, metrics_dir=metrics_dir)
        rendered = units.render_units(
            installation,
            scope=unit_scope,
            snapshot_every=int(snapshot_every),
            user_name=user_name,
            outputs=outputs,
        )
        account = service_access.service_account(user_name) if system_scope else None
        if dry_run:
            sysusers = service_access.render_sysusers(account) if account else None
            click.echo(units.format_units(rendered, unit_dir, sysusers=sysusers), nl=False)
            return
        written = units.install_units(
            rendered,
            scope=unit_scope,
            unit_dir=unit_dir,
            account=account,
            directories=outputs.made_by_install(),
        )
    except OptionsError as exc:
        fail(exc)
    flag = " --user" if unit_scope is units.Scope.USER else ""
    click.echo(f"installed {len(rendered)} units in {unit_dir}; timers enabled and started")
    if account is not None:
        click.echo(
            f"the jobs run as {account.user} ({written[0]}); what they write is readable by "
            f"the group {account.group} (add a reader: usermod -aG {account.group} NAME)"
        )
        for warning in service_access.directory_warnings(outputs.made_by_install(), account):
            click.echo(f"warning: {warning}", err=True)
    click.echo(f"next runs: systemctl{flag} list-timers 'ingest_*'")
    name = units.user_without_linger() if unit_scope is units.Scope.USER else None
    if name:
        click.echo(
            f"warning: the timers stop when you log out: run `loginctl enable-linger {name}`",
            err=True,
        )


@main.command("uninstall-units")
@scope_options
@click.option(
    "--dry-run", is_flag=True, help="Print what would be stopped and removed; do nothing."
)
@version_option
def uninstall_units(system: bool, user: bool, dry_run: bool) -> None:
    """Stop and disable the timers, remove the unit files, reload systemd.

    Drop-ins made with `systemctl edit` stay, and so do the jobs' user and group and every
    directory they wrote (the archive is data).
    """
    from options.ops import units

    unit_scope = chosen_scope(system, user)
    unit_dir = units.default_unit_dir(unit_scope)
    if dry_run:
        plan = units.plan_uninstall(scope=unit_scope, unit_dir=unit_dir)
        click.echo(units.format_uninstall_plan(plan))
        return
    try:
        plan = units.plan_uninstall(scope=unit_scope, unit_dir=unit_dir)
        removed = units.uninstall_units(scope=unit_scope, unit_dir=unit_dir)
    except OptionsError as exc:
        fail(exc)
    if not removed:
        click.echo("nothing installed")
        return
    for path in removed:
        click.echo(f"removed {path}")
    if plan.kept:
        click.echo(plan.kept)


main.add_command(status)
