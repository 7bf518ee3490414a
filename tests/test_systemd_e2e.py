"""The rendered units under a real systemd: a timer fires the hardened service, rows land, and
the archive and metrics files they write are read by the options-history group.

Uses ``../shared/tools/systemd-sandbox`` (systemd as PID 1 of private namespaces; needs root with
CAP_SYS_ADMIN). Takes about a minute, so it runs only with ``RUN_SYSTEMD_E2E=1`` (CI sets it
where it runs as root); asked for, a sandbox that is missing or cannot start fails the test.
The simulator runs as its own process and PostgreSQL is the test run's server on 127.0.0.1
(trust authentication), both reachable from inside the sandbox. The sandbox shares the host's
users: the jobs' user and group (made from install-units' sysusers.d snippet) and a reader are
added to the host's, and what was added is removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import grp
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from options.config import Settings
from options.ops.service_access import (
    Outputs,
    ServiceAccount,
    render_sysusers,
    service_account,
)
from options.ops.units import Installation, Scope, render_units
from options.store.partitions import ensure_partitions

SANDBOX = Path(__file__).resolve().parents[2] / "shared" / "tools" / "systemd-sandbox"
BIN = Path(sys.executable).parent
CHECKOUT = Path(__file__).resolve().parents[1]
SIM_KEY = "sim-key"
UNDERLYINGS = ("AAAA", "AAAB", "AAAC")
CONTRACTS = 200
REPORT = "/run/ingest-notify-report.txt"
# The documented defaults: StateDirectory= of the units, inside the sandbox's private /var.
ARCHIVE = "/var/lib/options-history/archive"
METRICS = "/var/lib/options-history/metrics"
ARCHIVE_AFTER_DAYS = 1
CAT = shutil.which("cat") or "/bin/cat"
READER = "ohist-e2e-reader"
"""A normal user in the options-history group, as an analyst running options_read would be."""
# A timer with a near OnCalendar= that starts the real service: the real schedule is days away.
NEAR_TIMER = """\
[Unit]
Description=e2e: start ingest_options.service within 5 seconds

