"""``options_read``: read the stored history back (chains, contract histories, day exports,
smiles), from PostgreSQL or the Parquet archive. Read-only: it never writes to the database."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from cli.common import (
    COMMAND_SETTINGS,
    echo_error,
    env_file_option,
    fail,
    load_settings,
    refuse,
    version_option,
)
from options.errors import ExitCode, OptionsError

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")

TIME_HELP = (
    "New York time (2026-11-20 15:30) unless an offset is given (2026-11-20T20:30Z, "
    "2026-11-20T15:30-05:00)."
)
EXIT_HELP = (
    "Exit status: 0 when something was read; 1 when nothing stored answers (no complete "
    "chain at or before --at, no snapshot in the range) or a tier cannot be read; 2 on a bad "
    "option, ticker or setting."
)


def archive_option(func: F) -> F:
    """``--archive-url URL``: where archived days are read from."""
    return click.option(
        "--archive-url",
        metavar="URL",
        default=None,
        help="The Parquet archive (a directory or s3://bucket/prefix; AWS_* variables for S3) "
        "to read the days dropped from PostgreSQL; default: the ARCHIVE_URL setting.",
    )(func)


def format_option(choices: tuple[str, ...], default: str) -> Callable[[F], F]:
    """``--format``: how the rows are written."""
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(choices),
        default=default,
        show_default=True,
        help="table: for a person (a few columns, New York times); csv, json, parquet: every "
        "column (times in New York with their offset). parquet needs --out.",
    )


def out_option(func: F) -> F:
    """``--out FILE``: write there instead of stdout."""
    return click.option(
        "--out",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        metavar="FILE",
        help="Write to FILE (atomically) instead of stdout.",
    )(func)


def expiration_option(func: F) -> F:
    """``--expiration DATE`` (repeatable)."""
    return click.option(
        "--expiration",
        "expirations",
        multiple=True,
        metavar="YYYY-MM-DD",
        help="Only contracts expiring on this day (repeatable).",
    )(func)


@click.group(context_settings=COMMAND_SETTINGS)
@version_option
def main() -> None:
    """Read the options history: a chain as it was, a contract's history, a day's export, a
    volatility smile. Reads PostgreSQL and, for archived days, the Parquet archive; writes
    nothing to either. Needs DATABASE_URL only."""


@main.command(context_settings=COMMAND_SETTINGS, epilog=EXIT_HELP)
@click.argument("underlying")
@click.option("--at", metavar="TIME", default=None, help=f"Default: the latest. {TIME_HELP}")
@expiration_option
@format_option(("table", "csv", "json", "parquet"), "table")
@out_option
@archive_option
@env_file_option
@version_option
def chain(
    underlying: str,
    at: str | None,
    expirations: tuple[str, ...],
    fmt: str,
    out: Path | None,
    archive_url: str | None,
    env_file: Path | None,
) -> None:
    """The chain of UNDERLYING at its latest complete slot at or before --at.

    One line on stderr names the slot, the number of contracts and where they were read
    from; the rows go to stdout or --out."""
    from options.ops.read_commands import describe_chain, parse_day, parse_time, read_chain
    from options.ops.read_formats import CHAIN_COLUMNS, render

    _parquet_needs_out(fmt, out)
    settings = load_settings(env_file)
    try:
        moment = parse_time(at, name="--at") if at is not None else None
        days = [parse_day(e, name="--expiration") for e in expirations]
        read = _run(
            read_chain(settings, underlying, at=moment, expirations=days, archive_url=archive_url)
        )
        click.echo(describe_chain(read), err=True)
        _show(render(read.table, fmt, columns=CHAIN_COLUMNS, out=out))
    except OptionsError as exc:
        fail(exc)


@main.command(context_settings=COMMAND_SETTINGS, epilog=EXIT_HELP)
@click.argument("ticker")
@click.option(
    "--from",
    "start",
    metavar="TIME",
    required=True,
    help=f"From this time (included); a date alone is its midnight. {TIME_HELP}",
)
@click.option(
    "--to",
    "end",
    metavar="TIME",
    required=True,
    help="To this time (excluded): --to 2026-12-01 for all of November.",
)
@format_option(("table", "csv", "json", "parquet"), "table")
@out_option
@archive_option
@env_file_option
@version_option
def history(
    ticker: str,
    start: str,
    end: str,
    fmt: str,
    out: Path | None,
    archive_url: str | None,
    env_file: Path | None,
) -> None:
    """The snapshots of contract TICKER (O:AAPL261218C00150000) from --from to --to, oldest
    first."""
    from options.ops.read_commands import describe_history, parse_time, read_history
    from options.ops.read_formats import HISTORY_COLUMNS, render

    _parquet_needs_out(fmt, out)
    settings = load_settings(env_file)
    try:
        range_ = (
            parse_time(start, name="--from", date_is_midnight=True),
            parse_time(end, name="--to", date_is_midnight=True),
        )
        read = _run(
            read_history(settings, ticker, start=range_[0], end=range_[1], archive_url=archive_url)
        )
        click.echo(describe_history(read), err=True)
        _show(render(read.table, fmt, columns=HISTORY_COLUMNS, out=out))
    except OptionsError as exc:
        fail(exc)


@main.command(context_settings=COMMAND_SETTINGS, epilog=EXIT_HELP)
@click.option("--date", "day", metavar="YYYY-MM-DD", required=True, help="The New York day.")
@click.option(
    "--underlying",
    "-u",
    "underlyings",
    multiple=True,
    metavar="TICKER",
    help="Only this underlying (repeatable); default: every underlying with a complete chain "
    "that day.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(("parquet", "csv")),
    default="parquet",
    show_default=True,
    help="parquet (zstd, typed) or csv (every column, New York times).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    metavar="DIR",
    help="Write DIR/date=YYYY-MM-DD/UNDERLYING.parquet (or .csv), one file per underlying.",
)
@archive_option
@env_file_option
@version_option
def export(
    day: str,
    underlyings: tuple[str, ...],
    fmt: str,
    out_dir: Path,
    archive_url: str | None,
    env_file: Path | None,
) -> None:
    """Export the complete chains of a day, every slot, one file per underlying.

    Prints one line per file written. Exit status 3 when an underlying named with -u had no
    complete chain that day (the others are written)."""
    from options.ops.read_commands import export_day, parse_day

    settings = load_settings(env_file)
    try:
        exported = _run(
            export_day(
                settings,
                parse_day(day, name="--date"),
                fmt=fmt,
                out_dir=out_dir,
                underlyings=underlyings,
                archive_url=archive_url,
            )
        )
    except OptionsError as exc:
        fail(exc)
    for file in exported.files:
        click.echo(f"{file.path}\t{file.rows} rows\t{file.slots} slots")
    for ticker in exported.missing:
        click.echo(f"error: {ticker}: no complete chain on {day} (New York)", err=True)
    sys.exit(int(ExitCode.PARTIAL if exported.missing else ExitCode.OK))


@main.command(context_settings=COMMAND_SETTINGS, epilog=EXIT_HELP)
@click.argument("underlying")
@click.option("--at", metavar="TIME", default=None, help=f"Default: the latest. {TIME_HELP}")
@expiration_option
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    metavar="FILE",
    help="The picture (PNG; .svg or .pdf by suffix).",
)
@archive_option
@env_file_option
@version_option
def smile(
    underlying: str,
    at: str | None,
    expirations: tuple[str, ...],
    out: Path,
    archive_url: str | None,
    env_file: Path | None,
) -> None:
    """Draw the implied-volatility smile of each expiration (against moneyness K/S) and the
    at-the-money term structure of the chain at --at. Needs matplotlib (the extra `plot`)."""
    from options.ops.read_commands import describe_chain, draw_smile, parse_day, parse_time

    settings = load_settings(env_file)
    try:
        moment = parse_time(at, name="--at") if at is not None else None
        days = [parse_day(e, name="--expiration") for e in expirations]
        read, plotted = _run(
            draw_smile(
                settings,
                underlying,
                at=moment,
                out=out,
                expirations=days,
                archive_url=archive_url,
            )
        )
    except OptionsError as exc:
        fail(exc)
    click.echo(describe_chain(read), err=True)
    click.echo(
        f"wrote {plotted.path}: {len(plotted.smiles)} expirations, "
        f"{len(plotted.term[0])} at-the-money points"
    )


def _run(coroutine: Coroutine[Any, Any, R]) -> R:
    try:
        return asyncio.run(coroutine)
    except KeyboardInterrupt:
        echo_error("interrupted")
        sys.exit(int(ExitCode.INTERRUPTED))


def _parquet_needs_out(fmt: str, out: Path | None) -> None:
    if fmt == "parquet" and out is None:
        refuse("--format parquet writes a file: pass --out FILE")


def _show(text: str | None) -> None:
    if text is not None:
        click.echo(text)


if __name__ == "__main__":
    main()
