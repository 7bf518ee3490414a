"""The end of a run: the summary line, the metrics textfile, the pool statistics line."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from options.errors import ExitCode
from tests.conftest import SIM_KEY

BIN = Path(sys.executable).parent


async def run_job(job: str, base_url: str, database_url: str, *args: str) -> tuple[int, str]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "POLYGON_BASE_URL": base_url,
        "POLYGON_API_KEY": SIM_KEY,
        "POLYGON_RATE_LIMIT": "off",
        "UNDERLYINGS": "AAA,BBB",
        "LOG_LEVEL": "INFO",
    }
    child = await asyncio.create_subprocess_exec(
        str(BIN / job), *args, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode is not None
    return child.returncode, err.decode()


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = path.read_text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_textfile_and_summary_line(
    simulator, database_url: str, tmp_path: Path
) -> None:
    """--metrics-textfile writes the run's figures in the Prometheus text format (it parses),
    replacing the file of the run before; the log ends with one JSON summary object and the
    pool statistics line."""
    textfile = tmp_path / "ingest_options.prom"
    async with simulator(underlyings=("AAA", "BBB"), contracts_per_underlying=40) as api:
        for _ in range(2):
            code, log = await run_job(
                "ingest_options",
                api.base_url,
                database_url,
                "--metrics-textfile",
                str(textfile),
                "--log-format",
                "json",
            )
            assert code == ExitCode.OK, log
    found = samples(textfile)
    job = (("job", "options"),)
    assert found[("options_history_last_run_id", job)] == 2
    assert found[("options_history_last_run_rows_written", job)] == 80
    assert found[("options_history_last_run_underlyings_succeeded", job)] == 2
    assert found[("options_history_last_run_exit_code", job)] == 0
    assert (
        found[("options_history_last_run_status", (("job", "options"), ("status", "succeeded")))]
        == 1
    )
    assert (
        found[("options_history_last_run_status", (("job", "options"), ("status", "failed")))] == 0
    )
    assert found[("options_history_last_success_timestamp_seconds", job)] > 1.7e9
    assert found[("options_history_last_run_duration_seconds", job)] > 0
    assert os.listdir(tmp_path) == ["ingest_options.prom"], "written whole and renamed"
    lines = [json.loads(line) for line in log.splitlines()]
    summaries = [line["summary"] for line in lines if "summary" in line]
    assert len(summaries) == 1
    assert summaries[0]["status"] == "succeeded" and summaries[0]["rows_written"] == 80
    assert summaries[0]["recorded"] is True
    assert any(
        line["message"].startswith("Database pool stats - Active: 0, Min: 0, Max: ")
        for line in lines
    )
