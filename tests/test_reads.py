"""Reads over both tiers: chains at a time, contract histories, days, the archive, formats,
the smile."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from options.config import S3Access, Secret
from options.errors import ArchiveError, ConfigError, NotStoredError
from options.ops.read_commands import day_bounds, parse_time
from options.ops.read_formats import (
    CHAIN_COLUMNS,
    format_csv,
    format_json,
    format_table,
    table_cell,
    write_parquet,
)
from options.ops.smile import INSTALL_HINT, plot_smile, require_matplotlib, smile_of
from options.store.archive_files import ARCHIVE_SCHEMA
from options.store.reads import (
    ARCHIVE,
    CHAIN_ORDER,
    POSTGRESQL,
    READ_COLUMNS,
    READ_SCHEMA,
    Archive,
    Reader,
    records_table,
    utc_day,
)
from tests.history import History, make_history, mark_dropped, write_archive

SECOND = dt.timedelta(seconds=1)
MICRO = dt.timedelta(microseconds=1)
UTC_US = pa.timestamp("us", tz="UTC")


@pytest.fixture
async def history(pool: asyncpg.Pool, simulator, make_settings) -> History:
    """Three slots of AAA and BBB stored by the real jobs (AAA incomplete at the third)."""
    return await make_history(pool, simulator, make_settings)


@pytest.fixture
def reader(pool: asyncpg.Pool) -> Reader:
    """A reader of the test's database, without an archive."""
    return Reader(pool)


def between(a: dt.datetime, b: dt.datetime) -> dt.datetime:
    return a + (b - a) / 2


@pytest.mark.parametrize(
    ("underlying", "at", "expected"),
    [
        ("AAA", "after_third", 1),
        ("BBB", "after_third", 2),
        ("AAA", "between_first_and_second", 0),
        ("AAA", "at_second", 1),
        ("BBB", "at_third", 2),
        ("AAA", "latest", 1),
        ("BBB", "latest", 2),
    ],
    ids=[
        "incomplete-later-slot-skipped",
        "complete-later-slot-taken",
        "between-slots",
        "exactly-at-a-slot",
        "exactly-at-the-last",
        "latest-skips-incomplete",
        "latest",
    ],
)
async def test_chain_is_the_latest_complete_slot_at_or_before(
    history: History, reader: Reader, underlying: str, at: str, expected: int
) -> None:
    """chain(u, T) is u's latest complete slot at or before T, never an incomplete later one."""
    first, second, third = history.slots
    moment = {
        "after_third": third + SECOND,
        "between_first_and_second": between(first, second),
        "at_second": second,
        "at_third": third,
        "latest": None,
    }[at]
    chain = await reader.chain(underlying, moment)
    assert chain.captured_at == history.slots[expected]
    assert chain.source == POSTGRESQL
    assert set(chain.table["captured_at"].to_pylist()) == {history.slots[expected]}
    assert set(chain.table["underlying_ticker"].to_pylist()) == {underlying}


async def test_chain_before_any_complete_slot_is_not_stored(
    history: History, reader: Reader
) -> None:
    """Before the first complete slot there is no chain: NotStoredError (exit 1), one line."""
    with pytest.raises(NotStoredError, match=r"^no complete chain of AAA at or before .* E[SD]T$"):
        await reader.chain("AAA", history.slots[0] - MICRO)


async def test_chain_rows_are_the_slots_rows_in_chain_order(
    history: History, reader: Reader, pool: asyncpg.Pool
) -> None:
    """A chain has every row its coverage counted, typed as snapshot_read, in chain_at's
    order; --expiration keeps only those expirations."""
    chain = await reader.chain("BBB", history.slots[1])
    stored = await pool.fetchval(
        "SELECT snapshots_stored FROM snapshot_coverage WHERE underlying_ticker = 'BBB' "
        "AND captured_at = $1",
        history.slots[1],
    )
    assert chain.table.num_rows == stored == 300
    assert chain.table.schema == READ_SCHEMA
    rows = chain.table.to_pylist()
    keys = [(r["expiration_date"], r["strike_price"], r["contract_type"]) for r in rows]
    assert keys == sorted(keys)
    expirations = sorted({r["expiration_date"] for r in rows})
    assert len(expirations) == 3
    only = await reader.chain("BBB", history.slots[1], expirations=[expirations[1]])
    assert only.table.to_pylist() == [r for r in rows if r["expiration_date"] == expirations[1]]


