"""Settings, .env files, ticker validation and the CLI's one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from options.config import (
    NO_ENV_FILE,
    S3Access,
    Secret,
    Settings,
    parse_cli_underlyings,
    read_env_file,
)
from options.errors import ConfigError, ExitCode
from options.tickers import validate_option_ticker, validate_underlying

BIN = Path(sys.executable).parent


def test_defaults_sync_everything() -> None:
    """With nothing set, no filter is on and the limits are the documented defaults."""
    settings = Settings.from_env({}, env_file=None)
    assert settings.contract_types is None
    assert settings.max_days_to_expiration is None
    assert settings.strike_band_percent is None
    assert settings.base_url == "https://api.massive.com"
    assert settings.db_pool_size == 10
    assert settings.rate_limit == (100.0, 1.0)


def test_values_are_parsed() -> None:
    """Every variable is read, normalized and typed."""
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u:pw@db.example:5433/opts",
            "MASSIVE_API_KEY": "k1",
            "POLYGON_BASE_URL": "http://127.0.0.1:8080/",
            "UNDERLYINGS": "aapl, BRK.B,I:SPX,AAPL",
            "CONTRACT_TYPES": "put",
            "MAX_DAYS_TO_EXPIRATION": "45",
            "STRIKE_BAND_PERCENT": "12.5",
            "POLYGON_RATE_LIMIT": "5/min",
            "DB_POOL_SIZE": "20",
            "LOG_LEVEL": "debug",
        },
        env_file=None,
    )
    assert settings.underlyings == ("AAPL", "BRK.B", "I:SPX")
    assert settings.api_key == Secret("k1")
    assert settings.base_url == "http://127.0.0.1:8080"
    assert settings.contract_types == ("put",)
    assert settings.max_days_to_expiration == 45
    assert settings.strike_band_percent == 12.5
    assert settings.rate_limit == (5.0, 60.0)
    assert settings.db_pool_size == 20
    assert settings.log_level == "DEBUG"
    assert settings.database_location() == "postgresql://db.example:5433/opts"


def test_polygon_key_wins_over_massive_key() -> None:
    """POLYGON_API_KEY is used when both names are set."""
    settings = Settings.from_env({"POLYGON_API_KEY": "p", "MASSIVE_API_KEY": "m"}, env_file=None)
    assert settings.require_api_key() == "p"


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("DATABASE_URL", "mysql://x/y", "postgresql://"),
        ("DATABASE_URL", "postgresql://h:notaport/db", "PORT"),
        ("POLYGON_BASE_URL", "ftp://x", "http(s)://"),
        ("POLYGON_BASE_URL", "https://api.massive.com/?apiKey=1", "credentials"),
        ("UNDERLYINGS", "AAPL,../x", "BRK.B"),
        ("CONTRACT_TYPES", "calls", "call, put"),
        ("MAX_DAYS_TO_EXPIRATION", "-1", "whole number"),
        ("MAX_DAYS_TO_EXPIRATION", "ten", "whole number"),
        ("STRIKE_BAND_PERCENT", "nan", "number >= 0"),
        ("DB_POOL_SIZE", "300", "<= 90"),
        ("HTTP_TIMEOUT", "0", "number >= 0.1"),
        ("POLYGON_RATE_LIMIT", "5/hour", "N/s or N/min"),
        ("LOG_LEVEL", "loud", "DEBUG"),
        ("ARCHIVE_URL", "archive/here", "absolute directory"),
        ("ARCHIVE_URL", "gs://bucket/x", "s3://BUCKET[/PREFIX]"),
        ("ARCHIVE_URL", "s3://Bad_Bucket/x", "s3://BUCKET[/PREFIX]"),
        ("ARCHIVE_URL", "s3://bucket/x?endpoint_override=h", "AWS_ENDPOINT_URL"),
        ("ARCHIVE_AFTER_DAYS", "0", "whole number >= 1"),
        ("SNAPSHOT_DELETE_UNARCHIVED", "sure", "true or false"),
    ],
    ids=lambda v: v if len(str(v)) < 20 else None,
)
def test_invalid_value_names_variable_and_form(variable: str, value: str, accepted: str) -> None:
    """An invalid value raises ConfigError naming the variable and the accepted form."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: value}, env_file=None)
    message = str(caught.value)
    assert variable in message
    assert accepted in message
    assert "\n" not in message
    assert caught.value.exit_code == ExitCode.USAGE


