"""OpenTelemetry traces and metrics, configured from the standard ``OTEL_*`` variables.

The CLI calls :func:`configure_telemetry` once, after logging, with the environment it read the
settings from, and :meth:`Telemetry.shutdown` before the process exits (it is also registered with
``atexit``, so a ``sys.exit`` anywhere still flushes). With nothing configured nothing is
installed: the API's no-op tracer stays, the SDK is not even imported, and every recording
function below returns at its first line.

Variables, read from the mapping passed in (never from ``os.environ`` here):

==========================================  ==================================================
``OTEL_SDK_DISABLED``                       ``true``: install nothing, whatever else is set
``OTEL_TRACES_EXPORTER``                    ``none``, ``console``, ``otlp`` or a list such as
``OTEL_METRICS_EXPORTER``                   ``console,otlp``; default ``otlp`` when an OTLP
                                            endpoint for the signal is set, else ``none``
``OTEL_EXPORTER_OTLP_ENDPOINT``             base URL of an OTLP/HTTP receiver (``/v1/traces``
                                            and ``/v1/metrics`` are appended)
``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_``    the full URL for one signal, used as it is
``ENDPOINT``
``OTEL_EXPORTER_OTLP[_{TRACES,METRICS}]_``  ``http/protobuf`` only (no gRPC exporter here)
``PROTOCOL``
``OTEL_EXPORTER_OTLP[_{TRACES,METRICS}]_``  ``name=value,...``; tokens, so never logged
``HEADERS``
``OTEL_SERVICE_NAME``                       ``service.name``; default: the job's name
``OTEL_RESOURCE_ATTRIBUTES``                ``key=value,...`` (a ``service.name`` here wins
                                            over the job's name, as in any OTel program)
``OTEL_METRIC_EXPORT_INTERVAL``             milliseconds between metric exports (60000)
==========================================  ==================================================

The SDK and its OTLP exporter read their other variables themselves from the process
environment, as in any OTel program (``OTEL_EXPORTER_OTLP_TIMEOUT``, ``..._COMPRESSION``,
``..._CERTIFICATE``, ``OTEL_BSP_*``, ``OTEL_TRACES_SAMPLER``). Console exporters write one
compact JSON object per line to stderr.

Spans: a module takes ``tracer = trace.get_tracer(__name__)`` at import and opens spans with
``with tracer.start_as_current_span("name") as span:``. Names in use or suggested:
``polygon.request`` (one per HTTP attempt, from the client), ``<job>.run`` (``ingest_options.run``,
``ingest_snapshots.run``; attribute ``options.run_id``), ``contracts.sync_underlying`` and
``snapshots.slice`` (attribute ``options.underlying``), ``db.batch`` (attribute ``db.table``).

OpenTelemetry lets a process set its global tracer provider once; modules' tracers resolve it at
their first span and keep it. So that :func:`configure_telemetry` can run again (tests configure
it per test), the first configuration with traces installs a *switch* as the global provider, and
each configuration puts its own SDK provider behind it; :meth:`Telemetry.shutdown` puts the no-op
one back. Metrics do not use the global meter provider at all: the instruments below are created
per configuration and reached through the functions of this module, which do nothing while no
configuration with metrics is active. Create new instruments here, not with
``metrics.get_meter`` elsewhere.

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
"""

from __future__ import annotations

import atexit
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import unquote, urlsplit

from opentelemetry import trace

from options.config import redact_url
from options.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.util.types import Attributes

__all__ = [
    "SHUTDOWN_TIMEOUT",
    "PoolStats",
    "Telemetry",
    "configure_telemetry",
    "count_retry",
    "count_rows_rejected",
    "count_rows_written",
    "observe_pool",
    "record_request",
    "time_batch",
]

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT: Final = 5.0
"""Seconds :meth:`Telemetry.shutdown` waits for the last spans and metrics to be sent."""

DEFAULT_METRIC_INTERVAL_MS: Final = 60_000
OTLP_PROTOCOL: Final = "http/protobuf"
EXPORTERS: Final = ("console", "otlp")
# Seconds; the SDK's default buckets are made for milliseconds. Up to the HTTP timeout's default.
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIGNAL_PATHS: Final = {"TRACES": "v1/traces", "METRICS": "v1/metrics"}
# The OTLP exporter spec's header syntax (W3C baggage without properties); values as the Python
# exporter's liberal mode takes them, spaces included.
_HEADER_RE: Final = re.compile(
    r"[ \t]*[\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+[ \t]*="
    r"[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"
)


class PoolStats(Protocol):
    """What :func:`observe_pool` reads of a pool (``asyncpg.Pool`` has it)."""

    def get_size(self) -> int: ...

    def get_idle_size(self) -> int: ...

    def is_closing(self) -> bool: ...


