"""The jobs' command lines: -h, --version."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("job", ["ingest_options", "ingest_snapshots"])
def test_help_and_version(job: str) -> None:
    """-h is --help, and --version names the installed version."""
    short = subprocess.run([str(BIN / job), "-h"], capture_output=True, text=True, check=False)
    assert short.returncode == 0
    assert short.stdout.startswith(f"Usage: {job} [OPTIONS]")
    assert "--dry-run" in short.stdout and "--metrics-textfile" in short.stdout
    shown = subprocess.run(
        [str(BIN / job), "--version"], capture_output=True, text=True, check=False
    )
    assert (shown.returncode, shown.stdout.strip()) == (0, f"{job} {version('options-history')}")
