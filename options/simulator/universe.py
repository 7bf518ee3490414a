"""The simulated universe: which contracts each underlying has, and how to find them.

Everything is derived from ``(seed, underlying, as_of)`` through seeded generators, so two
processes with the same configuration list the same contracts. Chains are built per underlying
on first use and kept in a bounded LRU cache, because a 2,000 x 1,000 universe built up front
would cost gigabytes and minutes. Their market state lives in :mod:`options.simulator.market`.
"""

from __future__ import annotations

import datetime as dt
import math
import operator
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from options.simulator.config import SimulatorConfig, option_root

CONTRACTS_PER_EXPIRATION = 100
MAX_EXPIRATIONS = 104
ADJUSTED_EVERY = 50
CACHED_CONTRACTS = 60_000
FILTERS_PER_CHAIN = 32
STRIKE_STEPS = (0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0)
PRIMARY_EXCHANGES = ("BATO", "XCBO", "XISX", "ARCO", "XPHL", "AMXO", "MPRL", "XBOX")

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "": operator.eq,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}

# One contract's market constants, built by options.simulator.market on first snapshot.
Static = tuple[Any, ...]


class ContractFilter:
    """The contract filters both list endpoints share, parsed and validated once."""

    __slots__ = ("contract_type", "expiration", "key", "strike")

    PARAMS = (
        "contract_type",
        *(f"expiration_date{s}" for s in ("", ".gt", ".gte", ".lt", ".lte")),
        *(f"strike_price{s}" for s in ("", ".gt", ".gte", ".lt", ".lte")),
    )

    def __init__(self, params: dict[str, str]) -> None:
        """Parse the filter parameters; raise ``ValueError`` naming the bad one."""
        self.key = tuple(sorted(params.items()))
        self.contract_type: bool | None = None
        self.expiration: list[tuple[Callable[[Any, Any], bool], str]] = []
        self.strike: list[tuple[Callable[[Any, Any], bool], float]] = []
        for name, value in params.items():
            field_name, _, op = name.partition(".")
            if field_name == "contract_type":
                if value not in ("call", "put"):
                    raise ValueError("contract_type must be 'call' or 'put'")
                self.contract_type = value == "call"
            elif field_name == "expiration_date":
                try:
                    dt.date.fromisoformat(value)
                except ValueError:
                    raise ValueError(f"{name} must be a date like 2024-01-19") from None
                self.expiration.append((_COMPARE[op], value))
            else:
                try:
                    strike = float(value)
                except ValueError:
                    raise ValueError(f"{name} must be a number") from None
                if not math.isfinite(strike):
                    raise ValueError(f"{name} must be a number")
                self.strike.append((_COMPARE[op], strike))

    @classmethod
    def from_query(cls, query: Any) -> ContractFilter:
        """Pick the filter parameters out of a request query."""
        return cls({name: query[name] for name in cls.PARAMS if name in query})


