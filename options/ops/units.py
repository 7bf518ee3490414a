"""systemd units for the jobs: render the templates in ``scripts/``, install them, uninstall them.

The templates use two kinds of markers:

- ``@NAME@`` placeholders, replaced by absolute paths of the current installation and by the
  schedule (a line holding only a placeholder whose value is empty is dropped);
- a leading ``@SYSTEM@`` on lines that only the system manager can apply (users, file-system
  namespaces, capabilities, credentials): kept in system units, dropped in user units.

System units run as the jobs' system user with the group that reads what they write, and may
write only the directories the settings name (:mod:`options.ops.service_access` says why):
``StateDirectory=`` under ``/var/lib/options-history``, ``ReadWritePaths=`` (or ``BindPaths=``
past ``ProtectHome=``/``PrivateTmp=``) elsewhere.

:func:`render_units` is pure (paths in, text out), so it is tested without systemd;
:func:`install_units` and :func:`uninstall_units` write the files and call ``systemctl`` and
``systemd-sysusers``, which tests replace with recording scripts; :func:`plan_uninstall` says
what uninstalling would do.
"""

from __future__ import annotations

import enum
import os
import pwd
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from options.errors import ConfigError, OptionsError
from options.ops.service_access import (
    DIRECTORY_MODE,
    SYSTEM_UMASK,
    SYSUSERS_FILE,
    USER_UMASK,
    Outputs,
    ServiceAccount,
    make_directory,
    render_sysusers,
    service_account,
)

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "scripts"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
USER_UNIT_SUBDIR = Path(".config/systemd/user")
LINGER_DIR = Path("/var/lib/systemd/linger")
UNIT_FILES = (
    "ingest_options.service",
    "ingest_options.timer",
    "ingest_snapshots.service",
    "ingest_snapshots.timer",
    "ingest_daily.service",
    "ingest_daily.timer",
    "ingest-notify@.service",
)
TIMERS = ("ingest_options.timer", "ingest_snapshots.timer", "ingest_daily.timer")
JOB_SCRIPTS = ("ingest_options", "ingest_snapshots", "ingest_daily", "ingest_admin")
TIME_ZONE = "America/New_York"
SNAPSHOT_PERIODS = (5, 10, 15)
DEFAULT_SNAPSHOT_EVERY = 10
# ProtectHome= hides these; PrivateTmp= replaces these: what the job reads there must be bound in.
HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))
TMP_ROOTS = (Path("/tmp"), Path("/var/tmp"))
# The job services, whose ExecStart= may take --metrics-textfile DIR/<job>.prom.
_JOB_SERVICES = ("ingest_options.service", "ingest_snapshots.service", "ingest_daily.service")

_PLACEHOLDER = re.compile(r"@([A-Z][A-Z_]*)@")
_SYSTEM_ONLY = "@SYSTEM@"
# Characters a unit file would need escaped or would expand (specifiers, variables, quoting).
_UNSAFE_PATH = re.compile(r"[\s%$\"'\\;]")


class Scope(enum.Enum):
    """Which service manager runs the units."""

    SYSTEM = "system"
    USER = "user"


