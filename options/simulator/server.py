"""Run a simulator app: in-process (tests), blocking (CLI), or as a child process."""

from __future__ import annotations

import asyncio
import os
import pathlib
import selectors
import signal
import subprocess
import sys
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from options.simulator.app import create_app
from options.simulator.config import SimulatorConfig

READY_PREFIX = "listening on "
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
NAMES_SHOWN = 5


def describe(config: SimulatorConfig, base_url: str) -> str:
    """Say where the simulator listens, the key it wants and the tickers it serves, with the
    settings a job needs to read from it (two lines, for a person starting it by hand)."""
    names = config.underlyings
    shown = ", ".join(names[:NAMES_SHOWN]) + (", ..." if len(names) > NAMES_SHOWN else "")
    count = f"{len(names):,} underlying{'s' if len(names) != 1 else ''}"
    each = " each" if len(names) != 1 else ""
    key = config.api_key if config.api_key is not None else "any (none checked)"
    settings = [f"POLYGON_BASE_URL={base_url}"]
    if config.api_key is not None:
        settings.append(f"POLYGON_API_KEY={config.api_key}")
    settings.append(f"UNDERLYINGS={','.join(names[:NAMES_SHOWN])}")
    return (
        f"simulator listening on {base_url}; key: {key}; {count}: {shown} "
        f"({config.contracts_per_underlying:,} contracts{each})\n"
        f"for the jobs: {' '.join(settings)}"
    )


class RunningSimulator:
    """A started simulator app listening at ``base_url``; close it, or use ``async with``."""

    def __init__(self, runner: web.AppRunner, base_url: str) -> None:
        """Wrap a set-up runner whose site listens at ``base_url``."""
        self.runner = runner
        self.base_url = base_url

    async def close(self) -> None:
        """Stop listening and release the app."""
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningSimulator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def start_server(
    app: web.Application, *, host: str = "127.0.0.1", port: int = 0
) -> RunningSimulator:
    """Serve ``app`` on ``host:port`` in the running loop; port 0 picks a free port."""
    # No access log: at thousands of pages per second it would cost more than the pages.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
    except BaseException:
        await runner.cleanup()
        raise
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    return RunningSimulator(runner, f"http://{url_host}:{bound_port}")


def serve_forever(
    config: SimulatorConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the simulator until SIGINT or SIGTERM; ``on_ready(base_url)`` runs once listening."""
    asyncio.run(_serve(config, host=host, port=port, on_ready=on_ready))


async def _serve(
    config: SimulatorConfig, *, host: str, port: int, on_ready: Callable[[str], None] | None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or Windows: Ctrl-C still raises KeyboardInterrupt
    try:
        async with await start_server(create_app(config), host=host, port=port) as server:
            if on_ready is not None:
                on_ready(server.base_url)
            await stop.wait()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


class SimulatorProcess:
    """Run the simulator in a child Python process, so it does not share the caller's GIL.

    ``base_url`` is set by ``__enter__`` once the child says it listens; ``__exit__`` stops it.
    """

    base_url: str

    def __init__(self, config: SimulatorConfig, *, host: str = "127.0.0.1", port: int = 0) -> None:
        """Remember what to start; nothing runs before ``__enter__``."""
        self.config = config
        self.host = host
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SimulatorProcess:
        project_root = str(pathlib.Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p)
        command = [
            sys.executable,
            "-m",
            "options.simulator",
            "--config-json",
            self.config.to_json(),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--quiet",
        ]
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env
        )
        try:
            self.base_url = self._read_ready_line(self._process)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    @staticmethod
    def _read_ready_line(process: subprocess.Popen[bytes]) -> str:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(READY_TIMEOUT):
                raise RuntimeError(f"the simulator did not start within {READY_TIMEOUT:.0f} s")
        line = process.stdout.readline().decode().strip()
        # The child sends nothing else to stdout, so the pipe can close without blocking it.
        process.stdout.close()
        if not line.startswith(READY_PREFIX):
            raise RuntimeError(
                f"the simulator exited with code {process.wait()} before listening"
                if not line
                else f"unexpected line from the simulator: {line!r}"
            )
        return line.removeprefix(READY_PREFIX)

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdout is not None and not process.stdout.closed:
            process.stdout.close()
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def announce(base_url: str) -> None:
    """Print the ready line :class:`SimulatorProcess` waits for, then detach stdout."""
    print(f"{READY_PREFIX}{base_url}", flush=True)
    # Nobody reads our stdout after this line; a stray print must not block on a full pipe.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
