"""systemd units: rendering, systemd's own checks (verify, security, calendar), install, hook."""

from __future__ import annotations

import dataclasses
import grp
import importlib.metadata
import os
import pwd
import re
import shutil
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from options.config import Settings
from options.errors import ConfigError, OptionsError
from options.ops.service_access import (
    READ_GROUP,
    SERVICE_USER,
    Outputs,
    ServiceAccount,
    directory_warnings,
    render_sysusers,
    service_account,
)
from options.ops.units import (
    TEMPLATE_DIR,
    TIMERS,
    UNIT_FILES,
    Installation,
    Scope,
    format_uninstall_plan,
    install_units,
    plan_uninstall,
    render_units,
    uninstall_units,
)

BIN = Path(sys.executable).parent
NEW_YORK = ZoneInfo("America/New_York")
NOTIFY_HOOK = TEMPLATE_DIR / "notify-failure"
SERVICES = ("ingest_options.service", "ingest_snapshots.service", "ingest_daily.service")
# A normal host: venv and code in /opt, settings in /etc, interpreter from the system.
OPT = Installation(
    exec_dir=Path("/opt/options-history/.venv/bin"),
    env_file=Path("/etc/options-history/env"),
    working_dir=Path("/opt/options-history"),
    read_paths=(Path("/opt/options-history/.venv"), Path("/usr"), Path("/opt/options-history")),
    scripts_dir=Path("/opt/options-history/scripts"),
)