# -- the active configuration ---------------------------------------------------------------------


class _Instruments:
    """The instruments of one configuration, created once from its meter."""

    def __init__(self, meter: Meter) -> None:
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
        with self._pools_lock:
            if not any(known is pool for _, known in self._pools):
                self._pools.append((name, pool))

    def forget_pools(self) -> None:
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
_instruments: _Instruments | None = None
_switch: _TracerSwitch | None = None
_lock = threading.Lock()


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

    A pool is forgotten once it is closing, and at :meth:`Telemetry.shutdown`. Without metrics
    this does nothing (the pool is not even remembered).
    """
    instruments = _instruments
    if instruments is not None:
        instruments.add_pool(pool, name)


# -- configuration ---------------------------------------------------------------------------------


class Telemetry:
    """What :func:`configure_telemetry` installed; :meth:`shutdown` flushes and removes it.

    Attributes:
        service_name: the ``service.name`` exported, or ``None`` when nothing is installed.
    """

    def __init__(
        self,
        *,
        service_name: str | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        instruments: _Instruments | None = None,
    ) -> None:
        self.service_name = service_name
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._instruments = instruments
        self._closed = False

    @property
    def enabled(self) -> bool:
        """Whether anything is exported (and not yet shut down)."""
        return not self._closed and (
            self._tracer_provider is not None or self._meter_provider is not None
        )

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Send the spans and metrics not yet exported, and stop exporting.

        Waits at most ``timeout`` seconds (what is not sent by then is dropped, with a WARNING).
        Safe to call twice, a no-op when nothing was installed; never raises.
        """
        with _lock:
            if self._closed:
                return
            self._closed = True
        try:
            atexit.unregister(self.shutdown)
            self._detach()
            self._flush(timeout)
            if self._instruments is not None:
                self._instruments.forget_pools()  # observed one last time by the flush
        except Exception:
            logger.warning("Telemetry shutdown failed", exc_info=True)

    def _detach(self) -> None:
        """Stop recording into this configuration, unless a later one replaced it already."""
        global _instruments
        with _lock:
            if self._instruments is not None and _instruments is self._instruments:
                _instruments = None
            if (
                self._tracer_provider is not None
                and _switch is not None
                and _switch.current is self._tracer_provider
            ):
                _switch.current = trace.NoOpTracerProvider()

    def _flush(self, timeout: float) -> None:
        """Shut the providers down side by side, each sending what it holds, within ``timeout``."""
        jobs: list[tuple[str, Callable[[], object]]] = []
        if self._tracer_provider is not None:
            jobs.append(("spans", self._tracer_provider.shutdown))
        if self._meter_provider is not None:
            provider = self._meter_provider
            jobs.append(("metrics", lambda: provider.shutdown(timeout_millis=timeout * 1000)))
        threads: list[tuple[str, threading.Thread]] = []
        for what, job in jobs:
            thread = threading.Thread(
                target=_quietly, args=(what, job), name=f"telemetry-flush-{what}", daemon=True
            )
            try:
                thread.start()
            except RuntimeError:
                # At interpreter exit (atexit, Python >= 3.12) no thread may start: flush inline,
                # bounded by the SDK's own timeouts instead.
                _quietly(what, job)
                continue
            threads.append((what, thread))
        deadline = time.monotonic() + timeout
        for what, thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning(
                    "Telemetry: the last %s were not sent within %gs; dropped", what, timeout
                )


def _quietly(what: str, job: Callable[[], object]) -> None:
    try:
        job()
    except Exception:
        logger.warning("Telemetry: flushing the %s failed", what, exc_info=True)


