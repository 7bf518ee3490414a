"""The options_read command line: chain, history, export, smile; formats, exit codes, the
archive tier."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import os
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from options.ops.read_formats import CHAIN_COLUMNS, HISTORY_COLUMNS, format_table
from options.store.reads import READ_SCHEMA, Reader
from tests.history import History, make_history, mark_dropped, write_archive
from tests.test_reads import SECOND, _typed

BIN = Path(sys.executable).parent
NEW_YORK = ZoneInfo("America/New_York")


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
async def history(pool: asyncpg.Pool, simulator, make_settings) -> History:
    """Three slots of AAA and BBB stored by the real jobs (AAA incomplete at the third)."""
    return await make_history(pool, simulator, make_settings)


@pytest.fixture
def options_read(database_url: str, tmp_path: Path):
    """Run ``options_read ARGS`` with only DATABASE_URL (and PATH, HOME) in its environment."""

    async def run(*args: str, env: dict[str, str] | None = None) -> Result:
        environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "DATABASE_URL": database_url,
            **(env or {}),
        }
        process = await asyncio.create_subprocess_exec(
            str(BIN / "options_read"),
            *args,
            env=environ,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode is not None
        return Result(process.returncode, out.decode(), err.decode())

    return run


def iso(moment: dt.datetime) -> str:
    return moment.isoformat()


def rows_of_csv(text: str) -> list[dict[str, object]]:
    return [_typed(row) for row in csv.DictReader(io.StringIO(text))]


@pytest.mark.parametrize("args", [[], ["chain"], ["history"], ["export"], ["smile"]])
async def test_help_and_version(options_read, args: list[str]) -> None:
    """-h is --help on the group and every command, and --version names the version."""
    short = await options_read(*args, "-h")
    assert short.code == 0
    assert short.stdout.startswith(f"Usage: options_read {' '.join(args)}".rstrip())
    shown = await options_read(*args, "--version")
    assert (shown.code, shown.stdout.strip()) == (0, f"options_read {version('options-history')}")


async def test_chain_formats_agree(options_read, history: History, tmp_path: Path) -> None:
    """chain's table, CSV, JSON and Parquet show the same rows: CSV, JSON and Parquet hold the
    same values, and the table is those values' table; stderr names the slot."""
    at = iso(history.slots[1])
    table = await options_read("chain", "BBB", "--at", at)
    assert table.code == 0, table.stderr
    assert table.stderr.startswith(
        f"BBB chain at {history.slots[1].astimezone(NEW_YORK):%Y-%m-%d %H:%M:%S %Z}"
    )
    assert "300 contracts" in table.stderr and "(from postgresql)" in table.stderr
    as_csv = await options_read("chain", "BBB", "--at", at, "--format", "csv")
    rows = rows_of_csv(as_csv.stdout)
    assert len(rows) == 300 and {r["captured_at"] for r in rows} == {history.slots[1]}
    as_json = await options_read("chain", "BBB", "--at", at, "--format", "json")
    assert [_typed(r) for r in json.loads(as_json.stdout)] == rows
    parquet = await options_read(
        "chain", "BBB", "--at", at, "--format", "parquet", "--out", str(tmp_path / "c.parquet")
    )
    assert (parquet.code, parquet.stdout) == (0, "")
    assert pq.read_table(tmp_path / "c.parquet").to_pylist() == rows
    expected = format_table(pa.Table.from_pylist(rows, schema=READ_SCHEMA), CHAIN_COLUMNS)
    assert table.stdout == expected + "\n"
    written = await options_read("chain", "BBB", "--at", at, "--out", str(tmp_path / "c.txt"))
    assert (written.code, (tmp_path / "c.txt").read_text()) == (0, table.stdout)


async def test_chain_at_new_york_time_skips_the_incomplete_slot(
    options_read, history: History
) -> None:
    """--at in New York time without an offset; AAA's later incomplete slot is not taken."""
    at = (history.slots[2] + SECOND).astimezone(NEW_YORK).strftime("%Y-%m-%d %H:%M:%S")
    read = await options_read("chain", "aaa", "--at", at, "--format", "csv")
    assert read.code == 0, read.stderr
    assert {r["captured_at"] for r in rows_of_csv(read.stdout)} == {history.slots[1]}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["chain", "AAA", "--at", "before"], 1, "no complete chain of AAA at or before "),
        (["chain", "AAA/..", "--at", "2026-11-20 15:30"], 2, "invalid underlying ticker 'AAA/..'"),
        (["chain", "AAA", "--at", "2026-11-20"], 2, "--at '2026-11-20' names a day, not a time"),
        (["chain", "AAA", "--format", "parquet"], 2, "--format parquet writes a file"),
        (["history", "AAA", "--from", "2026-11-01", "--to", "2026-12-01"], 2, "invalid option"),
        (
            ["history", "O:AAA261218C00150000", "--from", "2026-11-01", "--to", "2026-11-01"],
            2,
            "the range is empty",
        ),
        (
            ["history", "O:ZZZ261218C00150000", "--from", "2026-11-01", "--to", "2126-11-01"],
            1,
            "no snapshot of O:ZZZ261218C00150000 from 2026-11-01 00:00:00 EDT",
        ),
        (["export", "--date", "2001-01-02", "--out", "x"], 1, "no complete chain on 2001-01-02"),
        (["smile", "AAA", "--at", "before", "--out", "s.png"], 1, "no complete chain of AAA"),
    ],
    ids=[
        "at-before-first-slot",
        "bad-underlying",
        "day-for-at",
        "parquet-without-out",
        "bad-option-ticker",
        "empty-range",
        "nothing-in-range",
        "export-empty-day",
        "smile-before-first-slot",
    ],
)
async def test_errors_are_one_line_with_their_exit_code(
    options_read, history: History, args: list[str], code: int, message: str
) -> None:
    """Nothing stored answers: exit 1; a bad option, ticker or time: exit 2; one line each."""
    before = iso(history.slots[0] - SECOND)
    result = await options_read(*[before if a == "before" else a for a in args])
    assert result.code == code
    assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""


