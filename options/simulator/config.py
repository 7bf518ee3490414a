"""The simulator's knobs: one frozen :class:`SimulatorConfig`, and names for large universes."""

from __future__ import annotations

import datetime as dt
import re
import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

_NAME_RE = re.compile(r"^(I:)?[A-Z][A-Z0-9.]{0,9}$")


@dataclass(frozen=True)
class SimulatorConfig:
    """What the simulated API serves and how badly it behaves.

    Every random knob draws from generators seeded by ``seed``, so one configuration answers the
    same request sequence the same way. Market values also depend on the wall-clock minute.

    Attributes:
        underlyings: underlying names; ``"I:SPX"`` style names are index underlyings.
        contracts_per_underlying: exactly this many contracts per underlying.
        api_key: the accepted key, or ``None`` to accept any request.
        latency: seconds added to every API response.
        error_rate: fraction of API requests answered 500, 502 or 503.
        requests_per_second: token-bucket rate; above it, 429 with ``Retry-After``.
        truncate_rate: fraction of list pages whose body is cut short.
        deep_itm_without_greeks: deep ITM contracts lose ``greeks`` (half also the IV).
        broken_pages: underlying -> 1-based page number that always answers 500.
        seed: seed of the universe and of every random knob.
        as_of: the "today" the universe is built around; ``None`` is today's UTC date.
        cache_chain_pages: render each chain-snapshot page once and serve the same rows again
            (prices then stop drifting): for benchmarks, where the simulator stands in for a
            remote server whose CPU is not on the benchmarked machine. About 1 KB of memory
            per contract.
    """

    underlyings: tuple[str, ...] = ("AAA", "BBB", "CCC", "DDD", "EEE")
    contracts_per_underlying: int = 2000
    api_key: str | None = "sim-key"
    latency: float = 0.0
    error_rate: float = 0.0
    requests_per_second: float | None = None
    truncate_rate: float = 0.0
    deep_itm_without_greeks: bool = True
    broken_pages: Mapping[str, int] = field(default_factory=dict)
    seed: int = 0
    as_of: dt.date | None = None
    cache_chain_pages: bool = False

    def __post_init__(self) -> None:
        # Callers pass lists and dicts; freeze them so the config cannot change under the app.
        object.__setattr__(self, "underlyings", tuple(self.underlyings))
        object.__setattr__(self, "broken_pages", dict(self.broken_pages))
        if not self.underlyings:
            raise ValueError("underlyings must name at least one underlying")
        roots: set[str] = set()
        for name in self.underlyings:
            if not _NAME_RE.match(name):
                raise ValueError(f"underlying {name!r} is not like 'AAPL', 'BRK.B' or 'I:SPX'")
            root = option_root(name)
            if root in roots:
                raise ValueError(f"underlying {name!r} repeats an option root ({root})")
            roots.add(root)
        if self.contracts_per_underlying < 1:
            raise ValueError("contracts_per_underlying must be at least 1")
        for knob in ("error_rate", "truncate_rate"):
            if not 0.0 <= getattr(self, knob) <= 1.0:
                raise ValueError(f"{knob} must be between 0 and 1")
        if self.latency < 0:
            raise ValueError("latency must be >= 0 seconds")
        if self.requests_per_second is not None and self.requests_per_second <= 0:
            raise ValueError("requests_per_second must be > 0, or None for no limit")
        for name, page in self.broken_pages.items():
            if name not in self.underlyings and f"I:{name}" not in self.underlyings:
                raise ValueError(f"broken_pages names {name!r}, which is not an underlying")
            if not isinstance(page, int) or page < 1:
                raise ValueError(f"broken_pages[{name!r}] must be a page number >= 1")

    def to_json(self) -> str:
        """Serialize for :meth:`from_json` (the simulator child process reads it)."""
        data = asdict(self)
        data["as_of"] = self.as_of.isoformat() if self.as_of else None
        return orjson.dumps(data).decode()

    @classmethod
    def from_json(cls, text: str) -> SimulatorConfig:
        """Build a config from :meth:`to_json` output; absent keys take their defaults."""
        data: dict[str, Any] = orjson.loads(text)
        if data.get("as_of"):
            data["as_of"] = dt.date.fromisoformat(data["as_of"])
        if "underlyings" in data:
            data["underlyings"] = tuple(data["underlyings"])
        return cls(**data)


def option_root(name: str) -> str:
    """Return the option root of an underlying name: ``I:SPX`` -> ``SPX``, ``BRK.B`` -> ``BRKB``."""
    return name.removeprefix("I:").replace(".", "")


def make_universe_names(count: int) -> tuple[str, ...]:
    """Return ``count`` distinct four-letter tickers in order: AAAA, AAAB, ..., AAAZ, AABA, ...

    Five letters are used once four run out (456,976 names).
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    letters = string.ascii_uppercase
    width = 4 if count <= 26**4 else 5
    names = []
    for number in range(count):
        chars = []
        for _ in range(width):
            number, digit = divmod(number, 26)
            chars.append(letters[digit])
        names.append("".join(reversed(chars)))
    return tuple(names)
