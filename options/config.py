"""Settings: one frozen object built from the environment and a ``.env`` file.

This is the only module that reads environment variables. Every variable, its default and its
meaning is listed in ``.env.example`` and the README; an invalid value raises :class:`ConfigError`
naming the variable and the accepted form. An env file holds ``NAME=value`` lines only (what
systemd's ``EnvironmentFile=`` reads); a name nobody reads is a warning in ``Settings.warnings``.
"""

from __future__ import annotations

import difflib
import io
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from options.errors import ConfigError
from options.tickers import validate_underlying

DEFAULT_BASE_URL = "https://api.massive.com"
DEFAULT_ENV_FILE = Path(".env")
NO_ENV_FILE = Path(os.devnull)
"""``env_file=NO_ENV_FILE``: read no file at all, only the environment (a Lambda, the demo's
jobs)."""
CONTRACT_TYPES = ("call", "put")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MIN_LEASE_SECONDS = 2.0  # RUN_LEASE_SECONDS: four heartbeats must fit in it
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_RATE_FORM = "N/s or N/min (for example 100/s, or 5/min on the free plan), or off"
_ARCHIVE_FORM = "an absolute directory (/var/lib/options-history/archive) or s3://BUCKET[/PREFIX]"
_BOOLEANS = {"true": True, "yes": True, "1": True, "on": True}
_BOOLEANS.update({"false": False, "no": False, "0": False, "off": False})
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

SETTING_NAMES = tuple(
    (
        "DATABASE_URL POLYGON_API_KEY MASSIVE_API_KEY POLYGON_BASE_URL UNDERLYINGS CONTRACT_TYPES "
        "MAX_DAYS_TO_EXPIRATION STRIKE_BAND_PERCENT MAX_DEACTIVATION_PERCENT DB_POOL_SIZE "
        "UNDERLYING_CONCURRENCY HTTP_CONCURRENCY POLYGON_RATE_LIMIT HTTP_TIMEOUT "
        "HTTP_MAX_RETRIES MAX_PAGES_PER_QUERY DB_STATEMENT_TIMEOUT DB_LOCK_TIMEOUT "
        "DB_RECONNECT_SECONDS SNAPSHOT_RESUME_WINDOW SNAPSHOT_RETAIN_DAYS "
        "SNAPSHOT_DELETE_UNARCHIVED ARCHIVE_URL ARCHIVE_AFTER_DAYS LOG_LEVEL NOTIFY_COMMAND "
        "AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_REGION AWS_DEFAULT_REGION "
        "AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 COMPUTE_GREEKS GREEKS_RATE GREEKS_DIVIDEND_YIELD "
        "RUN_LEASE_SECONDS ALLOW_INSECURE_ENDPOINTS"
    ).split()
)
"""The project's own variables (``.env.example`` lists each); NOTIFY_COMMAND (and any other
``NOTIFY_*`` name) is the failure hook's; the AWS_* ones are the standard names an S3 archive
(``ARCHIVE_URL=s3://...``) is reached with."""
INSECURE_HINT = "http:// only for a loopback host, or with ALLOW_INSECURE_ENDPOINTS=true"
"""How an endpoint that carries credentials may still be reached over http://: the end of the
one-line error that refuses it (the S3 endpoint here, the OTLP ones in
:mod:`options.ops.telemetry_env`)."""