def test_secrets_never_show() -> None:
    """Neither the API key nor the database password appears in repr or str of the settings."""
    settings = Settings.from_env(
        {"POLYGON_API_KEY": "sekret-key", "DATABASE_URL": "postgresql://u:hunter2@h/db"},
        env_file=None,
    )
    for text in (repr(settings), str(settings), settings.database_location()):
        assert "sekret-key" not in text
        assert "hunter2" not in text


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("/var/lib/options/archive/", "/var/lib/options/archive"),
        ("file:///var/lib/options/archive", "/var/lib/options/archive"),
        ("s3://my-bucket", "s3://my-bucket"),
        ("s3://my-bucket//history/options/", "s3://my-bucket/history/options"),
    ],
)
def test_archive_url_is_normalized(raw: str, normalized: str) -> None:
    """ARCHIVE_URL is an absolute directory or s3://BUCKET[/PREFIX], kept without a trailing
    slash; ARCHIVE_AFTER_DAYS defaults to 30 and deleting unarchived days is off."""
    settings = Settings.from_env({"ARCHIVE_URL": raw}, env_file=None)
    assert settings.archive_url == normalized
    assert (settings.archive_after_days, settings.delete_unarchived) == (30, False)


def test_s3_access_comes_from_the_aws_variables() -> None:
    """For an s3:// archive the standard AWS variables are read, keys kept secret;
    AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL, AWS_REGION over AWS_DEFAULT_REGION."""
    aws = {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-secret",
        "AWS_SESSION_TOKEN": "token-secret",
        "AWS_REGION": "eu-west-3",
        "AWS_DEFAULT_REGION": "us-west-2",
        "AWS_ENDPOINT_URL": "https://s3.example.com",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000/",
    }
    settings = Settings.from_env({"ARCHIVE_URL": "s3://bucket/x", **aws}, env_file=None)
    assert settings.s3 == S3Access(
        access_key_id=Secret("AKIDEXAMPLE"),
        secret_access_key=Secret("wJalrXUtnFEMI-secret"),
        session_token=Secret("token-secret"),
        region="eu-west-3",
        endpoint_url="http://127.0.0.1:9000",
    )
    for value in ("AKIDEXAMPLE", "wJalrXUtnFEMI-secret", "token-secret"):
        assert value not in repr(settings)
    local = Settings.from_env({"ARCHIVE_URL": "/srv/archive", **aws}, env_file=None)
    assert local.s3 == S3Access()


@pytest.mark.parametrize(
    ("env", "variable", "hint"),
    [
        ({"AWS_ACCESS_KEY_ID": "AKID"}, "AWS_SECRET_ACCESS_KEY", "expected both"),
        ({"AWS_ENDPOINT_URL": "minio:9000"}, "AWS_ENDPOINT_URL", "http(s)://HOST[:PORT]"),
        ({"AWS_ENDPOINT_URL_S3": "https://k:s3cret@h"}, "AWS_ENDPOINT_URL_S3", "credentials"),
        ({"SNAPSHOT_DELETE_UNARCHIVED": "true"}, "SNAPSHOT_DELETE_UNARCHIVED", "one of the two"),
    ],
    ids=["key-without-secret", "endpoint-without-scheme", "endpoint-with-keys", "delete-too"],
)
def test_s3_archive_settings_are_checked(env: dict[str, str], variable: str, hint: str) -> None:
    """An S3 archive's AWS variables are checked together, and deleting unarchived days does
    not go with an archive; no message shows a secret."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"ARCHIVE_URL": "s3://bucket", **env}, env_file=None)
    assert caught.value.variable == variable
    assert hint in str(caught.value)
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("https://minio.example.com:9000", True),
        ("http://127.0.0.1:9000", True),
        ("http://localhost:9000", True),
        ("http://[::1]:9000", True),
        ("http://minio.example.com:9000", False),
        ("http://10.0.0.5:9000", False),
    ],
    ids=["https", "loopback-v4", "localhost", "loopback-v6", "cleartext-host", "cleartext-lan"],
)
def test_cleartext_s3_endpoint_only_for_loopback(variable: str, url: str, accepted: bool) -> None:
    """The S3 keys (or the session token the SDK's own chain finds) never travel in cleartext:
    http:// to a non-loopback host is one line naming the variable and what is accepted."""
    env = {"ARCHIVE_URL": "s3://bucket/x", variable: url}
    if accepted:
        assert Settings.from_env(env, env_file=None).s3.endpoint_url == url
        return
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env, env_file=None)
    message = str(caught.value)
    assert caught.value.variable == variable
    assert caught.value.exit_code == 2
    assert message.startswith(f"{variable}='{url}' would send the S3 credentials in cleartext")
    assert "expected https://HOST[:PORT]" in message
    assert "ALLOW_INSECURE_ENDPOINTS=true" in message
    assert "\n" not in message