async def test_chain_values_are_the_databases(
    history: History, reader: Reader, pool: asyncpg.Pool
) -> None:
    """Each value of a chain read equals what chain_at returns (strike as a double)."""
    chain = await reader.chain("AAA", history.slots[0])
    records = await pool.fetch("SELECT * FROM chain_at('AAA', $1)", history.slots[0])
    expected = [{**dict(r), "strike_price": float(r["strike_price"])} for r in records]
    assert chain.table.to_pylist() == expected


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [(0, 2, [0, 1]), (0, "after_third", [0, 1, 2]), (1, "after_third", [1, 2]), (1, 1, None)],
    ids=["end-excluded", "all", "start-included", "empty-range-refused"],
)
async def test_history_is_in_time_order_within_from_to(
    history: History, reader: Reader, start: int, end: int | str, expected: list[int] | None
) -> None:
    """history(ticker, from, to) is the contract's snapshots in [from, to), oldest first."""
    chain = await reader.chain("BBB", history.slots[0])
    ticker = chain.table["ticker"][17].as_py()
    begin = history.slots[start]
    finish = history.slots[2] + SECOND if end == "after_third" else history.slots[int(end)]
    if expected is None:
        with pytest.raises(ConfigError, match="the range is empty"):
            await reader.history(ticker, begin, finish)
        return
    read = await reader.history(ticker, begin, finish)
    assert read.table["captured_at"].to_pylist() == [history.slots[i] for i in expected]
    assert set(read.table["ticker"].to_pylist()) == {ticker}
    assert read.archived_days == ()


async def test_complete_slots_leave_out_incomplete_chains(history: History, reader: Reader) -> None:
    """The complete slots of a range per underlying leave out AAA's incomplete one; the
    chains of those slots come in one table, slot by slot."""
    start, end = history.slots[0] - dt.timedelta(hours=1), history.slots[2] + SECOND
    slots = await reader.complete_slots(start, end)
    first, second, third = history.slots
    assert slots == {"AAA": [first, second], "BBB": [first, second, third]}
    assert await reader.complete_slots(start, end, ["I:AAA"]) == {"AAA": [first, second]}
    day = await reader.slots("AAA", slots["AAA"])
    assert day.table.num_rows == 600
    assert day.table["captured_at"].to_pylist() == [first] * 300 + [second] * 300


# The archive tier: Parquet files written here as the archive's layout says


async def test_archive_reads_a_chain_as_postgresql_does(
    history: History, reader: Reader, tmp_path: Path
) -> None:
    """Archive.read of a slot's Parquet rows is the chain PostgreSQL gives, value for value
    (how a dropped day is routed there is tested below, when archived_days exists)."""
    days = await write_archive(reader, history, tmp_path)
    assert days == sorted({utc_day(s) for s in history.slots})
    archive = Archive.at(str(tmp_path))
    for underlying, slot in (("AAA", history.slots[1]), ("BBB", history.slots[2])):
        where = (ds.field("captured_at") == pa.scalar(slot, UTC_US)) & (
            ds.field("underlying_ticker") == underlying
        )
        from_archive = archive.read(utc_day(slot), where).sort_by(list(CHAIN_ORDER))
        assert from_archive.num_rows == 300
        assert from_archive.equals((await reader.chain(underlying, slot)).table)


async def test_archive_casts_other_column_widths(
    history: History, reader: Reader, tmp_path: Path
) -> None:
    """Parquet written with other widths (decimal strikes, nanosecond times, 32-bit sizes)
    reads back as the same values with the read's own types."""
    widths = {
        "strike_price": pa.decimal128(12, 3),
        "bid_size": pa.int32(),
        "ask_size": pa.int32(),
        "captured_at": pa.timestamp("ns", tz="UTC"),
        "quote_updated_at": pa.timestamp("ns", tz="UTC"),
    }
    schema = pa.schema([pa.field(f.name, widths.get(f.name, f.type)) for f in READ_SCHEMA])
    await write_archive(reader, history, tmp_path, schema=schema)
    slot = history.slots[0]
    where = ds.field("underlying_ticker") == "BBB"
    table = Archive.at(str(tmp_path)).read(utc_day(slot), where)
    assert table.schema == READ_SCHEMA
    from_archive = table.filter(pc.equal(table["captured_at"], pa.scalar(slot, UTC_US)))
    expected = (await reader.chain("BBB", slot)).table
    assert from_archive.sort_by(list(CHAIN_ORDER)).equals(expected)