[Timer]
OnCalendar=*-*-* *:*:0/5
AccuracySec=1s
Unit=ingest_options.service
"""

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("RUN_SYSTEMD_E2E") != "1",
        reason="slow end-to-end run under a systemd sandbox: set RUN_SYSTEMD_E2E=1",
    ),
    pytest.mark.timeout(300),
]


@dataclass(frozen=True)
class Sandbox:
    """A running systemd sandbox and a host directory its units can see."""

    state: str
    share: Path

    def run(self, tool: str, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run one of the sandbox's commands (exec, install-unit, journal) on this sandbox."""
        result = subprocess.run(
            [str(SANDBOX / tool), self.state, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if check:
            assert result.returncode == 0, f"{tool} {args}: {result.stdout}{result.stderr}"
        return result

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``systemctl ARGS`` inside."""
        return self.run("exec", "systemctl", *args)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """Properties of ``unit`` inside."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def messages(self, unit: str, lines: int = 15) -> str:
        """The last lines of ``unit``'s journal, for assertion messages."""
        return self.run("journal", unit, "-o", "cat", "-n", str(lines), "--no-pager").stdout

    def journal(self, unit: str) -> list[dict[str, str]]:
        """The journal entries of ``unit`` as JSON objects."""
        out = self.run("journal", unit, "-o", "json", "--no-pager").stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A fresh systemd sandbox; fails when it cannot start on this machine."""
    if not SANDBOX.is_dir():
        pytest.fail(f"systemd-sandbox not present at {SANDBOX}", pytrace=False)
    share = tmp_path_factory.mktemp("systemd-e2e")
    share.chmod(0o755)
    started = subprocess.run(
        [str(SANDBOX / "start")],
        capture_output=True,
        text=True,
        check=False,
        # the checkout stays visible inside too, wherever it lives (under /tmp in a CI clone)
        env={**os.environ, "SDSANDBOX_SHARE": f"{share}:{CHECKOUT}"},
        timeout=120,
    )
    if started.returncode != 0:
        reason = (started.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.fail(f"systemd sandbox cannot start here: {reason}", pytrace=False)
    box = Sandbox(state=started.stdout.strip(), share=share)
    try:
        yield box
    finally:
        subprocess.run([str(SANDBOX / "stop"), box.state], capture_output=True, check=False)


@pytest.fixture(scope="module")
def simulator_url() -> Iterator[str]:
    """The simulator in its own process (the tests block on subprocesses, not on its loop)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            str(BIN / "ingest_admin"),
            "simulate",
            "--port",
            str(port),
            "--underlyings",
            str(len(UNDERLYINGS)),
            "--contracts",
            str(CONTRACTS),
            "--api-key",
            SIM_KEY,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "simulator did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def accounts(sandbox: Sandbox) -> Iterator[ServiceAccount]:
    """The jobs' user and group, made as install-units makes them (systemd-sysusers and its
    snippet), and :data:`READER`; whichever of them this made is removed afterwards."""
    account = service_account(None)
    made_user, made_group = not _user_exists(account.user), not _group_exists(account.group)
    made_reader = not _user_exists(READER)
    snippet = sandbox.share / "options-history.conf"
    snippet.write_text(render_sysusers(account), encoding="utf-8")
    try:
        sandbox.run("exec", "systemd-sysusers", str(snippet), check=True)
        if made_reader:
            sandbox.run("exec", "useradd", "--shell", "/usr/sbin/nologin", READER, check=True)
        sandbox.run("exec", "usermod", "-aG", account.group, READER, check=True)
        yield account
    finally:
        if made_reader:
            subprocess.run(["userdel", READER], capture_output=True, check=False)
        if made_user:
            subprocess.run(["userdel", account.user], capture_output=True, check=False)
        if made_group and _group_exists(account.group):
            subprocess.run(["groupdel", account.group], capture_output=True, check=False)


@pytest.fixture
def installed(
    sandbox: Sandbox, accounts: ServiceAccount, simulator_url: str, database_url: str
) -> Sandbox:
    """The rendered system units installed in the sandbox, reading an env file for this test:
    rendered from the env file's settings as install-units renders them, with a local archive
    at its documented default and a metrics directory."""
    env_file = sandbox.share / "env"
    env_file.write_text(
        f"DATABASE_URL={database_url}\n"
        f"POLYGON_BASE_URL={simulator_url}\n"
        f"POLYGON_API_KEY={SIM_KEY}\n"
        f"UNDERLYINGS={','.join(UNDERLYINGS)}\n"
        "POLYGON_RATE_LIMIT=off\n"
        f"ARCHIVE_URL={ARCHIVE}\n"
        f"ARCHIVE_AFTER_DAYS={ARCHIVE_AFTER_DAYS}\n"
        f"NOTIFY_COMMAND='cat > {REPORT}'\n",
        encoding="utf-8",
    )
    env_file.chmod(0o600)  # root only: the service user reads its LoadCredential= copy
    # the working directory under /tmp exercises the bind into the service's private /tmp
    installation = Installation.detect(env_file=env_file, working_dir=sandbox.share)
    outputs = Outputs.from_settings(
        Settings.from_env({}, env_file=env_file), metrics_dir=Path(METRICS)
    )
    assert outputs.state_directories() == (Path(ARCHIVE), Path(METRICS))
    unit_dir = sandbox.share / "units"
    unit_dir.mkdir(exist_ok=True)
    rendered = render_units(installation, scope=Scope.SYSTEM, outputs=outputs)
    units = {**rendered, "e2e-contracts.timer": NEAR_TIMER}
    for name, text in units.items():
        (unit_dir / name).write_text(text, encoding="utf-8")
    sandbox.run("install-unit", *(str(unit_dir / name) for name in units), check=True)
    sandbox.run("exec", "rm", "-f", REPORT)
    sandbox.systemctl("reset-failed")
    return sandbox


async def wait_for_run(
    box: Sandbox, unit: str, *, after: int, within: float = 60
) -> dict[str, str]:
    """Wait until ``unit`` has finished a run that started after monotonic time ``after``."""
    deadline = time.monotonic() + within
    while True:
        props = box.show(
            unit, "ExecMainStartTimestampMonotonic", "ExecMainExitTimestampMonotonic", "Result"
        )
        started = int(props.get("ExecMainStartTimestampMonotonic") or 0)
        exited = int(props.get("ExecMainExitTimestampMonotonic") or 0)
        if started > after and exited >= started:
            return props
        assert time.monotonic() < deadline, f"{unit} did not run: {props}"
        await asyncio.sleep(0.5)


async def count_rows(database_url: str, table: str) -> int:
    """Rows in ``table``."""
    connection = await asyncpg.connect(database_url)
    try:
        return int(await connection.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await connection.close()


async def test_timer_fires_the_hardened_service_which_stores_the_contracts(
    installed: Sandbox, database_url: str
) -> None:
    """A calendar timer starts ingest_options.service; it runs sandboxed and the rows land."""
    box = installed
    for service in ("ingest_options.service", "ingest_daily.service"):
        verify = box.run("exec", "systemd-analyze", "verify", f"/etc/systemd/system/{service}")
        assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
        # exposure 2.0 at most
        security = box.run("exec", "systemd-analyze", "security", "--threshold=20", service)
        assert security.returncode == 0, security.stdout[-1500:]

    before = int(
        box.show("ingest_options.service", "ExecMainStartTimestampMonotonic")[
            "ExecMainStartTimestampMonotonic"
        ]
        or 0
    )
    assert box.systemctl("start", "e2e-contracts.timer").returncode == 0
    try:
        props = await wait_for_run(box, "ingest_options.service", after=before)
        fired = box.show("e2e-contracts.timer", "LastTriggerUSec")["LastTriggerUSec"]
    finally:
        box.systemctl("stop", "e2e-contracts.timer")
    assert fired, "the service ran, but not because the timer fired"
    assert props["Result"] == "success"

    entries = box.journal("ingest_options.service")
    job = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "ingest_options"]
    assert job, entries[-5:]
    assert any("ended succeeded" in e["MESSAGE"] for e in job)
    # journald consumed the <N> priority prefixes: none is left in a message
    assert not [e["MESSAGE"] for e in job if e["MESSAGE"][:1] == "<"]
    assert await count_rows(database_url, "option_contracts") == len(UNDERLYINGS) * CONTRACTS


async def test_a_failed_run_triggers_the_notification_hook(installed: Sandbox) -> None:
    """A failing job starts ingest-notify@, whose NOTIFY_COMMAND receives a report on the unit."""
    box = installed
    dropin = box.share / "dropins" / "ingest_options.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (box.share / "broken.env").write_text(
        "DATABASE_URL=postgresql://postgres@127.0.0.1:1/nowhere\n", encoding="utf-8"
    )
    (dropin / "broken.conf").write_text(
        f"[Service]\nEnvironmentFile={box.share / 'broken.env'}\n", encoding="utf-8"
    )
    box.run("install-unit", str(dropin), check=True)
    try:
        assert box.systemctl("start", "ingest_options.service").returncode != 0
        notify = "ingest-notify@ingest_options.service.service"
        deadline = time.monotonic() + 30
        while not (
            box.show(notify, "ActiveState")["ActiveState"] in ("inactive", "failed")
            and box.run("exec", "test", "-s", REPORT).returncode == 0
        ):
            assert time.monotonic() < deadline, box.show(notify, "ActiveState", "Result")
            await asyncio.sleep(0.5)
        assert box.show(notify, "Result")["Result"] == "success"
        report = box.run("exec", "cat", REPORT, check=True).stdout
    finally:
        box.run("exec", "rm", "-rf", "/etc/systemd/system/ingest_options.service.d")
        box.systemctl("daemon-reload")
        box.systemctl("reset-failed")
    assert report.startswith("options-history: ingest_options.service failed on ")
    assert "result: exit-code, exit status 1" in report
    errors = [
        e
        for e in box.journal("ingest_options.service")
        if e.get("SYSLOG_IDENTIFIER") == "ingest_options" and int(e.get("PRIORITY", "6")) <= 3
    ]
    # `journalctl -p err` must show why the run failed: the final `error: ...` line needs <3>
    assert errors, "no line of the failed job has an error priority (PRIORITY <= 3)"


@contextlib.contextmanager
def forced_snapshots(box: Sandbox) -> Iterator[None]:
    """ingest_snapshots.service with --force (markets may be closed), through a drop-in."""
    dropin = box.share / "dropins" / "ingest_snapshots.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    rendered = (box.share / "units" / "ingest_snapshots.service").read_text(encoding="utf-8")
    (exec_start,) = [line for line in rendered.splitlines() if line.startswith("ExecStart=")]
    (dropin / "force.conf").write_text(
        f"[Service]\nExecStart=\n{exec_start} --force\n", encoding="utf-8"
    )
    box.run("install-unit", str(dropin), check=True)
    try:
        yield
    finally:
        box.run("exec", "rm", "-rf", "/etc/systemd/system/ingest_snapshots.service.d")
        box.systemctl("daemon-reload")


async def test_snapshot_service_stores_snapshots(installed: Sandbox, database_url: str) -> None:
    """ingest_snapshots.service (forced, markets may be closed) stores a snapshot per contract,
    then computes the greeks the API left out."""
    box = installed
    synced = box.systemctl("start", "ingest_options.service")
    assert synced.returncode == 0, box.messages("ingest_options.service")
    with forced_snapshots(box):
        started = box.systemctl("start", "ingest_snapshots.service")
    journal = box.messages("ingest_snapshots.service")
    assert started.returncode == 0, journal
    assert await count_rows(database_url, "option_snapshots") > 0, journal
    # its ExecStartPost= computed the IV and greeks the API left out, inside the same sandbox
    assert await count_rows(database_url, "computed_greeks") > 0, journal


async def move_latest_slot_back(pool: asyncpg.Pool, *, days: int) -> tuple[dt.datetime, int]:
    """Move the latest snapshot slot ``days`` days into the past, as if taken then (its rows,
    coverage, run and computed greeks): a past day the archive may take. Return the slot's
    new time and its rows of ``UNDERLYINGS[0]``."""
    taken = await pool.fetchval(
        "SELECT captured_at FROM ingest_runs WHERE job = 'snapshots' ORDER BY id DESC LIMIT 1"
    )
    slot = taken - dt.timedelta(days=days)
    await ensure_partitions(pool, slot.astimezone(dt.UTC).date(), days_ahead=0)
    async with pool.acquire() as connection, connection.transaction():
        for table in (
            "option_snapshots",
            "snapshot_coverage",
            "ingest_runs",
            "computed_greeks",
            "greeks_slots",
        ):
            await connection.execute(
                f"UPDATE {table} SET captured_at = $1 WHERE captured_at = $2", slot, taken
            )
    rows = await pool.fetchval(
        "SELECT count(*) FROM snapshot_reads WHERE captured_at = $1 AND underlying_ticker = $2",
        slot,
        UNDERLYINGS[0],
    )
    return slot, int(rows)


def unit_word(word: str) -> str:
    """``word`` as one quoted word of a unit file's command line or Environment= line."""
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("%", "%%").replace("$", "$$") + '"'


def as_user(
    box: Sandbox, user: str, *command: str, env: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` inside the sandbox as ``user``, with that user's own groups and the
    environment systemd gives a service plus ``env`` (``NAME=value``): what that user may
    read, nothing root lent it. A oneshot unit, not setpriv: it binds in an interpreter that
    lives under /root or /home (pyenv) as the job units do, without opening the home itself."""
    installation = Installation.detect(env_file=box.share / "env", working_dir=box.share)
    out, err = "/run/e2e-as-user.out", "/run/e2e-as-user.err"
    lines = [
        "[Service]",
        "Type=oneshot",
        f"User={user}",
        "ProtectHome=tmpfs",
        *(f"BindReadOnlyPaths={path}" for path in installation.hidden_paths()),
        *(f"Environment={unit_word(item)}" for item in ("LANG=C.UTF-8", *env)),
        "WorkingDirectory=/",
        f"StandardOutput=file:{out}",
        f"StandardError=file:{err}",
        "ExecStart=" + " ".join(unit_word(word) for word in command),
    ]
    unit = box.share / "units" / "e2e-as-user.service"
    unit.write_text("\n".join(lines) + "\n", encoding="utf-8")
    box.run("exec", "rm", "-f", out, err)
    box.run("install-unit", str(unit), check=True)
    started = box.systemctl("start", unit.name)
    box.systemctl("reset-failed", unit.name)
    return subprocess.CompletedProcess(
        command,
        started.returncode,
        stdout=box.run("exec", "cat", out).stdout,
        stderr=box.run("exec", "cat", err).stdout,
    )


async def test_the_archive_and_metrics_written_under_the_units_are_read_by_the_group(
    installed: Sandbox, accounts: ServiceAccount, database_url: str, pool: asyncpg.Pool
) -> None:
    """With ARCHIVE_URL at its documented default (a StateDirectory= of the units), a snapshot
    run under the rendered unit archives a past day; a normal user of the options-history
    group reads that day (options_read, pyarrow) and the metrics file, and a user outside the
    group reads neither."""
    box = installed
    synced = box.systemctl("start", "ingest_options.service")
    assert synced.returncode == 0, box.messages("ingest_options.service")
    with forced_snapshots(box):
        first = box.systemctl("start", "ingest_snapshots.service")
        assert first.returncode == 0, box.messages("ingest_snapshots.service")
        slot, rows = await move_latest_slot_back(pool, days=ARCHIVE_AFTER_DAYS + 2)
        assert rows == CONTRACTS
        # the next run archives the days older than ARCHIVE_AFTER_DAYS, after its snapshot
        second = box.systemctl("start", "ingest_snapshots.service")
    journal = box.messages("ingest_snapshots.service", lines=40)
    assert second.returncode == 0, journal
    day = slot.astimezone(dt.UTC).date()
    archived = await pool.fetchrow(
        "SELECT url, rows, dropped_at FROM archived_days WHERE day = $1", day
    )
    assert archived is not None, journal
    assert archived["dropped_at"] is not None, journal
    day_file = f"{ARCHIVE}/option_snapshots/date={day.isoformat()}/part-0.parquet"
    assert archived["url"] == day_file

    # owned by the jobs' user and group; the group reads, nobody else does
    owner = f"{accounts.user}:{accounts.group}"
    for path, mode in (
        (ARCHIVE, "750"),
        (f"{ARCHIVE}/option_snapshots", "750"),
        (day_file, "640"),
        (METRICS, "750"),
        (f"{METRICS}/ingest_snapshots.prom", "640"),
    ):
        stat = box.run("exec", "stat", "-c", "%U:%G %a", path, check=True).stdout.split()
        assert stat == [owner, mode], path

    read = as_user(
        box,
        READER,
        str(BIN / "options_read"),
        "chain",
        UNDERLYINGS[0],
        "--at",
        slot.isoformat(),
        "--format",
        "csv",
        "--archive-url",
        ARCHIVE,
        "--env-file",
        "/dev/null",
        env=(f"DATABASE_URL={database_url}",),
    )
    assert read.returncode == 0, read.stderr
    assert "(from archive)" in read.stderr  # the day was read from its Parquet file
    assert len([line for line in read.stdout.splitlines() if line]) == 1 + rows, read.stderr
    parquet = as_user(
        box,
        READER,
        str(BIN / "python"),
        "-c",
        "import sys, pyarrow.parquet as pq; print(pq.read_table(sys.argv[1]).num_rows)",
        day_file,
    )
    assert parquet.returncode == 0, parquet.stderr
    assert int(parquet.stdout) == archived["rows"]
    metrics = as_user(box, READER, CAT, f"{METRICS}/ingest_snapshots.prom")
    assert metrics.returncode == 0, metrics.stderr
    assert 'options_history_last_run_status{job="snapshots",status="succeeded"} 1.0' in (
        metrics.stdout
    )
    for path in (day_file, f"{METRICS}/ingest_snapshots.prom"):
        outsider = as_user(box, "nobody", CAT, path)
        assert outsider.returncode != 0 and "Permission denied" in outsider.stderr, path