@pytest.mark.parametrize("allow", ["true", "false", ""], ids=["true", "false", "empty"])
def test_allow_insecure_endpoints_lets_cleartext_s3_through_only_when_true(allow: str) -> None:
    """ALLOW_INSECURE_ENDPOINTS=true (say it explicitly) accepts http:// to any S3 host;
    false or unset keeps the refusal; the setting defaults to false."""
    env = {
        "ARCHIVE_URL": "s3://bucket",
        "AWS_ENDPOINT_URL": "http://minio.lan:9000",
        "ALLOW_INSECURE_ENDPOINTS": allow,
    }
    if allow == "true":
        settings = Settings.from_env(env, env_file=None)
        assert settings.allow_insecure_endpoints is True
        assert settings.s3.endpoint_url == "http://minio.lan:9000"
        return
    with pytest.raises(ConfigError, match="AWS_ENDPOINT_URL="):
        Settings.from_env(env, env_file=None)
    assert Settings.from_env({}, env_file=None).allow_insecure_endpoints is False


def test_allow_insecure_endpoints_does_not_relax_the_api_url() -> None:
    """The API key still goes only over https (or to a loopback simulator)."""
    with pytest.raises(ConfigError, match="POLYGON_BASE_URL="):
        Settings.from_env(
            {"POLYGON_BASE_URL": "http://api.massive.com", "ALLOW_INSECURE_ENDPOINTS": "true"},
            env_file=None,
        )


def test_allow_insecure_endpoints_must_be_a_boolean() -> None:
    """A value other than true/false is one line naming the variable."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"ALLOW_INSECURE_ENDPOINTS": "sometimes"}, env_file=None)
    assert caught.value.variable == "ALLOW_INSECURE_ENDPOINTS"
    assert "expected true or false" in str(caught.value)


def test_archive_url_with_keys_is_refused_without_showing_them() -> None:
    """Keys in ARCHIVE_URL are refused, and the message does not repeat them."""
    with pytest.raises(ConfigError, match="must not carry credentials") as caught:
        Settings.from_env({"ARCHIVE_URL": "s3://AKID:s3cret@bucket/x"}, env_file=None)
    assert "s3cret" not in str(caught.value)


def test_env_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    """Values come from the .env file, and the process environment overrides them."""
    env = tmp_path / "job.env"
    env.write_text("# settings\nUNDERLYINGS=AAPL,SPY\nDB_POOL_SIZE='12'\nLOG_LEVEL=INFO\n")
    settings = Settings.from_env({"LOG_LEVEL": "ERROR"}, env_file=env)
    assert settings.underlyings == ("AAPL", "SPY")
    assert settings.db_pool_size == 12
    assert settings.log_level == "ERROR"


def test_broken_env_file_names_the_line(tmp_path: Path) -> None:
    """A line python-dotenv cannot parse is an error naming the file and line, not a skip."""
    env = tmp_path / ".env"
    env.write_text("UNDERLYINGS=AAPL\n\nPOLYGON_API_KEY 'abc def'\n")
    with pytest.raises(ConfigError, match=r"line 3 cannot be parsed") as caught:
        read_env_file(env)
    assert "abc def" not in str(caught.value)


def test_missing_explicit_env_file_is_an_error(tmp_path: Path) -> None:
    """--env-file naming a file that does not exist is an error, not an empty configuration."""
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.from_env({}, env_file=tmp_path / "nope.env")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("AAPL", "AAPL"), ("brk.b", "BRK.B"), ("I:SPX", "I:SPX"), (" spy ", "SPY"), ("X", "X")],
)
def test_valid_underlyings(raw: str, expected: str) -> None:
    """Stock, class-share and index tickers are accepted and upper-cased."""
    assert validate_underlying(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "../x",
        "AAPL/..",
        "",
        "A B",
        "AAPL?x=1",
        "%2e%2e",
        "I:",
        "O:AAPL230616C00150000",
        "A..B",
        "TOOLONGTICKER1",
    ],
)
def test_invalid_underlyings(raw: str) -> None:
    """Anything that could change a URL's path or query is refused before any request."""
    with pytest.raises(ConfigError, match="expected"):
        validate_underlying(raw)


