"""What every command shares: options, settings, logging, telemetry, exit codes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from options.config import Settings, parse_cli_underlyings, parse_duration
from options.errors import ConfigError, ExitCode, OptionsError
from options.jobs.preview import Preview
from options.ops.logs import LOG_FORMATS, configure_logging, journal_stream_matches
from options.ops.output import OUTPUT_FORMATS, format_rows
from options.ops.progress import Progress
from options.ops.summary import log_summary, write_metrics_textfile
from options.ops.telemetry_setup import Telemetry, configure_telemetry
from options.store.reconnect import is_connection_lost
from options.store.runs import RunSummary

F = TypeVar("F", bound=Callable[..., Any])
COMMAND_SETTINGS = {"help_option_names": ["-h", "--help"]}
"""Every command takes -h as well as --help."""


def version_option(func: F) -> F:
    """``--version``: the installed version of options-history."""
    return click.version_option(package_name="options-history", message="%(prog)s %(version)s")(
        func
    )


logger = logging.getLogger("cli")


def env_file_option(func: F) -> F:
    """``--env-file PATH``: read settings from PATH instead of ``./.env``."""
    return click.option(
        "--env-file",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="Read settings from this file instead of ./.env.",
    )(func)


def underlying_option(func: F) -> F:
    """``--underlying/-u TICKER`` (repeatable): this run only, instead of the tracked set."""
    return click.option(
        "--underlying",
        "-u",
        "underlyings",
        multiple=True,
        metavar="TICKER",
        help="Underlying to process this once (repeatable), instead of the tracked ones; "
        "never adds it to them.",
    )(func)


def log_format_option(func: F) -> F:
    """``--log-format``: auto (journald prefixes under systemd, text on a terminal), text, json."""
    return click.option(
        "--log-format",
        type=click.Choice(LOG_FORMATS),
        default="auto",
        show_default=True,
        help="auto: <N> priority prefixes under systemd's journal, text elsewhere; json: one "
        "object per line for log shippers.",
    )(func)


def load_settings(
    env_file: Path | None, log_format: str = "auto", *, job: str | None = None
) -> Settings:
    """Build the settings, configure logging and (for a ``job``) OpenTelemetry; exit 2 on a
    bad setting.

    The env file's ``PG*`` and ``OTEL_*`` values the environment does not set are put in the
    process environment, where libpq's and OpenTelemetry's conventions look for them.
    """
    global _telemetry
    try:
        settings = Settings.from_env(os.environ, env_file=env_file)
        for name, value in settings.passthrough:
            os.environ.setdefault(name, value)
        configure_logging(settings.log_level, log_format, environ=os.environ)
        for warning in settings.warnings:
            logger.warning("%s", warning)
        if job is not None:
            _telemetry = configure_telemetry(
                job, os.environ, allow_insecure=settings.allow_insecure_endpoints
            )
    except OptionsError as exc:
        fail(exc)
    return settings


_telemetry: Telemetry | None = None


def flush_telemetry() -> None:
    """Export what OpenTelemetry holds (bounded); called before the process exits."""
    if _telemetry is not None:
        _telemetry.shutdown()


def one_off_underlyings(underlyings: tuple[str, ...]) -> tuple[str, ...]:
    """The ``--underlying`` tickers, validated; exit 2 with one line on a bad one."""
    try:
        return parse_cli_underlyings(underlyings)
    except OptionsError as exc:
        fail(exc)


def progress_display(log_format: str) -> Progress:
    """Progress where the job runs: a bar on a terminal (text logs), a line every few seconds
    in a log, and ``systemctl status`` under systemd."""
    bar = (
        log_format in ("auto", "text")
        and sys.stderr.isatty()
        and not journal_stream_matches(sys.stderr, os.environ)
    )
    return Progress(environ=os.environ, stream=sys.stderr, bar=bar)


def metrics_textfile_option(func: F) -> F:
    """``--metrics-textfile PATH``: the run's figures for node_exporter's textfile collector."""
    return click.option(
        "--metrics-textfile",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        metavar="PATH",
        help="Write the run's figures (status, counts, duration, last success) to PATH in the "
        "Prometheus text format, atomically, for node_exporter's textfile collector.",
    )(func)


def dry_run_options(func: F) -> F:
    """``--dry-run``, ``--output`` and ``--limit``: look without storing."""
    for option in (
        click.option(
            "--limit",
            type=click.IntRange(min=0),
            default=20,
            show_default=True,
            help="With --dry-run: rows shown (0: all).",
        ),
        click.option(
            "--output",
            type=click.Choice(OUTPUT_FORMATS),
            default="table",
            show_default=True,
            help="With --dry-run: how the rows are shown on stdout.",
        ),
        click.option(
            "--dry-run",
            is_flag=True,
            help="Read from the API and show what would be stored; open no database, write "
            "nothing.",
        ),
    ):
        func = option(func)
    return func


def reporter(metrics_textfile: Path | None) -> Callable[[RunSummary], None]:
    """What the job does with its summary: one log line, and the metrics file when asked."""

    def report(summary: RunSummary) -> None:
        log_summary(summary)
        if metrics_textfile is not None:
            write_metrics_textfile(metrics_textfile, summary)

    return report


def show_preview(preview: Preview, output: str) -> int:
    """Print a dry run's rows on stdout, a line of counts per underlying on stderr; return the
    exit code (failed underlyings make it partial or failed)."""
    click.echo(format_rows(preview.rows, preview.shown, output))
    for underlying, count in preview.counts.items():
        rejected = preview.rejected.get(underlying, 0)
        click.echo(
            f"{underlying}: {count:,} rows would be stored"
            + (f", {rejected:,} rejected" if rejected else ""),
            err=True,
        )
    for reason in preview.reasons:
        click.echo(f"rejected: {reason}", err=True)
    for underlying, error in preview.errors.items():
        click.echo(f"{underlying}: failed: {error}", err=True)
    if preview.ok:
        return ExitCode.OK
    return ExitCode.PARTIAL if preview.counts else ExitCode.FAILED


def fail(exc: OptionsError) -> NoReturn:
    """Print the error as one line and exit with its code."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    echo_error(message)
    sys.exit(int(exc.exit_code))


