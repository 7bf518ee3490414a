"""AWS Lambda entry points: one handler per job, running the same job as the console scripts.

    options_handler(event, context)     what ``ingest_options`` does
    snapshots_handler(event, context)   what ``ingest_snapshots`` does

Settings come from the function's environment variables only (a Lambda has no ``.env``), read
and validated as the jobs read them. The event may carry overrides for one invocation; it may
be empty (``{}`` or ``null``), or an EventBridge event whose ``detail`` holds them:

    underlyings   ["AAPL", "I:SPX"] or "AAPL,I:SPX": work on these only, this once, without
                  tracking them (``--underlying``)
    deadline      "9m", "540s" or a number of seconds: stop starting new work after it
                  (``--deadline``); without it, 30 s before the Lambda's own timeout
    force         snapshots only: true takes a snapshot when the market is closed (``--force``)
    resume        snapshots only: true completes the latest unfinished slot (``--resume``)
    retain_days   snapshots only: days older than N leave PostgreSQL (``--retain-days``):
                  archived first with ARCHIVE_URL, else deleted only with
                  SNAPSHOT_DELETE_UNARCHIVED=true

Each handler returns the run's summary as a dict (``job``, ``exit_code``, ``exit_name``,
``status``, ``run_id``, the counts, ``error``), the same figures as the summary log line. When
no run was recorded, ``run_id`` is null and ``status`` is ``skipped`` (exit 0: the market was
closed, or nothing was left to resume) or ``not_run`` (refused before it started).

It raises :class:`JobFailed` (carrying that dict) when the run failed (exit 1), the settings or
the event are invalid (2), another copy holds the run lease (4), or the run was interrupted by
its deadline (5): an interrupted run is unfinished work, and Lambda's retry of a failed
invocation is its remedy (a snapshot run retried within ``SNAPSHOT_RESUME_WINDOW`` completes
the same slot; a contracts run syncs what was left). A ``partial`` run (exit 3) is returned,
not raised: what it could store is committed, what failed is in the ledger, and a retry would
not mend a refused deactivation or a rejected row, while for snapshots it would store an extra
slot at an hour no schedule asked for. Watch partial runs through the returned ``status``, or
``ingest_admin status``.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import math
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from options.config import NO_ENV_FILE, Settings, parse_duration, parse_underlyings
from options.errors import ConfigError, ExitCode, OptionsError
from options.jobs.wiring import run_options_job, run_snapshots_job
from options.ops.summary import log_summary
from options.ops.telemetry_setup import Telemetry, configure_telemetry
from options.store.runs import RunSummary

logger = logging.getLogger("cli.lambda")

DEADLINE_MARGIN = 30.0
"""Seconds before the Lambda's timeout at which a run stops starting new work, to store what it
read and close its ledger row."""
COMMON_KEYS = ("underlyings", "deadline")
SNAPSHOT_KEYS = (*COMMON_KEYS, "force", "resume", "retain_days")
RAISED = frozenset(
    (ExitCode.FAILED, ExitCode.USAGE, ExitCode.ALREADY_RUNNING, ExitCode.INTERRUPTED)
)
"""Exit codes that end an invocation with :class:`JobFailed`."""


class JobFailed(Exception):
    """The job ended with an exit code in :data:`RAISED`; ``summary`` is what the handler
    would have returned."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.summary = summary
        self.exit_code = ExitCode(summary["exit_code"])
        cause = f": {summary['error']}" if summary.get("error") else ""
        super().__init__(
            f"ingest_{summary['job']} ended {summary['status']} "
            f"(exit {int(self.exit_code)} {self.exit_code.name}){cause}"
        )


def options_handler(event: Any, context: Any) -> dict[str, Any]:
    """Sync the contracts of the tracked underlyings (or of ``underlyings``), as
    ``ingest_options`` does; return the run's summary.

    Raises:
        JobFailed: the run failed, was refused or was interrupted (see the module docstring).
    """
    return _handle("options", event, context, COMMON_KEYS)


def snapshots_handler(event: Any, context: Any) -> dict[str, Any]:
    """Store one snapshot of the tracked underlyings' chains (or of ``underlyings``), as
    ``ingest_snapshots`` does; return the run's summary.

    Raises:
        JobFailed: the run failed, was refused or was interrupted (see the module docstring).
    """
    return _handle("snapshots", event, context, SNAPSHOT_KEYS)


