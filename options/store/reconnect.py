"""Waiting for a database that went away: which errors mean the connection was lost, and how
long a job retries on a new connection before it gives up (``DB_RECONNECT_SECONDS``).

The wait is the job's, not each operation's (:class:`Reconnect`): it counts from the first
lost connection that no successful attempt has followed, whichever of the job's tasks saw it,
so the work that follows an outage (the next chain, a clean-up, the final status) gets what is
left of the window, the backoff never sleeps past it, and a connect attempt waits no longer
than what is left. A job whose database stopped gives up ``DB_RECONNECT_SECONDS`` after it
went away, not a multiple of it.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from tenacity import AsyncRetrying, RetryCallState, wait_random_exponential

logger = logging.getLogger(__name__)

ACQUIRE_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
# How long a running job waits for a database that went away (restart, failover, a cut
# connection) before it fails: long enough for a restart, short enough to notice an outage.
RECONNECT_SECONDS = 60.0
# While the database is away, one attempt to connect again gets what is left of the window,
# and at least this (a connect answered by a refusal takes milliseconds).
MIN_ATTEMPT_SECONDS = 1.0
RECONNECT_BACKOFF = wait_random_exponential(multiplier=0.2, max=5.0)

DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)

# The server ended the session or cannot be reached: another connection may succeed.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.IdleSessionTimeoutError,
    asyncpg.IdleInTransactionSessionTimeoutError,
    asyncpg.InterfaceError,  # "connection is closed": the session died under the client
    # "cannot switch to state ...": the protocol was cut mid-operation by the server
    asyncpg.exceptions.InternalClientError,
    OSError,  # ConnectionRefusedError, ConnectionResetError, a cut network
)
# InterfaceErrors that are the client's own refusals, not a lost connection.
_NOT_LOST: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
)


def is_connection_lost(exc: BaseException) -> bool:
    """The error says the session is gone or the server unreachable, not that a statement
    was refused: the same work may succeed on a new connection."""
    return isinstance(exc, _CONNECTION_LOST) and not isinstance(exc, _NOT_LOST)


def describe_db_error(exc: BaseException) -> str:
    """Return a one-line description of a database error, without secrets.

    A lost connection says so first ("the database connection was lost: ..."), so the real
    cause leads the line rather than whichever statement happened to notice it.
    """
    text = str(exc).splitlines()[0] if str(exc) else ""
    sqlstate = getattr(exc, "sqlstate", None)
    prefix = f"{type(exc).__name__}" + (f" [{sqlstate}]" if sqlstate else "")
    described = f"{prefix}: {text}" if text else prefix
    if is_connection_lost(exc):
        return f"the database connection was lost ({described})"
    return described


@dataclass
class Reconnect:
    """How long a job waits for a database that went away, and since when it has been away.

    One per job (:func:`wait_for_database`), shared by every task the job starts: the window
    counts from the first lost connection that no successful attempt has followed, whichever
    task saw it. Work that starts while the database is away (the next chain, a clean-up, the
    final status) therefore gets what is left of the window, not a window of its own, and the
    job gives up ``seconds`` after the database went away, not a multiple of it.
    """

    seconds: float = RECONNECT_SECONDS
    lost_since: float | None = None
    """``time.monotonic()`` when the attempt that first failed began; ``None``: not away."""

    def lost(self, since: float) -> None:
        """An attempt begun at ``since`` lost its connection."""
        if self.lost_since is None:
            self.lost_since = since

    def recovered(self) -> None:
        """An attempt succeeded: the database is back."""
        self.lost_since = None

    def deadline(self, now: float) -> float:
        """When the job stops waiting (``now + seconds`` while nothing has been lost)."""
        return (self.lost_since if self.lost_since is not None else now) + self.seconds

    def attempt_timeout(self, longest: float) -> float:
        """How long one attempt may wait for a connection: ``longest``, or while the database
        is away what is left of the window (at least :data:`MIN_ATTEMPT_SECONDS`)."""
        if self.lost_since is None:
            return longest
        left = self.deadline(time.monotonic()) - time.monotonic()
        return min(longest, max(MIN_ATTEMPT_SECONDS, left))


_reconnect: contextvars.ContextVar[Reconnect | None] = contextvars.ContextVar(
    "reconnect", default=None
)


def wait_for_database(seconds: float) -> Reconnect:
    """Start the job's :class:`Reconnect` (``DB_RECONNECT_SECONDS``): set once by the job's
    entry, shared by :func:`reconnecting` in every task the job starts from then on."""
    policy = Reconnect(seconds)
    _reconnect.set(policy)
    return policy


def current_reconnect() -> Reconnect:
    """The job's :class:`Reconnect`; outside a job, a new one of :data:`RECONNECT_SECONDS`."""
    return _reconnect.get() or Reconnect()


def acquire_timeout() -> float:
    """The ``timeout`` of ``pool.acquire()`` in a block :func:`reconnecting` may repeat:
    :data:`ACQUIRE_TIMEOUT`, or while the database is away what is left of the job's window."""
    return current_reconnect().attempt_timeout(ACQUIRE_TIMEOUT)


def connect_timeout() -> float:
    """The ``timeout`` of a connection opened outside the pool, as :func:`acquire_timeout`."""
    return current_reconnect().attempt_timeout(CONNECT_TIMEOUT)


def reconnecting(
    *,
    what: str | Callable[[], str] = "a query",
    on: tuple[type[BaseException], ...] | None = None,
    grace: float = 0.0,
) -> AsyncRetrying:
    """A tenacity loop that retries its block while the connection keeps being lost; any
    other error, or the last loss, is raised as it is. ``on``: retry these errors instead of
    lost connections only.

    It gives up when the job's database has been away for ``DB_RECONNECT_SECONDS``
    (:class:`Reconnect`: counted from the first loss of any of the job's tasks that no success
    has followed) or this loop has retried for that long, whichever comes first, but not
    before ``grace`` seconds from its start (a last write worth a brief try even once the job
    has given up). The backoff never sleeps past that moment, and an attempt's wait for a
    connection ends with it (:func:`acquire_timeout`), so the loop ends within about a second
    of it.

    Only for blocks that are safe to run again: reads, and transactions that either
    committed as a whole or not at all and check what is already there.
    """
    policy = current_reconnect()
    started = time.monotonic()
    attempt_began = started

    def retryable(exc: BaseException) -> bool:
        return is_connection_lost(exc) if on is None else isinstance(exc, on)

    def limit() -> float:
        own = started + policy.seconds
        return max(min(own, policy.deadline(time.monotonic())), started + grace)

    def before(state: RetryCallState) -> None:
        nonlocal attempt_began
        attempt_began = time.monotonic()

    def retry(state: RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome else None
        if error is not None and retryable(error):
            policy.lost(attempt_began)
            return True
        if error is None or (
            isinstance(error, asyncpg.PostgresError) and not is_connection_lost(error)
        ):
            policy.recovered()  # the server answered
        return False

    def wait(state: RetryCallState) -> float:
        return min(RECONNECT_BACKOFF(state), max(0.0, limit() - time.monotonic()))

    def stop(state: RetryCallState) -> bool:
        return time.monotonic() >= limit()

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.warning(
            "%s: %s; retrying on a new connection (attempt %d)",
            what if isinstance(what, str) else what(),
            describe_db_error(error) if error else "failed",
            state.attempt_number + 1,
        )

    return AsyncRetrying(
        before=before,
        retry=retry,
        stop=stop,
        wait=wait,
        before_sleep=log_retry,
        reraise=True,
    )
