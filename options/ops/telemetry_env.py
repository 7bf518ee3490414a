"""The standard ``OTEL_*`` variables that configure telemetry, read and checked in one place.

:func:`read_telemetry_env` reads them from the mapping passed in (never from ``os.environ``
here) for :func:`~options.ops.telemetry_setup.configure_telemetry`:

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
``OTEL_EXPORTER_OTLP[_{TRACES,METRICS}]_``  ``name=value,...``; tokens, so never logged, and
``HEADERS``                                 never sent over ``http://`` to a host other than
                                            loopback unless ``ALLOW_INSECURE_ENDPOINTS=true``
``OTEL_SERVICE_NAME``                       ``service.name``; default: the job's name
``OTEL_RESOURCE_ATTRIBUTES``                ``key=value,...`` (a ``service.name`` here wins
                                            over the job's name, as in any OTel program)
``OTEL_METRIC_EXPORT_INTERVAL``             milliseconds between metric exports (60000)
==========================================  ==================================================

The SDK and its OTLP exporter read their other variables themselves from the process
environment, as in any OTel program (``OTEL_EXPORTER_OTLP_TIMEOUT``, ``..._COMPRESSION``,
``..._CERTIFICATE``, ``OTEL_BSP_*``, ``OTEL_TRACES_SAMPLER``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from options.config import INSECURE_HINT, is_loopback_host, redact_url
from options.errors import ConfigError

__all__ = ["TelemetryEnv", "read_telemetry_env"]

DEFAULT_METRIC_INTERVAL_MS: Final = 60_000
OTLP_PROTOCOL: Final = "http/protobuf"
EXPORTERS: Final = ("console", "otlp")
_SIGNAL_PATHS: Final = {"TRACES": "v1/traces", "METRICS": "v1/metrics"}
# The OTLP exporter spec's header syntax (W3C baggage without properties); values as the Python
# exporter's liberal mode takes them, spaces included.
_HEADER_RE: Final = re.compile(
    r"[ \t]*[\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+[ \t]*="
    r"[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"
)


@dataclass(frozen=True)
class TelemetryEnv:
    """What the ``OTEL_*`` variables ask for, every one of them checked.

    Attributes:
        disabled: ``OTEL_SDK_DISABLED=true``.
        traces: the span exporters (``console``, ``otlp``); empty: no traces.
        metrics: the metric exporters; empty: no metrics.
        traces_endpoint: the OTLP/HTTP URL spans go to (the exporter's default when unset).
        metrics_endpoint: the OTLP/HTTP URL metrics go to (the exporter's default when unset).
        traces_headers: the headers span exports carry.
        metrics_headers: the headers metric exports carry.
        service_name: ``OTEL_SERVICE_NAME``, or ``None`` when unset.
        resource_attributes: ``OTEL_RESOURCE_ATTRIBUTES`` as a dict.
        interval_ms: milliseconds between metric exports.
    """

    disabled: bool
    traces: tuple[str, ...]
    metrics: tuple[str, ...]
    traces_endpoint: str
    metrics_endpoint: str
    traces_headers: dict[str, str]
    metrics_headers: dict[str, str]
    service_name: str | None
    resource_attributes: dict[str, Any]
    interval_ms: float


def read_telemetry_env(environ: Mapping[str, str], *, allow_insecure: bool = False) -> TelemetryEnv:
    """Read and check every ``OTEL_*`` variable in ``environ`` (blank ones count as unset).

    Args:
        environ: the variables (only ``OTEL_*`` ones are read).
        allow_insecure: ``ALLOW_INSECURE_ENDPOINTS`` (from the settings): a signal with headers
            may go over ``http://`` to a host other than loopback.

    Raises:
        ConfigError: a variable is invalid, or an endpoint would carry the headers' tokens in
            cleartext; one line naming it and the accepted form.
    """
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
    if not allow_insecure:
        for signal in _SIGNAL_PATHS:
            _refuse_cleartext_headers(env, signal, endpoints[signal], headers[signal])
    traces = _parse_exporters(env, "OTEL_TRACES_EXPORTER", endpoints["TRACES"] is not None)
    metrics = _parse_exporters(env, "OTEL_METRICS_EXPORTER", endpoints["METRICS"] is not None)
    attributes = _parse_resource_attributes(env)
    interval = _parse_interval(env)
    return TelemetryEnv(
        disabled=disabled,
        traces=traces,
        metrics=metrics,
        traces_endpoint=endpoints["TRACES"] or _default_endpoint("TRACES"),
        metrics_endpoint=endpoints["METRICS"] or _default_endpoint("METRICS"),
        traces_headers=headers["TRACES"],
        metrics_headers=headers["METRICS"],
        service_name=env.get("OTEL_SERVICE_NAME"),
        resource_attributes=attributes,
        interval_ms=interval,
    )


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


def _refuse_cleartext_headers(
    env: Mapping[str, str], signal: str, endpoint: str | None, headers: dict[str, str]
) -> None:
    """Headers hold tokens: refuse to send them over ``http://`` to a host other than loopback.

    Without headers a plain ``http://`` collector (a sidecar, a node agent) is fine: what
    travels is the run's figures, no credential. The exporter's default is loopback.
    """
    if endpoint is None or not headers:
        return
    parts = urlsplit(endpoint)
    if parts.scheme != "http" or is_loopback_host(parts.hostname or ""):
        return
    specific = f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
    name = specific if specific in env else "OTEL_EXPORTER_OTLP_ENDPOINT"
    header_name = f"OTEL_EXPORTER_OTLP_{signal}_HEADERS"
    if header_name not in env:
        header_name = "OTEL_EXPORTER_OTLP_HEADERS"
    raise ConfigError(
        f"{name}={redact_url(env[name])!r} would send {header_name} in cleartext: expected "
        f"https://HOST[:PORT][/PATH] ({INSECURE_HINT})",
        variable=name,
    )


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
