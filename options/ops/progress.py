"""A job's progress, shown where the job runs: a bar on a terminal, a line at a steady interval
in a log (journald, a file), and ``systemctl status`` through sd_notify.

The jobs report counts (:meth:`Progress.start`, :meth:`Progress.update`); this module decides
how they are shown. The bar is tqdm's, drawn on stderr only when stderr is a terminal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from options.ops.logs import StatusReporter

logger = logging.getLogger(__name__)

LOG_EVERY = 10.0  # seconds between two progress lines in a log


class Progress:
    """Counts of a running job: units done (underlyings, chains) of a total, and rows stored.

    Args:
        environ: the process environment (``NOTIFY_SOCKET`` for ``systemctl status``).
        stream: where a bar is drawn, when ``bar`` is true.
        bar: draw a tqdm bar (a terminal); otherwise log a line every ``log_every`` seconds.
        log_every: seconds between two log lines.
        redraw_every: least seconds between two redraws of the bar.
        clock: a monotonic clock, in seconds.
    """

    def __init__(
        self,
        *,
        environ: Mapping[str, str],
        stream: TextIO | None = None,
        bar: bool = False,
        log_every: float = LOG_EVERY,
        redraw_every: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.status = StatusReporter(environ=environ)
        self._stream = stream
        self._want_bar = bar
        self._bar: tqdm[None] | None = None
        self._log_every = log_every
        self._redraw_every = redraw_every
        self._clock = clock
        self._logged_at: float | None = None
        self._noun = "units"
        self._total = 0
        self._done = self._rows = self._failed = 0

    def start(self, total: int, noun: str) -> None:
        """A job begins ``total`` units of work called ``noun`` (``"underlyings"``)."""
        self._noun, self._total = noun, total
        self._done = self._rows = self._failed = 0
        self._logged_at = self._clock()
        if self._want_bar:
            self._bar = tqdm(
                total=total,
                unit=noun.rstrip("s") or noun,
                file=self._stream,
                leave=False,
                mininterval=self._redraw_every,
            )

    def update(self, *, done: int, rows: int, failed: int = 0) -> None:
        """``done`` units finished so far (``failed`` of them failed), ``rows`` stored."""
        self._done, self._rows, self._failed = done, rows, failed
        line = self.line()
        self.status.update(line)
        if self._bar is not None:
            self._bar.set_postfix_str(f"{rows:,} rows", refresh=False)
            self._bar.update(done - self._bar.n)
        elif self._logged_at is not None and self._clock() - self._logged_at >= self._log_every:
            self._logged_at = self._clock()
            logger.info("Progress: %s", line)

    def line(self) -> str:
        """The counts as one line: ``12/40 underlyings, 35,000 rows stored, 1 failed``."""
        failed = f", {self._failed} failed" if self._failed else ""
        return f"{self._done}/{self._total} {self._noun}, {self._rows:,} rows stored{failed}"

    def close(self) -> None:
        """Remove the bar and send the last status line (never one step behind)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.status.flush()

    @contextmanager
    def showing(self) -> Iterator[None]:
        """While the job runs: log lines are written above the bar rather than through it."""
        redirect = logging_redirect_tqdm() if self._want_bar else nullcontext()
        try:
            with redirect:
                yield
        finally:
            self.close()