def test_archive_files_hold_the_reads_columns() -> None:
    """The archive writes exactly snapshot_read's columns, in its order, as the reader types
    them (a difference of width would be cast; a missing column would not)."""
    assert ARCHIVE_SCHEMA.names == list(READ_COLUMNS)
    assert all(ARCHIVE_SCHEMA.field(f.name).type.equals(f.type) for f in READ_SCHEMA)


@pytest.fixture
def s3_server() -> Iterator[str]:
    """A local S3-compatible server (moto); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


async def test_archive_in_an_s3_bucket_reads_as_a_directory(
    history: History, reader: Reader, tmp_path: Path, s3_server: str
) -> None:
    """The same archive uploaded to an S3-compatible bucket (endpoint and keys from the AWS
    settings) gives the same chain as the local directory and PostgreSQL."""
    await write_archive(reader, history, tmp_path / "local")
    access = S3Access(
        access_key_id=Secret("test-key"),
        secret_access_key=Secret("test-secret"),
        region="us-east-1",
        endpoint_url=s3_server,
    )
    bucket = pafs.S3FileSystem(
        access_key="test-key",
        secret_key="test-secret",
        region="us-east-1",
        scheme="http",
        endpoint_override=s3_server.removeprefix("http://"),
        allow_bucket_creation=True,
    )
    bucket.create_dir("archive")
    pafs.copy_files(str(tmp_path / "local"), "archive/options", destination_filesystem=bucket)
    slot = history.slots[1]
    where = (ds.field("captured_at") == pa.scalar(slot, UTC_US)) & (
        ds.field("underlying_ticker") == "AAA"
    )
    from_s3 = Archive.at("s3://archive/options", s3=access).read(utc_day(slot), where)
    assert from_s3.num_rows == 300
    assert from_s3.sort_by(list(CHAIN_ORDER)).equals((await reader.chain("AAA", slot)).table)


@pytest.mark.parametrize("leftover", [None, ".part-0.parquet.tmp", "_SUCCESS"])
async def test_archive_day_without_a_file(tmp_path: Path, leftover: str | None) -> None:
    """A day with no Parquet file (no directory, or only a writer's temporary file) is an
    ArchiveError naming the directory; hidden and _ files are never read as data."""
    if leftover is not None:
        folder = tmp_path / "option_snapshots" / "date=2026-11-20"
        folder.mkdir(parents=True)
        (folder / leftover).write_bytes(b"half a file")
    with pytest.raises(ArchiveError, match=r"date=2026-11-20 has no Parquet file$"):
        Archive.at(str(tmp_path)).read(dt.date(2026, 11, 20), ds.field("ticker") == "x")


@pytest.fixture
async def dropped(history: History, reader: Reader, pool: asyncpg.Pool, tmp_path: Path) -> Path:
    """The history's days written to a Parquet archive in tmp_path and recorded as archived
    and dropped (their PostgreSQL rows stay, so both tiers can be compared)."""
    days = await write_archive(reader, history, tmp_path / "archive")
    if not await mark_dropped(pool, tmp_path / "archive", days):
        pytest.skip("archived_days does not exist (the archive's migration is not there yet)")
    return tmp_path / "archive"


async def test_dropped_day_chain_is_read_from_the_archive(
    history: History, pool: asyncpg.Pool, dropped: Path
) -> None:
    """A chain of a dropped day comes from the archive, equal to PostgreSQL's, and the slot is
    still PostgreSQL's latest complete one (AAA's incomplete third slot skipped)."""
    both = Reader(pool, archive=Archive.at(str(dropped)))
    for underlying in ("AAA", "BBB"):
        read = await both.chain(underlying, history.slots[2] + SECOND)
        expected = await _postgresql_chain(pool, underlying, read.captured_at)
        assert read.source == ARCHIVE
        assert read.captured_at == history.slots[1 if underlying == "AAA" else 2]
        assert read.table.equals(expected)


async def test_dropped_days_history_and_slots_are_read_from_the_archive(
    history: History, pool: asyncpg.Pool, dropped: Path
) -> None:
    """A history and a day's chains over dropped days equal PostgreSQL's own rows."""
    both = Reader(pool, archive=Archive.at(str(dropped)))
    ticker = (await both.chain("BBB", history.slots[0])).table["ticker"][5].as_py()
    start, end = history.slots[0], history.slots[2] + SECOND
    read = await both.history(ticker, start, end)
    records = await pool.fetch("SELECT * FROM contract_history($1, $2, $3)", ticker, start, end)
    assert read.archived_days == tuple(sorted({utc_day(s) for s in history.slots}))
    assert read.table.equals(records_table(records))
    slots = (await both.complete_slots(start, end))["AAA"]
    day = await both.slots("AAA", slots)
    assert day.archived_days == read.archived_days
    expected = pa.concat_tables([await _postgresql_chain(pool, "AAA", s) for s in slots])
    assert day.table.equals(expected)


async def test_dropped_day_without_an_archive_url(
    history: History, reader: Reader, dropped: Path
) -> None:
    """Reading a dropped day with no archive configured says to set ARCHIVE_URL (exit 2)."""
    with pytest.raises(ConfigError, match=r"archived and dropped .* set ARCHIVE_URL"):
        await reader.chain("BBB")


async def _postgresql_chain(pool: asyncpg.Pool, underlying: str, slot: dt.datetime) -> pa.Table:
    records = await pool.fetch("SELECT * FROM chain_at($1, $2)", underlying, slot)
    return records_table(records).sort_by(list(CHAIN_ORDER))


# Formats: what csv, json and parquet hold is what the table shows


async def test_csv_json_parquet_hold_the_tables_values(
    history: History, reader: Reader, tmp_path: Path
) -> None:
    """CSV, JSON and Parquet of a chain read back to the read's own values (times as the same
    instants, in New York), and the text table shows those values."""
    table = (await reader.chain("AAA", history.slots[0])).table
    expected = table.to_pylist()
    from_csv = [_typed(row) for row in csv.DictReader(io.StringIO(format_csv(table)))]
    assert from_csv == expected
    from_json = [_typed(row) for row in json.loads(format_json(table))]
    assert from_json == expected
    write_parquet(table, tmp_path / "chain.parquet")
    parquet = pq.read_table(tmp_path / "chain.parquet")
    assert parquet.schema.field("captured_at").type == pa.timestamp("us", tz="America/New_York")
    assert parquet.to_pylist() == expected
    assert all(
        s.endswith(("-05:00", "-04:00"))
        for s in json.loads(format_json(table))[0].values()
        if isinstance(s, str) and "T" in s
    )
    lines = format_table(table, CHAIN_COLUMNS).splitlines()
    assert lines[0].split() == list(CHAIN_COLUMNS)
    shown = format_table(pa.Table.from_pylist(from_csv, schema=READ_SCHEMA), CHAIN_COLUMNS)
    assert shown.splitlines() == lines
    assert len(lines) == 1 + len(expected)
    first = dict(zip(CHAIN_COLUMNS, lines[1].split(), strict=True))
    assert first["ticker"] == expected[0]["ticker"]
    assert first["strike"] == f"{expected[0]['strike_price']:.6g}"


def test_table_shows_times_in_new_york() -> None:
    """The table shows a time in New York with its zone's abbreviation."""
    winter = dt.datetime(2026, 11, 20, 20, 30, 5, tzinfo=dt.UTC)
    summer = dt.datetime(2026, 7, 20, 19, 30, 5, tzinfo=dt.UTC)
    assert table_cell(winter) == "2026-11-20 15:30:05 EST"
    assert table_cell(summer) == "2026-07-20 15:30:05 EDT"


