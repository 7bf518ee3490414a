"""The project's exception tree and exit codes.

Every error the jobs raise on purpose derives from :class:`OptionsError`; the CLI turns it into
one line on stderr and the exit code it carries::

    OptionsError                      exit 1
    ├── ConfigError                   exit 2  bad setting, ticker, option or .env file
    ├── ApiError                      exit 1  the Polygon API said no, or said nonsense
    │   ├── TransientApiError                 retried: timeouts, dropped connections, 429, 5xx,
    │   │   ├── RateLimitedError              429, with the server's Retry-After if it sent one
    │   │   └── PayloadError                  a body that is not valid JSON (truncated page)
    │   └── PermanentApiError                 not retried: 4xx other than 429, redirects
    │       ├── AuthError                     403: the plan does not include this data
    │       │   └── KeyRejectedError          401: unknown key; ends the whole run at once
    │       ├── PageShapeError                a 200 page without a ``results`` list
    │       └── PaginationError               a ``next_url`` that loops or never ends
    ├── DatabaseError                 exit 1  PostgreSQL refused or went away
    │   └── LeaseLostError                    another copy found this run dead and closed it
    ├── DeactivationRefused           (one underlying fails) a listing would deactivate too much
    ├── NotStoredError                exit 1  a read found nothing stored (no complete chain at
    │                                         or before the time asked, no such contract, ...)
    ├── ArchiveError                  exit 1  the Parquet archive cannot be read or written, or
    │                                         a day written to it failed its verification
    ├── CompactionError               exit 1  a day rewritten into the compact tier did not
    │                                         read back as stored (it stays as it was)
    ├── DayRefusedError               exit 1  a write into a day that left PostgreSQL (archived,
    │                                         or deleted by retention): refused, nothing stored
    ├── AlreadyRunningError           exit 4  a live copy of the job holds the run lease
    └── RunInterrupted                exit 5  a signal or the deadline stopped the run

A run that stores some underlyings and fails others is not an exception: it ends ``partial`` and
exits with :attr:`ExitCode.PARTIAL`.
"""

from __future__ import annotations

import datetime as dt
import enum


class ExitCode(enum.IntEnum):
    """Process exit codes, the same for every job (documented in the README)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    PARTIAL = 3
    ALREADY_RUNNING = 4
    INTERRUPTED = 5


class OptionsError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILED


class ConfigError(OptionsError):
    """A setting, ticker, command-line option or ``.env`` line is invalid.

    The message names what was wrong and the accepted form.
    """

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, *, variable: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable


class ApiError(OptionsError):
    """The Polygon API answered with an error or with something unusable.

    Attributes:
        endpoint: the request path (never the query string, which could carry a cursor).
        status: the HTTP status, or ``None`` when no response arrived.
        request_id: the API's ``request_id``, when the body had one.
        underlying: the underlying being fetched, when the caller knows it.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        underlying: str | None = None,
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status
        self.request_id = request_id
        self.underlying = underlying


class TransientApiError(ApiError):
    """An error worth retrying: timeout, dropped connection, HTTP 429 or 5xx."""


class RateLimitedError(TransientApiError):
    """HTTP 429. ``retry_after`` holds the server's Retry-After in seconds, if given."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        endpoint: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        underlying: str | None = None,
    ) -> None:
        super().__init__(
            message, endpoint=endpoint, status=status, request_id=request_id, underlying=underlying
        )
        self.retry_after = retry_after


class PayloadError(TransientApiError):
    """A response body that is not valid JSON, as a truncated page is."""


class PermanentApiError(ApiError):
    """An error that retrying will not fix: a 4xx other than 429, a redirect, or a 200 whose
    content cannot be trusted."""


class AuthError(PermanentApiError):
    """HTTP 401 (unknown key) or 403 (the plan does not include this data, which can differ
    between underlyings: index options need an indices plan)."""


class KeyRejectedError(AuthError):
    """HTTP 401: the API does not know the key. Every other request would fail the same way,
    so the run stops at once instead of failing underlying after underlying."""


class PageShapeError(PermanentApiError):
    """A page that parsed but has no ``results`` list: never taken for an empty page."""


class PaginationError(PermanentApiError):
    """Pagination that cannot be trusted: a repeated cursor or more pages than the cap."""


class DatabaseError(OptionsError):
    """PostgreSQL refused a statement or the connection was lost."""


class LeaseLostError(DatabaseError):
    """Another copy of the job found this run silent for longer than its lease and closed it;
    this copy may commit nothing more."""


class DeactivationRefused(OptionsError):
    """A complete listing would mark inactive more of an underlying's unexpired contracts than
    the guard allows (``MAX_DEACTIVATION_PERCENT``), or all of them: that underlying fails and
    nothing of it changes."""

    def __init__(self, message: str, *, underlying: str) -> None:
        super().__init__(message)
        self.underlying = underlying


class NotStoredError(OptionsError):
    """A read found nothing stored for what was asked: no complete chain of the underlying at
    or before the time, no snapshot of the contract in the range, no chain on the day."""


class ArchiveError(OptionsError):
    """The Parquet archive (a directory or an S3-compatible bucket) cannot be read or written,
    lacks a day that ``archived_days`` lists, or a day written to it failed its verification
    (its partition then stays in PostgreSQL, and a later run tries the day again).

    Attributes:
        url: the archive's location (never with credentials).
        day: the day being archived or read, when there was one.
    """

    def __init__(self, message: str, *, url: str | None = None, day: dt.date | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.day = day


class CompactionError(OptionsError):
    """A day rewritten into ``snapshot_rows`` did not read back as its ``option_snapshots``
    rows; the rewrite was rolled back and the day stays in ``option_snapshots``."""


class DayRefusedError(OptionsError):
    """A write into a day that is no longer in PostgreSQL (archived, or deleted by retention),
    or that is being archived, was refused; nothing was stored
    (:mod:`options.store.lifecycle`).

    Attributes:
        day: the UTC day refused.
        final: the day has left PostgreSQL for good (``False``: it is being archived, and a
            later write may find it compact again).
    """

    def __init__(self, message: str, *, day: dt.date, final: bool = True) -> None:
        super().__init__(message)
        self.day = day
        self.final = final


class AlreadyRunningError(OptionsError):
    """A live copy of the same job holds its run lease."""

    exit_code = ExitCode.ALREADY_RUNNING


class RunInterrupted(OptionsError):
    """The run was stopped by a signal or by its deadline."""

    exit_code = ExitCode.INTERRUPTED
