"""What ``options_read`` does: parse market times, read a tier or both, write what was read.

Times are New York times unless they carry an offset: ``2026-11-20 15:30`` is 15:30 in New
York, ``2026-11-20T20:30Z`` and ``2026-11-20T20:30+00:00`` are what they say. A day
(``--date``, or a date alone in ``--from``/``--to``) starts at New York's midnight.

Each command opens a one-connection pool (:func:`options.store.reads.open_reader`), reads, and
closes it; the archive is read for the days ``archived_days`` says were dropped, from
``--archive-url`` or else the ``ARCHIVE_URL`` setting (S3 through the ``AWS_*`` settings).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

from options.config import Settings
from options.errors import ConfigError, NotStoredError, OptionsError
from options.ops.read_formats import write_csv, write_parquet
from options.ops.smile import PlottedSmile, plot_smile, require_matplotlib, smile_of
from options.store.reads import (
    ChainRead,
    HistoryRead,
    market_time,
    open_reader,
)
from options.tickers import validate_option_ticker, validate_underlying

MARKET_TZ = ZoneInfo("America/New_York")
TIME_FORM = (
    "YYYY-MM-DD HH:MM[:SS] in New York time, or ISO 8601 with an offset such as "
    "2026-11-20T20:30Z or 2026-11-20T15:30-05:00"
)
_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_time(text: str, *, name: str, date_is_midnight: bool = False) -> dt.datetime:
    """An aware time from the command line: New York time unless ``text`` has an offset.

    Args:
        text: ``2026-11-20 15:30``, ``2026-11-20T15:30:05``, ``2026-11-20T20:30Z``, ...
        name: the option, for the message.
        date_is_midnight: accept a date alone as New York's midnight starting that day.

    Raises:
        ConfigError: naming ``name`` and the accepted form.
    """
    raw = text.strip()
    if _DATE_ONLY.fullmatch(raw) and not date_is_midnight:
        raise ConfigError(f"{name} {text!r} names a day, not a time: expected {TIME_FORM}")
    try:
        moment = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ConfigError(f"{name} {text!r} is invalid: expected {TIME_FORM}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=MARKET_TZ)
    return moment


def parse_day(text: str, *, name: str) -> dt.date:
    """A calendar day ``YYYY-MM-DD``.

    Raises:
        ConfigError: naming ``name`` and the accepted form.
    """
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"{name} {text!r} is invalid: expected YYYY-MM-DD") from None


def day_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """New York's ``day``: from its midnight (included) to the next (excluded)."""
    start = dt.datetime.combine(day, dt.time(), MARKET_TZ)
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), MARKET_TZ)
    return start, end


async def read_chain(
    settings: Settings,
    underlying: str,
    *,
    at: dt.datetime | None,
    expirations: Sequence[dt.date] = (),
    archive_url: str | None = None,
) -> ChainRead:
    """The chain of ``underlying`` at its latest complete slot at or before ``at``.

    Raises:
        ConfigError: a bad ticker or setting.
        NotStoredError: no complete chain at or before ``at``, or none of ``expirations``.
        ArchiveError, DatabaseError: a tier cannot be read.
    """
    ticker = validate_underlying(underlying)
    async with open_reader(settings, archive_url=archive_url) as reader:
        chain = await reader.chain(ticker, at, expirations=expirations)
    if not chain.table.num_rows:
        asked = ", ".join(str(e) for e in expirations)
        raise NotStoredError(
            f"the chain of {chain.underlying} at {market_time(chain.captured_at)} has no "
            f"contract expiring {asked}"
        )
    return chain


async def read_history(
    settings: Settings,
    ticker: str,
    *,
    start: dt.datetime,
    end: dt.datetime,
    archive_url: str | None = None,
) -> HistoryRead:
    """The snapshots of contract ``ticker`` from ``start`` (included) to ``end`` (excluded).

    Raises:
        ConfigError: a bad ticker, range or setting.
        NotStoredError: no snapshot of the contract in the range.
        ArchiveError, DatabaseError: a tier cannot be read.
    """
    contract = validate_option_ticker(ticker)
    async with open_reader(settings, archive_url=archive_url) as reader:
        history = await reader.history(contract, start, end)
    if not history.table.num_rows:
        raise NotStoredError(
            f"no snapshot of {contract} from {market_time(start)} to {market_time(end)}"
        )
    return history