def configure_telemetry(job: str, environ: Mapping[str, str]) -> Telemetry:
    """Export traces and metrics as the standard ``OTEL_*`` variables in ``environ`` say.

    Every variable is checked before anything is installed. With no exporter configured (the
    default when no OTLP endpoint is set) nothing is installed and the returned object's
    :meth:`~Telemetry.shutdown` does nothing. A later call replaces the active configuration
    (the earlier one should be shut down first).

    Args:
        job: the job's name (``ingest_snapshots``), the default ``service.name``.
        environ: the environment (``os.environ`` from the CLI, or the settings' merged view).

    Raises:
        ConfigError: a variable is invalid; one line naming it and the accepted form.
    """
    global _instruments
    env = {k: v.strip() for k, v in environ.items() if k.startswith("OTEL_") and v.strip()}
    disabled = _parse_bool(env, "OTEL_SDK_DISABLED")
    for name in _signal_names("PROTOCOL"):
        value = env.get(name)
        if value is not None and value.lower() != OTLP_PROTOCOL:
            raise ConfigError(
                f"{name}={value!r} is not supported: expected {OTLP_PROTOCOL} "
                "(this program exports OTLP over HTTP only)",
                variable=name,
            )
    endpoints = {signal: _signal_endpoint(env, signal) for signal in _SIGNAL_PATHS}
    headers = {signal: _signal_headers(env, signal) for signal in _SIGNAL_PATHS}
    traces = _parse_exporters(env, "OTEL_TRACES_EXPORTER", endpoints["TRACES"] is not None)
    metrics = _parse_exporters(env, "OTEL_METRICS_EXPORTER", endpoints["METRICS"] is not None)
    attributes = _parse_resource_attributes(env)
    interval = _parse_interval(env)
    if disabled or not (traces or metrics):
        return Telemetry()

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    attributes[SERVICE_NAME] = env.get("OTEL_SERVICE_NAME") or attributes.get(SERVICE_NAME) or job
    resource = Resource.create(attributes)
    service_name = str(attributes[SERVICE_NAME])

    tracer_provider = None
    if traces:
        tracer_provider = _tracer_provider(
            resource, traces, endpoints["TRACES"] or _default_endpoint("TRACES"), headers["TRACES"]
        )
    meter_provider = None
    instruments = None
    if metrics:
        meter_provider = _meter_provider(
            resource,
            metrics,
            endpoints["METRICS"] or _default_endpoint("METRICS"),
            headers["METRICS"],
            interval,
        )
        instruments = _Instruments(meter_provider.get_meter(__name__))

    telemetry = Telemetry(
        service_name=service_name,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        instruments=instruments,
    )
    with _lock:
        _instruments = instruments
        if tracer_provider is not None:
            _install_switch().current = tracer_provider
    atexit.register(telemetry.shutdown)
    logger.info(
        "Telemetry: service.name=%s, traces to %s, metrics to %s",
        service_name,
        _describe(traces, endpoints["TRACES"] or _default_endpoint("TRACES")),
        _describe(metrics, endpoints["METRICS"] or _default_endpoint("METRICS"))
        + (f" every {interval / 1000:g}s" if metrics else ""),
    )
    return telemetry


def _tracer_provider(
    resource: Any, exporters: Sequence[str], endpoint: str, headers: dict[str, str]
) -> TracerProvider:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    def one_line(span: ReadableSpan) -> str:
        return span.to_json(indent=None) + "\n"

    # Shut down by Telemetry.shutdown (bounded), not by the SDK's own unbounded atexit hook.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for name in exporters:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint, headers=headers or None)
        else:
            exporter = ConsoleSpanExporter(out=sys.stderr, formatter=one_line)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _meter_provider(
    resource: Any,
    exporters: Sequence[str],
    endpoint: str,
    headers: dict[str, str],
    interval_ms: float,
) -> MeterProvider:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        MetricExporter,
        MetricsData,
        PeriodicExportingMetricReader,
    )

    def one_line(data: MetricsData) -> str:
        return data.to_json(indent=None) + "\n"

    readers = []
    for name in exporters:
        exporter: MetricExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )

            exporter = OTLPMetricExporter(endpoint=endpoint, headers=headers or None)
        else:
            exporter = ConsoleMetricExporter(out=sys.stderr, formatter=one_line)
        readers.append(PeriodicExportingMetricReader(exporter, export_interval_millis=interval_ms))
    return MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)


# -- the tracer switch ----------------------------------------------------------------------------


class _TracerSwitch(trace.TracerProvider):
    """The global tracer provider once traces were configured: its tracers follow ``current``."""

    def __init__(self) -> None:
        self.current: trace.TracerProvider = trace.NoOpTracerProvider()

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes | None = None,
    ) -> trace.Tracer:
        return _SwitchedTracer(
            self, instrumenting_module_name, instrumenting_library_version, schema_url, attributes
        )


class _SwitchedTracer(trace.Tracer):
    """A tracer of whichever provider the switch holds now (looked up again when it changes)."""

    def __init__(
        self,
        switch: _TracerSwitch,
        name: str,
        version: str | None,
        schema_url: str | None,
        attributes: Attributes | None,
    ) -> None:
        self._switch = switch
        self._args = (name, version, schema_url, attributes)
        self._provider: trace.TracerProvider | None = None
        self._tracer: trace.Tracer = trace.NoOpTracer()

    def _current(self) -> trace.Tracer:
        provider = self._switch.current
        if provider is not self._provider:
            self._tracer = provider.get_tracer(*self._args)
            self._provider = provider
        return self._tracer

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._current().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        # The current tracer's own context manager, which also works as a decorator.
        return self._current().start_as_current_span(*args, **kwargs)