def refuse(message: str) -> NoReturn:
    """Refuse options that do not go together, in one line (exit 2)."""
    fail(ConfigError(message))


def echo_error(message: str) -> None:
    """Write ``error: message`` to stderr, tagged <3> for the journal when stderr goes there.

    Settings errors happen before logging is configured, so this does not go through logging.
    """
    priority = "<3>" if journal_stream_matches(sys.stderr, os.environ) else ""
    click.echo(f"{priority}error: {message}", err=True)


def deadline_option(func: F) -> F:
    """``--deadline DURATION``: stop starting new work after DURATION, flush, exit 5."""
    return click.option(
        "--deadline",
        metavar="DURATION",
        default=None,
        help="Stop starting new work after DURATION (540s, 9m, 1h30m), store what was "
        "fetched, record the run interrupted and exit 5.",
    )(func)


def parse_deadline(raw: str | None) -> float | None:
    """The ``--deadline`` in seconds; exit 2 with one line when it is malformed."""
    if raw is None:
        return None
    try:
        return parse_duration(raw)
    except OptionsError as exc:
        fail(exc)


def quiet_lost_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's handler of errors nobody awaited: a query cancelled while its job was
    failing leaves asyncpg a future that the lost connection fails later; that is an echo of
    the error already reported, logged at DEBUG. Anything else is reported as usual."""
    error = context.get("exception")
    if error is not None and is_connection_lost(error):
        logger.debug("%s: %r", context.get("message"), error)
        return
    loop.default_exception_handler(context)


def run(
    main: Callable[[asyncio.Event], Awaitable[int]],
    *,
    deadline: float | None = None,
    progress: Progress | None = None,
) -> NoReturn:
    """Run ``main(stop)`` on a fresh event loop and exit with the code it returns.

    The first SIGINT or SIGTERM, or the deadline, sets ``stop``: the job stops starting new
    work, stores what it fetched and records the run ``interrupted`` (exit 5). A second signal
    cancels at once.
    """

    async def with_signals() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        stop = asyncio.Event()

        def on_signal(sig: signal.Signals) -> None:
            if stop.is_set():
                task.cancel()
                return
            logger.warning("%s received: finishing what was fetched, then stopping", sig.name)
            stop.set()

        def on_deadline() -> None:
            logger.warning(
                "Deadline of %gs reached: finishing what was fetched, then stopping", deadline
            )
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        loop.set_exception_handler(quiet_lost_connections)
        if deadline is not None:
            loop.call_later(deadline, on_deadline)
        if progress is None:
            return await main(stop)
        with progress.showing():
            return await main(stop)

    try:
        code = asyncio.run(with_signals())
    except OptionsError as exc:
        flush_telemetry()
        fail(exc)
    except (asyncio.CancelledError, KeyboardInterrupt):
        echo_error("interrupted")
        code = ExitCode.INTERRUPTED
    flush_telemetry()
    sys.exit(int(code))