@dataclass(frozen=True)
class ExportedFile:
    """One file ``export`` wrote: an underlying's complete chains of the day."""

    path: Path
    underlying: str
    rows: int
    slots: int


@dataclass(frozen=True)
class Export:
    """What ``export`` wrote, and the underlyings asked for that had no complete chain."""

    files: tuple[ExportedFile, ...]
    missing: tuple[str, ...]


async def export_day(
    settings: Settings,
    day: dt.date,
    *,
    fmt: str,
    out_dir: Path,
    underlyings: Sequence[str] = (),
    archive_url: str | None = None,
) -> Export:
    """Write the complete chains of New York's ``day`` to ``out_dir/date=DAY/UNDERLYING.ext``,
    one file per underlying (``fmt``: ``parquet`` or ``csv``), each written atomically.

    Only complete chains are exported: the slots ``chain`` would answer with. The files read
    as one hive-partitioned dataset (DuckDB: ``read_parquet('DIR/*/*.parquet',
    hive_partitioning = true)``).

    Raises:
        ConfigError: a bad ticker or setting.
        NotStoredError: no complete chain on ``day`` (of ``underlyings``, when named).
        ArchiveError, DatabaseError: a tier cannot be read.
        OptionsError: a file cannot be written.
    """
    tickers = [validate_underlying(u) for u in underlyings]
    start, end = day_bounds(day)
    files: list[ExportedFile] = []
    async with open_reader(settings, archive_url=archive_url) as reader:
        slots = await reader.complete_slots(start, end, tickers)
        if not slots:
            of = f" of {', '.join(tickers)}" if tickers else ""
            raise NotStoredError(f"no complete chain{of} on {day} (New York)")
        for underlying, its_slots in slots.items():
            read = await reader.slots(underlying, its_slots)
            path = out_dir / f"date={day.isoformat()}" / f"{underlying}.{fmt}"
            try:
                (write_parquet if fmt == "parquet" else write_csv)(read.table, path)
            except OSError as exc:
                raise OptionsError(f"cannot write {path}: {exc.strerror or exc}") from exc
            files.append(ExportedFile(path, underlying, read.table.num_rows, len(its_slots)))
    missing = tuple(t for t in tickers if t.removeprefix("I:") not in slots)
    return Export(tuple(files), missing)


async def draw_smile(
    settings: Settings,
    underlying: str,
    *,
    at: dt.datetime | None,
    out: Path,
    expirations: Sequence[dt.date] = (),
    archive_url: str | None = None,
) -> tuple[ChainRead, PlottedSmile]:
    """Plot the implied-volatility smile per expiration and the at-the-money term structure of
    the chain at ``at`` into ``out`` (PNG, or what its suffix names).

    Raises:
        ConfigError: matplotlib is not installed (the ``plot`` extra), a bad ticker or setting.
        NotStoredError: no complete chain at or before ``at``, or no implied volatility in it.
        ArchiveError, DatabaseError: a tier cannot be read.
        OptionsError: the picture cannot be written.
    """
    require_matplotlib()  # before reading: say at once what is missing
    chain = await read_chain(
        settings, underlying, at=at, expirations=expirations, archive_url=archive_url
    )
    smile = smile_of(chain.table, underlying=chain.underlying, captured_at=chain.captured_at)
    try:
        return chain, plot_smile(smile, out)
    except OSError as exc:
        raise OptionsError(f"cannot write {out}: {exc.strerror or exc}") from exc


def describe_chain(chain: ChainRead) -> str:
    """One line about a chain read: its slot, size, spot and where it was read from."""
    spots = [p for p in chain.table["underlying_price"].to_pylist() if p is not None]
    spot = f", underlying at {spots[0]:g}" if spots else ""
    asked = "latest" if chain.at is None else f"at {market_time(chain.at)}"
    return (
        f"{chain.underlying} chain {asked}: slot of {market_time(chain.captured_at)}, "
        f"{chain.table.num_rows:,} contracts{spot} (from {chain.source})"
    )


def describe_history(history: HistoryRead) -> str:
    """One line about a history read: its range, size and archived days."""
    archived = f", {len(history.archived_days)} archived days" if history.archived_days else ""
    return (
        f"{history.ticker} from {market_time(history.start)} to {market_time(history.end)}: "
        f"{history.table.num_rows:,} snapshots{archived}"
    )
