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
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from options.config import Settings
from options.errors import ExitCode, OptionsError

F = TypeVar("F", bound=Callable[..., Any])
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def env_file_option(func: F) -> F:
    """``--env-file PATH``: read settings from PATH instead of ``./.env``."""
    return click.option(
        "--env-file",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="Read settings from this file instead of ./.env.",
    )(func)


def underlying_option(func: F) -> F:
    """``--underlying/-u TICKER`` (repeatable): overrides UNDERLYINGS for this run."""
    return click.option(
        "--underlying",
        "-u",
        "underlyings",
        multiple=True,
        metavar="TICKER",
        help="Underlying to process (repeatable); overrides UNDERLYINGS for this run.",
    )(func)


def load_settings(env_file: Path | None, underlyings: tuple[str, ...] = ()) -> Settings:
    """Build the settings and configure logging and telemetry; exit 2 on a bad setting."""
    try:
        settings = Settings.from_env(os.environ, env_file=env_file)
        if underlyings:
            settings = settings.with_underlyings(underlyings)
    except OptionsError as exc:
        fail(exc)
    configure_logging(settings.log_level)
    trace.set_tracer_provider(TracerProvider())
    return settings


def configure_logging(level: str) -> None:
    """Send log lines to stderr at ``level``."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)


def fail(exc: OptionsError) -> NoReturn:
    """Print the error as one line and exit with its code."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    click.echo(f"error: {message}", err=True)
    sys.exit(int(exc.exit_code))


def run(main: Callable[[], Awaitable[int]]) -> NoReturn:
    """Run ``main`` on a fresh event loop and exit with the code it returns.

    SIGINT and SIGTERM cancel the job, which records itself ``interrupted`` (exit 5).
    """

    async def with_signals() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        return await main()

    try:
        code = asyncio.run(with_signals())
    except OptionsError as exc:
        fail(exc)
    except (asyncio.CancelledError, KeyboardInterrupt):
        click.echo("error: interrupted", err=True)
        code = ExitCode.INTERRUPTED
    sys.exit(int(code))
