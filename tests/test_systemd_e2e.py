"""The rendered units under a real systemd: a timer fires the hardened service, rows land.

Uses ``../shared/tools/systemd-sandbox`` (systemd as PID 1 of private namespaces; needs root with
CAP_SYS_ADMIN). Takes about half a minute, so it runs only with ``RUN_SYSTEMD_E2E=1`` (CI sets
it where it runs as root); asked for, a sandbox that is missing or cannot start fails the test.
The simulator runs as its own process and PostgreSQL is the test run's server on 127.0.0.1
(trust authentication), both reachable from inside the sandbox.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from options.ops.units import Installation, Scope, render_units

SANDBOX = Path(__file__).resolve().parents[2] / "shared" / "tools" / "systemd-sandbox"
BIN = Path(sys.executable).parent
CHECKOUT = Path(__file__).resolve().parents[1]
SIM_KEY = "sim-key"
UNDERLYINGS = ("AAAA", "AAAB", "AAAC")
CONTRACTS = 200
REPORT = "/run/ingest-notify-report.txt"
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


@pytest.fixture
def installed(sandbox: Sandbox, simulator_url: str, database_url: str) -> Sandbox:
    """The rendered system units installed in the sandbox, reading an env file for this test."""
    env_file = sandbox.share / "env"
    env_file.write_text(
        f"DATABASE_URL={database_url}\n"
        f"POLYGON_BASE_URL={simulator_url}\n"
        f"POLYGON_API_KEY={SIM_KEY}\n"
        f"UNDERLYINGS={','.join(UNDERLYINGS)}\n"
        "POLYGON_RATE_LIMIT=off\n"
        f"NOTIFY_COMMAND='cat > {REPORT}'\n",
        encoding="utf-8",
    )
    env_file.chmod(0o600)  # root only: the dynamic user reads its LoadCredential= copy
    # the working directory under /tmp exercises the bind into the service's private /tmp
    installation = Installation.detect(env_file=env_file, working_dir=sandbox.share)
    unit_dir = sandbox.share / "units"
    unit_dir.mkdir(exist_ok=True)
    units = {**render_units(installation, scope=Scope.SYSTEM), "e2e-contracts.timer": NEAR_TIMER}
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


async def test_snapshot_service_stores_snapshots(installed: Sandbox, database_url: str) -> None:
    """ingest_snapshots.service (forced, markets may be closed) stores a snapshot per contract,
    then computes the greeks the API left out."""
    box = installed
    synced = box.systemctl("start", "ingest_options.service")
    assert synced.returncode == 0, box.messages("ingest_options.service")
    dropin = box.share / "dropins" / "ingest_snapshots.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    rendered = (box.share / "units" / "ingest_snapshots.service").read_text(encoding="utf-8")
    (exec_start,) = [line for line in rendered.splitlines() if line.startswith("ExecStart=")]
    (dropin / "force.conf").write_text(
        f"[Service]\nExecStart=\n{exec_start} --force\n", encoding="utf-8"
    )
    box.run("install-unit", str(dropin), check=True)
    try:
        started = box.systemctl("start", "ingest_snapshots.service")
    finally:
        box.run("exec", "rm", "-rf", "/etc/systemd/system/ingest_snapshots.service.d")
        box.systemctl("daemon-reload")
    journal = box.messages("ingest_snapshots.service")
    assert started.returncode == 0, journal
    assert await count_rows(database_url, "option_snapshots") > 0, journal
    # its ExecStartPost= computed the IV and greeks the API left out, inside the same sandbox
    assert await count_rows(database_url, "computed_greeks") > 0, journal
