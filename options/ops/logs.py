"""Log lines for a terminal, journald or a log shipper, and progress for ``systemctl status``.

The CLI calls :func:`configure_logging` once; every module logs through
``logging.getLogger(__name__)``. The format is chosen by ``fmt``:

- ``text``: ``2026-03-10 10:40:00,123 INFO options.jobs.snapshots: ...`` for people at a terminal;
- ``journal``: ``<6>INFO options.jobs.snapshots: ...``; journald reads the ``<N>`` syslog
  priority off each line (so ``journalctl -p err`` works) and stamps the time itself;
- ``json``: one object per line (``ts``, ``level``, ``logger``, ``message``, ``exception``, and
  any ``extra=`` fields), for log shippers; under journald each line also gets its ``<N>``, which
  journald strips, so the journal's MESSAGE is the bare JSON;
- ``auto``: ``journal`` when stderr is the journal stream systemd names in ``JOURNAL_STREAM``,
  else ``text``.

:func:`sd_notify` and :class:`StatusReporter` speak systemd's notification protocol (a datagram
to ``$NOTIFY_SOCKET``) with the standard library only. The service needs ``NotifyAccess=main``
(systemd passes ``NOTIFY_SOCKET`` to a ``Type=oneshot`` service only then); without the
variable both are no-ops.

The environment is a parameter everywhere: the CLI passes ``os.environ``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TextIO

from options.errors import ConfigError

__all__ = [
    "LOG_FORMATS",
    "JournalFormatter",
    "JsonFormatter",
    "StatusReporter",
    "configure_logging",
    "journal_stream_matches",
    "notify_status",
    "sd_notify",
    "syslog_priority",
]

logger = logging.getLogger(__name__)

LOG_FORMATS: Final = ("auto", "text", "json", "journal")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# No time: journald stamps every line itself.
JOURNAL_FORMAT: Final = "%(levelname)s %(name)s: %(message)s"
DEFAULT_STATUS_INTERVAL: Final = 1.0

# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES: Final = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}
_JSON_KEYS: Final = ("ts", "level", "logger", "message", "exception", "stack")


def syslog_priority(levelno: int) -> int:
    """Return the syslog priority of a level: CRITICAL 2, ERROR 3, WARNING 4, INFO 6, DEBUG 7."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """Format records for journald: a ``<N>`` priority on every line, no timestamp."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` and prefix each of its lines with its priority."""
        # journald splits the stream at newlines; an unprefixed traceback line would fall back
        # to the default priority and vanish from ``journalctl -p err``.
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object on one line.

    Args:
        priority_prefix: start the line with ``<N>``, for journald to read and strip.
    """

    def __init__(self, *, priority_prefix: bool = False) -> None:
        super().__init__()
        self._priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        """Return ``record`` as ``{"ts", "level", "logger", "message", ...}``."""
        created = dt.datetime.fromtimestamp(record.created, dt.UTC)
        payload: dict[str, Any] = {
            "ts": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            payload["exception"] = record.exc_text
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in _JSON_KEYS and not key.startswith("_"):
                payload[key] = value
        # json.dumps escapes newlines inside strings, so a traceback stays on one line.
        line = json.dumps(payload, ensure_ascii=False, default=str)
        if self._priority_prefix:
            return f"<{syslog_priority(record.levelno)}>{line}"
        return line


def journal_stream_matches(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Tell whether ``stream`` is the journal stream that ``JOURNAL_STREAM`` names.

    systemd sets ``JOURNAL_STREAM=DEVICE:INODE`` for a service whose stdout or stderr goes to
    the journal. A child process inherits the variable even when its stderr is redirected, so
    the stream's own device and inode are compared, as systemd's documentation advises. A stream
    without a file descriptor (a test's ``StringIO``) cannot be compared and trusts the variable.
    """
    value = environ.get("JOURNAL_STREAM", "").strip()
    if not value:
        return False
    try:
        device, inode = (int(part) for part in value.split(":", 1))
    except ValueError:
        return False
    try:
        status = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return True
    return (status.st_dev, status.st_ino) == (device, inode)


