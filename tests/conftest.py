"""Shared fixtures: a real PostgreSQL (one throwaway database per test) and the simulator."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from options.config import S3Access, Secret, Settings
from options.dev.localdb import start_local_postgres
from options.simulator import RunningSimulator, SimulatorConfig, create_app, start_server
from options.store.db import apply_migrations

FIXTURES_DIR = Path(__file__).resolve().parents[2] / "shared" / "polygon-fixtures"
SIM_KEY = "test-key"
S3_KEY, S3_SECRET = "test-key-id", "test-secret-key"  # the local S3 server's dummy keys


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))


@pytest.fixture(autouse=True)
def outside_the_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own empty directory, so a developer's own ``./.env`` in the
    clone is never read (settings come from what each test passes)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """TEST_DATABASE_URL when set, otherwise a throwaway local cluster (the demo's code path)."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    server = start_local_postgres(tmp_path_factory.mktemp("pg") / "data")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
async def template_database(server_url: str) -> AsyncIterator[str]:
    """A migrated database that each test's database is cloned from."""
    name = f"t_template_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        pool = await asyncpg.create_pool(with_database(server_url, name), min_size=1, max_size=2)
        try:
            await apply_migrations(pool)
        finally:
            await pool.close()
        yield name
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def database_url(server_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh migrated database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template_database}")
        yield with_database(server_url, name)
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A small pool on the test's database."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def simulator() -> Callable[..., AbstractAsyncContextManager[RunningSimulator]]:
    """Start an in-process simulator: ``async with simulator(underlyings=..., ...) as sim``."""

    @asynccontextmanager
    async def start(**config: object) -> AsyncIterator[RunningSimulator]:
        config.setdefault("api_key", SIM_KEY)
        running = await start_server(create_app(SimulatorConfig(**config)))  # type: ignore[arg-type]
        try:
            yield running
        finally:
            await running.close()

    return start


@pytest.fixture
def make_settings(database_url: str) -> Callable[..., Settings]:
    """Settings for a job against ``base_url``, fast to fail: few retries, no rate limit."""

    def make(base_url: str, underlyings: tuple[str, ...], **overrides: object) -> Settings:
        values: dict[str, object] = {
            "database_url": Secret(database_url),
            "api_key": Secret(SIM_KEY),
            "base_url": base_url,
            "underlyings": underlyings,
            "rate_limit": None,
            "http_max_retries": 1,
            "http_timeout": 10.0,
            "db_pool_size": 6,
            "underlying_concurrency": 4,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


def require_fixtures() -> Path:
    """The recorded API responses in ../shared/polygon-fixtures. They are part of the
    development setup (CI always has them): their absence fails the test, never skips it."""
    if not FIXTURES_DIR.is_dir():
        pytest.fail(
            f"recorded API fixtures missing at {FIXTURES_DIR}: the shared folder must sit "
            "beside the project",
            pytrace=False,
        )
    return FIXTURES_DIR


@pytest.fixture
def fixtures_dir() -> Path:
    """:func:`require_fixtures` as a fixture."""
    return require_fixtures()


async def black_out(database_url: str, *, after: float, seconds: float) -> None:
    """After ``after`` s, refuse new connections to the database and end every session on it
    (as a database going away does), for ``seconds`` s."""
    await asyncio.sleep(after)
    name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(with_database(database_url, "postgres"))
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
            await asyncio.sleep(seconds)
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    finally:
        await admin.close()


async def wait_for_value(pool: asyncpg.Pool, query: str, *, interval: float = 0.02) -> object:
    """Poll ``query`` until it returns a true value; return that value."""
    while True:
        value = await pool.fetchval(query)
        if value:
            return value
        await asyncio.sleep(interval)


class DatabaseProxy:
    """A TCP relay in front of the test's PostgreSQL that a test can cut: every connection
    through it is reset and new ones are refused (as a stopped server or a failover does),
    until it is restored on the same port. The shared cluster itself is never touched."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._parts = parts
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        """The database URL through the relay."""
        netloc = self._parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        return urlunsplit(
            (
                self._parts.scheme,
                f"{netloc[0]}@{host}" if len(netloc) == 2 else host,
                self._parts.path,
                self._parts.query,
                "",
            )
        )

    async def start(self) -> None:
        """Listen (on a free port the first time, on the same one after a cut)."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and reset every relayed connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._relays):
            writer.transport.abort()
        self._relays.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._relays |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._relays -= {writer, up_writer}


@pytest.fixture
async def db_proxy(database_url: str) -> AsyncIterator[DatabaseProxy]:
    """A :class:`DatabaseProxy` in front of the test's database, listening."""
    proxy = DatabaseProxy(database_url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.cut()


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A local S3-compatible server (moto), for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_settings(s3_endpoint: str) -> Settings:
    """Settings naming a fresh bucket on the local S3 server, with dummy keys."""
    import pyarrow.fs as pafs

    bucket = f"archive-{uuid.uuid4().hex[:12]}"
    fs = pafs.S3FileSystem(
        access_key=S3_KEY,
        secret_key=S3_SECRET,
        endpoint_override=s3_endpoint.removeprefix("http://"),
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    fs.create_dir(bucket)
    return Settings(
        archive_url=f"s3://{bucket}/history",
        s3=S3Access(
            access_key_id=Secret(S3_KEY),
            secret_access_key=Secret(S3_SECRET),
            endpoint_url=s3_endpoint,
        ),
    )