class Chain:
    """One underlying: its spot model, its contracts in ticker order, and lazily built caches."""

    __slots__ = (
        "_by_ticker",
        "_contract_json",
        "_filtered",
        "adjusted",
        "as_of",
        "exercise_style",
        "expirations",
        "is_call",
        "is_index",
        "malformed_contracts",
        "malformed_snapshots",
        "name",
        "phases",
        "root",
        "seed",
        "shares",
        "spot0",
        "statics",
        "strikes",
        "tickers",
        "underlying_ticker",
        "vol",
    )

    def __init__(self, name: str, *, seed: int, contracts: int, as_of: dt.date) -> None:
        """Lay out ``contracts`` contracts for ``name`` around its deterministic spot price."""
        self.name = name
        self.seed = seed
        self.as_of = as_of
        self.is_index = name.startswith("I:")
        self.root = option_root(name)
        self.underlying_ticker = name.removeprefix("I:")
        self.exercise_style = "european" if self.is_index else "american"
        rng = random.Random(f"{seed}:{name}:underlying")
        if self.is_index:
            self.spot0 = round(rng.uniform(1000.0, 6000.0), 2)
            self.vol = rng.uniform(0.12, 0.25)
        else:
            self.spot0 = round(math.exp(rng.uniform(math.log(20.0), math.log(600.0))), 2)
            self.vol = rng.uniform(0.2, 0.8)
        self.phases = (rng.uniform(0, math.tau), rng.uniform(0, math.tau))
        self.tickers: list[str] = []
        self.is_call: list[bool] = []
        self.expirations: list[str] = []
        self.strikes: list[float] = []
        self.shares: list[int] = []
        self.adjusted: dict[int, list[dict[str, Any]]] = {}
        self._lay_out(contracts, rng)
        self._by_ticker: dict[str, int] | None = None
        self._contract_json: list[bytes] | None = None
        self.statics: list[Static] | None = None
        # Positions served malformed on purpose; the Universe fills them from the config.
        self.malformed_contracts: frozenset[int] = frozenset()
        self.malformed_snapshots: frozenset[int] = frozenset()
        self._filtered: OrderedDict[tuple[tuple[str, str], ...], list[int]] = OrderedDict()

    def _lay_out(self, contracts: int, rng: random.Random) -> None:
        n_exp = min(MAX_EXPIRATIONS, max(1, contracts // CONTRACTS_PER_EXPIRATION))
        per_exp = [contracts // n_exp + (1 if i < contracts % n_exp else 0) for i in range(n_exp)]
        n_strikes = (max(per_exp) + 1) // 2
        # Cover about +-40% of spot so every chain has deep ITM (beyond 20%) calls and puts.
        wanted = 0.8 * self.spot0 / max(n_strikes, 1)
        step = next((s for s in STRIKE_STEPS if s >= wanted), STRIKE_STEPS[-1])
        start = max(step, round(self.spot0 / step) * step - (n_strikes // 2) * step)
        grid = [start + j * step for j in range(n_strikes)]
        codes = [f"{round(strike * 1000):08d}" for strike in grid]
        first = self.as_of + dt.timedelta(days=(4 - self.as_of.weekday()) % 7)
        adjusted_offset = rng.randrange(ADJUSTED_EVERY)
        for week, count in enumerate(per_exp):
            expiry = first + dt.timedelta(weeks=week)
            iso = expiry.isoformat()
            yymmdd = expiry.strftime("%y%m%d")
            for is_call, kind_count in ((True, (count + 1) // 2), (False, count // 2)):
                letter = "C" if is_call else "P"
                prefix = f"O:{self.root}{yymmdd}{letter}"
                for strike, code in zip(grid[:kind_count], codes, strict=False):
                    number = len(self.tickers)
                    self.tickers.append(prefix + code)
                    self.is_call.append(is_call)
                    self.expirations.append(iso)
                    self.strikes.append(strike)
                    if (number + adjusted_offset) % ADJUSTED_EVERY == 0:
                        # A corporate action left this contract with a non-standard deliverable.
                        self.shares.append(150)
                        self.adjusted[number] = [
                            {"amount": 50, "type": "equity", "underlying": self.root + "W"}
                        ]
                    else:
                        self.shares.append(100)

    # --- lookups -----------------------------------------------------------------------------

    def find(self, ticker: str) -> int | None:
        """Return the position of ``ticker`` in this chain, or ``None``."""
        if self._by_ticker is None:
            self._by_ticker = {t: i for i, t in enumerate(self.tickers)}
        return self._by_ticker.get(ticker)

    def select(self, flt: ContractFilter) -> Sequence[int]:
        """Return the positions of the contracts that pass ``flt``, in ticker order."""
        if not flt.key:
            return range(len(self.tickers))
        cached = self._filtered.get(flt.key)
        if cached is not None:
            self._filtered.move_to_end(flt.key)
            return cached
        positions: Sequence[int] = range(len(self.tickers))
        if flt.contract_type is not None:
            is_call, want = self.is_call, flt.contract_type
            positions = [i for i in positions if is_call[i] is want]
        expirations, strikes = self.expirations, self.strikes
        for cmp, day in flt.expiration:
            positions = [i for i in positions if cmp(expirations[i], day)]
        for cmp, strike in flt.strike:
            positions = [i for i in positions if cmp(strikes[i], strike)]
        selected = list(positions)
        self._filtered[flt.key] = selected
        if len(self._filtered) > FILTERS_PER_CHAIN:
            self._filtered.popitem(last=False)
        return selected

    # --- reference data ----------------------------------------------------------------------

    def contract_json(self) -> list[bytes]:
        """Return every contract pre-rendered as JSON, in ticker order (built once)."""
        if self._contract_json is None:
            cfi_style = "EICS" if self.is_index else "ASPS"
            rng = random.Random(f"{self.seed}:{self.name}:contracts")
            exchange = PRIMARY_EXCHANGES[rng.randrange(len(PRIMARY_EXCHANGES))]
            # Plain formatting is several times cheaper than dicts through orjson here, and
            # every value is a known-safe string or number.
            kinds = {
                True: f'"cfi":"OC{cfi_style}","contract_type":"call"',
                False: f'"cfi":"OP{cfi_style}","contract_type":"put"',
            }
            style = f'"exercise_style":"{self.exercise_style}","expiration_date":"'
            middle = f'","primary_exchange":"{exchange}","shares_per_contract":'
            tail = f'","underlying_ticker":"{self.underlying_ticker}"}}'
            expirations: Sequence[str] = self.expirations
            if self.malformed_contracts:
                # A datetime where a date belongs: a strict normalizer rejects the row, while
                # its ticker stays readable.
                bad = self.malformed_contracts
                expirations = [
                    f"{expiry}T00:00:00Z" if i in bad else expiry
                    for i, expiry in enumerate(expirations)
                ]
            rendered = [
                f'{{{kinds[is_call]},{style}{expiry}{middle}{shares},"strike_price":'
                f'{json_number(strike)},"ticker":"{ticker}{tail}'.encode()
                for ticker, is_call, expiry, shares, strike in zip(
                    self.tickers,
                    self.is_call,
                    expirations,
                    self.shares,
                    self.strikes,
                    strict=True,
                )
            ]
            for i, extra in self.adjusted.items():
                prefix = b'{"additional_underlyings":' + orjson.dumps(extra) + b","
                rendered[i] = prefix + rendered[i][1:]
            self._contract_json = rendered
        return self._contract_json


class Universe:
    """All underlyings of one configuration, built lazily and kept in a bounded LRU cache."""

    def __init__(self, config: SimulatorConfig, as_of: dt.date) -> None:
        """Index the configured names; no chain is built yet."""
        self.config = config
        self.as_of = as_of
        # Sorted by option root, the concatenated chains are in global ticker order.
        self.names = tuple(sorted(config.underlyings, key=option_root))
        self._lookup: dict[str, str] = {}
        for name in config.underlyings:
            self._lookup[name] = name
            self._lookup.setdefault(name.removeprefix("I:"), name)
        self._by_root = {option_root(name): name for name in config.underlyings}
        self._capacity = max(4, CACHED_CONTRACTS // config.contracts_per_underlying)
        self._chains: OrderedDict[tuple[str, dt.date], Chain] = OrderedDict()

    def resolve(self, name: str) -> str | None:
        """Return the configured name for ``name`` (``SPX`` finds ``I:SPX``), or ``None``."""
        return self._lookup.get(name)

    def chain(self, name: str, as_of: dt.date | None = None) -> Chain:
        """Return the chain of a configured underlying name as listed on ``as_of`` (``None``:
        the universe's day), building it on first use. A past day's chain is laid out as the
        universe's own is, from that day: its weekly expirations start that week."""
        day = self.as_of if as_of is None else as_of
        key = (name, day)
        chain = self._chains.get(key)
        if chain is not None:
            self._chains.move_to_end(key)
            return chain
        chain = Chain(
            name,
            seed=self.config.seed,
            contracts=self.config.contracts_per_underlying,
            as_of=day,
        )
        config = self.config
        if config.malformed_contracts_rate:
            chain.malformed_contracts = frozenset(
                i for i, ticker in enumerate(chain.tickers) if config.malformed_contract(ticker)
            )
        if config.malformed_snapshots_rate:
            chain.malformed_snapshots = frozenset(
                i for i, ticker in enumerate(chain.tickers) if config.malformed_snapshot(ticker)
            )
        self._chains[key] = chain
        if len(self._chains) > self._capacity:
            self._chains.popitem(last=False)
        return chain

    def locate(self, ticker: str, as_of: dt.date | None = None) -> tuple[Chain, int] | None:
        """Return the chain and position of option ``ticker`` as listed on ``as_of`` (``None``:
        the universe's day), or ``None`` if it is not listed then."""
        if not ticker.startswith("O:") or len(ticker) < 18:
            return None
        name = self._by_root.get(ticker[2:-15])
        if name is None:
            return None
        chain = self.chain(name, as_of)
        position = chain.find(ticker)
        return None if position is None else (chain, position)


def json_number(value: float) -> int | float:
    """Return ``value`` as the API writes it: whole strikes as integers (65), others as 2.5."""
    # The API writes whole strikes as integers (65) and others as decimals (2.5).
    return int(value) if value.is_integer() else value