@dataclass(frozen=True, kw_only=True)
class Installation:
    """The absolute paths a rendered unit refers to.

    Attributes:
        exec_dir: the virtualenv's ``bin`` directory holding the job scripts.
        env_file: the settings file (``EnvironmentFile=``, ``--env-file``).
        working_dir: the jobs' working directory.
        read_paths: what the job must be able to read besides ``exec_dir``: the virtualenv,
            the interpreter's installation, the code (for an editable install).
        scripts_dir: where the ``notify-failure`` hook is.
    """

    exec_dir: Path
    env_file: Path
    working_dir: Path
    read_paths: tuple[Path, ...] = ()
    scripts_dir: Path = TEMPLATE_DIR

    @classmethod
    def detect(
        cls, *, env_file: Path | None = None, working_dir: Path | None = None
    ) -> Installation:
        """Describe the installation running this code: its virtualenv, interpreter and code.

        Args:
            env_file: the settings file; ``./.env`` when ``None``. It must exist.
            working_dir: the jobs' working directory; the current one when ``None``.

        Raises:
            ConfigError: the env file does not exist, or this interpreter is not the one the
                job scripts are installed with.
        """
        cwd = Path.cwd()
        working = _absolute(working_dir or cwd, cwd)
        env = _absolute(env_file or Path(".env"), cwd)
        if not env.is_file():
            raise ConfigError(
                f"env file {env} does not exist: "
                "create it from .env.example, or pass --env-file PATH"
            )
        exec_dir = _absolute(Path(sys.executable).parent, cwd)
        missing = [name for name in JOB_SCRIPTS if not (exec_dir / name).is_file()]
        if missing:
            raise ConfigError(
                f"{exec_dir} has no {', '.join(missing)}: run install-units with the "
                "ingest_admin of the virtualenv the jobs are installed in"
            )
        code_dir = Path(__file__).resolve().parents[2]
        read_paths = (Path(sys.prefix), Path(sys.base_prefix), code_dir)
        return cls(
            exec_dir=exec_dir,
            env_file=env,
            working_dir=working,
            read_paths=tuple(dict.fromkeys(_absolute(p, cwd) for p in read_paths)),
        )

    def hidden_paths(self) -> tuple[Path, ...]:
        """Return the paths the job needs that ProtectHome= or PrivateTmp= would hide.

        Both the path as written and its real path count (a venv's ``python`` is a symlink,
        often into a home directory, as pyenv's are). Nested paths are left out.
        """
        wanted: list[Path] = []
        for path in (self.exec_dir, self.working_dir, *self.read_paths):
            for candidate in (path, path.resolve()):
                if _under(candidate, HOME_ROOTS + TMP_ROOTS) and candidate not in wanted:
                    wanted.append(candidate)
        return tuple(
            sorted(p for p in wanted if not any(o != p and p.is_relative_to(o) for o in wanted))
        )


def render_units(
    installation: Installation,
    *,
    scope: Scope = Scope.SYSTEM,
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
    user_name: str | None = None,
    outputs: Outputs | None = None,
    template_dir: Path = TEMPLATE_DIR,
) -> dict[str, str]:
    """Render every unit file for ``installation``.

    Args:
        installation: the paths the units refer to.
        scope: system units (hardened, run as the jobs' system user) or user units.
        snapshot_every: the snapshot cadence in minutes, one of :data:`SNAPSHOT_PERIODS`.
        user_name: run the system units as this existing user instead of ``options-history``.
        outputs: the directories the jobs write (a local archive, the metrics directory);
            ``None``: none.
        template_dir: where the templates are.

    Returns:
        File name to file content, in :data:`UNIT_FILES` order.

    Raises:
        ConfigError: an invalid cadence or user name, a path a unit file cannot hold, or a
            missing template.
    """
    if snapshot_every not in SNAPSHOT_PERIODS:
        raise ConfigError(
            f"snapshot cadence {snapshot_every} is invalid: expected one of "
            f"{', '.join(map(str, SNAPSHOT_PERIODS))} minutes"
        )
    if user_name is not None and scope is Scope.USER:
        raise ConfigError("--user-name applies to system units only: user units run as you")
    account = service_account(user_name)
    outputs = outputs or Outputs()
    paths = [installation.exec_dir, installation.env_file, installation.working_dir]
    paths += [installation.scripts_dir, *installation.read_paths]
    for path in paths:
        if not path.is_absolute() or _UNSAFE_PATH.search(str(path)):
            raise ConfigError(
                f"path {str(path)!r} cannot go into a unit file: expected an absolute path "
                "without spaces, quotes, %, $, ; or backslashes"
            )
    _check_output_paths(outputs)

    system = scope is Scope.SYSTEM
    values = {
        "EXEC_DIR": str(installation.exec_dir),
        "ENV_FILE": str(installation.env_file),
        # System units read the service's private copy (LoadCredential=): the file may be
        # unreadable by the service user.
        "JOB_ENV_FILE": "${CREDENTIALS_DIRECTORY}/env" if system else str(installation.env_file),
        "WORKING_DIR": str(installation.working_dir),
        "SCRIPTS_DIR": str(installation.scripts_dir),
        "NOTIFY_SCOPE": f"--{scope.value}",
        "USER_DIRECTIVES": _user_directives(account) if system else "",
        "PATH_DIRECTIVES": _path_directives(installation, outputs) if system else "",
        "WRITE_DIRECTIVES": _write_directives(outputs) if system else "",
        "UMASK": SYSTEM_UMASK if system else USER_UMASK,
        "METRICS_OPTION": "",
        "NOTIFY_PATH_DIRECTIVES": _notify_path_directives(installation) if system else "",
        "SNAPSHOT_EVERY": str(snapshot_every),
        "SNAPSHOT_DEADLINE": f"{snapshot_every - 1}m",
        "SNAPSHOT_TIMEOUT": f"{snapshot_every - 1}min 30s",
        "ON_CALENDAR": "\n".join(
            f"OnCalendar={spec}" for spec in snapshot_calendar(snapshot_every)
        ),
    }
    rendered: dict[str, str] = {}
    for name in UNIT_FILES:
        try:
            template = (template_dir / name).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"unit template {template_dir / name} cannot be read ({type(exc).__name__}): "
                "install-units needs the project's scripts/ directory (install from a checkout)"
            ) from None
        own = dict(values)
        if name in _JOB_SERVICES and outputs.metrics_dir is not None:
            textfile = outputs.metrics_dir / f"{name.removesuffix('.service')}.prom"
            own["METRICS_OPTION"] = f" --metrics-textfile {textfile}"
        rendered[name] = _render(name, template, own, system=system)
    return rendered


