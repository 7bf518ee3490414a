"""Tests of OpenTelemetry export: a local OTLP/HTTP receiver, the client against the simulator.

The receiver runs on its own thread and event loop: the SDK exports from its own threads with
blocking HTTP, and :meth:`Telemetry.shutdown` blocks its caller until the last export is answered,
so a receiver on the test's event loop could not answer it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry import trace
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

from options.api.endpoints import MARKET_STATUS_PATH
from options.api.polygon import PolygonClient
from options.errors import ConfigError
from options.ops import telemetry
from options.ops.telemetry import (
    count_rows_rejected,
    count_rows_written,
    observe_pool,
    time_batch,
)
from options.ops.telemetry_env import read_telemetry_env
from options.ops.telemetry_setup import Telemetry, configure_telemetry
from tests.conftest import SIM_KEY

tracer = trace.get_tracer(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def attributes_of(items: Any) -> dict[str, Any]:
    """Protobuf ``KeyValue`` attributes as a plain dict."""
    result: dict[str, Any] = {}
    for item in items:
        assert isinstance(item, KeyValue)
        kind = item.value.WhichOneof("value")
        result[item.key] = getattr(item.value, kind) if kind else None
    return result


@dataclass
class Span:
    """One received span: its resource's attributes, name, ids and attributes."""

    resource: dict[str, Any]
    name: str
    span_id: bytes
    parent_span_id: bytes
    attributes: dict[str, Any]


@dataclass
class Point:
    """One received metric data point (the last export's, metrics being cumulative)."""

    resource: dict[str, Any]
    metric: str
    unit: str
    attributes: dict[str, Any]
    value: float  # a sum's or gauge's value, a histogram's count


