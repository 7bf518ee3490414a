"""Log formats (text, journald, JSON) and systemd notifications over real AF_UNIX sockets."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import re
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import pytest

from options.errors import ConfigError
from options.ops.logs import StatusReporter, configure_logging, notify_status, sd_notify

JOURNAL = {"JOURNAL_STREAM": "8:1234"}
LOGGER = "options.example"
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only"
)


@contextmanager
def logging_to(
    out: TextIO, level: str = "INFO", fmt: str = "auto", environ: dict[str, str] | None = None
) -> Iterator[str]:
    """Configure logging to ``out`` for the block, then put the root logger back as it was.

    Restoring inside the test keeps pytest's own capture handlers, which it swaps per phase,
    out of the way.
    """
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    try:
        yield configure_logging(level, fmt, environ=environ or {}, stream=out)
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(root_level)


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket in a short temporary directory, and its path."""
    # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="sdn") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.setblocking(False)
            yield sock, path


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram queued on ``sock`` (local datagrams are queued when ``send`` returns)."""
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(4096))
        except BlockingIOError:
            return datagrams


@pytest.mark.parametrize(
    ("level", "line"),
    [
        pytest.param(logging.DEBUG, "<7>DEBUG options.example: hello", id="debug-7"),
        pytest.param(logging.INFO, "<6>INFO options.example: hello", id="info-6"),
        pytest.param(logging.WARNING, "<4>WARNING options.example: hello", id="warning-4"),
        pytest.param(logging.ERROR, "<3>ERROR options.example: hello", id="error-3"),
        pytest.param(logging.CRITICAL, "<2>CRITICAL options.example: hello", id="critical-2"),
    ],
)
def test_journal_stream_prefixes_the_syslog_priority(level: int, line: str) -> None:
    """Under journald each line starts with its <N> priority and carries no timestamp."""
    out = io.StringIO()
    with logging_to(out, "DEBUG", environ=JOURNAL) as effective:
        logging.getLogger(LOGGER).log(level, "hello")
    assert effective == "journal"
    assert out.getvalue() == line + "\n"


def test_journal_traceback_lines_keep_the_priority() -> None:
    """Every line of a logged traceback carries <3>, so journalctl -p err shows all of it."""
    out = io.StringIO()
    with logging_to(out, environ=JOURNAL):
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger(LOGGER).exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: boom"


def test_forced_journal_format_without_journal_stream() -> None:
    """fmt='journal' prefixes priorities even where JOURNAL_STREAM is not set."""
    out = io.StringIO()
    with logging_to(out, fmt="journal"):
        logging.getLogger(LOGGER).warning("careful")
    assert out.getvalue() == "<4>WARNING options.example: careful\n"


def test_text_format_on_a_terminal() -> None:
    """Without JOURNAL_STREAM, lines are text with time, level and logger."""
    out = io.StringIO()
    with logging_to(out) as effective:
        logging.getLogger(LOGGER).info("rows: %d", 12)
    assert effective == "text"
    pattern = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO options\.example: rows: 12\n"
    assert re.fullmatch(pattern, out.getvalue())


@pytest.mark.parametrize(
    ("same_file", "expected"),
    [
        pytest.param(True, "journal", id="stream-is-the-journal"),
        pytest.param(False, "text", id="stream-redirected-elsewhere"),
    ],
)
def test_journal_stream_is_checked_against_the_stream(
    tmp_path: Path, same_file: bool, expected: str
) -> None:
    """JOURNAL_STREAM counts only when its device:inode is the stream's own."""
    with open(tmp_path / "err.log", "w") as out, open(tmp_path / "other.log", "w") as other:
        status = os.fstat((out if same_file else other).fileno())
        environ = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        with logging_to(out, environ=environ) as effective:
            assert effective == expected


def test_level_filters_lines() -> None:
    """Lines below the configured level are dropped."""
    out = io.StringIO()
    with logging_to(out, "warning", environ=JOURNAL):
        logging.getLogger(LOGGER).info("quiet")
        logging.getLogger(LOGGER).error("loud")
    assert out.getvalue() == "<3>ERROR options.example: loud\n"


def test_json_format_carries_the_fields() -> None:
    """fmt='json' writes one parseable object per line with ts, level, logger and message."""
    out = io.StringIO()
    before = dt.datetime.now(dt.UTC)
    with logging_to(out, fmt="json") as effective:
        logging.getLogger(LOGGER).warning("stored %d rows", 35_000)
    assert effective == "json"
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert {k: record[k] for k in ("level", "logger", "message")} == {
        "level": "WARNING",
        "logger": LOGGER,
        "message": "stored 35000 rows",
    }
    ts = dt.datetime.fromisoformat(record["ts"])
    assert ts.utcoffset() == dt.timedelta(0)
    assert record["ts"].endswith("Z")
    assert abs(ts - before) < dt.timedelta(minutes=1)
    assert "exception" not in record


def test_json_format_carries_the_exception() -> None:
    """A logged exception travels in the same one-line object, under 'exception'."""
    out = io.StringIO()
    with logging_to(out, fmt="json"):
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger(LOGGER).exception("failed")
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "failed"
    assert record["level"] == "ERROR"
    assert record["exception"].startswith("Traceback (most recent call last):")
    assert record["exception"].endswith("ValueError: boom")