def snapshot_calendar(every: int) -> tuple[str, ...]:
    """Return the ``OnCalendar=`` specs of the slots 09:30..16:00 New York time, Mon..Fri.

    ``HH:MM/N`` repeats the minutes within hour HH only, hence three specs: the half hour after
    09:30, the full hours 10..15, and 16:00 itself.
    """
    return (
        f"Mon..Fri *-*-* 09:30/{every}:00 {TIME_ZONE}",
        f"Mon..Fri *-*-* 10..15:00/{every}:00 {TIME_ZONE}",
        f"Mon..Fri *-*-* 16:00:00 {TIME_ZONE}",
    )


def default_unit_dir(scope: Scope) -> Path:
    """Return where systemd reads administrator units of ``scope`` from."""
    return SYSTEM_UNIT_DIR if scope is Scope.SYSTEM else Path.home() / USER_UNIT_SUBDIR


def format_units(
    units: Mapping[str, str],
    unit_dir: Path,
    *,
    sysusers: str | None = None,
    sysusers_file: Path = SYSUSERS_FILE,
) -> str:
    """Return the rendered files as one text, each after a ``==> PATH <==`` header line: the
    sysusers.d snippet first (system units), then the units."""
    files = [(sysusers_file, sysusers)] if sysusers is not None else []
    files += [(unit_dir / name, text) for name, text in units.items()]
    return "\n".join(f"==> {path} <==\n{text}" for path, text in files)


def install_units(
    units: Mapping[str, str],
    *,
    scope: Scope,
    unit_dir: Path,
    account: ServiceAccount | None = None,
    directories: Sequence[Path] = (),
    sysusers_file: Path = SYSUSERS_FILE,
    sysusers_command: Sequence[str] = ("systemd-sysusers",),
    systemctl: Sequence[str] = ("systemctl",),
    euid: int | None = None,
) -> list[Path]:
    """Make the jobs' account and directories, write the units, reload systemd and enable and
    start the timers.

    Args:
        units: file name to content, as :func:`render_units` returns.
        scope: which manager to reload (``systemctl --user`` for user units).
        unit_dir: where to write the files.
        account: the system units' account: its sysusers.d snippet is written to
            ``sysusers_file`` and applied first (``None``: user units, no account).
        directories: :meth:`Outputs.made_by_install`; a missing one is made (``account``'s
            user and group, mode 0750), an existing one left as it is.
        sysusers_file: where the snippet goes.
        sysusers_command: the command to run instead of ``systemd-sysusers`` (tests).
        systemctl: the command to run instead of ``systemctl`` (tests).
        euid: the effective user id to check against root; the process's when ``None``.

    Returns:
        The files written (the snippet first).

    Raises:
        ConfigError: system units requested without root.
        OptionsError: a file or directory cannot be written, or a command failed.
    """
    _require_root(scope, euid, "install")
    written: list[Path] = []
    if account is not None:
        _write_file(sysusers_file, render_sysusers(account), what="the sysusers.d snippet")
        written.append(sysusers_file)
        _run([*sysusers_command, str(sysusers_file)])
    for directory in directories:
        make_directory(directory, account)
    for name, text in units.items():
        written.append(_write_file(unit_dir / name, text, what="units"))
    command = _systemctl_command(systemctl, scope)
    _run([*command, "daemon-reload"])
    _run([*command, "enable", "--now", *TIMERS])
    return written


