"""Progress: a bar on a terminal, a line at a steady interval in a log."""

from __future__ import annotations

import io
import logging

import pytest

from options.ops.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_log_gets_a_progress_line_at_a_steady_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Without a terminal, one line every log_every seconds, however often counts change."""
    clock = Clock()
    progress = Progress(environ={}, log_every=10.0, clock=clock)
    caplog.set_level(logging.INFO, logger="options.ops.progress")
    progress.start(40, "underlyings")
    for second in range(25):
        clock.now = float(second)
        progress.update(done=second, rows=second * 1000, failed=1 if second > 20 else 0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "Progress: 10/40 underlyings, 10,000 rows stored",
        "Progress: 20/40 underlyings, 20,000 rows stored",
    ]
    assert progress.line() == "24/40 underlyings, 24,000 rows stored, 1 failed"


def test_a_terminal_gets_a_bar() -> None:
    """With a bar, the counts are drawn by tqdm on the stream, and closing removes it."""
    stream = io.StringIO()
    progress = Progress(environ={}, stream=stream, bar=True, redraw_every=0)
    progress.start(4, "chains")
    progress.update(done=2, rows=500)
    progress.update(done=4, rows=1000)
    drawn = stream.getvalue()
    assert "4/4" in drawn and "1,000 rows" in drawn
    progress.close()