def configure_logging(
    level: str,
    fmt: str = "auto",
    *,
    environ: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> str:
    """Send every log line to ``stream`` at ``level`` or above, in format ``fmt``.

    Replaces the root logger's handlers, like ``logging.basicConfig(force=True)``.

    Args:
        level: a logging level name, any case (``"INFO"``).
        fmt: ``"auto"``, ``"text"``, ``"json"`` or ``"journal"`` (see the module docstring).
        environ: the process environment (``os.environ`` from the CLI); ``None`` is empty.
        stream: where lines go; ``None`` is ``sys.stderr``.

    Returns:
        The format in effect: ``"text"``, ``"json"`` or ``"journal"``.

    Raises:
        ConfigError: an unknown level or format.
    """
    level_name = level.strip().upper()
    levelno = logging.getLevelNamesMapping().get(level_name)
    if levelno is None:
        raise ConfigError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"unknown log format {fmt!r}; use one of {', '.join(LOG_FORMATS)}")
    out = stream if stream is not None else sys.stderr
    journal = fmt == "journal" or (
        fmt in ("auto", "json") and journal_stream_matches(out, environ or {})
    )
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(priority_prefix=journal)
        effective = "json"
    elif journal:
        formatter = JournalFormatter()
        effective = "journal"
    else:
        formatter = logging.Formatter(TEXT_FORMAT)
        effective = "text"
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    return effective


def sd_notify(message: str, *, environ: Mapping[str, str]) -> bool:
    """Send one notification (``"READY=1"``, ``"STATUS=..."``) to systemd's ``$NOTIFY_SOCKET``.

    Returns:
        ``True`` when the datagram was sent; ``False`` when there is no socket to send to (not
        under systemd, or ``NotifyAccess=`` unset) or sending failed. Never raises: progress
        reports must not break the job.
    """
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        # Abstract namespace: the leading @ stands for a NUL byte.
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        # Unset, or a transport this helper does not speak (vsock:...).
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(target)
            sock.sendall(message.encode())
    except OSError as exc:
        logger.debug("sd_notify to %s failed: %s", address, exc)
        return False
    return True


def notify_status(text: str, *, environ: Mapping[str, str]) -> bool:
    """Show ``text`` as the service's status line in ``systemctl status``; see :func:`sd_notify`."""
    # The protocol is one VARIABLE=value per line: a newline would end the status early.
    return sd_notify("STATUS=" + " ".join(text.splitlines()), environ=environ)


class StatusReporter:
    """Show a job's progress in ``systemctl status``, at most one datagram per interval.

    Call :meth:`update` as often as progress changes (``"12/40 underlyings, 35,000 rows"``);
    lines that come too soon after the last one sent are held, and :meth:`flush` sends the last
    held one so the final status is never one step behind.

    Args:
        environ: the process environment; without ``NOTIFY_SOCKET`` the reporter does nothing.
        min_interval: seconds between two datagrams.
        clock: a monotonic clock, in seconds.
    """

    def __init__(
        self,
        *,
        environ: Mapping[str, str],
        min_interval: float = DEFAULT_STATUS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        notify_socket = environ.get("NOTIFY_SOCKET", "")
        self._environ = {"NOTIFY_SOCKET": notify_socket} if notify_socket else {}
        self._min_interval = min_interval
        self._clock = clock
        self._last_sent: float | None = None
        self._held: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether there is a notification socket to report to."""
        return bool(self._environ)

    def update(self, text: str, *, force: bool = False) -> bool:
        """Report ``text`` now, or hold it if the last report was under ``min_interval`` ago.

        Returns:
            ``True`` when a datagram was sent.
        """
        if not self.enabled:
            return False
        now = self._clock()
        if not force and self._last_sent is not None and now - self._last_sent < self._min_interval:
            self._held = text
            return False
        return self._send(text, now)

    def flush(self) -> bool:
        """Send the last held line, if any; call it when the job's progress is final."""
        if self._held is None or not self.enabled:
            return False
        return self._send(self._held, self._clock())

    def _send(self, text: str, now: float) -> bool:
        self._held = None
        self._last_sent = now
        return notify_status(text, environ=self._environ)