@dataclass(frozen=True)
class UninstallPlan:
    """What :func:`uninstall_units` does, in order: stop and disable ``timers``, remove
    ``files``, reload the manager (``commands`` holds both ``systemctl`` calls).

    ``kept`` names what stays on purpose: the user and group that own the jobs' data.
    """

    unit_dir: Path
    timers: tuple[str, ...]
    files: tuple[Path, ...]
    commands: tuple[tuple[str, ...], ...]
    kept: str | None = None


def plan_uninstall(
    *,
    scope: Scope,
    unit_dir: Path,
    sysusers_file: Path = SYSUSERS_FILE,
    systemctl: Sequence[str] = ("systemctl",),
) -> UninstallPlan:
    """Look at what is installed in ``unit_dir`` (and the sysusers.d snippet, for system
    units) and say what uninstalling would do; change nothing (``uninstall-units --dry-run``).
    Nothing installed: an empty plan."""
    command = _systemctl_command(systemctl, scope)
    files = [unit_dir / name for name in UNIT_FILES if (unit_dir / name).exists()]
    snippet = scope is Scope.SYSTEM and sysusers_file.exists()
    if snippet:
        files.append(sysusers_file)
    if not files:
        return UninstallPlan(unit_dir=unit_dir, timers=(), files=(), commands=())
    timers = tuple(t for t in TIMERS if (unit_dir / t).exists())
    commands = [(*command, "disable", "--now", *timers)] if timers else []
    commands.append((*command, "daemon-reload"))
    # A removed user's UID is handed to the next user created, who would then own the archive.
    kept = (
        "kept: the user and group of the jobs (they own the archive and the metrics files; "
        "`userdel` them once those are gone) and every data directory"
        if snippet
        else None
    )
    return UninstallPlan(
        unit_dir=unit_dir, timers=timers, files=tuple(files), commands=tuple(commands), kept=kept
    )


def format_uninstall_plan(plan: UninstallPlan) -> str:
    """The plan as the lines ``uninstall-units --dry-run`` prints."""
    if not plan.files:
        return f"nothing installed in {plan.unit_dir}: nothing would be done"
    lines = []
    if plan.timers:
        lines.append(
            f"would stop and disable {', '.join(plan.timers)}: `{' '.join(plan.commands[0])}`"
        )
    lines += [f"would remove {path}" for path in plan.files]
    lines.append(f"would reload systemd: `{' '.join(plan.commands[-1])}`")
    if plan.kept:
        lines.append(plan.kept)
    return "\n".join(lines)


def uninstall_units(
    *,
    scope: Scope,
    unit_dir: Path,
    sysusers_file: Path = SYSUSERS_FILE,
    systemctl: Sequence[str] = ("systemctl",),
    euid: int | None = None,
) -> list[Path]:
    """Disable and stop the timers, remove the unit files and the sysusers.d snippet, reload
    systemd.

    Drop-ins made with ``systemctl edit`` (``*.d/`` directories) are the operator's and stay.
    So do the jobs' user and group, and every directory they wrote (the archive is data).

    Returns:
        The files removed (empty when nothing was installed).

    Raises:
        ConfigError: system units requested without root.
        OptionsError: ``systemctl`` failed or a file cannot be removed.
    """
    _require_root(scope, euid, "uninstall")
    plan = plan_uninstall(
        scope=scope, unit_dir=unit_dir, sysusers_file=sysusers_file, systemctl=systemctl
    )
    if not plan.files:
        return []
    if plan.timers:
        _run(list(plan.commands[0]))
    try:
        for path in plan.files:
            path.unlink()
    except OSError as exc:
        raise OptionsError(f"cannot remove units from {unit_dir}: {exc.strerror or exc}") from None
    _run(list(plan.commands[-1]))
    return list(plan.files)


def user_without_linger() -> str | None:
    """Return the current user's name if their timers stop at logout (linger off), else None."""
    name = pwd.getpwuid(os.getuid()).pw_name
    return None if (LINGER_DIR / name).exists() else name


