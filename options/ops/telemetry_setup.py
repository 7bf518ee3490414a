"""OpenTelemetry setup: exporters for traces and metrics, configured from the ``OTEL_*`` variables.

The CLI calls :func:`configure_telemetry` once, after logging, with the environment it read the
settings from, and :meth:`Telemetry.shutdown` before the process exits (it is also registered with
``atexit``, so a ``sys.exit`` anywhere still flushes). With nothing configured nothing is
installed: the API's no-op tracer stays, the SDK is not even imported, and every recording
function of :mod:`options.ops.telemetry` returns at its first line.

The variables are listed, and checked, in :mod:`options.ops.telemetry_env`. Console exporters
write one compact JSON object per line to stderr. A configuration with traces puts its SDK
tracer provider behind the global switch of :mod:`options.ops.telemetry_traces`; one with metrics
installs its instruments in :mod:`options.ops.telemetry`. A later configuration replaces both.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from options.config import redact_url
from options.ops.telemetry import Instruments, install_instruments, uninstall_instruments
from options.ops.telemetry_env import read_telemetry_env
from options.ops.telemetry_traces import install_tracer_provider, uninstall_tracer_provider

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["SHUTDOWN_TIMEOUT", "Telemetry", "configure_telemetry"]

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT: Final = 5.0
"""Seconds :meth:`Telemetry.shutdown` waits for the last spans and metrics to be sent."""

# Serialises installing and removing configurations (and a Telemetry's shutdown).
_lock = threading.Lock()


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
        instruments: Instruments | None = None,
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
        with _lock:
            if self._instruments is not None:
                uninstall_instruments(self._instruments)
            if self._tracer_provider is not None:
                uninstall_tracer_provider(self._tracer_provider)

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


def configure_telemetry(
    job: str, environ: Mapping[str, str], *, allow_insecure: bool = False
) -> Telemetry:
    """Export traces and metrics as the standard ``OTEL_*`` variables in ``environ`` say.

    Every variable is checked before anything is installed. With no exporter configured (the
    default when no OTLP endpoint is set) nothing is installed and the returned object's
    :meth:`~Telemetry.shutdown` does nothing. A later call replaces the active configuration
    (the earlier one should be shut down first).

    Args:
        job: the job's name (``ingest_snapshots``), the default ``service.name``.
        environ: the environment (``os.environ`` from the CLI, or the settings' merged view).
        allow_insecure: ``Settings.allow_insecure_endpoints``: headers may go over
            ``http://`` to a host other than loopback.

    Raises:
        ConfigError: a variable is invalid; one line naming it and the accepted form.
    """
    env = read_telemetry_env(environ, allow_insecure=allow_insecure)
    if env.disabled or not (env.traces or env.metrics):
        return Telemetry()

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    attributes = dict(env.resource_attributes)
    attributes[SERVICE_NAME] = env.service_name or attributes.get(SERVICE_NAME) or job
    resource = Resource.create(attributes)
    service_name = str(attributes[SERVICE_NAME])

    tracer_provider = None
    if env.traces:
        tracer_provider = _tracer_provider(
            resource, env.traces, env.traces_endpoint, env.traces_headers
        )
    meter_provider = None
    instruments = None
    if env.metrics:
        meter_provider = _meter_provider(
            resource, env.metrics, env.metrics_endpoint, env.metrics_headers, env.interval_ms
        )
        instruments = Instruments(meter_provider)

    telemetry = Telemetry(
        service_name=service_name,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        instruments=instruments,
    )
    with _lock:
        install_instruments(instruments)
        if tracer_provider is not None:
            install_tracer_provider(tracer_provider)
    atexit.register(telemetry.shutdown)
    logger.info(
        "Telemetry: service.name=%s, traces to %s, metrics to %s",
        service_name,
        _describe(env.traces, env.traces_endpoint),
        _describe(env.metrics, env.metrics_endpoint)
        + (f" every {env.interval_ms / 1000:g}s" if env.metrics else ""),
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


def _describe(exporters: Sequence[str], endpoint: str) -> str:
    if not exporters:
        return "none"
    return ", ".join(
        f"otlp {redact_url(endpoint)}" if name == "otlp" else "console (stderr)"
        for name in exporters
    )