def _install_switch() -> _TracerSwitch:
    """Make the switch the global tracer provider (once per process); called under ``_lock``."""
    global _switch
    if _switch is None:
        _switch = _TracerSwitch()
        trace.set_tracer_provider(_switch)
        if trace.get_tracer_provider() is not _switch:
            logger.warning("Telemetry: another tracer provider was installed first; spans go there")
    return _switch


# -- parsing the variables ------------------------------------------------------------------------


def _signal_names(suffix: str) -> tuple[str, ...]:
    return (
        f"OTEL_EXPORTER_OTLP_{suffix}",
        *(f"OTEL_EXPORTER_OTLP_{signal}_{suffix}" for signal in _SIGNAL_PATHS),
    )


def _parse_bool(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "false").lower()
    if value not in ("true", "false"):
        raise ConfigError(f"{name}={env[name]!r} is invalid: expected true or false", variable=name)
    return value == "true"


def _parse_exporters(env: Mapping[str, str], name: str, has_endpoint: bool) -> tuple[str, ...]:
    raw = env.get(name)
    if raw is None:
        return ("otlp",) if has_endpoint else ()
    names = [part.strip().lower() for part in raw.split(",")]
    if names == ["none"]:
        return ()
    if not names or any(part not in EXPORTERS for part in names):
        raise ConfigError(
            f"{name}={raw!r} is invalid: expected none, console or otlp (or console,otlp for both)",
            variable=name,
        )
    return tuple(dict.fromkeys(names))


def _check_endpoint(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        # Not echoed: a malformed URL may carry a token where a host was expected.
        raise ConfigError(
            f"{name} is invalid: expected http(s)://HOST[:PORT][/PATH] "
            "(an OTLP/HTTP receiver, port 4318 by convention)",
            variable=name,
        )
    return raw


def _signal_endpoint(env: Mapping[str, str], signal: str) -> str | None:
    """The URL one signal is sent to, or ``None`` when no endpoint variable is set."""
    specific = f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
    if specific in env:
        return _check_endpoint(specific, env[specific])
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if base is None:
        return None
    _check_endpoint("OTEL_EXPORTER_OTLP_ENDPOINT", base)
    return f"{base.rstrip('/')}/{_SIGNAL_PATHS[signal]}"


def _default_endpoint(signal: str) -> str:
    # The OTLP/HTTP default, as the exporter itself would choose it from an empty environment.
    return f"http://localhost:4318/{_SIGNAL_PATHS[signal]}"


def _signal_headers(env: Mapping[str, str], signal: str) -> dict[str, str]:
    """The headers one signal's exports carry; checked first, so the exporter never logs them."""
    specific = f"OTEL_EXPORTER_OTLP_{signal}_HEADERS"
    name = specific if specific in env else "OTEL_EXPORTER_OTLP_HEADERS"
    raw = env.get(name)
    if raw is None:
        return {}
    headers: dict[str, str] = {}
    for item in re.split(r"[ \t]*,[ \t]*", raw):
        if not item:
            continue
        if not _HEADER_RE.fullmatch(item):
            # The value is never echoed: it holds tokens.
            raise ConfigError(
                f"{name} is invalid: expected name=value pairs separated by commas "
                "(values URL-encoded)",
                variable=name,
            )
        key, value = item.split("=", 1)
        headers[unquote(key).strip().lower()] = unquote(value).strip()
    return headers


def _parse_resource_attributes(env: Mapping[str, str]) -> dict[str, Any]:
    raw = env.get("OTEL_RESOURCE_ATTRIBUTES")
    attributes: dict[str, Any] = {}
    if raw is None:
        return attributes
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                "OTEL_RESOURCE_ATTRIBUTES is invalid: expected key=value pairs separated by "
                "commas (service.namespace=options,deployment.environment.name=prod)",
                variable="OTEL_RESOURCE_ATTRIBUTES",
            )
        attributes[key.strip()] = unquote(value.strip())
    return attributes


def _parse_interval(env: Mapping[str, str]) -> float:
    name = "OTEL_METRIC_EXPORT_INTERVAL"
    raw = env.get(name)
    if raw is None:
        return float(DEFAULT_METRIC_INTERVAL_MS)
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ConfigError(
            f"{name}={raw!r} is invalid: expected milliseconds > 0 (default 60000)",
            variable=name,
        )
    return value


def _describe(exporters: Sequence[str], endpoint: str) -> str:
    if not exporters:
        return "none"
    return ", ".join(
        f"otlp {redact_url(endpoint)}" if name == "otlp" else "console (stderr)"
        for name in exporters
    )
