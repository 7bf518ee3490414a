"""The snapshot writer's connection: taken when needed, given back even when it was lost."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from options.jobs.snapshot_writer import _WriterConnection


def reset_fails_with(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """The pool's reset of a connection given back fails as when its backend dies during it."""

    async def reset(self: asyncpg.Connection, *args: Any, **kwargs: Any) -> None:
        self.terminate()
        raise error

    monkeypatch.setattr(asyncpg.connection.Connection, "reset", reset)


async def test_a_connection_lost_on_its_way_back_is_not_an_error(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the connection stored is committed: losing it during the pool's reset neither
    raises nor keeps it, and the next connection works."""
    writer = _WriterConnection(pool)
    pid = (await writer.get()).get_server_pid()
    reset_fails_with(
        monkeypatch,
        asyncpg.ConnectionDoesNotExistError("terminating connection due to administrator command"),
    )

    await writer.release()

    monkeypatch.undo()
    again = await writer.get()
    assert again.get_server_pid() != pid
    assert await again.fetchval("SELECT 1") == 1
    await writer.release()


async def test_other_errors_on_its_way_back_are_raised(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error that is not a lost connection is not hidden."""
    writer = _WriterConnection(pool)
    await writer.get()
    reset_fails_with(monkeypatch, asyncpg.exceptions.InsufficientPrivilegeError("denied"))

    with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
        await writer.release()