def test_option_ticker_validation() -> None:
    """Option tickers follow O:<root><YYMMDD><C|P><8-digit strike>."""
    assert validate_option_ticker("o:aapl230616c00150000") == "O:AAPL230616C00150000"
    with pytest.raises(ConfigError):
        validate_option_ticker("O:AAPL/../C00150000")


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("UNDERLYINGS", "DATABASE_URL")}
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (("ingest_options",), {"UNDERLYINGS": "AAPL/.."}, "UNDERLYINGS"),
        (("ingest_options", "-u", "../x"), {}, "invalid underlying ticker"),
        (("ingest_options",), {"POLYGON_RATE_LIMIT": "fast"}, "POLYGON_RATE_LIMIT"),
        (("ingest_options",), {"POLYGON_API_KEY": "k"}, "DATABASE_URL is not set"),
        (("ingest_options", "-u", "AAPL"), {"POLYGON_API_KEY": "k"}, "DATABASE_URL is not set"),
        (("ingest_options", "-u", "AAPL"), {}, "POLYGON_API_KEY is not set"),
    ],
    ids=["bad-env-ticker", "bad-cli-ticker", "bad-rate", "no-db", "no-db-one-off", "no-key"],
)
def test_cli_reports_one_line_and_exits_2(
    args: tuple[str, ...], env: dict[str, str], needle: str, tmp_path: Path
) -> None:
    """A bad setting ends the command with exit 2 and one line on stderr naming the problem."""
    result = run_cli(*args, env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.USAGE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert needle in lines[0]


def test_cli_reads_env_file_option(tmp_path: Path) -> None:
    """--env-file is read instead of ./.env; a malformed one exits 2 naming the line."""
    (tmp_path / ".env").write_text("UNDERLYINGS=AAPL\n")
    broken = tmp_path / "broken.env"
    broken.write_text("UNDERLYINGS=AAPL\nthis is not a setting\n")
    result = run_cli("ingest_options", "--env-file", str(broken), env={}, cwd=tmp_path)
    assert result.returncode == ExitCode.USAGE
    assert "line 2" in result.stderr


@pytest.mark.parametrize(
    "given", [("SPX", "I:SPX"), ("I:SPX", "spx")], ids=["stock-first", "index-first"]
)
def test_index_and_stock_of_one_name_are_refused(given: tuple[str, str]) -> None:
    """SPX with I:SPX, in UNDERLYINGS or --underlying, is one underlying named twice: a clear
    error rather than two runs over the same contracts."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"UNDERLYINGS": ",".join(given)}, env_file=None)
    assert "UNDERLYINGS names both" in str(caught.value)
    assert "keep I:SPX for the index or SPX for the stock" in str(caught.value)
    with pytest.raises(ConfigError, match="--underlying names both"):
        parse_cli_underlyings(list(given))


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("https://api.massive.com", True),
        ("http://127.0.0.1:8080", True),
        ("http://localhost:8080", True),
        ("http://[::1]:8080", True),
        ("http://api.massive.com", False),
        ("http://10.0.0.5:8080", False),
    ],
    ids=["https", "loopback-v4", "localhost", "loopback-v6", "cleartext-host", "cleartext-lan"],
)
def test_cleartext_base_url_only_for_loopback(url: str, accepted: bool) -> None:
    """The key never travels in cleartext: http:// is refused unless the host is loopback (the
    simulator), with one line naming the variable and what is accepted."""
    if accepted:
        assert Settings.from_env({"POLYGON_BASE_URL": url}, env_file=None).base_url == url
        return
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"POLYGON_BASE_URL": url}, env_file=None)
    message = str(caught.value)
    assert message.startswith(f"POLYGON_BASE_URL='{url}' would send the API key in cleartext")
    assert "expected https://HOST[:PORT]" in message
    assert "\n" not in message


def test_clone_env_file_is_not_read_by_tests(tmp_path: Path) -> None:
    """Tests run outside the clone: a developer's own .env there changes nothing here."""
    assert Path.cwd() == tmp_path
    assert Settings.from_env({}, env_file=None) == Settings()