def _render(name: str, template: str, values: Mapping[str, str], *, system: bool) -> str:
    lines: list[str] = []
    for line in template.splitlines():
        if line.startswith(_SYSTEM_ONLY):
            if not system:
                continue
            line = line[len(_SYSTEM_ONLY) :]
        unknown = {m for m in _PLACEHOLDER.findall(line) if m not in values}
        if unknown:
            raise ConfigError(f"unit template {name} uses unknown placeholders: {sorted(unknown)}")
        whole = _PLACEHOLDER.fullmatch(line)
        if whole and not values[whole.group(1)]:
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], line))
    return "\n".join(lines) + "\n"


def _user_directives(account: ServiceAccount) -> str:
    return f"User={account.user}\nGroup={account.group}"


def _check_output_paths(outputs: Outputs) -> None:
    named = (("ARCHIVE_URL", outputs.archive_dir), ("--metrics-dir", outputs.metrics_dir))
    for name, path in named:
        if path is not None and (not path.is_absolute() or _UNSAFE_PATH.search(str(path))):
            raise ConfigError(
                f"{name} {str(path)!r} cannot go into a unit file: expected an absolute path "
                "without spaces, quotes, %, $, ; or backslashes"
            )


def _write_directives(outputs: Outputs) -> str:
    """Write access to exactly the directories the jobs write, nothing else."""
    lines = []
    state = outputs.state_directories()
    if state:
        # relative to /var/lib; systemd makes each (parents root-owned, 0755) for User=/Group=
        lines.append("StateDirectory=" + " ".join(str(p.relative_to("/var/lib")) for p in state))
        lines.append(f"StateDirectoryMode={DIRECTORY_MODE:04o}")
    for path in outputs.made_by_install():
        # past ProtectHome= or PrivateTmp=, a directory must be bound in to be seen at all
        key = "BindPaths" if _under(path, HOME_ROOTS + TMP_ROOTS) else "ReadWritePaths"
        lines.append(f"{key}={path}")
    return "\n".join(lines)


def _path_directives(installation: Installation, outputs: Outputs) -> str:
    hidden = installation.hidden_paths()
    written = outputs.made_by_install()
    under_home = any(_under(p, HOME_ROOTS) for p in (*hidden, *written))
    # tmpfs, not yes: a bind mount needs a path to land on, and an empty tmpfs /root or /home
    # (mode 0755) lets the service user reach the bound directories, which 0700 /root would not.
    lines = [f"ProtectHome={'tmpfs' if under_home else 'yes'}"]
    lines += [f"BindReadOnlyPaths={p}" for p in hidden]
    return "\n".join(lines)


def _write_file(path: Path, text: str, *, what: str) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole then renamed: systemd never reads a half-written file
        partial = path.with_name(f".{path.name}.tmp")
        partial.write_text(text, encoding="utf-8")
        partial.chmod(0o644)
        partial.replace(path)
    except OSError as exc:
        raise OptionsError(f"cannot write {what} to {path.parent}: {exc.strerror or exc}") from None
    return path


def _notify_path_directives(installation: Installation) -> str:
    """The hook's scripts directory, if its private /tmp would hide it (a clone under /tmp)."""
    scripts = installation.scripts_dir
    hidden = dict.fromkeys(p for p in (scripts, scripts.resolve()) if _under(p, TMP_ROOTS))
    return "\n".join(f"BindReadOnlyPaths={p}" for p in hidden)


def _systemctl_command(systemctl: Sequence[str], scope: Scope) -> list[str]:
    return [*systemctl, "--user"] if scope is Scope.USER else list(systemctl)


def _require_root(scope: Scope, euid: int | None, verb: str) -> None:
    if scope is Scope.SYSTEM and (os.geteuid() if euid is None else euid) != 0:
        raise ConfigError(
            f"{verb}ing system units needs root: run it with sudo, or use --user for user units"
        )


def _run(argv: list[str]) -> None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise OptionsError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()
        detail = output[-1] if output else "no output"
        raise OptionsError(f"`{' '.join(argv)}` exited {result.returncode}: {detail}")


def _absolute(path: Path, cwd: Path) -> Path:
    # normalized but not resolved: a symlinked venv keeps the path the operator chose
    return Path(os.path.normpath(cwd / path))


def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)