OTEL_NAMES = frozenset(
    f"OTEL_{name}"
    for name in (
        "SDK_DISABLED SERVICE_NAME RESOURCE_ATTRIBUTES LOG_LEVEL PROPAGATORS CONFIG_FILE "
        "TRACES_EXPORTER METRICS_EXPORTER LOGS_EXPORTER TRACES_SAMPLER TRACES_SAMPLER_ARG "
        "METRIC_EXPORT_INTERVAL METRIC_EXPORT_TIMEOUT METRICS_EXEMPLAR_FILTER "
        "EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE EXPERIMENTAL_RESOURCE_DETECTORS "
        "EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION EXPORTER_ZIPKIN_ENDPOINT "
        "EXPORTER_ZIPKIN_TIMEOUT EXPORTER_PROMETHEUS_HOST EXPORTER_PROMETHEUS_PORT "
        "BSP_SCHEDULE_DELAY BSP_EXPORT_TIMEOUT BSP_MAX_QUEUE_SIZE BSP_MAX_EXPORT_BATCH_SIZE "
        "BLRP_SCHEDULE_DELAY BLRP_EXPORT_TIMEOUT BLRP_MAX_QUEUE_SIZE BLRP_MAX_EXPORT_BATCH_SIZE "
        "ATTRIBUTE_VALUE_LENGTH_LIMIT ATTRIBUTE_COUNT_LIMIT SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT "
        "SPAN_ATTRIBUTE_COUNT_LIMIT SPAN_EVENT_COUNT_LIMIT SPAN_LINK_COUNT_LIMIT "
        "EVENT_ATTRIBUTE_COUNT_LIMIT LINK_ATTRIBUTE_COUNT_LIMIT "
        "LOGRECORD_ATTRIBUTE_VALUE_LENGTH_LIMIT LOGRECORD_ATTRIBUTE_COUNT_LIMIT"
    ).split()
) | frozenset(
    f"OTEL_EXPORTER_OTLP_{signal}{option}"
    for signal in ("", "TRACES_", "METRICS_", "LOGS_")
    for option in (
        "ENDPOINT HEADERS PROTOCOL TIMEOUT COMPRESSION CERTIFICATE CLIENT_CERTIFICATE "
        "CLIENT_KEY INSECURE"
    ).split()
)
"""The OpenTelemetry SDK's standard variables (``OTEL_PYTHON_*`` are known as a family)."""

LIBPQ_NAMES = frozenset(
    f"PG{name}"
    for name in (
        "HOST HOSTADDR PORT DATABASE USER PASSWORD PASSFILE REQUIREAUTH CHANNELBINDING SERVICE "
        "SERVICEFILE OPTIONS APPNAME SSLMODE REQUIRESSL SSLNEGOTIATION SSLCOMPRESSION SSLCERT "
        "SSLKEY SSLCERTMODE SSLROOTCERT SSLCRL SSLCRLDIR SSLSNI REQUIREPEER "
        "SSLMINPROTOCOLVERSION SSLMAXPROTOCOLVERSION MINPROTOCOLVERSION MAXPROTOCOLVERSION "
        "GSSENCMODE KRBSRVNAME GSSLIB GSSDELEGATION CONNECT_TIMEOUT CLIENTENCODING "
        "TARGETSESSIONATTRS LOADBALANCEHOSTS DATESTYLE TZ GEQO SYSCONFDIR LOCALEDIR"
    ).split()
)
"""libpq's environment variables (PostgreSQL docs, "Environment Variables"); asyncpg reads
several of them (PGPASSWORD, PGSSLMODE, ...)."""

