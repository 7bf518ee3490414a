"""Who the system units run as, and what they may write: the jobs' account and directories.

The system units run as a static system user, :data:`SERVICE_USER` (or an existing user named
with ``--user-name``), with the group :data:`READ_GROUP` and ``UMask=0027``: what the jobs
write (a local archive, the metrics files) is readable by that group's members
(``options_read``, node_exporter) and by no one else. Not ``DynamicUser=``: its
``StateDirectory=`` lives under ``/var/lib/private`` (0700), which no other user can enter, and
its files belong to a UID that may be another unit's tomorrow. The user and group come from a
sysusers.d snippet (:func:`render_sysusers`), applied by ``systemd-sysusers``.

The sandbox stays ``ProtectSystem=strict``; the only writable directories are those the settings
name (:class:`Outputs`): a ``StateDirectory=`` under :data:`STATE_DIR` (systemd makes it and
gives it to the account), elsewhere a directory ``install-units`` makes when it is missing
(:func:`make_directory`) and checks when it exists (:func:`directory_warnings`). Never a
``StateDirectory=`` outside :data:`STATE_DIR`: systemd would ``chown`` another package's tree.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from options.config import Settings
from options.errors import ConfigError, OptionsError

SERVICE_USER = "options-history"
"""The system user the system units run as, unless ``--user-name``."""
READ_GROUP = "options-history"
"""The group the system units run with: what the jobs write is readable by its members."""
STATE_DIR = Path("/var/lib/options-history")
"""The jobs' own state tree: a directory under it is a ``StateDirectory=`` (systemd makes it
and gives it to the jobs' user); ``/var/lib/options-history/archive`` is the documented local
archive."""
DIRECTORY_MODE = 0o750
SYSTEM_UMASK = "0027"
USER_UMASK = "0077"
SYSUSERS_FILE = Path("/etc/sysusers.d/options-history.conf")

_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


@dataclass(frozen=True, kw_only=True)
class Outputs:
    """The directories the jobs write: what the system units' sandbox must let them write.

    Attributes:
        archive_dir: a local ``ARCHIVE_URL`` (``None`` for none, or an ``s3://`` one).
        metrics_dir: ``install-units --metrics-dir``: each job writes ``<job>.prom`` there.
    """

    archive_dir: Path | None = None
    metrics_dir: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, metrics_dir: Path | None = None) -> Outputs:
        """The directories ``settings`` (the env file's) and ``--metrics-dir`` make the jobs
        write."""
        url = settings.archive_url
        archive = None if url is None or url.startswith("s3://") else Path(url)
        return cls(archive_dir=archive, metrics_dir=metrics_dir)

    def directories(self) -> tuple[Path, ...]:
        """Every directory written, once each, archive first."""
        found = (p for p in (self.archive_dir, self.metrics_dir) if p is not None)
        return tuple(dict.fromkeys(Path(os.path.normpath(p)) for p in found))

    def state_directories(self) -> tuple[Path, ...]:
        """Those under :data:`STATE_DIR`: ``StateDirectory=`` lines, made by systemd."""
        return tuple(p for p in self.directories() if p.is_relative_to(STATE_DIR))

    def made_by_install(self) -> tuple[Path, ...]:
        """The others: ``ReadWritePaths=``/``BindPaths=``, which must exist before a job starts
        (``install-units`` makes a missing one)."""
        return tuple(p for p in self.directories() if not p.is_relative_to(STATE_DIR))


@dataclass(frozen=True, kw_only=True)
class ServiceAccount:
    """Who the system units run as.

    Attributes:
        user: ``User=``.
        group: ``Group=``, the group that reads what the jobs write.
        create_user: the user is the project's own, made by the sysusers.d snippet (not an
            existing ``--user-name`` user, of whom only the group is made).
    """

    user: str = SERVICE_USER
    group: str = READ_GROUP
    create_user: bool = False


def service_account(user_name: str | None) -> ServiceAccount:
    """The account of the system units: the project's own user, or ``--user-name``'s.

    Raises:
        ConfigError: ``user_name`` is not a valid system user name.
    """
    if user_name is None:
        return ServiceAccount(user=SERVICE_USER, create_user=True)
    if not _USER_NAME.fullmatch(user_name):
        raise ConfigError(f"user name {user_name!r} is invalid: expected a system user name")
    return ServiceAccount(user=user_name)


def render_sysusers(account: ServiceAccount) -> str:
    """The sysusers.d snippet that makes ``account``'s group (and its user, when it is the
    project's own): a system user without a login shell or a home."""
    lines = [
        "# Written by `ingest_admin install-units`: the group that reads what the options-history",
        "# jobs write (the archive, the metrics files); add a reader with",
        f"# `usermod -aG {account.group} NAME`. Applied by systemd-sysusers.",
        f"g {account.group} -",
    ]
    if account.create_user:
        lines.append(f'u {account.user} -:{account.group} "options-history jobs"')
    return "\n".join(lines) + "\n"


def directory_warnings(directories: Sequence[Path], account: ServiceAccount) -> list[str]:
    """Say which existing ``directories`` ``account`` cannot write, by their mode bits (ACLs
    are not read): a job would fail there, and an archive failure is only logged."""
    warnings = []
    for directory in directories:
        try:
            info = directory.stat()
        except OSError:
            continue
        if _may_write(info, account):
            continue
        owner = f"{_user_name(info.st_uid)}:{_group_name(info.st_gid)}"
        warnings.append(
            f"{directory} (owner {owner}, mode {stat.S_IMODE(info.st_mode):04o}) is not "
            f"writable by {account.user}: `chown {account.user}:{account.group} {directory}` "
            f"and `chmod {DIRECTORY_MODE:04o} {directory}`, or use a directory under {STATE_DIR}"
        )
    return warnings


def _may_write(info: os.stat_result, account: ServiceAccount) -> bool:
    try:
        user = pwd.getpwnam(account.user)
    except KeyError:
        return False
    if user.pw_uid == 0:
        return True
    if info.st_uid == user.pw_uid:
        return bool(info.st_mode & stat.S_IWUSR)
    groups = {g.gr_gid for g in grp.getgrall() if account.user in g.gr_mem}
    groups.add(user.pw_gid)
    try:
        groups.add(grp.getgrnam(account.group).gr_gid)
    except KeyError:
        pass
    if info.st_gid in groups:
        return bool(info.st_mode & stat.S_IWGRP)
    return bool(info.st_mode & stat.S_IWOTH)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def make_directory(directory: Path, account: ServiceAccount | None) -> None:
    """Make a missing directory the jobs write: ``account``'s (when given), mode 0750; its
    parents as the umask makes them. An existing one is the operator's and stays as it is.

    Raises:
        OptionsError: the directory cannot be made, or the account does not exist.
    """
    if directory.exists():
        return
    try:
        directory.mkdir(parents=True)
        directory.chmod(DIRECTORY_MODE)
        if account is not None:
            shutil.chown(directory, user=account.user, group=account.group)
    except (OSError, LookupError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) else exc
        raise OptionsError(f"cannot make the directory {directory}: {detail or exc}") from None