# .env rules: export lines, unknown names


PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "line",
    [
        "export POLYGON_API_KEY=abc123",
        "  export POLYGON_API_KEY='abc 123'",
        "export\tPOLYGON_API_KEY=1",
    ],
    ids=["plain", "indented-quoted", "tab"],
)
def test_export_line_is_an_error_naming_file_and_line(line: str, tmp_path: Path) -> None:
    """`export NAME=value`, which python-dotenv accepts, is refused: systemd's EnvironmentFile=
    ignores the line, so the job under the timer would run without the variable."""
    env = tmp_path / "job.env"
    env.write_text(f"# settings\nUNDERLYINGS=AAPL\n\n{line}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({}, env_file=env)
    message = str(caught.value)
    assert message.startswith(f"env file {env} line 4 starts with `export`")
    assert "systemd's EnvironmentFile= ignores such lines" in message
    assert "expected POLYGON_API_KEY=value" in message
    assert "abc" not in message and "\n" not in message


def test_name_without_value_is_an_error(tmp_path: Path) -> None:
    """A bare NAME (no `=`) is refused like an export line: systemd would ignore it."""
    env = tmp_path / "job.env"
    env.write_text("LOG_LEVEL=INFO\nUNDERLYINGS\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 2 names UNDERLYINGS without a value"):
        Settings.from_env({}, env_file=env)


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("UNDERLYING", " (did you mean UNDERLYINGS?)"),
        ("DB_POOLSIZE", " (did you mean DB_POOL_SIZE?)"),
        ("POLYGON_KEY", " (did you mean POLYGON_API_KEY?)"),
        ("PGPASSWROD", " (did you mean PGPASSWORD?)"),
        ("ARCHIVE_AFTER", " (did you mean ARCHIVE_AFTER_DAYS?)"),
        ("AWS_SECRET_ACCESS_KEYS", " (did you mean AWS_SECRET_ACCESS_KEY?)"),
        ("OTEL_EXPORTER_OTLP_ENDPONT", " (did you mean OTEL_EXPORTER_OTLP_ENDPOINT?)"),
        ("underlyings", " (names are case-sensitive: UNDERLYINGS)"),
        ("FAVOURITE_COLOUR", ""),
    ],
    ids=str,
)
def test_unknown_name_is_a_one_line_warning(name: str, hint: str, tmp_path: Path) -> None:
    """A name the project does not know is a warning naming it, the file and the line, and the
    close known name when there is one; it is not an error, and the value is never shown."""
    env = tmp_path / "job.env"
    env.write_text(f"UNDERLYINGS=AAPL\n{name}=s3cret\n", encoding="utf-8")
    settings = Settings.from_env({}, env_file=env)
    assert settings.warnings == (
        f"env file {env} line 2: {name} is not a variable options-history knows; it is "
        f"ignored{hint}",
    )
    assert settings.underlyings == ("AAPL",)
    assert settings == Settings.from_env({"UNDERLYINGS": "AAPL"}, env_file=NO_ENV_FILE)