KNOWN_NAMES = frozenset(SETTING_NAMES) | OTEL_NAMES | LIBPQ_NAMES
"""Every name an env file may hold without a warning."""
# NOTIFY_*: the failure hook hands these to NOTIFY_COMMAND (a webhook's address, a recipient).
_KNOWN_PREFIXES = ("OTEL_PYTHON_", "NOTIFY_")
# Read from the process environment by libraries, not by Settings: only systemd's
# EnvironmentFile= puts an env file's values there.
_PASSTHROUGH_PREFIXES = ("PG", "OTEL_")


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        """Return the secret value, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, kw_only=True)
class S3Access:
    """How an S3 archive is reached: the standard AWS variables, read once like every setting.

    Keys left unset leave pyarrow to the AWS SDK's own chain (``~/.aws/credentials``, the
    instance's role). pyarrow does not read ``AWS_ENDPOINT_URL`` itself, so the endpoint of an
    S3-compatible store (MinIO, Ceph, R2, a test server) is passed on from here.
    """

    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    session_token: Secret | None = None
    region: str | None = None
    endpoint_url: str | None = None
    """``http(s)://HOST[:PORT]``: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the jobs may be told, validated once."""

    database_url: Secret | None = None
    api_key: Secret | None = None
    base_url: str = DEFAULT_BASE_URL
    underlyings: tuple[str, ...] = ()
    contract_types: tuple[str, ...] | None = None
    max_days_to_expiration: int | None = None
    strike_band_percent: float | None = None
    db_pool_size: int = 10
    underlying_concurrency: int = 8
    http_concurrency: int = 16
    rate_limit: tuple[float, float] | None = (100.0, 1.0)
    http_timeout: float = 30.0
    http_max_retries: int = 6
    max_pages: int = 10_000
    snapshot_retain_days: int | None = None
    delete_unarchived: bool = False
    """``SNAPSHOT_DELETE_UNARCHIVED``: retention may drop days that are not archived (the only
    way anything leaves PostgreSQL without an archive)."""
    archive_url: str | None = None
    """Where old days go as Parquet: an absolute directory or ``s3://BUCKET[/PREFIX]``."""
    archive_after_days: int = 30
    """Days of snapshots kept in PostgreSQL when there is an archive; older days are archived."""
    s3: S3Access = field(default_factory=S3Access)
    allow_insecure_endpoints: bool = False
    """``ALLOW_INSECURE_ENDPOINTS``: the S3 endpoint, and OTLP endpoints with headers, may be
    ``http://`` to a host other than loopback (credentials in cleartext: a trusted network
    only). ``POLYGON_BASE_URL`` is never relaxed."""
    compute_greeks: bool = True
    """``COMPUTE_GREEKS``: ``ingest_admin greeks`` (run right after each snapshot run) and
    ``ingest_daily`` compute IV and greeks for the rows the API left without them
    (``computed_greeks``)."""
    greeks_rate: float = 0.04
    """``GREEKS_RATE``: the continuous risk-free rate of the computed greeks (0.04 is 4%)."""
    greeks_dividend_yield: float = 0.0
    """``GREEKS_DIVIDEND_YIELD``: the continuous dividend yield of the computed greeks."""
    snapshot_resume_window: float = 120.0
    max_deactivation_percent: float = 20.0
    db_statement_timeout: float = 300.0
    db_lock_timeout: float = 30.0
    db_reconnect_seconds: float = 60.0
    run_lease_seconds: float = 60.0
    """``RUN_LEASE_SECONDS``: a run whose heartbeat is older than this is dead, and another
    copy takes it over; the run renews it four times within it (every 5 s at most)."""
    log_level: str = "INFO"
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """One line per doubtful line of the env file (a name the project does not know, a name
    set twice): for the CLI to log once logging is set up."""
    passthrough: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)
    """The env file's PG* and OTEL_* values that the environment does not set: libraries
    (libpq's PGPASSWORD in asyncpg, the OpenTelemetry SDK) read those from the process
    environment, where only systemd's EnvironmentFile= puts them; a caller may export them."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, env_file: Path | None = None) -> Settings:
        """Build settings from ``environ`` over the values of a ``.env`` file.

        Variables set in the environment win over the file, as systemd's ``EnvironmentFile=``
        and a shell's exported variables do.

        Args:
            environ: the process environment (``os.environ`` from the CLI).
            env_file: the ``.env`` to read; ``None`` reads ``./.env`` if it exists. A file named
                explicitly must exist.

        Returns:
            The settings; their ``warnings`` name what in the file looks wrong without being
            an error (a name the project does not know, with the closest known one).

        Raises:
            ConfigError: a variable or a line of the file is invalid (an ``export NAME=value``
                line among them: systemd's ``EnvironmentFile=`` ignores those).
        """
        if env_file is None:
            found = DEFAULT_ENV_FILE.is_file()
            parsed = _parse_env_file(DEFAULT_ENV_FILE) if found else _ParsedEnvFile({}, ())
        else:
            parsed = _parse_env_file(env_file)
        merged = {**parsed.values, **{k: v for k, v in environ.items()}}
        passthrough = tuple(
            (name, value)
            for name, value in parsed.values.items()
            if name.startswith(_PASSTHROUGH_PREFIXES)
            and is_known_name(name)
            and name not in environ
        )
        return cls._from_mapping(merged, warnings=parsed.warnings, passthrough=passthrough)

    @classmethod
    def _from_mapping(
        cls,
        env: Mapping[str, str],
        *,
        warnings: tuple[str, ...] = (),
        passthrough: tuple[tuple[str, str], ...] = (),
    ) -> Settings:
        def get(name: str) -> str | None:
            value = env.get(name)
            if value is None or value.strip() == "":
                return None
            return value.strip()

        api_key = get("POLYGON_API_KEY") or get("MASSIVE_API_KEY")
        archive_url = _parse_archive_url(get("ARCHIVE_URL"))
        delete_unarchived = _parse_bool(
            "SNAPSHOT_DELETE_UNARCHIVED", get("SNAPSHOT_DELETE_UNARCHIVED"), False
        )
        allow_insecure = _parse_bool(
            "ALLOW_INSECURE_ENDPOINTS", get("ALLOW_INSECURE_ENDPOINTS"), False
        )
        if delete_unarchived and archive_url is not None:
            raise ConfigError(
                "SNAPSHOT_DELETE_UNARCHIVED deletes old days without archiving them, and "
                "ARCHIVE_URL archives them before they leave PostgreSQL: set one of the two",
                variable="SNAPSHOT_DELETE_UNARCHIVED",
            )
        return cls(
            database_url=_parse_database_url(get("DATABASE_URL")),
            api_key=Secret(api_key) if api_key else None,
            base_url=_parse_base_url(get("POLYGON_BASE_URL")),
            underlyings=parse_underlyings(get("UNDERLYINGS") or "", variable="UNDERLYINGS"),
            contract_types=_parse_contract_types(get("CONTRACT_TYPES")),
            max_days_to_expiration=_parse_int(
                "MAX_DAYS_TO_EXPIRATION", get("MAX_DAYS_TO_EXPIRATION"), None, minimum=0
            ),
            strike_band_percent=_parse_float(
                "STRIKE_BAND_PERCENT", get("STRIKE_BAND_PERCENT"), None, minimum=0.0
            ),
            db_pool_size=_parse_int("DB_POOL_SIZE", get("DB_POOL_SIZE"), 10, minimum=3, maximum=90),
            underlying_concurrency=_parse_int(
                "UNDERLYING_CONCURRENCY", get("UNDERLYING_CONCURRENCY"), 8, minimum=1, maximum=256
            ),
            http_concurrency=_parse_int(
                "HTTP_CONCURRENCY", get("HTTP_CONCURRENCY"), 16, minimum=1, maximum=256
            ),
            rate_limit=_parse_rate_limit(get("POLYGON_RATE_LIMIT")),
            http_timeout=_parse_float("HTTP_TIMEOUT", get("HTTP_TIMEOUT"), 30.0, minimum=0.1),
            http_max_retries=_parse_int(
                "HTTP_MAX_RETRIES", get("HTTP_MAX_RETRIES"), 6, minimum=0, maximum=20
            ),
            max_pages=_parse_int(
                "MAX_PAGES_PER_QUERY", get("MAX_PAGES_PER_QUERY"), 10_000, minimum=1
            ),
            snapshot_retain_days=_parse_int(
                "SNAPSHOT_RETAIN_DAYS", get("SNAPSHOT_RETAIN_DAYS"), None, minimum=1
            ),
            delete_unarchived=delete_unarchived,
            archive_url=archive_url,
            archive_after_days=_parse_int(
                "ARCHIVE_AFTER_DAYS", get("ARCHIVE_AFTER_DAYS"), 30, minimum=1
            ),
            s3=_parse_s3_access(get, allow_insecure=allow_insecure)
            if archive_url and archive_url.startswith("s3://")
            else S3Access(),
            allow_insecure_endpoints=allow_insecure,
            compute_greeks=_parse_bool("COMPUTE_GREEKS", get("COMPUTE_GREEKS"), True),
            greeks_rate=_parse_float(
                "GREEKS_RATE", get("GREEKS_RATE"), 0.04, minimum=-0.1, maximum=1.0
            ),
            greeks_dividend_yield=_parse_float(
                "GREEKS_DIVIDEND_YIELD", get("GREEKS_DIVIDEND_YIELD"), 0.0, minimum=0.0, maximum=1.0
            ),
            snapshot_resume_window=_parse_seconds(
                "SNAPSHOT_RESUME_WINDOW", get("SNAPSHOT_RESUME_WINDOW"), 120.0, allow_zero=True
            ),
            max_deactivation_percent=_parse_float(
                "MAX_DEACTIVATION_PERCENT",
                get("MAX_DEACTIVATION_PERCENT"),
                20.0,
                minimum=0.0,
                maximum=100.0,
            ),
            db_statement_timeout=_parse_seconds(
                "DB_STATEMENT_TIMEOUT", get("DB_STATEMENT_TIMEOUT"), 300.0
            ),
            db_lock_timeout=_parse_seconds("DB_LOCK_TIMEOUT", get("DB_LOCK_TIMEOUT"), 30.0),
            db_reconnect_seconds=_parse_seconds(
                "DB_RECONNECT_SECONDS", get("DB_RECONNECT_SECONDS"), 60.0, allow_zero=True
            ),
            run_lease_seconds=_parse_lease(get("RUN_LEASE_SECONDS")),
            log_level=_parse_choice("LOG_LEVEL", (get("LOG_LEVEL") or "INFO").upper(), LOG_LEVELS),
            warnings=warnings,
            passthrough=passthrough,
        )

    def require_database_url(self) -> str:
        """Return the database URL, or raise ConfigError when it is not set."""
        if self.database_url is None:
            raise ConfigError(
                "DATABASE_URL is not set: expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME "
                "(or run `make demo` for a local database)",
                variable="DATABASE_URL",
            )
        return self.database_url.get()

    def require_api_key(self) -> str:
        """Return the API key, or raise ConfigError when it is not set."""
        if self.api_key is None:
            raise ConfigError(
                "POLYGON_API_KEY is not set: expected the API key of your Polygon/Massive account "
                "(MASSIVE_API_KEY is accepted too)",
                variable="POLYGON_API_KEY",
            )
        return self.api_key.get()

    def require_underlyings(self) -> tuple[str, ...]:
        """Return the underlyings to sync, or raise ConfigError when there are none."""
        if not self.underlyings:
            raise ConfigError(
                "no underlyings to sync: set UNDERLYINGS (comma-separated, e.g. AAPL,SPY,I:SPX) "
                "or pass --underlying/-u TICKER",
                variable="UNDERLYINGS",
            )
        return self.underlyings

    def database_location(self) -> str:
        """Return the database URL without user or password, for log lines."""
        if self.database_url is None:
            return "(not set)"
        return redact_url(self.database_url.get())


def read_env_file(path: Path) -> dict[str, str]:
    """Read a ``.env`` file, refusing lines python-dotenv cannot parse and ``export`` lines.

    Raises:
        ConfigError: the file is missing or unreadable, or a line is malformed (the message
            names the file and the line number, never the line's value, which may hold a key).
    """
    return _parse_env_file(path).values


def is_known_name(name: str) -> bool:
    """Whether ``name`` is a variable the project, its failure hook, libpq or OpenTelemetry
    reads."""
    return name in KNOWN_NAMES or name.startswith(_KNOWN_PREFIXES)


@dataclass(frozen=True)
class _ParsedEnvFile:
    values: dict[str, str]
    warnings: tuple[str, ...]


def _parse_env_file(path: Path) -> _ParsedEnvFile:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"env file {path} does not exist: pass an existing file to --env-file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"env file {path} cannot be read ({type(exc).__name__}): expected a UTF-8 text file"
        ) from None
    warnings: list[str] = []
    first_line: dict[str, int] = {}
    for binding in parse_stream(io.StringIO(text)):
        # the binding's text starts with the blank lines before it
        source = binding.original.string
        content = source.lstrip()
        line = binding.original.line + source[: len(source) - len(content)].count("\n")
        where = f"env file {path} line {line}"
        if binding.error:
            raise ConfigError(
                f"{where} cannot be parsed: expected "
                "NAME=value (quote values with spaces; comments start with #)"
            )
        name = binding.key
        if name is None:
            continue  # a comment or a blank line
        if re.match(r"export\s", content):
            raise ConfigError(
                f"{where} starts with `export`: systemd's EnvironmentFile= ignores such lines "
                f"(the job would run without {name}); expected {name}=value"
            )
        if binding.value is None:
            raise ConfigError(
                f"{where} names {name} without a value: expected {name}=value "
                f"({name}= for an empty one)"
            )
        if name in first_line:
            warnings.append(
                f"{where}: {name} is set again (first on line {first_line[name]}); "
                "the last one counts"
            )
        else:
            first_line[name] = line
        if not is_known_name(name):
            warnings.append(f"{where}: {_unknown_name(name)}")
    values = dotenv_values(stream=io.StringIO(text), interpolate=True)
    return _ParsedEnvFile({k: v for k, v in values.items() if v is not None}, tuple(warnings))


def _unknown_name(name: str) -> str:
    """Say that ``name`` is read by nothing, and which known name it may be a typo of."""
    message = f"{name} is not a variable options-history knows; it is ignored"
    if name.upper() in KNOWN_NAMES:
        return f"{message} (names are case-sensitive: {name.upper()})"
    candidates = SETTING_NAMES if not name.upper().startswith(("PG", "OTEL_")) else KNOWN_NAMES
    close = difflib.get_close_matches(name.upper(), candidates, n=1, cutoff=0.75)
    if not close and candidates is SETTING_NAMES:
        close = difflib.get_close_matches(name.upper(), KNOWN_NAMES, n=1, cutoff=0.85)
    return f"{message} (did you mean {close[0]}?)" if close else message


def parse_underlyings(raw: str, *, variable: str) -> tuple[str, ...]:
    """Split a comma-separated list of underlyings, validate each, drop duplicates.

    Raises:
        ConfigError: naming ``variable`` and the accepted ticker form.
    """
    tickers: list[str] = []
    for part in raw.split(","):
        if not part.strip():
            continue
        try:
            tickers.append(validate_underlying(part))
        except ConfigError as exc:
            raise ConfigError(f"{variable}: {exc}", variable=variable) from None
    unique = tuple(dict.fromkeys(tickers))
    _check_one_per_underlying(unique, variable=variable)
    return unique


def parse_cli_underlyings(tickers: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate the CLI's ``--underlying`` tickers (a one-off list, never tracked).

    Raises:
        ConfigError: a ticker of the wrong form, or an index and a stock of one name.
    """
    validated = tuple(dict.fromkeys(validate_underlying(t) for t in tickers))
    _check_one_per_underlying(validated, variable="--underlying")
    return validated


def _check_one_per_underlying(tickers: tuple[str, ...], *, variable: str) -> None:
    """Refuse ``SPX`` with ``I:SPX``: index options are listed under ``SPX``, so both would
    read and write the same contracts."""
    seen: dict[str, str] = {}
    for ticker in tickers:
        key = ticker.removeprefix("I:")
        if key in seen:
            raise ConfigError(
                f"{variable} names both {seen[key]} and {ticker}, one underlying (its options "
                f"are listed under {key}): keep I:{key} for the index or {key} for the stock",
                variable=variable,
            )
        seen[key] = ticker


def parse_duration(raw: str, *, name: str = "--deadline") -> float:
    """Parse a duration such as ``540s``, ``9m``, ``1h30m`` or ``90`` (seconds) into seconds.

    Raises:
        ConfigError: naming ``name`` and the accepted form.
    """
    text = raw.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        seconds = float(text)
    else:
        match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
        if not match or not any(match.groups()):
            seconds = 0.0
        else:
            hours, minutes, secs = (int(g or 0) for g in match.groups())
            seconds = float(hours * 3600 + minutes * 60 + secs)
    if seconds <= 0:
        raise ConfigError(
            f"{name} {raw!r} is invalid: expected a duration such as 540s, 9m, 1h30m or 90",
            variable=name,
        )
    return seconds


def redact_url(url: str) -> str:
    """Return ``url`` with any user and password removed."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _parse_database_url(raw: str | None) -> Secret | None:
    return None if raw is None else parse_database_url(raw)


def parse_database_url(raw: str, *, name: str = "DATABASE_URL") -> Secret:
    """Check a PostgreSQL URL (``DATABASE_URL``, or an option ``name``) and keep it secret.

    Raises:
        ConfigError: naming ``name`` and the accepted form.
    """
    parts = urlsplit(raw)
    if parts.scheme not in ("postgresql", "postgres") or not (parts.hostname or parts.query):
        raise ConfigError(
            f"{name} is invalid: expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME",
            variable=name,
        )
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(
            f"{name} has an invalid port: expected postgresql://USER@HOST:PORT/DBNAME",
            variable=name,
        ) from None
    return Secret(raw)


def _parse_base_url(raw: str | None) -> str:
    if raw is None:
        return DEFAULT_BASE_URL
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"POLYGON_BASE_URL={redact_url(raw)!r} is invalid: expected http(s)://HOST[:PORT]",
            variable="POLYGON_BASE_URL",
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(
            "POLYGON_BASE_URL must not carry credentials, a query or a fragment: "
            "expected http(s)://HOST[:PORT] (the key goes in POLYGON_API_KEY)",
            variable="POLYGON_BASE_URL",
        )
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ConfigError(
            f"POLYGON_BASE_URL={redact_url(raw)!r} would send the API key in cleartext: "
            "expected https://HOST[:PORT] (http:// only for a loopback host such as the "
            "simulator on 127.0.0.1)",
            variable="POLYGON_BASE_URL",
        )
    return raw.rstrip("/")


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a URL's host name) is ``localhost`` or a loopback address: the one
    place ``http://`` cannot be read on the way."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_archive_url(raw: str | None) -> str | None:
    """``ARCHIVE_URL``, normalized: ``s3://BUCKET[/PREFIX]`` or an absolute directory, no
    trailing slash."""
    if raw is None:
        return None
    parts = urlsplit(raw)
    if parts.scheme == "s3":
        if "@" in parts.netloc:
            # never echo the value: it holds a key
            raise ConfigError(
                "ARCHIVE_URL must not carry credentials: expected s3://BUCKET[/PREFIX] (the keys "
                "go in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
                variable="ARCHIVE_URL",
            )
        if parts.query or parts.fragment:
            raise ConfigError(
                f"ARCHIVE_URL={raw!r} must not carry a query: expected s3://BUCKET[/PREFIX] (the "
                "endpoint goes in AWS_ENDPOINT_URL, the region in AWS_REGION)",
                variable="ARCHIVE_URL",
            )
        if not _S3_BUCKET.fullmatch(parts.netloc):
            raise ConfigError(
                f"ARCHIVE_URL={raw!r} names no valid bucket: expected s3://BUCKET[/PREFIX], "
                "BUCKET in lower case letters, digits, dots and hyphens",
                variable="ARCHIVE_URL",
            )
        prefix = "/".join(part for part in parts.path.split("/") if part)
        return f"s3://{parts.netloc}/{prefix}" if prefix else f"s3://{parts.netloc}"
    if parts.scheme == "file" and not parts.netloc and not parts.query:
        path = parts.path
    elif parts.scheme:
        raise ConfigError(
            f"ARCHIVE_URL={raw!r} is not supported: expected {_ARCHIVE_FORM}",
            variable="ARCHIVE_URL",
        )
    else:
        path = raw
    if not path.startswith("/"):
        raise ConfigError(
            f"ARCHIVE_URL={raw!r} is a relative path: expected {_ARCHIVE_FORM} (every run, "
            "whatever its working directory, must find the same archive)",
            variable="ARCHIVE_URL",
        )
    return os.path.normpath(path)


def _parse_s3_access(get: Callable[[str], str | None], *, allow_insecure: bool) -> S3Access:
    key_id, secret = get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")
    if (key_id is None) != (secret is None):
        given, missing = (
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
            if secret is None
            else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        )
        raise ConfigError(
            f"{given} is set without {missing}: expected both (or neither, for the AWS SDK's "
            "own credentials: ~/.aws/credentials, the instance's role)",
            variable=missing,
        )
    token = get("AWS_SESSION_TOKEN")
    endpoint_name = "AWS_ENDPOINT_URL_S3" if get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
    endpoint = get(endpoint_name)
    if endpoint is not None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{endpoint_name}={redact_url(endpoint)!r} is invalid: expected "
                "http(s)://HOST[:PORT] of an S3-compatible store",
                variable=endpoint_name,
            )
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ConfigError(
                f"{endpoint_name} must not carry credentials, a query or a fragment: expected "
                "http(s)://HOST[:PORT] (the keys go in AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY)",
                variable=endpoint_name,
            )
        # Always, not only with keys set: without them the SDK's own chain signs the requests,
        # and a session token travels in a header; the archive's rows travel too.
        if parts.scheme == "http" and not allow_insecure and not is_loopback_host(parts.hostname):
            raise ConfigError(
                f"{endpoint_name}={redact_url(endpoint)!r} would send the S3 credentials in "
                f"cleartext: expected https://HOST[:PORT] ({INSECURE_HINT})",
                variable=endpoint_name,
            )
        endpoint = endpoint.rstrip("/")
    return S3Access(
        access_key_id=Secret(key_id) if key_id else None,
        secret_access_key=Secret(secret) if secret else None,
        session_token=Secret(token) if token else None,
        region=get("AWS_REGION") or get("AWS_DEFAULT_REGION"),
        endpoint_url=endpoint,
    )


def _parse_bool(name: str, raw: str | None, default: bool) -> bool:
    if raw is None:
        return default
    value = _BOOLEANS.get(raw.lower())
    if value is None:
        raise ConfigError(
            f"{name}={raw!r} is invalid: expected true or false (yes/no, 1/0, on/off)",
            variable=name,
        )
    return value


def _parse_contract_types(raw: str | None) -> tuple[str, ...] | None:
    if raw is None:
        return None
    types = tuple(dict.fromkeys(t.strip().lower() for t in raw.split(",") if t.strip()))
    if not types or any(t not in CONTRACT_TYPES for t in types):
        raise ConfigError(
            f"CONTRACT_TYPES={raw!r} is invalid: expected call, put or call,put",
            variable="CONTRACT_TYPES",
        )
    return None if set(types) == set(CONTRACT_TYPES) else types


def _parse_int(
    name: str, raw: str | None, default: int | None, *, minimum: int, maximum: int | None = None
) -> int:
    if raw is None:
        return default  # type: ignore[return-value]
    accepted = f"a whole number >= {minimum}" + (f" and <= {maximum}" if maximum else "")
    if not re.fullmatch(r"[+-]?\d+", raw):
        raise ConfigError(f"{name}={raw!r} is invalid: expected {accepted}", variable=name)
    value = int(raw)
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"{name}={raw!r} is out of range: expected {accepted}", variable=name)
    return value


def _parse_float(
    name: str,
    raw: str | None,
    default: float | None,
    *,
    minimum: float,
    maximum: float | None = None,
) -> float:
    if raw is None:
        return default  # type: ignore[return-value]
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
        accepted = f"a number >= {minimum:g}" + (f" and <= {maximum:g}" if maximum else "")
        raise ConfigError(f"{name}={raw!r} is invalid: expected {accepted}", variable=name)
    return value


def _parse_seconds(
    name: str, raw: str | None, default: float, *, allow_zero: bool = False
) -> float:
    if raw is None:
        return default
    if allow_zero and raw.strip() in ("0", "off"):
        return 0.0
    return parse_duration(raw, name=name)


def _parse_lease(raw: str | None) -> float:
    seconds = _parse_seconds("RUN_LEASE_SECONDS", raw, 60.0)
    if seconds < MIN_LEASE_SECONDS:
        raise ConfigError(
            f"RUN_LEASE_SECONDS={raw!r} is too short: expected a duration of at least "
            f"{MIN_LEASE_SECONDS:g}s (default 60s)",
            variable="RUN_LEASE_SECONDS",
        )
    return seconds


def _parse_rate_limit(raw: str | None) -> tuple[float, float] | None:
    if raw is None:
        return (100.0, 1.0)
    if raw.lower() in ("off", "none", "unlimited"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*/\s*([a-z]+)", raw.lower())
    if not match or match.group(2) not in _RATE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(
            f"POLYGON_RATE_LIMIT={raw!r} is invalid: expected {_RATE_FORM}",
            variable="POLYGON_RATE_LIMIT",
        )
    return (float(match.group(1)), _RATE_UNITS[match.group(2)])


def _parse_choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    if raw not in choices:
        raise ConfigError(
            f"{name}={raw!r} is invalid: expected one of {', '.join(choices)}", variable=name
        )
    return raw
