"""A Polygon-compatible HTTP simulator of the options endpoints this project reads.

It serves a deterministic synthetic universe (``create_app``) or recorded responses byte for byte
(``create_fixture_app``), speaks the real API's shapes, auth, pagination and limits, and can
misbehave on purpose: latency and its spikes, 5xx, 429 with Retry-After (steady or in bursts),
truncated pages, always-broken pages, next_url loops, malformed rows, and contracts missing from
the chain snapshot.

Modules: ``config`` (the knobs), ``universe`` (contracts and market state), ``app`` (routes,
auth, pagination, faults), ``recorded`` (the fixture app), ``server`` (ways to run it).
"""

from options.simulator.app import create_app
from options.simulator.config import SimulatorConfig, make_universe_names
from options.simulator.recorded import create_fixture_app
from options.simulator.server import (
    RunningSimulator,
    SimulatorProcess,
    describe,
    serve_forever,
    start_server,
)

__all__ = [
    "RunningSimulator",
    "SimulatorConfig",
    "SimulatorProcess",
    "create_app",
    "create_fixture_app",
    "describe",
    "make_universe_names",
    "serve_forever",
    "start_server",
]