# The documented defaults: the archive and node_exporter's files under the jobs' state directory.
STATE_OUTPUTS = Outputs(
    archive_dir=Path("/var/lib/options-history/archive"),
    metrics_dir=Path("/var/lib/options-history/metrics"),
)

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install systemd)",
)


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    """An env file as an operator writes it."""
    path = tmp_path / "env"
    path.write_text("DATABASE_URL=postgresql://options@127.0.0.1/options\n", encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.fixture
def here(env_file: Path) -> Installation:
    """This checkout's installation: real console scripts, so `verify` can check ExecStart=."""
    return Installation.detect(env_file=env_file, working_dir=Path.cwd())


def write_units(units: dict[str, str], directory: Path) -> list[Path]:
    """Write rendered units into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in units.items():
        (directory / name).write_text(text, encoding="utf-8")
        paths.append(directory / name)
    return paths


def directives(text: str, key: str) -> list[str]:
    """Every value of ``key=`` in a unit file's text."""
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def analyze(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze with UTC output."""
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TZ": "UTC", "SYSTEMD_PAGER": "", **(env or {})},
        timeout=60,
    )


def timespan_seconds(span: str) -> float:
    """How systemd reads a time span, in seconds."""
    result = analyze("timespan", span)
    assert result.returncode == 0, result.stderr
    match = re.search(r"μs:\s*(\d+)", result.stdout)
    assert match, result.stdout
    return int(match.group(1)) / 1e6


# rendering


@pytest.mark.parametrize("scope", list(Scope), ids=lambda s: s.value)
def test_rendering_fills_every_placeholder_with_absolute_paths(
    here: Installation, scope: Scope
) -> None:
    """No placeholder or marker survives, and every path a unit names is absolute."""
    units = render_units(here, scope=scope)
    assert list(units) == list(UNIT_FILES)
    for name, text in units.items():
        assert not re.search(r"@[A-Z_]+@", text), name
        for key in ("ExecStart", "WorkingDirectory", "EnvironmentFile", "BindReadOnlyPaths"):
            for value in directives(text, key):
                assert Path(value.lstrip("-").split()[0]).is_absolute(), (name, key, value)
    options = units["ingest_options.service"]
    assert directives(options, "ExecStart")[0].startswith(f"{BIN}/ingest_options --env-file ")
    assert directives(options, "EnvironmentFile") == [str(here.env_file)]
    assert directives(options, "WorkingDirectory") == [str(Path.cwd())]


def test_system_units_are_hardened_and_read_a_private_copy_of_the_env_file() -> None:
    """System units run as the jobs' system user, sandboxed, and get the env file as a
    credential."""
    units = render_units(OPT, scope=Scope.SYSTEM)
    for name in SERVICES:
        text = units[name]
        assert directives(text, "DynamicUser") == []
        assert directives(text, "User") == ["options-history"]
        assert directives(text, "ProtectSystem") == ["strict"]
        assert directives(text, "ProtectHome") == ["yes"]
        assert directives(text, "BindReadOnlyPaths") == []
        assert directives(text, "CapabilityBoundingSet") == [""]
        assert directives(text, "LoadCredential") == ["env:/etc/options-history/env"]
        assert "--env-file ${CREDENTIALS_DIRECTORY}/env" in directives(text, "ExecStart")[0]
        assert directives(text, "Type") == ["oneshot"]
        assert directives(text, "KillSignal") == ["SIGTERM"]
        assert directives(text, "OnFailure") == ["ingest-notify@%n.service"]
        assert directives(text, "SuccessExitStatus") == []
        assert directives(text, "SyslogIdentifier") == [name.removesuffix(".service")]
    notify = units["ingest-notify@.service"]
    assert directives(notify, "ExecStart") == [
        "/opt/options-history/scripts/notify-failure --system %i"
    ]


def test_user_name_replaces_the_jobs_user_and_keeps_the_reading_group() -> None:
    """--user-name runs the system units as that user; what they write still belongs to the
    options-history group, so its readers read it."""
    units = render_units(OPT, scope=Scope.SYSTEM, user_name="options", outputs=STATE_OUTPUTS)
    for name in SERVICES:
        assert directives(units[name], "User") == ["options"]
        assert directives(units[name], "Group") == ["options-history"]
        assert directives(units[name], "DynamicUser") == []
        assert directives(units[name], "UMask") == ["0027"]


def test_system_units_write_group_readable_files_and_nothing_else() -> None:
    """Without a local archive or a metrics directory, no directory is writable (ProtectSystem=
    strict, no StateDirectory=, ReadWritePaths= or BindPaths=); files are made 0640 (UMask=
    0027) and belong to the options-history group (Group=)."""
    units = render_units(OPT, scope=Scope.SYSTEM)
    for name in SERVICES:
        text = units[name]
        assert directives(text, "Group") == [READ_GROUP] == ["options-history"]
        assert directives(text, "UMask") == ["0027"]
        for key in ("StateDirectory", "StateDirectoryMode", "ReadWritePaths", "BindPaths"):
            assert directives(text, key) == [], (name, key)
        assert "--metrics-textfile" not in text


@pytest.mark.parametrize(
    ("archive", "state", "read_write", "bind", "home"),
    [
        ("/var/lib/options-history/archive", ["options-history/archive"], [], [], "yes"),
        ("/var/lib/options-history", ["options-history"], [], [], "yes"),
        ("/srv/options-archive", [], ["/srv/options-archive"], [], "yes"),
        # another package's tree is never taken over by StateDirectory= (it chowns recursively)
        ("/var/lib/postgresql/archive", [], ["/var/lib/postgresql/archive"], [], "yes"),
        ("/tmp/ci/archive", [], [], ["/tmp/ci/archive"], "yes"),
        ("/home/alice/archive", [], [], ["/home/alice/archive"], "tmpfs"),
    ],
    ids=["state-default", "state-root", "srv", "other-package", "tmp", "home"],
)
def test_a_local_archive_gets_exactly_its_write_access(
    archive: str, state: list[str], read_write: list[str], bind: list[str], home: str
) -> None:
    """ARCHIVE_URL=/dir: StateDirectory= under /var/lib/options-history (systemd makes it, owned
    by the jobs' user and group, 0750), ReadWritePaths= elsewhere, BindPaths= where
    ProtectHome= or PrivateTmp= would hide it; every job service gets it (each may write into
    the tier that holds a day)."""
    outputs = Outputs.from_settings(Settings(archive_url=archive))
    assert outputs == Outputs(archive_dir=Path(archive))
    units = render_units(OPT, scope=Scope.SYSTEM, outputs=outputs)
    for name in SERVICES:
        text = units[name]
        assert directives(text, "ProtectSystem") == ["strict"]
        assert directives(text, "StateDirectory") == ([" ".join(state)] if state else [])
        assert directives(text, "StateDirectoryMode") == (["0750"] if state else [])
        assert directives(text, "ReadWritePaths") == read_write
        assert directives(text, "BindPaths") == bind
        assert directives(text, "ProtectHome") == [home]
    assert "StateDirectory" not in units["ingest-notify@.service"]


@pytest.mark.parametrize("archive_url", [None, "s3://bucket/options"], ids=["no-archive", "s3"])
def test_an_s3_archive_or_none_gets_no_write_access(archive_url: str | None) -> None:
    """An s3:// archive (or none) needs no directory: nothing is made writable."""
    outputs = Outputs.from_settings(Settings(archive_url=archive_url))
    assert outputs == Outputs()
    assert render_units(OPT, outputs=outputs) == render_units(OPT)


def test_a_metrics_directory_is_each_jobs_metrics_file_and_write_access() -> None:
    """--metrics-dir DIR: each job writes DIR/<job>.prom (--metrics-textfile in its ExecStart=)
    and may write DIR; with the default archive, one StateDirectory= line holds both."""
    units = render_units(OPT, scope=Scope.SYSTEM, outputs=STATE_OUTPUTS)
    for name in SERVICES:
        text = units[name]
        job = name.removesuffix(".service")
        (exec_start,) = directives(text, "ExecStart")
        assert exec_start.endswith(
            f" --metrics-textfile /var/lib/options-history/metrics/{job}.prom"
        ), exec_start
        assert directives(text, "StateDirectory") == [
            "options-history/archive options-history/metrics"
        ]
        assert directives(text, "ReadWritePaths") == []
    # the greeks step after a snapshot run is not a run with figures of its own
    (post,) = directives(units["ingest_snapshots.service"], "ExecStartPost")
    assert "--metrics-textfile" not in post
    elsewhere = Outputs(metrics_dir=Path("/var/lib/prometheus/node-exporter"))
    text = render_units(OPT, outputs=elsewhere)["ingest_daily.service"]
    assert directives(text, "ReadWritePaths") == ["/var/lib/prometheus/node-exporter"]
    assert directives(text, "StateDirectory") == []


@pytest.mark.parametrize("path", ["relative/metrics", "/var/lib/my metrics", "/srv/100%"], ids=str)
def test_a_metrics_directory_a_unit_cannot_hold_is_refused(path: str) -> None:
    """A relative path or one a unit file would mis-read is one ConfigError."""
    with pytest.raises(ConfigError, match="--metrics-dir"):
        render_units(OPT, outputs=Outputs(metrics_dir=Path(path)))


def test_user_units_write_where_the_user_may_and_keep_their_umask() -> None:
    """User units get the metrics option, but no user, group or sandbox lines: they run as
    you, without ProtectSystem=, and keep UMask=0077 (your files stay yours)."""
    units = render_units(OPT, scope=Scope.USER, outputs=STATE_OUTPUTS)
    for name in SERVICES:
        text = units[name]
        for key in ("User", "Group", "StateDirectory", "ReadWritePaths", "BindPaths"):
            assert directives(text, key) == [], (name, key)
        assert directives(text, "UMask") == ["0077"]
        assert "--metrics-textfile /var/lib/options-history/metrics/" in text


def test_sysusers_snippet_makes_the_user_and_the_reading_group(tmp_path: Path) -> None:
    """The sysusers.d snippet install-units writes creates the system user options-history
    with the options-history group (systemd-sysusers --root, a scratch /etc); with
    --user-name only the group, since the user exists."""
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed (apt-get install systemd)")
    own = service_account(None)
    assert own == ServiceAccount(user=SERVICE_USER, group=READ_GROUP, create_user=True)
    named = service_account("alice")
    assert named == ServiceAccount(user="alice", group=READ_GROUP, create_user=False)
    for account, users in ((own, ["options-history"]), (named, [])):
        root = tmp_path / account.user
        (root / "etc").mkdir(parents=True)
        snippet = tmp_path / f"{account.user}.conf"
        snippet.write_text(render_sysusers(account), encoding="utf-8")
        result = subprocess.run(
            ["systemd-sysusers", f"--root={root}", str(snippet)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        groups = {
            line.split(":")[0]: line.split(":")[2]
            for line in (root / "etc/group").read_text().splitlines()
        }
        assert list(groups) == ["options-history"]
        made = (root / "etc/passwd").read_text() if (root / "etc/passwd").exists() else ""
        passwd = [line.split(":") for line in made.splitlines()]
        assert [entry[0] for entry in passwd] == users
        for entry in passwd:
            assert entry[3] == groups["options-history"]  # primary group
            assert entry[6] == "/usr/sbin/nologin"


@pytest.mark.parametrize(
    ("scope", "user_name"),
    [(Scope.SYSTEM, "Bad Name"), (Scope.SYSTEM, "../root"), (Scope.USER, "options")],
    ids=["space", "path", "user-scope"],
)
def test_bad_user_names_are_refused(scope: Scope, user_name: str) -> None:
    """An invalid name, or a name for user units, is a ConfigError."""
    with pytest.raises(ConfigError):
        render_units(OPT, scope=scope, user_name=user_name)


def test_user_units_leave_out_what_a_user_manager_cannot_apply() -> None:
    """User units keep the seccomp-based options and drop users, namespaces and credentials."""
    units = render_units(OPT, scope=Scope.USER)
    for name in SERVICES:
        text = units[name]
        for key in (
            "DynamicUser",
            "User",
            "CapabilityBoundingSet",
            "PrivateDevices",
            "PrivateTmp",
            "ProtectSystem",
            "ProtectHome",
            "LoadCredential",
            "Wants",
        ):
            assert directives(text, key) == [], (name, key)
        for key in ("NoNewPrivileges", "SystemCallFilter", "RestrictAddressFamilies", "UMask"):
            assert directives(text, key), (name, key)
        assert "--env-file /etc/options-history/env " in directives(text, "ExecStart")[0]
    assert "--user %i" in directives(units["ingest-notify@.service"], "ExecStart")[0]


def test_paths_in_home_directories_are_bound_into_an_empty_home() -> None:
    """A venv or interpreter under /home or /root is reachable despite ProtectHome=."""
    home = Installation(
        exec_dir=Path("/home/alice/app/.venv/bin"),
        env_file=Path("/home/alice/app/.env"),
        working_dir=Path("/home/alice/app"),
        read_paths=(
            Path("/home/alice/app/.venv"),
            Path("/root/.pyenv/versions/3.11.7"),
            Path("/home/alice/app"),
        ),
    )
    text = render_units(home, scope=Scope.SYSTEM)["ingest_options.service"]
    assert directives(text, "ProtectHome") == ["tmpfs"]
    assert directives(text, "BindReadOnlyPaths") == [
        "/home/alice/app",
        "/root/.pyenv/versions/3.11.7",
    ]


def test_paths_under_tmp_are_bound_into_the_private_tmp() -> None:
    """A working directory under /tmp stays visible with PrivateTmp=."""
    in_tmp = dataclasses.replace(OPT, working_dir=Path("/tmp/trial"))
    text = render_units(in_tmp, scope=Scope.SYSTEM)["ingest_snapshots.service"]
    assert directives(text, "ProtectHome") == ["yes"]
    assert directives(text, "BindReadOnlyPaths") == ["/tmp/trial"]


def test_hook_in_a_clone_under_tmp_stays_visible() -> None:
    """The failure hook of a clone under /tmp is bound into the hook's private /tmp (it would
    not run, and no failure would be reported); from /opt nothing is bound."""
    in_tmp = dataclasses.replace(OPT, scripts_dir=Path("/tmp/ci-clone/scripts"))
    hook = render_units(in_tmp, scope=Scope.SYSTEM)["ingest-notify@.service"]
    assert directives(hook, "BindReadOnlyPaths") == ["/tmp/ci-clone/scripts"]
    assert directives(render_units(OPT)["ingest-notify@.service"], "BindReadOnlyPaths") == []
    user = render_units(in_tmp, scope=Scope.USER)["ingest-notify@.service"]
    assert directives(user, "BindReadOnlyPaths") == []


@pytest.mark.parametrize(
    "path", ["/opt/my app/.venv/bin", "/opt/100%/bin", "relative/bin"], ids=str
)
def test_paths_a_unit_file_cannot_hold_are_refused(path: str) -> None:
    """Spaces, specifiers and relative paths are refused rather than mis-rendered."""
    with pytest.raises(ConfigError, match="cannot go into a unit file"):
        render_units(dataclasses.replace(OPT, exec_dir=Path(path)))


def test_detect_refuses_a_missing_env_file(tmp_path: Path) -> None:
    """The env file must exist before units that read it are rendered."""
    with pytest.raises(ConfigError, match="does not exist"):
        Installation.detect(env_file=tmp_path / "missing.env")


def test_bad_snapshot_cadence_is_refused() -> None:
    """Only 5, 10 and 15 minutes divide the 09:30..16:00 session into whole slots."""
    with pytest.raises(ConfigError, match="expected one of 5, 10, 15"):
        render_units(OPT, snapshot_every=7)


@needs_systemd_analyze
@pytest.mark.parametrize("every", [5, 10, 15], ids=lambda n: f"every{n}")
def test_snapshot_run_ends_before_the_next_slot(every: int) -> None:
    """Deadline < TimeoutStartSec, and TimeoutStartSec + TimeoutStopSec < the timer period."""
    text = render_units(OPT, snapshot_every=every)["ingest_snapshots.service"]
    deadline = directives(text, "ExecStart")[0].split("--deadline ")[1].split()[0]
    start = timespan_seconds(directives(text, "TimeoutStartSec")[0])
    stop = timespan_seconds(directives(text, "TimeoutStopSec")[0])
    assert timespan_seconds(deadline) < start
    assert start + stop < every * 60


# systemd's own checks


@needs_systemd_analyze
@pytest.mark.parametrize("scope", list(Scope), ids=lambda s: s.value)
def test_systemd_analyze_verify_is_silent(here: Installation, scope: Scope, tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts every rendered unit without a word."""
    paths = write_units(render_units(here, scope=scope, outputs=STATE_OUTPUTS), tmp_path / "units")
    # a template is verified through an instance, as OnFailure= starts it
    paths.append(tmp_path / "units" / "ingest-notify@ingest_options.service.service")
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    flags = ["--user"] if scope is Scope.USER else []
    result = analyze(*flags, "verify", *map(str, paths), env={"XDG_RUNTIME_DIR": str(runtime)})
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_systemd_analyze
@pytest.mark.parametrize("layout", ["this-checkout", "opt", "opt-archive-metrics"])
@pytest.mark.parametrize("service", SERVICES)
def test_security_exposure_is_at_most_2(
    here: Installation, layout: str, service: str, tmp_path: Path
) -> None:
    """`systemd-analyze security --offline=true --threshold=20` passes: exposure <= 2.0, with
    the archive and metrics directories writable too."""
    installation = here if layout == "this-checkout" else OPT
    outputs = STATE_OUTPUTS if layout == "opt-archive-metrics" else Outputs()
    write_units(render_units(installation, scope=Scope.SYSTEM, outputs=outputs), tmp_path)
    result = analyze("security", "--offline=true", "--threshold=20", str(tmp_path / service))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-2000:]
    assert float(match.group(1)) <= 2.0
    print(f"{service} ({layout}): exposure {match.group(1)}")


def calendar_elapses(spec: str, *, base: datetime, until: datetime) -> list[datetime]:
    """Elapses of one OnCalendar= spec in [base, until), computed by systemd itself."""
    found: list[datetime] = []
    iterations = 100
    while True:
        result = analyze(
            "calendar",
            f"--iterations={iterations}",
            f"--base-time={base:%Y-%m-%d %H:%M:%S} UTC",
            spec,
        )
        assert result.returncode == 0, result.stderr
        stamps = re.findall(
            r"(?:Next elapse|Iter\. #\d+): \w{3} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC",
            result.stdout,
        )
        found = [datetime.fromisoformat(s).replace(tzinfo=UTC) for s in stamps]
        if len(found) < iterations or found[-1] >= until:
            return [t for t in found if base <= t < until]
        iterations *= 4


def expected_slots(first: date, days: int, every: int) -> set[datetime]:
    """The N-minute slots 09:30..16:00 New York time on the weekdays from ``first``."""
    slots = set()
    for offset in range(days):
        day = first + timedelta(days=offset)
        if day.weekday() >= 5:
            continue
        slot = datetime.combine(day, dtime(9, 30), NEW_YORK)
        while slot.time() <= dtime(16, 0):
            slots.add(slot.astimezone(UTC))
            slot += timedelta(minutes=every)
    return slots


# Mondays starting three weeks that contain a daylight-saving change (a Sunday, at 02:00).
DST_WEEKS = {"fall-2026-11-01": date(2026, 10, 26), "spring-2027-03-14": date(2027, 3, 8)}
WEEKS = 3


@needs_systemd_analyze
@pytest.mark.parametrize("monday", list(DST_WEEKS.values()), ids=list(DST_WEEKS))
@pytest.mark.parametrize("every", [5, 10, 15], ids=lambda n: f"every{n}")
def test_snapshot_timer_fires_exactly_on_the_new_york_slots(every: int, monday: date) -> None:
    """Over three weeks across a DST change: every N-minute slot 09:30..16:00 ET, Mon-Fri, only."""
    timer = render_units(OPT, snapshot_every=every)["ingest_snapshots.timer"]
    specs = directives(timer, "OnCalendar")
    assert specs and all(spec.endswith(" America/New_York") for spec in specs)
    base = datetime.combine(monday, dtime(0, 0), UTC)
    until = base + timedelta(weeks=WEEKS)
    elapses: list[datetime] = []
    for spec in specs:
        elapses += calendar_elapses(spec, base=base, until=until)
    expected = expected_slots(monday, 7 * WEEKS, every)
    assert len(elapses) == len(set(elapses)), "two specs fire on the same slot"
    assert sorted(elapses) == sorted(expected)
    assert len(expected) == 15 * (390 // every + 1)
    # the UTC time of the first slot moved with daylight saving: the zone was applied
    first_slots = {t.time() for t in elapses if t.astimezone(NEW_YORK).time() == dtime(9, 30)}
    assert first_slots == {dtime(13, 30), dtime(14, 30)}
    assert directives(timer, "AccuracySec") == ["1s"]
    assert directives(timer, "Persistent") == ["false"]


@needs_systemd_analyze
@pytest.mark.parametrize("monday", list(DST_WEEKS.values()), ids=list(DST_WEEKS))
def test_contracts_timer_fires_once_a_day_at_the_same_new_york_time(monday: date) -> None:
    """The daily timer fires once every day, at 07:00 New York time, across a DST change."""
    timer = render_units(OPT)["ingest_options.timer"]
    (spec,) = directives(timer, "OnCalendar")
    base = datetime.combine(monday, dtime(0, 0), UTC)
    until = base + timedelta(weeks=WEEKS)
    elapses = calendar_elapses(spec, base=base, until=until)
    local = [t.astimezone(NEW_YORK) for t in elapses]
    assert [t.date() for t in local] == [monday + timedelta(days=d) for d in range(7 * WEEKS)]
    assert {t.time() for t in local} == {dtime(7, 0)}
    assert directives(timer, "Persistent") == ["true"]


# install-units / uninstall-units


@pytest.fixture
def fake_systemctl(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for systemctl that records each call's arguments, one line per call."""
    log = tmp_path / "systemctl.log"
    script = tmp_path / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\n', encoding="utf-8")
    script.chmod(0o755)
    return script, log


@pytest.mark.parametrize("scope", list(Scope), ids=lambda s: s.value)
def test_install_writes_units_reloads_and_enables_the_timers(
    scope: Scope, fake_systemctl: tuple[Path, Path], tmp_path: Path
) -> None:
    """install writes every file (0644), reloads, enables and starts both timers."""
    systemctl, log = fake_systemctl
    unit_dir = tmp_path / "units"
    units = render_units(OPT, scope=scope)
    written = install_units(
        units, scope=scope, unit_dir=unit_dir, systemctl=[str(systemctl)], euid=0
    )
    assert written == [unit_dir / name for name in UNIT_FILES]
    for path in written:
        assert path.read_text(encoding="utf-8") == units[path.name]
        assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in unit_dir.iterdir()) == sorted(UNIT_FILES)
    flag = "--user " if scope is Scope.USER else ""
    assert log.read_text(encoding="utf-8").splitlines() == [
        f"{flag}daemon-reload",
        f"{flag}enable --now {' '.join(TIMERS)}",
    ]

    log.unlink()
    removed = uninstall_units(scope=scope, unit_dir=unit_dir, systemctl=[str(systemctl)], euid=0)
    assert sorted(removed) == sorted(written)
    assert list(unit_dir.iterdir()) == []
    assert log.read_text(encoding="utf-8").splitlines() == [
        f"{flag}disable --now {' '.join(TIMERS)}",
        f"{flag}daemon-reload",
    ]


def test_system_install_makes_the_account_and_directories_and_uninstall_keeps_the_data(
    fake_systemctl: tuple[Path, Path], tmp_path: Path
) -> None:
    """install writes the sysusers.d snippet and runs systemd-sysusers before systemd is
    reloaded, makes a missing ReadWritePaths= directory (owner, group, 0750), and leaves the
    StateDirectory= ones to systemd; uninstall removes the snippet and the units, and never a
    directory of data (nor the user and group who own it)."""
    systemctl, log = fake_systemctl
    sysusers_cmd = tmp_path / "systemd-sysusers"
    sysusers_cmd.write_text(f'#!/bin/sh\necho "sysusers $*" >> {log}\n', encoding="utf-8")
    sysusers_cmd.chmod(0o755)
    unit_dir, sysusers_file = tmp_path / "units", tmp_path / "sysusers.d/options-history.conf"
    archive = tmp_path / "srv/archive"
    (archive.parent).mkdir()
    # this process's own user and group: chown to them needs no root
    account = ServiceAccount(
        user=pwd.getpwuid(os.getuid()).pw_name, group=grp.getgrgid(os.getgid()).gr_name
    )
    outputs = Outputs(archive_dir=archive, metrics_dir=Path("/var/lib/options-history/metrics"))
    assert outputs.made_by_install() == (archive,)
    units = render_units(OPT, scope=Scope.SYSTEM, outputs=outputs)
    written = install_units(
        units,
        scope=Scope.SYSTEM,
        unit_dir=unit_dir,
        account=account,
        directories=outputs.made_by_install(),
        sysusers_file=sysusers_file,
        sysusers_command=[str(sysusers_cmd)],
        systemctl=[str(systemctl)],
        euid=0,
    )
    assert written == [sysusers_file, *(unit_dir / name for name in UNIT_FILES)]
    assert sysusers_file.read_text(encoding="utf-8") == render_sysusers(account)
    assert log.read_text(encoding="utf-8").splitlines() == [
        f"sysusers {sysusers_file}",
        "daemon-reload",
        f"enable --now {' '.join(TIMERS)}",
    ]
    assert archive.is_dir() and archive.stat().st_mode & 0o7777 == 0o750
    assert (archive.stat().st_uid, archive.stat().st_gid) == (os.getuid(), os.getgid())
    (archive / "option_snapshots").mkdir()

    plan = plan_uninstall(
        scope=Scope.SYSTEM, unit_dir=unit_dir, sysusers_file=sysusers_file, systemctl=["x"]
    )
    assert list(plan.files) == [*(unit_dir / name for name in UNIT_FILES), sysusers_file]
    assert "kept: the user and group" in format_uninstall_plan(plan)
    removed = uninstall_units(
        scope=Scope.SYSTEM,
        unit_dir=unit_dir,
        sysusers_file=sysusers_file,
        systemctl=[str(systemctl)],
        euid=0,
    )
    assert sorted(removed) == sorted(written)
    assert not sysusers_file.exists() and list(unit_dir.iterdir()) == []
    assert (archive / "option_snapshots").is_dir()


def test_an_existing_directory_the_user_cannot_write_is_a_warning(tmp_path: Path) -> None:
    """A ReadWritePaths= directory that exists is left as it is, but install-units says when
    its mode and owner keep the jobs' user from writing it (the archive would fail at run
    time, only in the log)."""
    closed = tmp_path / "closed"
    closed.mkdir()
    closed.chmod(0o755)
    owner = f"{pwd.getpwuid(os.getuid()).pw_name}:{grp.getgrgid(os.getgid()).gr_name}"
    nobody = ServiceAccount(user="nobody", group="nogroup")
    (warning,) = directory_warnings([closed], nobody)
    assert warning == (
        f"{closed} (owner {owner}, mode 0755) is not writable by nobody: "
        f"`chown nobody:nogroup {closed}` and `chmod 0750 {closed}`, "
        "or use a directory under /var/lib/options-history"
    )
    me = ServiceAccount(user=pwd.getpwuid(os.getuid()).pw_name, group="nogroup")
    assert directory_warnings([closed], me) == []
    closed.chmod(0o777)
    assert directory_warnings([closed], nobody) == []
    assert directory_warnings([tmp_path / "missing"], nobody) == []


def test_uninstall_with_nothing_installed_does_nothing(
    fake_systemctl: tuple[Path, Path], tmp_path: Path
) -> None:
    """A second uninstall neither fails nor calls systemctl."""
    systemctl, log = fake_systemctl
    assert uninstall_units(scope=Scope.USER, unit_dir=tmp_path, systemctl=[str(systemctl)]) == []
    assert not log.exists()


def test_system_install_needs_root(tmp_path: Path) -> None:
    """System units are refused to a non-root user, before anything is written."""
    with pytest.raises(ConfigError, match="needs root") as caught:
        install_units(render_units(OPT), scope=Scope.SYSTEM, unit_dir=tmp_path / "u", euid=1000)
    assert caught.value.exit_code == 2
    assert not (tmp_path / "u").exists()


def test_a_failing_systemctl_is_one_error_line(tmp_path: Path) -> None:
    """systemctl's complaint becomes the error message."""
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(
        "#!/bin/sh\necho 'Failed to connect to bus: No medium found' >&2\nexit 1\n",
        encoding="utf-8",
    )
    systemctl.chmod(0o755)
    with pytest.raises(OptionsError, match="exited 1: Failed to connect to bus") as caught:
        install_units(
            render_units(OPT, scope=Scope.USER),
            scope=Scope.USER,
            unit_dir=tmp_path / "units",
            systemctl=[str(systemctl)],
        )
    assert "\n" not in str(caught.value)


def run_admin(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """Run ``ingest_admin`` as an operator would."""
    return subprocess.run(
        [str(BIN / "ingest_admin"), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env={**os.environ, "HOME": str(home)},
        timeout=60,
    )


@pytest.mark.parametrize("scope", list(Scope), ids=lambda s: s.value)
def test_dry_run_prints_every_file_and_writes_nothing(
    scope: Scope, env_file: Path, tmp_path: Path
) -> None:
    """--dry-run prints each rendered file after a header naming its path, and touches nothing."""
    home = tmp_path / "home"
    home.mkdir()
    system_dir = Path("/etc/systemd/system")
    before = sorted(system_dir.iterdir()) if system_dir.is_dir() else []
    result = run_admin(
        "install-units",
        f"--{scope.value}",
        "--dry-run",
        "--env-file",
        str(env_file),
        cwd=tmp_path,
        home=home,
    )
    assert result.returncode == 0, result.stderr
    unit_dir = system_dir if scope is Scope.SYSTEM else home / ".config/systemd/user"
    headers = re.findall(r"^==> (.+) <==$", result.stdout, flags=re.MULTILINE)
    sysusers = ["/etc/sysusers.d/options-history.conf"] if scope is Scope.SYSTEM else []
    assert headers == [*sysusers, *(str(unit_dir / name) for name in UNIT_FILES)]
    assert f"EnvironmentFile={env_file}" in result.stdout
    assert list(home.iterdir()) == []
    assert (sorted(system_dir.iterdir()) if system_dir.is_dir() else []) == before


def test_dry_run_gives_a_local_archive_from_the_env_file_its_write_access(
    tmp_path: Path,
) -> None:
    """install-units reads ARCHIVE_URL from the env file it is given: the archive under
    /var/lib/options-history becomes each job's StateDirectory= (ProtectSystem=strict would
    make it read-only), and the files land readable by the options-history group."""
    env_file = tmp_path / "env"
    env_file.write_text(
        "DATABASE_URL=postgresql://options@127.0.0.1/options\n"
        "ARCHIVE_URL=/var/lib/options-history/archive\n",
        encoding="utf-8",
    )
    result = run_admin(
        "install-units", "--dry-run", "--env-file", str(env_file), cwd=tmp_path, home=tmp_path
    )
    assert result.returncode == 0, result.stderr
    snapshots = result.stdout.split("==> /etc/systemd/system/ingest_snapshots.service <==")[1]
    snapshots = snapshots.split("==> ")[0]
    assert directives(snapshots, "ProtectSystem") == ["strict"]
    assert directives(snapshots, "StateDirectory") == ["options-history/archive"]
    assert directives(snapshots, "StateDirectoryMode") == ["0750"]
    assert directives(snapshots, "Group") == ["options-history"]
    assert directives(snapshots, "UMask") == ["0027"]


def test_dry_run_renders_the_metrics_directory(tmp_path: Path, env_file: Path) -> None:
    """install-units --metrics-dir DIR renders each job's --metrics-textfile and access to DIR;
    a relative DIR is one line, exit 2."""
    result = run_admin(
        "install-units",
        "--dry-run",
        "--env-file",
        str(env_file),
        "--metrics-dir",
        "/var/lib/options-history/metrics",
        cwd=tmp_path,
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "StateDirectory=options-history/metrics\n" in result.stdout
    assert "--metrics-textfile /var/lib/options-history/metrics/ingest_daily.prom\n" in (
        result.stdout
    )
    bad = run_admin(
        "install-units",
        "--dry-run",
        "--env-file",
        str(env_file),
        "--metrics-dir",
        "m",
        cwd=tmp_path,
        home=tmp_path,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --metrics-dir ")
    assert bad.stderr.count("\n") == 1


def test_an_invalid_setting_in_the_env_file_is_refused_at_install(tmp_path: Path) -> None:
    """The env file's settings are checked when the units are rendered from them: one line
    naming the variable, exit 2, before anything is written."""
    env_file = tmp_path / "env"
    env_file.write_text("ARCHIVE_URL=archive\n", encoding="utf-8")
    result = run_admin(
        "install-units", "--dry-run", "--env-file", str(env_file), cwd=tmp_path, home=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ARCHIVE_URL='archive' is a relative path")
    assert result.stderr.count("\n") == 1


def test_missing_env_file_is_refused_in_one_line(tmp_path: Path) -> None:
    """install-units without an env file exits 2 with one `error:` line."""
    result = run_admin("install-units", "--dry-run", cwd=tmp_path, home=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: env file ")
    assert result.stderr.count("\n") == 1


# the notification hook


def run_hook(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the OnFailure= hook with ``env`` added to a clean environment."""
    base = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_COMMAND", "JOURNAL_STREAM")}
    return subprocess.run(
        [str(NOTIFY_HOOK), *args],
        capture_output=True,
        text=True,
        check=False,
        env={**base, **env},
        timeout=60,
    )


def test_hook_hands_a_report_naming_the_unit_to_the_command(tmp_path: Path) -> None:
    """NOTIFY_COMMAND gets the report on stdin and the unit and subject as $1 and $2."""
    report, args = tmp_path / "report.txt", tmp_path / "args.txt"
    command = f'cat > {report}; printf "%s|%s|%s" "$1" "$2" "$FAILED_UNIT" > {args}'
    result = run_hook("--system", "ingest_snapshots.service", NOTIFY_COMMAND=command)
    assert result.returncode == 0, result.stderr
    text = report.read_text(encoding="utf-8")
    assert text.splitlines()[0] == args.read_text(encoding="utf-8").split("|")[1]
    assert "unit:   ingest_snapshots.service" in text
    assert "journalctl --system -u ingest_snapshots.service -n 50" in text
    unit, subject, exported = args.read_text(encoding="utf-8").split("|")
    assert unit == exported == "ingest_snapshots.service"
    assert subject.startswith("options-history: ingest_snapshots.service failed on ")


def test_hook_keeps_the_jobs_secrets_from_the_command(tmp_path: Path) -> None:
    """The notification command never sees the database URL or the API key."""
    seen = tmp_path / "env.txt"
    result = run_hook(
        "ingest_options.service",
        NOTIFY_COMMAND=f"env > {seen}",
        DATABASE_URL="postgresql://u:pw-3f9a@db/x",
        POLYGON_API_KEY="key-7c1e",
        MASSIVE_API_KEY="key-7c1e",
    )
    assert result.returncode == 0, result.stderr
    seen_env = seen.read_text(encoding="utf-8")
    assert "pw-3f9a" not in seen_env
    assert "key-7c1e" not in seen_env


# What NOTIFY_COMMAND may see: what mail(1) or curl(1) needs, NOTIFY_*, and the report's names.
HOOK_KEPT = {
    "PATH",
    "HOME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "USER",
    "LOGNAME",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "all_proxy",
    "FAILED_UNIT",
    "NOTIFY_SUBJECT",
}
HOOK_SECRETS = {
    "DATABASE_URL": "postgresql://u:pw-3f9a@db/x",
    "POLYGON_API_KEY": "key-7c1e",
    "MASSIVE_API_KEY": "key-7c1e",
    "PGPASSWORD": "pgpw-51d0",
    "AWS_ACCESS_KEY_ID": "AKID-90aa",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-e41b",
    "AWS_SESSION_TOKEN": "aws-token-77c2",
    "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20otlp-tok-19f3",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-api-key=otlp-tok-2b8d",
    "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "x-api-key=otlp-tok-6c4e",
    "SOME_FUTURE_TOKEN": "future-tok-0d5a",
}


def test_hook_hands_the_command_only_a_kept_list_of_variables(tmp_path: Path) -> None:
    """NOTIFY_COMMAND runs with a clean environment: PATH, HOME, locale, TZ, user, proxies,
    NOTIFY_* and the report's names are kept; every other variable (the job's keys, the S3
    keys, OTLP headers, a secret nobody has listed yet) never reaches it."""
    seen = tmp_path / "env.txt"
    result = run_hook(
        "ingest_snapshots.service",
        NOTIFY_COMMAND=f"env > {seen}",
        NOTIFY_WEBHOOK_URL="https://hooks.example.com/x",
        LANG="C.UTF-8",
        LC_TIME="en_GB.UTF-8",
        TZ="America/New_York",
        https_proxy="http://proxy.example.com:3128",
        NO_PROXY="localhost",
        **HOOK_SECRETS,
    )
    assert result.returncode == 0, result.stderr
    text = seen.read_text(encoding="utf-8")
    for name, value in HOOK_SECRETS.items():
        assert value not in text, name
    names = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line}
    # sh itself adds PWD (and may add SHLVL, OLDPWD, _)
    extra = names - HOOK_KEPT - {"PWD", "SHLVL", "OLDPWD", "_"}
    assert {n for n in extra if not n.startswith(("LC_", "NOTIFY_"))} == set()
    assert {"PATH", "LANG", "LC_TIME", "TZ", "https_proxy", "NO_PROXY"} <= names
    assert {"NOTIFY_WEBHOOK_URL", "FAILED_UNIT", "NOTIFY_SUBJECT"} <= names
    assert "FAILED_UNIT=ingest_snapshots.service" in text.splitlines()


def test_hook_without_a_command_logs_and_succeeds() -> None:
    """With no NOTIFY_COMMAND configured the hook says so and exits 0."""
    result = run_hook("ingest_options.service")
    assert result.returncode == 0
    assert "NOTIFY_COMMAND is not set" in result.stderr


def test_hook_reports_a_failed_delivery() -> None:
    """A command that fails makes the hook fail, so the notify unit shows up as failed."""
    result = run_hook("ingest_options.service", NOTIFY_COMMAND="cat > /dev/null; exit 7")
    assert result.returncode == 7
    assert "not delivered" in result.stderr


# uninstall-units --dry-run, conflicting flags, -h and --version


def test_uninstall_plan_says_what_would_happen_and_does_nothing(
    fake_systemctl: tuple[Path, Path], tmp_path: Path
) -> None:
    """plan_uninstall names the timers to stop, the files to remove and the reload, in the
    order uninstall_units runs them, and touches nothing."""
    systemctl, log = fake_systemctl
    unit_dir = tmp_path / "units"
    written = write_units(render_units(OPT, scope=Scope.USER), unit_dir)
    plan = plan_uninstall(scope=Scope.USER, unit_dir=unit_dir, systemctl=[str(systemctl)])
    assert plan.timers == TIMERS
    assert list(plan.files) == written
    assert format_uninstall_plan(plan).splitlines() == [
        f"would stop and disable {', '.join(TIMERS)}: "
        f"`{systemctl} --user disable --now {' '.join(TIMERS)}`",
        *(f"would remove {path}" for path in written),
        f"would reload systemd: `{systemctl} --user daemon-reload`",
    ]
    assert sorted(unit_dir.iterdir()) == sorted(written)
    assert not log.exists()
    empty = plan_uninstall(scope=Scope.USER, unit_dir=tmp_path / "none")
    assert format_uninstall_plan(empty) == (
        f"nothing installed in {tmp_path / 'none'}: nothing would be done"
    )


def test_uninstall_dry_run_prints_and_changes_nothing(
    fake_systemctl: tuple[Path, Path], tmp_path: Path
) -> None:
    """`uninstall-units --user --dry-run` prints what would be stopped and removed; the files
    stay and systemctl is never called."""
    systemctl, log = fake_systemctl
    home = tmp_path / "home"
    unit_dir = home / ".config/systemd/user"
    written = write_units(render_units(OPT, scope=Scope.USER), unit_dir)
    result = subprocess.run(
        [str(BIN / "ingest_admin"), "uninstall-units", "--user", "--dry-run"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "HOME": str(home), "PATH": f"{systemctl.parent}:{os.environ['PATH']}"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("would stop and disable ingest_options.timer, ")
    assert [line for line in lines if line.startswith("would remove ")] == [
        f"would remove {path}" for path in written
    ]
    assert lines[-1] == "would reload systemd: `systemctl --user daemon-reload`"
    assert sorted(unit_dir.iterdir()) == sorted(written)
    assert not log.exists()


@pytest.mark.parametrize("command", ["install-units", "uninstall-units"])
def test_system_and_user_together_are_refused(command: str, tmp_path: Path) -> None:
    """--system with --user is one line and exit 2, whatever their order (click's flag_value
    would let the last one win)."""
    for flags in (("--system", "--user"), ("--user", "--system")):
        result = run_admin(command, *flags, "--dry-run", cwd=tmp_path, home=tmp_path)
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr == (
            "error: --system and --user do not go together: give one (--system is the default)\n"
        )


ADMIN_COMMANDS = [
    (),
    ("migrate",),
    ("underlyings",),
    ("underlyings", "list"),
    ("underlyings", "add"),
    ("underlyings", "disable"),
    ("underlyings", "enable"),
    ("simulate",),
    ("demo",),
    ("install-units",),
    ("uninstall-units",),
]


@pytest.mark.parametrize("command", ADMIN_COMMANDS, ids=lambda c: " ".join(c) or "ingest_admin")
def test_every_admin_command_has_short_help_and_version(command: tuple[str, ...]) -> None:
    """-h is --help and --version prints the installed version, on ingest_admin and on each of
    its commands."""
    from click.testing import CliRunner

    from cli.ingest_admin import main

    runner = CliRunner()
    short = runner.invoke(main, [*command, "-h"], prog_name="ingest_admin")
    assert short.exit_code == 0, short.output
    assert (
        short.output == runner.invoke(main, [*command, "--help"], prog_name="ingest_admin").output
    )
    assert short.output.startswith(f"Usage: ingest_admin {' '.join(command)}".rstrip())
    version = runner.invoke(main, [*command, "--version"], prog_name="ingest_admin")
    assert version.exit_code == 0, version.output
    assert version.output == f"ingest_admin {importlib.metadata.version('options-history')}\n"
