"""The simulator's knobs: one frozen :class:`SimulatorConfig`, and names for large universes."""

from __future__ import annotations

import datetime as dt
import hashlib
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
        latency_spike_rate: fraction of API requests delayed by ``latency_spike`` more seconds.
        latency_spike: seconds a spiked request waits on top of ``latency``.
        error_rate: fraction of API requests answered 500, 502 or 503.
        requests_per_second: token-bucket rate; above it, 429 with ``Retry-After``.
        throttle_bursts: N > 0 answers 429 with ``Retry-After: 1`` to the
            ``throttle_burst_length`` requests after every N-th request (counting authenticated
            requests to API routes that are not themselves in a burst), whatever
            ``requests_per_second`` says; 0 turns bursts off.
        throttle_burst_length: requests per 429 burst.
        truncate_rate: fraction of list pages whose body is cut short.
        deep_itm_without_greeks: deep ITM contracts lose ``greeks`` (half also the IV).
        broken_pages: underlying -> 1-based page number that always answers 500.
        looping_pages: underlying -> page number n >= 2 of its chain snapshot and of its
            ``underlying_ticker`` contracts listing whose ``next_url`` is the URL that led to page
            n, so following it never ends (even when page n is the last).
        malformed_contracts_rate: fraction of contracts served, in the listing and alone, with
            ``expiration_date`` as a datetime (``"2030-01-18T00:00:00Z"``); chosen per ticker
            (:meth:`malformed_contract`), so the same contracts on every request and run.
        malformed_snapshots_rate: fraction of contracts whose snapshot (in the chain and alone)
            has ``open_interest`` as a string like ``"12x"``; chosen per ticker
            (:meth:`malformed_snapshot`).
        hidden_contracts: underlying -> k: its first k contracts in ticker order are missing from
            its chain snapshot (the single-contract snapshot answers 404) yet still listed as
            contracts.
        seed: seed of the universe and of every random knob.
        as_of: the "today" the universe is built around; ``None`` is today's UTC date.
        cache_chain_pages: render each chain-snapshot page once and serve the same rows again
            (prices then stop drifting): for benchmarks, where the simulator stands in for a
            remote server whose CPU is not on the benchmarked machine. About 1 KB of memory
            per contract. Every fault knob applies to cached pages too.
    """

    underlyings: tuple[str, ...] = ("AAA", "BBB", "CCC", "DDD", "EEE")
    contracts_per_underlying: int = 2000
    api_key: str | None = "sim-key"
    latency: float = 0.0
    latency_spike_rate: float = 0.0
    latency_spike: float = 1.0
    error_rate: float = 0.0
    requests_per_second: float | None = None
    throttle_bursts: int = 0
    throttle_burst_length: int = 5
    truncate_rate: float = 0.0
    deep_itm_without_greeks: bool = True
    broken_pages: Mapping[str, int] = field(default_factory=dict)
    looping_pages: Mapping[str, int] = field(default_factory=dict)
    malformed_contracts_rate: float = 0.0
    malformed_snapshots_rate: float = 0.0
    hidden_contracts: Mapping[str, int] = field(default_factory=dict)
    seed: int = 0
    as_of: dt.date | None = None
    cache_chain_pages: bool = False

    def __post_init__(self) -> None:
        # Callers pass lists and dicts; freeze them so the config cannot change under the app.
        object.__setattr__(self, "underlyings", tuple(self.underlyings))
        for knob in ("broken_pages", "looping_pages", "hidden_contracts"):
            object.__setattr__(self, knob, dict(getattr(self, knob)))
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
        for knob in (
            "error_rate",
            "truncate_rate",
            "latency_spike_rate",
            "malformed_contracts_rate",
            "malformed_snapshots_rate",
        ):
            if not 0.0 <= getattr(self, knob) <= 1.0:
                raise ValueError(f"{knob} must be between 0 and 1")
        for knob in ("latency", "latency_spike"):
            if getattr(self, knob) < 0:
                raise ValueError(f"{knob} must be >= 0 seconds")
        if self.requests_per_second is not None and self.requests_per_second <= 0:
            raise ValueError("requests_per_second must be > 0, or None for no limit")
        if not isinstance(self.throttle_bursts, int) or self.throttle_bursts < 0:
            raise ValueError("throttle_bursts must be a request count >= 0 (0 for no bursts)")
        if not isinstance(self.throttle_burst_length, int) or self.throttle_burst_length < 1:
            raise ValueError("throttle_burst_length must be a request count >= 1")
        self._check_per_underlying("broken_pages", 1, "a page number")
        self._check_per_underlying("looping_pages", 2, "a page number")
        self._check_per_underlying("hidden_contracts", 0, "a contract count")

    def _check_per_underlying(self, knob: str, minimum: int, what: str) -> None:
        mapping: Mapping[str, int] = getattr(self, knob)
        for name, value in mapping.items():
            if name not in self.underlyings and f"I:{name}" not in self.underlyings:
                raise ValueError(f"{knob} names {name!r}, which is not an underlying")
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"{knob}[{name!r}] must be {what} >= {minimum}")

    def malformed_contract(self, ticker: str) -> bool:
        """Whether contract ``ticker`` is served with a datetime ``expiration_date``."""
        return _picked(self.seed, "contracts", ticker, self.malformed_contracts_rate)

    def malformed_snapshot(self, ticker: str) -> bool:
        """Whether the snapshot of contract ``ticker`` is served with a string open interest."""
        return _picked(self.seed, "snapshots", ticker, self.malformed_snapshots_rate)

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


def _picked(seed: int, kind: str, ticker: str, rate: float) -> bool:
    """Choose ``ticker`` with probability ``rate``, the same way in every process and run."""
    if not rate:
        return False
    digest = hashlib.blake2b(f"{seed}:{kind}:{ticker}".encode(), digest_size=8).digest()
    return int.from_bytes(digest) < rate * 2**64


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