def _handle(job: str, event: Any, context: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    ended: list[RunSummary] = []

    def on_end(summary: RunSummary) -> None:
        log_summary(summary)
        ended.append(summary)

    telemetry: Telemetry | None = None
    try:
        settings = Settings.from_env(os.environ, env_file=NO_ENV_FILE)
        logging.getLogger().setLevel(settings.log_level)
        overrides = _overrides(job, event, keys)
        deadline = _deadline(overrides.pop("deadline", None), context)
        only = overrides.pop("underlyings", ())
        telemetry = configure_telemetry(
            f"ingest_{job}", os.environ, allow_insecure=settings.allow_insecure_endpoints
        )
        code = asyncio.run(_run(job, settings, only, overrides, deadline, on_end))
    except OptionsError as exc:
        result = _result(job, exc.exit_code, ended, error=str(exc).splitlines()[0])
        raise JobFailed(result) from exc
    finally:
        if telemetry is not None:
            telemetry.shutdown()  # before Lambda freezes the process
    result = _result(job, code, ended)
    if code in RAISED:
        raise JobFailed(result)
    return result


async def _run(
    job: str,
    settings: Settings,
    only: tuple[str, ...],
    overrides: dict[str, Any],
    deadline: float | None,
    on_end: Callable[[RunSummary], None],
) -> ExitCode:
    stop = asyncio.Event()

    def on_deadline() -> None:
        logger.warning(
            "Deadline of %gs reached: finishing what was fetched, then stopping", deadline
        )
        stop.set()

    if deadline is not None:
        asyncio.get_running_loop().call_later(deadline, on_deadline)
    main: Awaitable[ExitCode]
    if job == "options":
        main = run_options_job(settings, only=only, stop=stop, on_end=on_end)
    else:
        main = run_snapshots_job(settings, only=only, stop=stop, on_end=on_end, **overrides)
    return await main


def _result(
    job: str, code: ExitCode, ended: list[RunSummary], *, error: str | None = None
) -> dict[str, Any]:
    """The invocation's answer: the run's summary when a run was recorded."""
    if ended:
        summary = ended[-1].as_dict()
        summary["exit_name"] = ExitCode(ended[-1].exit_code).name
        if error and not summary.get("error"):
            summary["error"] = error
        return summary
    if code is ExitCode.OK:
        status = "skipped"
        error = error or "no run recorded: the market was closed, or there was nothing to resume"
    else:
        status = "not_run"  # refused before a run row was written: exit_name says why
    return {
        "job": job,
        "run_id": None,
        "status": status,
        "exit_code": int(code),
        "exit_name": code.name,
        "error": error,
    }


def _overrides(job: str, event: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """Validate the event's keys and values; return them under the job's argument names.

    Raises:
        ConfigError: one line naming the key and what is accepted.
    """
    if event is None:
        return {}
    if not isinstance(event, Mapping):
        raise ConfigError(
            f"the event is a {type(event).__name__}: expected an object with the keys "
            f"{', '.join(keys)} (or none)"
        )
    if "detail-type" in event and "source" in event:
        event = event.get("detail") or {}  # an EventBridge event: overrides in its detail
        if not isinstance(event, Mapping):
            raise ConfigError("the EventBridge event's detail is not an object")
    values: dict[str, Any] = {}
    for key, value in event.items():
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"event key {key!r} is unknown to ingest_{job}{hint}: expected {', '.join(keys)}",
                variable=str(key),
            )
        values[key] = _check(key, value)
    return values


def _check(key: str, value: Any) -> Any:
    name = f"event key {key!r}"
    if key == "underlyings":
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise ConfigError(f'{name} is invalid: expected a list of tickers such as ["AAPL"]')
        return parse_underlyings(",".join(value), variable=name)
    if key in ("force", "resume"):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} is invalid: expected true or false", variable=key)
        return value
    if key == "retain_days":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} is invalid: expected a whole number >= 1", variable=key)
        return value
    # deadline
    if isinstance(value, str):
        return parse_duration(value, name=name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(
            f"{name} is invalid: expected a duration such as 540s, 9m or 1h30m, or seconds > 0",
            variable=key,
        )
    if not math.isfinite(value):
        raise ConfigError(f"{name} is invalid: expected a finite number of seconds", variable=key)
    return float(value)


def _deadline(asked: float | None, context: Any) -> float | None:
    """When the run stops starting new work: the event's deadline, and at the latest
    :data:`DEADLINE_MARGIN` seconds before the Lambda's timeout (half the time left, if less
    than twice the margin is left)."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is None:
        return asked
    left = remaining() / 1000.0
    available = left - DEADLINE_MARGIN if left > 2 * DEADLINE_MARGIN else left / 2
    return available if asked is None else min(asked, available)
