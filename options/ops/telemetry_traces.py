"""OpenTelemetry traces: how modules open spans, and the switch that lets tracing be reconfigured.

Spans: a module takes ``tracer = trace.get_tracer(__name__)`` at import and opens spans with
``with tracer.start_as_current_span("name") as span:``. Names in use or suggested:
``polygon.request`` (one per HTTP attempt, from the client), ``<job>.run`` (``ingest_options.run``,
``ingest_snapshots.run``; attribute ``options.run_id``), ``contracts.sync_underlying`` and
``snapshots.slice`` (attribute ``options.underlying``), ``db.batch`` (attribute ``db.table``).

OpenTelemetry lets a process set its global tracer provider once; modules' tracers resolve it at
their first span and keep it. So that
:func:`~options.ops.telemetry_setup.configure_telemetry` can run again (tests configure it per
test), the first configuration with traces installs a *switch* as the global provider, and each
configuration puts its own SDK provider behind it (:func:`install_tracer_provider`);
:meth:`Telemetry.shutdown <options.ops.telemetry_setup.Telemetry.shutdown>` puts the no-op one back
(:func:`uninstall_tracer_provider`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

if TYPE_CHECKING:
    from opentelemetry.util.types import Attributes

__all__ = ["install_tracer_provider", "uninstall_tracer_provider"]

logger = logging.getLogger(__name__)


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


_switch: _TracerSwitch | None = None


def install_tracer_provider(provider: trace.TracerProvider) -> None:
    """Send the spans of every module's tracer to ``provider`` from now on.

    Called by :mod:`options.ops.telemetry_setup`, under its lock.
    """
    _install_switch().current = provider


def uninstall_tracer_provider(provider: trace.TracerProvider) -> None:
    """Put the no-op provider back, unless a later configuration replaced ``provider`` already.

    Called by :mod:`options.ops.telemetry_setup`, under its lock.
    """
    if _switch is not None and _switch.current is provider:
        _switch.current = trace.NoOpTracerProvider()


def _install_switch() -> _TracerSwitch:
    """Make the switch the global tracer provider (once per process)."""
    global _switch
    if _switch is None:
        _switch = _TracerSwitch()
        trace.set_tracer_provider(_switch)
        if trace.get_tracer_provider() is not _switch:
            logger.warning("Telemetry: another tracer provider was installed first; spans go there")
    return _switch