def test_json_format_carries_extra_fields() -> None:
    """Fields passed with extra= become keys of the object, non-JSON values as text."""
    out = io.StringIO()
    with logging_to(out, fmt="json"):
        extra = {"underlying": "SPY", "day": dt.date(2026, 3, 4)}
        logging.getLogger(LOGGER).info("done", extra=extra)
    record = json.loads(out.getvalue())
    assert (record["underlying"], record["day"]) == ("SPY", "2026-03-04")


def test_json_under_journald_gets_a_priority_prefix() -> None:
    """Under journald, JSON lines start with <N> for journald to read and strip."""
    out = io.StringIO()
    with logging_to(out, fmt="json", environ=JOURNAL):
        logging.getLogger(LOGGER).error("failed")
    line = out.getvalue().rstrip("\n")
    assert line.startswith("<3>{")
    assert json.loads(line.removeprefix("<3>"))["level"] == "ERROR"


@pytest.mark.parametrize(
    ("level", "fmt", "match"),
    [
        pytest.param("LOUD", "auto", "unknown log level", id="level"),
        pytest.param("INFO", "xml", "unknown log format", id="format"),
    ],
)
def test_bad_level_or_format_is_a_config_error(level: str, fmt: str, match: str) -> None:
    """An unknown level or format raises ConfigError (exit 2) and leaves logging untouched."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    with pytest.raises(ConfigError, match=match):
        configure_logging(level, fmt, environ={}, stream=io.StringIO())
    assert root.handlers == handlers


def test_sd_notify_sends_a_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    """sd_notify sends the message as one datagram to the NOTIFY_SOCKET path."""
    sock, path = notify_socket
    assert sd_notify("READY=1", environ={"NOTIFY_SOCKET": path})
    assert received(sock) == [b"READY=1"]


@linux_only
def test_sd_notify_reaches_an_abstract_socket() -> None:
    """A NOTIFY_SOCKET starting with @ names a socket in the abstract namespace."""
    name = f"options-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        assert sd_notify("STATUS=working", environ={"NOTIFY_SOCKET": "@" + name})
        assert received(sock) == [b"STATUS=working"]


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({}, id="unset"),
        pytest.param({"NOTIFY_SOCKET": ""}, id="empty"),
        pytest.param({"NOTIFY_SOCKET": "vsock:2:1234"}, id="unsupported-transport"),
        pytest.param({"NOTIFY_SOCKET": "/nonexistent/notify"}, id="missing-socket"),
    ],
)
def test_sd_notify_without_a_socket_is_a_no_op(environ: dict[str, str]) -> None:
    """Without a usable NOTIFY_SOCKET, sd_notify returns False and never raises."""
    assert sd_notify("READY=1", environ=environ) is False


def test_notify_status_keeps_the_status_on_one_line(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """A newline in a status line is flattened: it would end the STATUS= assignment."""
    sock, path = notify_socket
    assert notify_status("12/40 underlyings\n35,000 rows", environ={"NOTIFY_SOCKET": path})
    assert received(sock) == [b"STATUS=12/40 underlyings 35,000 rows"]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_status_reporter_sends_at_most_one_datagram_per_interval(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """Updates closer than the interval to the last one sent are held back."""
    sock, path = notify_socket
    clock = FakeClock()
    reporter = StatusReporter(environ={"NOTIFY_SOCKET": path}, min_interval=1.0, clock=clock)
    sent = []
    for at, text in ((0.0, "a"), (0.2, "b"), (0.9, "c"), (1.1, "d"), (1.5, "e"), (2.2, "f")):
        clock.now = 100.0 + at
        sent.append(reporter.update(text))
    assert sent == [True, False, False, True, False, True]
    assert received(sock) == [b"STATUS=a", b"STATUS=d", b"STATUS=f"]


def test_status_reporter_flush_sends_the_held_line(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """flush() sends the last held line once, so the final status is never one step behind."""
    sock, path = notify_socket
    clock = FakeClock()
    reporter = StatusReporter(environ={"NOTIFY_SOCKET": path}, clock=clock)
    reporter.update("1/2 underlyings")
    reporter.update("2/2 underlyings")
    assert reporter.flush()
    assert not reporter.flush()
    assert received(sock) == [b"STATUS=1/2 underlyings", b"STATUS=2/2 underlyings"]


def test_status_reporter_force_skips_the_rate_limit(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """update(force=True) sends at once, for lines that must not wait (a final summary)."""
    sock, path = notify_socket
    reporter = StatusReporter(environ={"NOTIFY_SOCKET": path}, clock=FakeClock())
    assert reporter.update("working")
    assert reporter.update("done", force=True)
    assert received(sock) == [b"STATUS=working", b"STATUS=done"]


def test_status_reporter_without_systemd_does_nothing() -> None:
    """Outside systemd the reporter is disabled and every call returns False."""
    reporter = StatusReporter(environ={})
    assert not reporter.enabled
    assert not reporter.update("working")
    assert not reporter.flush()
