"""The Lambda handlers: the same jobs, settings from the environment, the summary as a dict,
failed runs raised."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import pytest

from cli.lambda_handler import JobFailed, options_handler, snapshots_handler
from options.config import is_known_name
from options.simulator import RunningSimulator
from tests.conftest import SIM_KEY

Simulator = Callable[..., AbstractAsyncContextManager[RunningSimulator]]
CONTRACTS = 40


class LambdaContext:
    """The part of Lambda's context object the handlers read: the time left."""

    def __init__(self, seconds_left: float) -> None:
        self.seconds_left = seconds_left

    def get_remaining_time_in_millis(self) -> int:
        return int(self.seconds_left * 1000)


@pytest.fixture(autouse=True)
def function_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A Lambda's environment holds only what its configuration sets: none of the project's
    variables from the test run's environment. The root logger's level is put back."""
    for name in list(os.environ):
        if is_known_name(name):
            monkeypatch.delenv(name)
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def configure(
    monkeypatch: pytest.MonkeyPatch, database_url: str, base_url: str, **extra: str
) -> None:
    """The function's environment variables, as its configuration would set them."""
    values = {
        "DATABASE_URL": database_url,
        "POLYGON_BASE_URL": base_url,
        "POLYGON_API_KEY": SIM_KEY,
        "UNDERLYINGS": "AAA,BBB",
        "POLYGON_RATE_LIMIT": "off",
        "HTTP_MAX_RETRIES": "1",
        "DB_POOL_SIZE": "6",
        **extra,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)


async def invoke(
    handler: Callable[[Any, Any], dict[str, Any]], event: Any, context: Any = None
) -> dict[str, Any]:
    """Call the handler as Lambda does: synchronously, here in a thread, so the in-process
    simulator keeps answering."""
    return await asyncio.to_thread(handler, event, context)