def _typed(row: dict[str, object]) -> dict[str, object]:
    """A CSV or JSON row back in the read's Python types."""
    typed: dict[str, object] = {}
    for field in READ_SCHEMA:
        value = row[field.name]
        if value in ("", None):
            typed[field.name] = None
        elif pa.types.is_timestamp(field.type):
            typed[field.name] = dt.datetime.fromisoformat(str(value)).astimezone(dt.UTC)
        elif pa.types.is_date(field.type):
            typed[field.name] = dt.date.fromisoformat(str(value))
        elif pa.types.is_floating(field.type):
            typed[field.name] = float(value)  # type: ignore[arg-type]
        elif pa.types.is_integer(field.type):
            typed[field.name] = int(value)  # type: ignore[call-overload]
        else:
            typed[field.name] = value
    return typed


# Times on the command line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-20 15:30", dt.datetime(2026, 11, 20, 20, 30, tzinfo=dt.UTC)),
        ("2026-11-20T15:30:05", dt.datetime(2026, 11, 20, 20, 30, 5, tzinfo=dt.UTC)),
        ("2026-07-20 15:30", dt.datetime(2026, 7, 20, 19, 30, tzinfo=dt.UTC)),
        ("2026-11-20T20:30Z", dt.datetime(2026, 11, 20, 20, 30, tzinfo=dt.UTC)),
        ("2026-11-20T20:30+00:00", dt.datetime(2026, 11, 20, 20, 30, tzinfo=dt.UTC)),
        ("2026-11-20 16:30+01:00", dt.datetime(2026, 11, 20, 15, 30, tzinfo=dt.UTC)),
    ],
    ids=["new-york-winter", "new-york-seconds", "new-york-summer", "z", "utc-offset", "offset"],
)
def test_times_are_new_york_unless_an_offset_is_given(text: str, expected: dt.datetime) -> None:
    """--at without an offset is New York time; with Z or an offset, that offset."""
    assert parse_time(text, name="--at") == expected