async def test_history_is_in_time_order(options_read, history: History) -> None:
    """history prints the contract's snapshots in [--from, --to), oldest first; offsets count."""
    csv_chain = await options_read("chain", "BBB", "--format", "csv")
    ticker = rows_of_csv(csv_chain.stdout)[42]["ticker"]
    start, end = iso(history.slots[0]), iso(history.slots[2])
    read = await options_read(
        "history", str(ticker), "--from", start, "--to", end, "--format", "csv"
    )
    assert read.code == 0, read.stderr
    rows = rows_of_csv(read.stdout)
    assert [r["captured_at"] for r in rows] == list(history.slots[:2])
    assert f"{ticker} from " in read.stderr and "2 snapshots" in read.stderr
    table = await options_read("history", str(ticker), "--from", start, "--to", end)
    expected = format_table(pa.Table.from_pylist(rows, schema=READ_SCHEMA), HISTORY_COLUMNS)
    assert table.stdout == expected + "\n"


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
async def test_export_writes_a_file_per_underlying(
    options_read, history: History, tmp_path: Path, fmt: str
) -> None:
    """export --date writes DIR/date=DAY/UNDERLYING.ext with every complete chain of the New
    York day; the files read as one hive-partitioned dataset."""
    day = history.slots[0].astimezone(NEW_YORK).date()
    out = tmp_path / "export"
    result = await options_read("export", "--date", str(day), "--format", fmt, "--out", str(out))
    assert result.code == 0, result.stderr
    folder = out / f"date={day}"
    assert result.stdout.splitlines() == [
        f"{folder / 'AAA'}.{fmt}\t600 rows\t2 slots",
        f"{folder / 'BBB'}.{fmt}\t900 rows\t3 slots",
    ]
    if fmt == "parquet":
        dataset = ds.dataset(out, format="parquet", partitioning="hive")
        table = dataset.to_table()
        assert table.num_rows == 1500
        assert pc_unique(table, "underlying_ticker") == ["AAA", "BBB"]
    else:
        rows = rows_of_csv((folder / "AAA.csv").read_text())
        assert [r["captured_at"] for r in rows] == [history.slots[0]] * 300 + [
            history.slots[1]
        ] * 300


async def test_export_of_an_underlying_without_chains_is_partial(
    options_read, history: History, tmp_path: Path
) -> None:
    """export -u AAA -u CCC writes AAA and exits 3, naming CCC on stderr."""
    day = history.slots[0].astimezone(NEW_YORK).date()
    result = await options_read(
        "export", "--date", str(day), "-u", "AAA", "-u", "CCC", "--out", str(tmp_path / "x")
    )
    assert result.code == 3
    assert len(result.stdout.splitlines()) == 1 and "AAA.parquet\t600 rows" in result.stdout
    assert result.stderr == f"error: CCC: no complete chain on {day} (New York)\n"


async def test_smile_writes_a_png(options_read, history: History, tmp_path: Path) -> None:
    """smile writes a PNG of the chain's three expirations."""
    out = tmp_path / "smile.png"
    result = await options_read("smile", "BBB", "--at", iso(history.slots[2]), "--out", str(out))
    assert result.code == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stdout == f"wrote {out}: 3 expirations, 3 at-the-money points\n"


async def test_smile_without_matplotlib(options_read, history: History, tmp_path: Path) -> None:
    """Without matplotlib, smile exits 2 with one line saying how to install the extra."""
    fake = tmp_path / "no-matplotlib"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('not installed')\n")
    result = await options_read(
        "smile", "BBB", "--out", str(tmp_path / "s.png"), env={"PYTHONPATH": str(fake)}
    )
    assert result.code == 2
    assert result.stderr.startswith("error: the smile plot needs matplotlib")
    assert "options-history[plot]" in result.stderr and result.stderr.count("\n") == 1


async def test_archived_chain_reads_the_same(
    options_read, history: History, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """A chain of a day archived and dropped prints the same table through --archive-url as
    from PostgreSQL, and says where it came from."""
    at = iso(history.slots[2] + SECOND)
    before = await options_read("chain", "AAA", "--at", at)
    assert before.code == 0
    days = await write_archive(Reader(pool), history, tmp_path / "archive")
    if not await mark_dropped(pool, tmp_path / "archive", days):
        pytest.skip("archived_days does not exist (the archive's migration is not there yet)")
    refused = await options_read("chain", "AAA", "--at", at)
    assert refused.code == 2 and "set ARCHIVE_URL or pass --archive-url" in refused.stderr
    after = await options_read(
        "chain", "AAA", "--at", at, "--archive-url", str(tmp_path / "archive")
    )
    assert after.code == 0, after.stderr
    assert after.stdout == before.stdout
    assert after.stderr == before.stderr.replace("(from postgresql)", "(from archive)")


def pc_unique(table: pa.Table, column: str) -> list[object]:
    return sorted(set(table[column].to_pylist()))