async def test_options_handler_returns_the_summary(
    simulator: Simulator, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """options_handler runs ingest_options on the tracked underlyings and returns the run's
    summary as a JSON-ready dict."""
    async with simulator(underlyings=("AAA", "BBB"), contracts_per_underlying=CONTRACTS) as sim:
        configure(monkeypatch, database_url, sim.base_url)
        result = await invoke(options_handler, {})
    assert json.loads(json.dumps(result)) == result
    assert result["job"] == "options"
    assert (result["exit_code"], result["exit_name"], result["status"]) == (0, "OK", "succeeded")
    assert result["underlyings_succeeded"] == 2
    assert result["rows_written"] == 2 * CONTRACTS
    conn = await asyncpg.connect(database_url)
    try:
        run = await conn.fetchrow("SELECT id, status FROM ingest_runs")
        assert (run["id"], run["status"]) == (result["run_id"], "succeeded")
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "event",
    [
        {"underlyings": ["BBB"], "force": True},
        {"underlyings": "BBB", "force": True, "deadline": "5m"},
        {
            "version": "0",
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "detail": {"underlyings": ["BBB"], "force": True},
        },
    ],
    ids=["list", "string", "eventbridge"],
)
async def test_snapshots_handler_takes_the_events_overrides(
    event: dict[str, Any],
    simulator: Simulator,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The event's underlyings and force apply to this invocation only, as -u and --force do:
    BBB is snapshotted once and not tracked."""
    async with simulator(underlyings=("AAA", "BBB"), contracts_per_underlying=CONTRACTS) as sim:
        configure(monkeypatch, database_url, sim.base_url, UNDERLYINGS="AAA")
        await invoke(options_handler, {"underlyings": ["BBB"]})
        result = await invoke(snapshots_handler, event, LambdaContext(600))
    assert (result["job"], result["status"], result["exit_code"]) == ("snapshots", "succeeded", 0)
    assert (result["underlyings_requested"], result["rows_written"]) == (1, CONTRACTS)
    conn = await asyncpg.connect(database_url)
    try:
        covered = await conn.fetch("SELECT underlying_ticker, complete FROM snapshot_coverage")
        tracked = await conn.fetch("SELECT ticker FROM tracked_underlyings")
    finally:
        await conn.close()
    assert [tuple(row) for row in covered] == [("BBB", True)]
    assert "BBB" not in [row["ticker"] for row in tracked]


@pytest.mark.parametrize(
    ("handler", "event", "message"),
    [
        (
            options_handler,
            {"force": True},
            "event key 'force' is unknown to ingest_options: expected underlyings, deadline",
        ),
        (
            snapshots_handler,
            {"underlying": ["AAPL"]},
            "event key 'underlying' is unknown to ingest_snapshots (did you mean underlyings?): "
            "expected underlyings, deadline, force, resume, retain_days",
        ),
        (
            snapshots_handler,
            {"force": "yes"},
            "event key 'force' is invalid: expected true or false",
        ),
        (
            snapshots_handler,
            {"retain_days": 0},
            "event key 'retain_days' is invalid: expected a whole number >= 1",
        ),
        (
            snapshots_handler,
            {"deadline": "soon"},
            "event key 'deadline' 'soon' is invalid: expected a duration such as 540s",
        ),
        (snapshots_handler, {"underlyings": ["../x"]}, "invalid underlying ticker '../x'"),
        (options_handler, ["AAPL"], "the event is a list: expected an object"),
    ],
    ids=[
        "other-jobs-key",
        "misspelt",
        "not-a-bool",
        "zero-days",
        "bad-deadline",
        "bad-ticker",
        "list",
    ],
)
async def test_a_bad_event_is_one_clear_error(
    handler: Callable[[Any, Any], dict[str, Any]], event: Any, message: str
) -> None:
    """An unknown key or a bad value raises at once, before any run, with one line naming the
    key and what is accepted (exit 2)."""
    with pytest.raises(JobFailed) as caught:
        await invoke(handler, event)
    text = str(caught.value)
    assert "(exit 2 USAGE): " in text
    assert message in text
    assert "\n" not in text
    assert caught.value.summary["status"] == "not_run"
    assert caught.value.summary["run_id"] is None


async def test_a_failed_run_raises_with_its_summary(
    simulator: Simulator, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that fails (a key the API refuses: exit 1) raises JobFailed carrying the run's
    summary, so Lambda counts the invocation as an error."""
    async with simulator(underlyings=("AAA", "BBB"), contracts_per_underlying=CONTRACTS) as sim:
        configure(monkeypatch, database_url, sim.base_url, POLYGON_API_KEY="wrong-key")
        with pytest.raises(JobFailed) as caught:
            await invoke(options_handler, {})
    summary = caught.value.summary
    assert caught.value.exit_code == 1
    assert (summary["status"], summary["exit_name"]) == ("failed", "FAILED")
    assert isinstance(summary["run_id"], int)
    assert "POLYGON_API_KEY" in summary["error"]
    assert str(caught.value).startswith("ingest_options ended failed (exit 1 FAILED): ")


async def test_a_partial_run_is_returned(
    simulator: Simulator, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial run (one underlying failed, the other stored: exit 3) is returned, not raised:
    what it stored is committed and a retry would not mend what failed."""
    async with simulator(
        underlyings=("AAA", "BBB"), contracts_per_underlying=CONTRACTS, broken_pages={"AAA": 1}
    ) as sim:
        configure(monkeypatch, database_url, sim.base_url)
        result = await invoke(options_handler, {})
    assert (result["status"], result["exit_code"], result["exit_name"]) == ("partial", 3, "PARTIAL")
    assert (result["underlyings_succeeded"], result["underlyings_failed"]) == (1, 1)
    assert result["rows_written"] == CONTRACTS


async def test_a_run_stopped_before_the_lambda_timeout_raises(
    simulator: Simulator, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With little time left, the run stops starting new work before Lambda's timeout, records
    itself interrupted (exit 5) and raises: a retry completes the work."""
    async with simulator(
        underlyings=("AAA", "BBB"), contracts_per_underlying=5000, latency=0.3
    ) as sim:
        configure(monkeypatch, database_url, sim.base_url)
        with pytest.raises(JobFailed) as caught:
            await invoke(options_handler, {}, LambdaContext(1.0))
    summary = caught.value.summary
    assert (caught.value.exit_code, summary["status"]) == (5, "interrupted")
    assert summary["underlyings_succeeded"] == 0