@pytest.mark.parametrize(
    ("text", "date_is_midnight", "message"),
    [
        ("2026-11-20", False, "names a day, not a time"),
        ("20/11/2026 15:30", False, "is invalid: expected YYYY-MM-DD HH:MM"),
        ("2026-11-20 25:00", False, "is invalid"),
    ],
    ids=["date-for-at", "other-form", "no-such-hour"],
)
def test_bad_times_are_refused(text: str, date_is_midnight: bool, message: str) -> None:
    """A time that is not one is a ConfigError (exit 2) naming the option and the form."""
    with pytest.raises(ConfigError, match=f"^--at {text!r} {message}"):
        parse_time(text, name="--at", date_is_midnight=date_is_midnight)


def test_a_date_alone_is_new_yorks_midnight() -> None:
    """--from 2026-11-01 starts at New York's midnight (04:00 UTC in summer time)."""
    assert parse_time("2026-11-01", name="--from", date_is_midnight=True) == dt.datetime(
        2026, 11, 1, 4, tzinfo=dt.UTC
    )
    assert day_bounds(dt.date(2026, 11, 20)) == (
        dt.datetime(2026, 11, 20, 5, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 21, 5, tzinfo=dt.UTC),
    )


# The smile


async def test_smile_draws_one_line_per_expiration(
    history: History, reader: Reader, tmp_path: Path
) -> None:
    """The smile picture is a PNG with one smile line per expiration of the chain and a term
    structure point per expiration whose strikes surround the underlying's price."""
    chain = await reader.chain("BBB", history.slots[2])
    smile = smile_of(chain.table, underlying="BBB", captured_at=chain.captured_at)
    plotted = plot_smile(smile, tmp_path / "smile.png")
    assert (tmp_path / "smile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expirations = sorted(set(chain.table["expiration_date"].to_pylist()))
    assert [label.split()[0] for label in plotted.smiles] == [str(e) for e in expirations]
    spot = smile.spot
    for curve in smile.curves:
        assert min(curve.moneyness) < 1.0 <= max(curve.moneyness)
        assert all(0 < iv < 5 for iv in curve.iv)
        assert plotted.smiles[f"{curve.expiration} ({curve.days}d)"][0] == curve.moneyness
    assert plotted.term[0] == tuple(float(c.days) for c in smile.curves)
    assert spot == pytest.approx(chain.table["underlying_price"][0].as_py())


def test_smile_without_matplotlib_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib the smile fails with one line naming the extra to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError) as raised:
        require_matplotlib()
    assert str(raised.value) == INSTALL_HINT
    assert "options-history[plot]" in INSTALL_HINT and "\n" not in INSTALL_HINT