def test_every_documented_and_standard_name_is_known(tmp_path: Path) -> None:
    """Every variable .env.example names (commented ones too), the standard OTEL_* ones, the
    hook's NOTIFY_* ones and libpq's PG* ones pass without a warning."""
    example = (PROJECT_ROOT / ".env.example").read_text(encoding="utf-8")
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, flags=re.MULTILINE))
    assert {"DATABASE_URL", "UNDERLYINGS", "NOTIFY_COMMAND", "OTEL_TRACES_EXPORTER"} <= documented
    standard = {
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_METRICS_EXPORTER",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_PYTHON_LOG_CORRELATION",
        "NOTIFY_WEBHOOK_URL",
        "PGPASSWORD",
        "PGSSLMODE",
        "PGPASSFILE",
        "PGCONNECT_TIMEOUT",
    }
    env = tmp_path / "job.env"
    env.write_text("".join(f"{name}=\n" for name in sorted(documented | standard)))
    assert Settings.from_env({}, env_file=env).warnings == ()


def test_a_name_set_twice_is_a_warning(tmp_path: Path) -> None:
    """A name set twice says which line counts (python-dotenv takes the last one silently)."""
    env = tmp_path / "job.env"
    env.write_text("LOG_LEVEL=INFO\nUNDERLYINGS=AAPL\nLOG_LEVEL=ERROR\n", encoding="utf-8")
    settings = Settings.from_env({}, env_file=env)
    assert settings.log_level == "ERROR"
    assert settings.warnings == (
        f"env file {env} line 3: LOG_LEVEL is set again (first on line 1); the last one counts",
    )


def test_library_variables_of_the_file_are_handed_over(tmp_path: Path) -> None:
    """PG* and OTEL_* values of the file, which libraries read from the process environment,
    are kept for the caller (the environment's own win); never shown by repr."""
    env = tmp_path / "job.env"
    env.write_text(
        "PGPASSWORD=hunter2\nPGSSLMODE=require\nOTEL_SERVICE_NAME=x\nUNDERLYINGS=AAPL\n",
        encoding="utf-8",
    )
    settings = Settings.from_env({"PGSSLMODE": "disable"}, env_file=env)
    assert dict(settings.passthrough) == {"PGPASSWORD": "hunter2", "OTEL_SERVICE_NAME": "x"}
    assert "hunter2" not in repr(settings)


def test_no_env_file_reads_nothing(tmp_path: Path) -> None:
    """env_file=NO_ENV_FILE reads the environment only, whatever ./.env holds (a Lambda)."""
    (tmp_path / ".env").write_text("UNDERLYINGS=AAPL\nexport X=1\n", encoding="utf-8")
    settings = Settings.from_env({"LOG_LEVEL": "ERROR"}, env_file=NO_ENV_FILE)
    assert settings == Settings(log_level="ERROR")
    assert settings.warnings == ()


def test_cli_refuses_an_export_line_in_one_line(tmp_path: Path) -> None:
    """A job given an env file with an export line exits 2 with one line naming file and line."""
    env = tmp_path / "job.env"
    env.write_text("UNDERLYINGS=AAPL\nexport POLYGON_API_KEY=k\n", encoding="utf-8")
    result = run_cli("ingest_options", "--env-file", str(env), env={}, cwd=tmp_path)
    assert result.returncode == ExitCode.USAGE
    assert result.stderr == (
        f"error: env file {env} line 2 starts with `export`: systemd's EnvironmentFile= "
        "ignores such lines (the job would run without POLYGON_API_KEY); expected "
        "POLYGON_API_KEY=value\n"
    )


def test_run_lease_seconds_is_a_duration_of_at_least_two_seconds() -> None:
    """RUN_LEASE_SECONDS takes a duration (default 60 s); shorter than 2 s is refused, since
    four heartbeats must fit in a lease."""
    assert Settings.from_env({}, env_file=NO_ENV_FILE).run_lease_seconds == 60.0
    assert (
        Settings.from_env({"RUN_LEASE_SECONDS": "4s"}, env_file=NO_ENV_FILE).run_lease_seconds
        == 4.0
    )
    with pytest.raises(ConfigError, match="RUN_LEASE_SECONDS='1s' is too short"):
        Settings.from_env({"RUN_LEASE_SECONDS": "1s"}, env_file=NO_ENV_FILE)
