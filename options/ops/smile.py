"""The implied-volatility smile of a stored chain, per expiration, and its at-the-money term
structure, drawn with matplotlib (the optional extra ``plot``).

**Moneyness, not strike**, on the smile's axis: ``K / S``, the strike over the underlying's
price at the slot. Expirations of one chain share the axis whatever their strike grids, and
smiles of different days compare although the underlying moved; 1.0 is at the money, and a
reader still converts to strikes with one multiplication (S is in the title).

**Out-of-the-money contracts only**: puts below the underlying's price, calls at or above it,
as volatility surfaces are usually built. In-the-money prices are mostly intrinsic value and
their quotes are wide, so their implied volatilities are noisy (and the API often leaves them
out). A contract without an implied volatility, or with zero, is left out.

**At the money**: per expiration, the smile's implied volatility at ``K / S = 1``, interpolated
linearly between the two nearest strikes around it; an expiration whose strikes do not surround
the underlying's price has no point in the term structure. An expiration with fewer than two
usable contracts has no curve.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import pyarrow as pa

from options.errors import ConfigError, NotStoredError

MARKET_TZ = ZoneInfo("America/New_York")
INSTALL_HINT = (
    "the smile plot needs matplotlib, the optional extra `plot`: "
    "pip install 'options-history[plot]' (or poetry install --extras plot; make install has it)"
)
SMILE_GID, TERM_GID = "smile", "term"
"""The gid of the smile's lines and of the term structure's line in the figure."""


@dataclass(frozen=True)
class SmileCurve:
    """One expiration's smile: implied volatility against moneyness ``K / S``."""

    expiration: dt.date
    days: int
    moneyness: tuple[float, ...]
    iv: tuple[float, ...]
    atm_iv: float | None


@dataclass(frozen=True)
class Smile:
    """The smiles of one chain, nearest expiration first."""

    underlying: str
    captured_at: dt.datetime
    spot: float
    curves: tuple[SmileCurve, ...]

    @property
    def term(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The at-the-money term structure: days to expiration, implied volatility."""
        points = [(c.days, c.atm_iv) for c in self.curves if c.atm_iv is not None]
        return tuple(d for d, _ in points), tuple(v for _, v in points if v is not None)


@dataclass(frozen=True)
class PlottedSmile:
    """What the figure shows, read back from its lines.

    Attributes:
        path: the picture written.
        smiles: per expiration (its label), the smile line's x and y data.
        term: the term structure line's x (days) and y (implied volatility).
    """

    path: Path
    smiles: dict[str, tuple[tuple[float, ...], tuple[float, ...]]]
    term: tuple[tuple[float, ...], tuple[float, ...]]


def smile_of(table: pa.Table, *, underlying: str, captured_at: dt.datetime) -> Smile:
    """The smile of a chain (rows of ``snapshot_read``). Pure: no I/O.

    Raises:
        NotStoredError: the chain has no underlying price, or no expiration has two usable
            out-of-the-money implied volatilities.
    """
    spots = [p for p in table["underlying_price"].to_pylist() if p is not None and p > 0]
    if not spots:
        raise NotStoredError(f"the chain of {underlying} has no underlying price: no smile")
    spot = statistics.median(spots)
    today = captured_at.astimezone(MARKET_TZ).date()
    points: dict[dt.date, list[tuple[float, float]]] = {}
    for row in table.select(
        ["expiration_date", "strike_price", "contract_type", "implied_volatility"]
    ).to_pylist():
        expiration, strike, kind, iv = row.values()
        if expiration is None or strike is None or not _usable(iv):
            continue
        if (kind == "put" and strike < spot) or (kind == "call" and strike >= spot):
            points.setdefault(expiration, []).append((strike / spot, iv))
    curves = []
    for expiration in sorted(points):
        smile = sorted(points[expiration])
        if len(smile) < 2:
            continue
        x, y = zip(*smile, strict=True)
        curves.append(SmileCurve(expiration, (expiration - today).days, x, y, _at_the_money(smile)))
    if not curves:
        raise NotStoredError(
            f"the chain of {underlying} has no expiration with two out-of-the-money implied "
            "volatilities: no smile"
        )
    return Smile(underlying, captured_at, spot, tuple(curves))


def require_matplotlib() -> None:
    """Make sure matplotlib can be imported.

    Raises:
        ConfigError: it cannot; the message says how to install it.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None


def plot_smile(smile: Smile, path: Path, *, dpi: int = 110) -> PlottedSmile:
    """Draw ``smile`` (left: one line per expiration; right: the at-the-money term structure)
    into ``path``; the format follows its suffix (PNG by default).

    Raises:
        ConfigError: matplotlib is not installed.
        OSError: the file cannot be written.
    """
    require_matplotlib()
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    figure = Figure(figsize=(13, 5.5), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=(3, 2))
    colors = matplotlib.colormaps["viridis"]
    count = len(smile.curves)
    for i, curve in enumerate(smile.curves):
        left.plot(
            curve.moneyness,
            curve.iv,
            color=colors(i / max(count - 1, 1)),
            linewidth=1.3,
            label=f"{curve.expiration} ({curve.days}d)",
            gid=SMILE_GID,
        )
    left.axvline(1.0, color="0.6", linestyle=":", linewidth=1.0)
    left.set_xlabel(f"moneyness K / S  (S = {smile.spot:g})")
    left.set_ylabel("implied volatility")
    left.set_title("smile per expiration (out-of-the-money puts and calls)")
    left.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    # beside the smiles, not over them: the legend's corner is where the wings rise
    left.legend(
        fontsize="x-small" if count > 12 else "small",
        ncols=2 if count > 24 else 1,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        title="expiration",
    )
    left.grid(alpha=0.3)
    days, atm = smile.term
    right.plot(days, atm, marker="o", color="tab:red", gid=TERM_GID)
    right.set_xlabel("days to expiration")
    right.set_ylabel("at-the-money implied volatility")
    right.set_title("at-the-money term structure")
    right.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    right.grid(alpha=0.3)
    when = smile.captured_at.astimezone(MARKET_TZ).strftime("%Y-%m-%d %H:%M %Z")
    figure.suptitle(f"{smile.underlying} implied volatility, slot of {when}")
    figure.savefig(path, dpi=dpi)
    smiles = {
        str(line.get_label()): (_floats(line.get_xdata()), _floats(line.get_ydata()))
        for line in left.get_lines()
        if line.get_gid() == SMILE_GID
    }
    (term,) = (line for line in right.get_lines() if line.get_gid() == TERM_GID)
    return PlottedSmile(path, smiles, (_floats(term.get_xdata()), _floats(term.get_ydata())))


def _usable(iv: float | None) -> bool:
    return iv is not None and math.isfinite(iv) and iv > 0


def _at_the_money(smile: list[tuple[float, float]]) -> float | None:
    """The implied volatility at moneyness 1, linear between the nearest points around it."""
    for (x0, y0), (x1, y1) in itertools.pairwise(smile):
        if x0 <= 1.0 <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (1.0 - x0) / (x1 - x0)
    return None


def _floats(values: Iterable[object]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)  # type: ignore[arg-type]