@dataclass
class Receiver:
    """A running OTLP/HTTP receiver: what it was sent, and the headers of each export."""

    url: str = ""
    traces: list[ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[ExportMetricsServiceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def spans(self) -> list[Span]:
        return [
            Span(
                resource=attributes_of(rs.resource.attributes),
                name=span.name,
                span_id=span.span_id,
                parent_span_id=span.parent_span_id,
                attributes=attributes_of(span.attributes),
            )
            for request in self.traces
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]

    def points(self) -> list[Point]:
        """The data points of the last export that carried each metric, per service."""
        last: dict[tuple[Any, str], list[Point]] = {}
        for request in self.metrics:
            for rm in request.resource_metrics:
                resource = attributes_of(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        kind = metric.WhichOneof("data")
                        data = getattr(metric, kind)
                        last[resource.get("service.name"), metric.name] = [
                            Point(
                                resource=resource,
                                metric=metric.name,
                                unit=metric.unit,
                                attributes=attributes_of(point.attributes),
                                value=_value_of(kind, point),
                            )
                            for point in data.data_points
                        ]
        return [point for points in last.values() for point in points]

    def totals(self, metric: str, *keys: str) -> dict[tuple[Any, ...], float]:
        """A metric's values summed by the given attributes."""
        totals: Counter[tuple[Any, ...]] = Counter()
        for point in self.points():
            if point.metric == metric:
                totals[tuple(point.attributes.get(key) for key in keys)] += point.value
        return dict(totals)


def _value_of(kind: str, point: Any) -> float:
    if kind == "histogram":
        return float(point.count)
    number = point.WhichOneof("value")
    return float(getattr(point, number))


def start_receiver() -> tuple[Receiver, Any]:
    """Serve ``/v1/traces`` and ``/v1/metrics`` on 127.0.0.1 from a thread; return the receiver
    and a function that stops it."""
    receiver = Receiver()
    lock = threading.Lock()

    async def on_traces(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest.FromString(await request.read())
        with lock:
            receiver.traces.append(message)
            receiver.headers.append(dict(request.headers))
        return protobuf_response(ExportTraceServiceResponse())

    async def on_metrics(request: web.Request) -> web.Response:
        message = ExportMetricsServiceRequest.FromString(await request.read())
        with lock:
            receiver.metrics.append(message)
            receiver.headers.append(dict(request.headers))
        return protobuf_response(ExportMetricsServiceResponse())

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner_box: list[web.AppRunner] = []

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", on_traces)
        app.router.add_post("/v1/metrics", on_metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        receiver.url = f"http://{host}:{port}"
        runner_box.append(runner)
        ready.set()

    thread = threading.Thread(
        target=lambda: (loop.run_until_complete(serve()), loop.run_forever()),
        name="otlp-receiver",
        daemon=True,
    )
    thread.start()
    assert ready.wait(10), "the receiver did not start"

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner_box[0].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    return receiver, stop


def protobuf_response(message: Any) -> web.Response:
    return web.Response(body=message.SerializeToString(), content_type="application/x-protobuf")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A local OTLP/HTTP receiver for one test."""
    running, stop = start_receiver()
    try:
        yield running
    finally:
        stop()


@pytest.fixture
def configured() -> Iterator[list[Telemetry]]:
    """Telemetry configured in a test (append it here) is shut down after the test, even when
    the test fails, so the next test starts with nothing installed."""
    made: list[Telemetry] = []
    yield made
    for item in made:
        item.shutdown()


async def sim_stats(base_url: str) -> dict[str, Any]:
    """The simulator's request counters."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base_url}/_sim/stats") as response,
    ):
        stats: dict[str, Any] = await response.json()
        return stats


def client_for(base_url: str) -> PolygonClient:
    """A client on the simulator that retries server errors quickly and often."""
    return PolygonClient(
        base_url=base_url,
        api_key=SIM_KEY,
        rate_limit=None,
        max_retries=10,
        backoff_initial=0.001,
        backoff_max=0.01,
        concurrency=4,
    )


async def drain(client: PolygonClient) -> None:
    """Requests to three endpoints: two chains of 3 pages, one listing, one previous close."""
    with tracer.start_as_current_span("ingest_snapshots.run"):
        for underlying in ("AAA", "BBB"):
            async for _ in client.chain_snapshot(underlying):
                pass
        async for _ in client.list_contracts("AAA"):
            pass
        await client.previous_close("AAA")


# -- export to an OTLP receiver ------------------------------------------------------------------


async def test_client_spans_and_metrics_reach_an_otlp_receiver(simulator, receiver, configured):
    """Every attempt arrives as a span and in the request metrics, as the simulator counted."""
    async with simulator(
        underlyings=("AAA", "BBB"), contracts_per_underlying=600, error_rate=0.3, seed=3
    ) as sim:
        configured.append(
            configure_telemetry("ingest_snapshots", {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
        )
        async with client_for(sim.base_url) as client:
            await drain(client)
        stats = await sim_stats(sim.base_url)
    configured[0].shutdown()

    requests = stats["requests"]
    errors = stats["errors_injected"]
    assert requests == client.requests_sent
    assert errors > 0, "the seed should inject some server errors"

    spans = receiver.spans()
    assert {span.resource["service.name"] for span in spans} == {"ingest_snapshots"}
    (run,) = [span for span in spans if span.name == "ingest_snapshots.run"]
    attempts = [span for span in spans if span.name == "polygon.request"]
    assert len(attempts) == requests
    assert {span.parent_span_id for span in attempts} == {run.span_id}
    assert Counter(span.attributes["http.response.status_code"] for span in attempts)[200] == (
        requests - errors
    )

    points = receiver.points()
    assert {point.resource["service.name"] for point in points} == {"ingest_snapshots"}
    by_endpoint = receiver.totals("options.api.requests", "endpoint")
    assert {key[0]: value for key, value in by_endpoint.items()} == stats["by_endpoint"]
    by_status = receiver.totals("options.api.requests", "status")
    assert by_status[("200",)] == requests - errors
    assert sum(v for (status,), v in by_status.items() if status.startswith("5")) == errors
    failed = receiver.totals("options.api.requests", "endpoint", "status")
    retries = receiver.totals("options.api.retries", "endpoint", "reason")
    assert retries == {key: n for key, n in failed.items() if key[1].startswith("5")}
    durations = receiver.totals("options.api.request.duration", "endpoint")
    assert sum(durations.values()) == requests
    units = {point.metric: point.unit for point in points}
    assert units["options.api.request.duration"] == "s"
    assert units["options.api.requests"] == "{request}"


async def test_retries_are_counted_by_reason(receiver, configured):
    """Timeout, dropped connection, 429 and unreadable 200 are counted as retries by reason."""
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(2)  # longer than the client's timeout
        if calls == 2:
            response = web.StreamResponse(headers={"Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b'{"market": ')
            assert request.transport is not None
            request.transport.close()
            return response
        if calls == 3:
            return web.Response(status=429, headers={"Retry-After": "0"})
        if calls == 4:
            return web.Response(status=200, body=b'{"market": "op')
        return web.json_response({"market": "open"})

    app = web.Application()
    app.router.add_get(MARKET_STATUS_PATH, handler)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    configured.append(
        configure_telemetry("ingest_options", {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    )
    try:
        client = PolygonClient(
            base_url=str(server.make_url("")),
            api_key=SIM_KEY,
            rate_limit=None,
            timeout=0.3,
            backoff_initial=0.001,
            backoff_max=0.01,
        )
        async with client:
            assert await client.market_status_now() == {"market": "open"}
    finally:
        await server.close()
    configured[0].shutdown()

    assert receiver.totals("options.api.requests", "endpoint", "status") == {
        (MARKET_STATUS_PATH, "error"): 2,
        (MARKET_STATUS_PATH, "429"): 1,
        (MARKET_STATUS_PATH, "200"): 2,
    }
    assert receiver.totals("options.api.retries", "reason") == {
        ("timeout",): 1,
        ("connection",): 1,
        ("429",): 1,
        ("payload",): 1,
    }


async def test_database_instruments_reach_an_otlp_receiver(receiver, configured, pool):
    """Rows written/rejected, batch durations and pool connections in use arrive as metrics."""
    configured.append(
        configure_telemetry(
            "ingest_options",
            {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{receiver.url}/v1/metrics"},
        )
    )
    observe_pool(pool)
    observe_pool(pool)  # registering twice counts once
    for _ in range(3):
        with time_batch("option_contracts"):
            await pool.execute("SELECT pg_sleep(0.001)")
    count_rows_written("option_contracts", 1000)
    count_rows_written("option_contracts", 234)
    count_rows_written("option_snapshots", 0)  # nothing is recorded for nothing
    count_rows_rejected("option_contracts", 2)
    async with pool.acquire():
        configured[0].shutdown()

    assert receiver.traces == [], "only metrics were configured (the metrics endpoint)"
    assert receiver.totals("options.rows.written", "table") == {("option_contracts",): 1234}
    assert receiver.totals("options.rows.rejected", "table") == {("option_contracts",): 2}
    assert receiver.totals("options.db.batch.duration", "table") == {("option_contracts",): 3}
    assert receiver.totals("options.db.pool.connections.in_use", "pool") == {("main",): 1}
    assert {point.resource["service.name"] for point in receiver.points()} == {"ingest_options"}


@pytest.mark.parametrize(
    ("extra", "service_name", "resource"),
    [
        pytest.param({}, "ingest_options", {}, id="job-name"),
        pytest.param({"OTEL_SERVICE_NAME": "options-history"}, "options-history", {}, id="env"),
        pytest.param(
            {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=ci,team=data%20eng"},
            "ingest_options",
            {"deployment.environment.name": "ci", "team": "data eng"},
            id="attributes",
        ),
        pytest.param(
            {
                "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attributes",
                "OTEL_SERVICE_NAME": "from-env",
            },
            "from-env",
            {},
            id="env-over-attributes",
        ),
    ],
)
def test_service_name_and_resource_attributes(receiver, configured, extra, service_name, resource):
    """service.name is OTEL_SERVICE_NAME, else the job; resource attributes are exported."""
    configured.append(
        configure_telemetry(
            "ingest_options", {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url + "/", **extra}
        )
    )
    with tracer.start_as_current_span("ingest_options.run"):
        pass
    configured[0].shutdown()

    (span,) = receiver.spans()
    assert span.resource["service.name"] == service_name
    assert resource.items() <= span.resource.items()


def test_headers_are_sent_and_never_logged(receiver, configured, caplog):
    """OTEL_EXPORTER_OTLP_HEADERS reach the receiver with every export; no log line shows them."""
    caplog.set_level(logging.DEBUG)
    configured.append(
        configure_telemetry(
            "ingest_options",
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20tok-SECRET-1,x-tenant=t1",
            },
        )
    )
    with tracer.start_as_current_span("ingest_options.run"):
        count_rows_written("option_contracts", 1)
    configured[0].shutdown()

    assert len(receiver.headers) == 2  # one trace export, one metrics export
    for headers in receiver.headers:
        assert headers["Authorization"] == "Bearer tok-SECRET-1"
        assert headers["x-tenant"] == "t1"
    assert "Telemetry: service.name=ingest_options" in caplog.text
    assert "SECRET" not in caplog.text


def test_configure_again_exports_to_the_new_receiver_only(configured):
    """A second configuration gets the spans and metrics; the first receiver nothing more."""
    first, stop_first = start_receiver()
    second, stop_second = start_receiver()
    try:
        for job, target in (("ingest_options", first), ("ingest_snapshots", second)):
            configured.append(configure_telemetry(job, {"OTEL_EXPORTER_OTLP_ENDPOINT": target.url}))
            with tracer.start_as_current_span(f"{job}.run"):
                count_rows_written(job, 1)
            configured[-1].shutdown()
    finally:
        stop_first()
        stop_second()

    assert [(s.name, s.resource["service.name"]) for s in first.spans()] == [
        ("ingest_options.run", "ingest_options")
    ]
    assert [(s.name, s.resource["service.name"]) for s in second.spans()] == [
        ("ingest_snapshots.run", "ingest_snapshots")
    ]
    assert first.totals("options.rows.written", "table") == {("ingest_options",): 1}
    assert second.totals("options.rows.written", "table") == {("ingest_snapshots",): 1}


def test_console_exporters_write_one_json_object_per_line(configured, capsys):
    """Console exporters write compact one-line JSON to stderr, nothing to stdout."""
    configured.append(
        configure_telemetry(
            "ingest_snapshots",
            {"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "console"},
        )
    )
    with tracer.start_as_current_span("ingest_snapshots.run"):
        count_rows_written("option_snapshots", 5)
    configured[0].shutdown()

    out, err = capsys.readouterr()
    assert out == ""
    objects = [json.loads(line) for line in err.splitlines()]  # every line one whole object
    # (spans that another test's leftover thread ends meanwhile would be exported here too)
    spans = [o for o in objects if o.get("name") == "ingest_snapshots.run"]
    assert len(spans) == 1, err
    span = spans[0]
    assert span["resource"]["attributes"]["service.name"] == "ingest_snapshots"
    exports = [o for o in objects if "resource_metrics" in o]
    assert len(exports) == 1, err
    (resource_metrics,) = exports[0]["resource_metrics"]
    names = [m["name"] for sm in resource_metrics["scope_metrics"] for m in sm["metrics"]]
    assert "options.rows.written" in names


def test_shutdown_is_bounded_when_the_receiver_never_answers(configured, caplog, monkeypatch):
    """Shutdown waits no longer than its timeout for a silent receiver, and does not raise."""
    # The exporter's own timeout (it reads it from the process environment): its thread, left
    # behind by the bounded shutdown, gives up soon after, while the socket is still open.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    with socket.create_server(("127.0.0.1", 0)) as silent:
        host, port = silent.getsockname()[:2]
        configured.append(
            configure_telemetry(
                "ingest_options",
                {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{host}:{port}",
                    "OTEL_METRICS_EXPORTER": "none",
                },
            )
        )
        with tracer.start_as_current_span("ingest_options.run"):
            pass
        configured[0].shutdown(timeout=0.5)
        pending = [t for t in threading.enumerate() if t.name == "telemetry-flush-spans"]
        assert [thread.is_alive() for thread in pending] == [True], "returned before the export"
        pending[0].join(10)
    assert "the last spans were not sent within 0.5s" in caplog.text


def test_exit_without_shutdown_still_flushes(receiver):
    """A process exiting without calling shutdown still sends its spans and metrics (atexit)."""
    script = (
        "import sys\n"
        "from opentelemetry import trace\n"
        "from options.ops.telemetry import count_rows_written\n"
        "from options.ops.telemetry_setup import configure_telemetry\n"
        "configure_telemetry('ingest_snapshots', {'OTEL_EXPORTER_OTLP_ENDPOINT': sys.argv[1]})\n"
        "with trace.get_tracer('child').start_as_current_span('ingest_snapshots.run'):\n"
        "    count_rows_written('option_snapshots', 7)\n"
        "sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    for name in [name for name in env if name.startswith("OTEL_")]:
        del env[name]
    done = subprocess.run(
        [sys.executable, "-c", script, receiver.url], env=env, timeout=60, check=False
    )

    assert done.returncode == 3
    assert [span.name for span in receiver.spans()] == ["ingest_snapshots.run"]
    assert receiver.totals("options.rows.written", "table") == {("option_snapshots",): 7}


# -- nothing configured ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({}, id="unset"),
        pytest.param(
            {"OTEL_SERVICE_NAME": "x", "OTEL_EXPORTER_OTLP_HEADERS": ""}, id="no-exporter"
        ),
        pytest.param({"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}, id="none"),
        pytest.param({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, id="disabled"),
    ],
)
async def test_nothing_configured_exports_nothing(simulator, receiver, environ):
    """Without an exporter nothing is installed or exported and shutdown is a no-op."""
    result = configure_telemetry("ingest_snapshots", environ)
    assert not result.enabled
    assert telemetry._instruments is None
    assert time_batch("option_snapshots") is time_batch("option_contracts")
    async with simulator(underlyings=("AAA",), contracts_per_underlying=300) as sim:
        async with client_for(sim.base_url) as client:
            async for _ in client.chain_snapshot("AAA"):
                pass
        stats = await sim_stats(sim.base_url)
    with time_batch("option_snapshots"):
        count_rows_written("option_snapshots", 300)
    count_rows_rejected("option_snapshots", 1)
    result.shutdown()
    result.shutdown()

    assert stats["requests"] == 2
    assert receiver.traces == []
    assert receiver.metrics == []


def test_shutdown_twice_after_export_is_safe(receiver, configured):
    """A configured telemetry's second shutdown does nothing and raises nothing."""
    configured.append(
        configure_telemetry("ingest_options", {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    )
    assert configured[0].enabled
    configured[0].shutdown()
    configured[0].shutdown()
    assert not configured[0].enabled
    assert telemetry._instruments is None


# -- invalid variables ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "variable", "accepted"),
    [
        pytest.param(
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "http/protobuf",
            id="grpc",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json", "OTEL_TRACES_EXPORTER": "otlp"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "http/protobuf",
            id="http-json",
        ),
        pytest.param(
            {"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER", "none, console", id="jaeger"
        ),
        pytest.param(
            {"OTEL_METRICS_EXPORTER": "prometheus"},
            "OTEL_METRICS_EXPORTER",
            "none, console",
            id="prometheus",
        ),
        pytest.param(
            {"OTEL_TRACES_EXPORTER": "none,otlp"}, "OTEL_TRACES_EXPORTER", "or otlp", id="none-and"
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"},
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http(s)://HOST",
            id="no-scheme",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_HEADERS": "Authorization: Bearer tok-SECRET-2"},
            "OTEL_EXPORTER_OTLP_HEADERS",
            "name=value",
            id="headers",
        ),
        pytest.param(
            {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name"},
            "OTEL_RESOURCE_ATTRIBUTES",
            "key=value",
            id="attributes",
        ),
        pytest.param({"OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED", "true or false", id="sdk"),
        pytest.param(
            {"OTEL_METRIC_EXPORT_INTERVAL": "soon"},
            "OTEL_METRIC_EXPORT_INTERVAL",
            "milliseconds",
            id="interval",
        ),
    ],
)
def test_invalid_variable_is_one_config_error(environ, variable, accepted):
    """An invalid value is one ConfigError line naming the variable and the accepted form."""
    with pytest.raises(ConfigError) as raised:
        configure_telemetry("ingest_options", environ)
    message = str(raised.value)
    assert raised.value.variable == variable
    assert message.startswith(variable)
    assert accepted in message
    assert "\n" not in message
    assert "SECRET" not in message
    assert telemetry._instruments is None


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        pytest.param(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.example.com:4318",
                "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20tok-SECRET-3",
            },
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            id="base",
        ),
        pytest.param(
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://10.0.0.7:4318/v1/traces",
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-api-key=tok-SECRET-4",
                "OTEL_METRICS_EXPORTER": "none",
            },
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            id="traces",
        ),
        pytest.param(
            {
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://collector:4318/v1/metrics",
                "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=tok-SECRET-5",
                "OTEL_TRACES_EXPORTER": "none",
            },
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            id="metrics-with-shared-headers",
        ),
    ],
)
def test_cleartext_endpoint_with_headers_is_refused(environ, variable, configured):
    """Headers hold tokens: sending them over http:// to a host other than loopback is one
    ConfigError naming the endpoint variable and what is accepted, before anything exports."""
    with pytest.raises(ConfigError) as raised:
        configured.append(configure_telemetry("ingest_options", environ))
    message = str(raised.value)
    assert raised.value.variable == variable
    assert message.startswith(f"{variable}=")
    assert "would send OTEL_EXPORTER_OTLP" in message
    assert "expected https://HOST[:PORT]" in message
    assert "ALLOW_INSECURE_ENDPOINTS=true" in message
    assert "\n" not in message and "SECRET" not in message
    assert telemetry._instruments is None


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, id="no-headers"),
        pytest.param(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=tok",
            },
            id="loopback",
        ),
        pytest.param(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example.com",
                "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=tok",
            },
            id="https",
        ),
        pytest.param(
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example.com/v1/traces",
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-api-key=tok",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://sidecar:4318/v1/metrics",
            },
            id="headers-of-the-other-signal",
        ),
    ],
)
def test_endpoints_that_carry_no_token_in_cleartext_are_accepted(environ):
    """http:// is fine without headers (a sidecar collector), to loopback, and https always."""
    env = read_telemetry_env(environ)
    assert env.traces == ("otlp",) or env.metrics == ("otlp",)


def test_allow_insecure_lets_headers_go_over_http():
    """allow_insecure=True (ALLOW_INSECURE_ENDPOINTS=true) accepts http:// with headers."""
    env = read_telemetry_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.lan:4318",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=tok",
        },
        allow_insecure=True,
    )
    assert env.traces_endpoint == "http://collector.lan:4318/v1/traces"
    assert env.traces_headers == {"x-api-key": "tok"}


@pytest.mark.parametrize("allow", [False, True], ids=["refused", "allowed"])
def test_the_jobs_take_allow_insecure_endpoints_from_the_env_file(tmp_path, allow):
    """A job refuses OTLP headers over http:// in one line (exit 2) before anything else, unless
    the env file (what systemd hands the units) says ALLOW_INSECURE_ENDPOINTS=true."""
    env_file = tmp_path / "job.env"
    env_file.write_text(
        "OTEL_EXPORTER_OTLP_ENDPOINT=http://collector.invalid:4318\n"
        "OTEL_EXPORTER_OTLP_HEADERS=x-api-key=tok-SECRET-6\n"
        "OTEL_EXPORTER_OTLP_TIMEOUT=1\n"
        f"ALLOW_INSECURE_ENDPOINTS={str(allow).lower()}\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ingest_options"), "--env-file", str(env_file)],
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "DATABASE_"))},
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "SECRET" not in result.stderr
    if allow:
        # telemetry was set up; the job then stops at the next missing setting
        assert "Telemetry: service.name=ingest_options, traces to otlp" in result.stderr
        assert "is not set" in result.stderr.splitlines()[-1]
    else:
        assert result.stderr == (
            "error: OTEL_EXPORTER_OTLP_ENDPOINT='http://collector.invalid:4318' would send "
            "OTEL_EXPORTER_OTLP_HEADERS in cleartext: expected https://HOST[:PORT][/PATH] "
            "(http:// only for a loopback host, or with ALLOW_INSECURE_ENDPOINTS=true)\n"
        )


@pytest.fixture(autouse=True)
def nothing_left_installed() -> Iterator[None]:
    """Each test starts and ends with no telemetry configuration active."""
    assert telemetry._instruments is None
    yield
    assert telemetry._instruments is None


async def run_job_exporting(
    job: str, base_url: str, database_url: str, endpoint: str, *args: str
) -> None:
    import os
    import sys

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "DATABASE_URL": database_url,
        "POLYGON_BASE_URL": base_url,
        "POLYGON_API_KEY": SIM_KEY,
        "POLYGON_RATE_LIMIT": "off",
        "UNDERLYINGS": "AAA,BBB",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
    child = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / job), *args, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0, stderr.decode()


async def test_both_jobs_export_spans_and_metrics(simulator, receiver, database_url: str) -> None:
    """Each job run with OTEL_EXPORTER_OTLP_ENDPOINT set sends, before it exits, a run span
    with a span per underlying and per API request under it, and metrics: API requests by
    endpoint and status (as many as the simulator saw), rows written by table, batch latency
    and pool connections in use; service.name is the job's name."""
    async with simulator(underlyings=("AAA", "BBB"), contracts_per_underlying=600) as api:
        await run_job_exporting("ingest_options", api.base_url, database_url, receiver.url)
        after_options = (await sim_stats(api.base_url))["requests"]
        await run_job_exporting(
            "ingest_snapshots", api.base_url, database_url, receiver.url, "--force"
        )
        total = (await sim_stats(api.base_url))["requests"]
    spans = receiver.spans()
    services = {s.resource["service.name"] for s in spans}
    assert services == {"ingest_options", "ingest_snapshots"}
    names = [(s.resource["service.name"], s.name) for s in spans]
    assert names.count(("ingest_options", "ingest_options.run")) == 1
    assert names.count(("ingest_options", "contracts.sync_underlying")) == 2
    assert names.count(("ingest_snapshots", "ingest_snapshots.run")) == 1
    assert names.count(("ingest_snapshots", "snapshots.slice")) == 2
    run_ids = {s.attributes["options.run_id"] for s in spans if s.name.endswith(".run")}
    assert run_ids == {1, 2}
    requests: Counter[str] = Counter()
    written: Counter[str] = Counter()
    for point in receiver.points():
        service = point.resource["service.name"]
        if point.metric == "options.api.requests":
            requests[service] += int(point.value)
            assert point.attributes["status"] == "200"
        if point.metric == "options.rows.written":
            written[point.attributes["table"]] += int(point.value)
    assert requests == {"ingest_options": after_options, "ingest_snapshots": total - after_options}
    assert written == {"option_contracts": 1200, "option_snapshots": 1200}
    metrics = {point.metric for point in receiver.points()}
    assert {"options.db.batch.duration", "options.db.pool.connections.in_use"} <= metrics


async def test_a_job_stopped_by_sigterm_still_exports(simulator, receiver, database_url: str):
    """SIGTERM mid-run: the job stops, records the run interrupted (exit 5) and, before it
    exits, exports its run span and the requests it sent."""
    import signal

    names = ("AAA", "BBB")
    async with simulator(underlyings=names, contracts_per_underlying=600) as api:
        await run_job_exporting("ingest_options", api.base_url, database_url, receiver.url)
    async with simulator(underlyings=names, contracts_per_underlying=600, latency=0.5) as api:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
            "DATABASE_URL": database_url,
            "POLYGON_BASE_URL": api.base_url,
            "POLYGON_API_KEY": SIM_KEY,
            "POLYGON_RATE_LIMIT": "off",
            "UNDERLYINGS": ",".join(names),
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        }
        child = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "ingest_snapshots"),
            "--force",
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(400):  # until its first request reaches the simulator
            if (await sim_stats(api.base_url))["requests"] >= 1:
                break
            await asyncio.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 5, stderr.decode()
    runs = [s for s in receiver.spans() if s.name == "ingest_snapshots.run"]
    assert len(runs) == 1, [s.name for s in receiver.spans()]
    sent = sum(
        int(p.value)
        for p in receiver.points()
        if p.metric == "options.api.requests" and p.resource["service.name"] == "ingest_snapshots"
    )
    assert sent >= 1
