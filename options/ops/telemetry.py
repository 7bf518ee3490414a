"""OpenTelemetry metrics: the instruments, and the functions the jobs and the client record with.

:func:`~options.ops.telemetry_setup.configure_telemetry` creates the :class:`Instruments` of a
configuration with metrics and installs them here; :meth:`Telemetry.shutdown
<options.ops.telemetry_setup.Telemetry.shutdown>` removes them. While none are installed every
recording function below returns at its first line. Metrics do not use the global meter provider
at all: the instruments are created per configuration and reached through the functions of this
module. Create new instruments here, not with ``metrics.get_meter`` elsewhere.

Metrics (unit; attributes):

- ``options.api.requests`` ({request}; ``endpoint``, ``status``): every HTTP attempt, retries
  included; ``endpoint`` is the path template (``/v3/snapshot/options/{underlying}``), ``status``
  the HTTP status as text, or ``error`` when no response arrived (timeout, dropped connection).
- ``options.api.retries`` ({retry}; ``endpoint``, ``reason``): ``reason`` is the status (``429``,
  ``503``), ``timeout``, ``connection`` or ``payload`` (a 2xx body that is not JSON).
- ``options.api.request.duration`` (s; ``endpoint``): one attempt, connect to last byte.
- ``options.rows.written`` ({row}; ``table``), ``options.rows.rejected`` ({row}; ``table``).
- ``options.db.batch.duration`` (s; ``table``): one write batch (:func:`time_batch`).
- ``options.db.pool.connections.in_use`` ({connection}; ``pool``): observed at each export
  from the pools given to :func:`observe_pool`.

Spans are not made here: see :mod:`options.ops.telemetry_traces`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

__all__ = [
    "Instruments",
    "PoolStats",
    "count_retry",
    "count_rows_rejected",
    "count_rows_written",
    "install_instruments",
    "observe_pool",
    "record_request",
    "time_batch",
    "uninstall_instruments",
]

# Seconds; the SDK's default buckets are made for milliseconds. Up to the HTTP timeout's default.
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class PoolStats(Protocol):
    """What :func:`observe_pool` reads of a pool (``asyncpg.Pool`` has it)."""

    def get_size(self) -> int: ...

    def get_idle_size(self) -> int: ...

    def is_closing(self) -> bool: ...


# -- the active configuration ---------------------------------------------------------------------


class Instruments:
    """The instruments of one configuration, created once from its meter provider.

    Their meter is named after this module, whatever module creates them.
    """

    def __init__(self, meter_provider: MeterProvider) -> None:
        meter = meter_provider.get_meter(__name__)
        self.requests = meter.create_counter(
            "options.api.requests",
            unit="{request}",
            description="HTTP attempts to the Polygon API, retries included",
        )
        self.retries = meter.create_counter(
            "options.api.retries",
            unit="{retry}",
            description="Polygon API attempts retried, by the reason of the failure",
        )
        self.request_duration = meter.create_histogram(
            "options.api.request.duration",
            unit="s",
            description="One Polygon API attempt, connect to last byte",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.rows_written = meter.create_counter(
            "options.rows.written", unit="{row}", description="Rows stored, by table"
        )
        self.rows_rejected = meter.create_counter(
            "options.rows.rejected", unit="{row}", description="Rows refused, by table"
        )
        self.batch_duration = meter.create_histogram(
            "options.db.batch.duration",
            unit="s",
            description="One database write batch",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._pools: list[tuple[str, PoolStats]] = []
        self._pool_names: set[str] = set()
        self._pools_lock = threading.Lock()
        meter.create_observable_gauge(
            "options.db.pool.connections.in_use",
            callbacks=[self._observe_pools],
            unit="{connection}",
            description="Database connections checked out of the pool",
        )

    def add_pool(self, pool: PoolStats, name: str) -> None:
        """Observe ``pool`` (once, however often it is added) under ``name``."""
        with self._pools_lock:
            if not any(known is pool for _, known in self._pools):
                self._pools.append((name, pool))

    def forget_pools(self) -> None:
        """Stop observing every pool."""
        with self._pools_lock:
            self._pools = []

    def _observe_pools(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        # Runs on the metric reader's thread: the pool's counters are only read.
        with self._pools_lock:
            self._pool_names.update(name for name, _ in self._pools)
            self._pools = [(name, pool) for name, pool in self._pools if not pool.is_closing()]
            pools = list(self._pools)
            # a closed pool has none in use: still reported, so a short run's gauge is seen
            in_use = dict.fromkeys(self._pool_names, 0)
        for name, pool in pools:
            in_use[name] += pool.get_size() - pool.get_idle_size()
        return [Observation(count, {"pool": name}) for name, count in in_use.items()]


# None while no configuration with metrics is active: every recording function returns at once.
_instruments: Instruments | None = None


def install_instruments(instruments: Instruments | None) -> None:
    """Record into ``instruments`` from now on (``None``: record nothing).

    Called by :mod:`options.ops.telemetry_setup`, under its lock.
    """
    global _instruments
    _instruments = instruments


def uninstall_instruments(instruments: Instruments) -> None:
    """Stop recording into ``instruments``, unless a later configuration replaced them already.

    Called by :mod:`options.ops.telemetry_setup`, under its lock.
    """
    global _instruments
    if _instruments is instruments:
        _instruments = None


# -- what the jobs and the client call ------------------------------------------------------------


def record_request(endpoint: str, status: int | None, seconds: float) -> None:
    """Count one HTTP attempt and record its duration.

    Args:
        endpoint: the path template, never a path with tickers or a query.
        status: the HTTP status, or ``None`` when no (whole) response arrived.
        seconds: the attempt's duration.
    """
    instruments = _instruments
    if instruments is None:
        return
    instruments.requests.add(
        1, {"endpoint": endpoint, "status": "error" if status is None else str(status)}
    )
    instruments.request_duration.record(seconds, {"endpoint": endpoint})


def count_retry(endpoint: str, reason: str) -> None:
    """Count one retried attempt; ``reason``: the status, ``timeout``, ``connection``, ..."""
    instruments = _instruments
    if instruments is None:
        return
    instruments.retries.add(1, {"endpoint": endpoint, "reason": reason})


def count_rows_written(table: str, n: int) -> None:
    """Count ``n`` rows stored in ``table``."""
    instruments = _instruments
    if instruments is None or n <= 0:
        return
    instruments.rows_written.add(n, {"table": table})


def count_rows_rejected(table: str, n: int) -> None:
    """Count ``n`` rows refused on their way to ``table``."""
    instruments = _instruments
    if instruments is None or n <= 0:
        return
    instruments.rows_rejected.add(n, {"table": table})


_NO_TIMER: Final[AbstractContextManager[None]] = nullcontext()


class _BatchTimer:
    __slots__ = ("_attributes", "_histogram", "_started")

    def __init__(self, histogram: Any, table: str) -> None:
        self._histogram = histogram
        self._attributes = {"table": table}
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._histogram.record(time.perf_counter() - self._started, self._attributes)


def time_batch(table: str) -> AbstractContextManager[None]:
    """Time one write batch into ``table``: ``with time_batch("option_snapshots"): ...``.

    A batch that fails is timed too. Without metrics this is a shared no-op context manager.
    """
    instruments = _instruments
    if instruments is None:
        return _NO_TIMER
    return _BatchTimer(instruments.batch_duration, table)


def observe_pool(pool: PoolStats, *, name: str = "main") -> None:
    """Report the connections ``pool`` has checked out, at each metric export.

    A pool is forgotten once it is closing, and at :meth:`Telemetry.shutdown
    <options.ops.telemetry_setup.Telemetry.shutdown>`. Without metrics this does nothing (the pool
    is not even remembered).
    """
    instruments = _instruments
    if instruments is not None:
        instruments.add_pool(pool, name)
