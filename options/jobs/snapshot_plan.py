"""Planning a snapshot: the chains of a slot, and each chain's slices by expiration date.

A :class:`Chain` is one underlying's snapshot in progress. Before its first page is asked for,
:func:`plan_chain` learns which contracts the database knows for it (those the chain should
return, and those it may return without them being new), and :func:`plan_slices` splits a large
chain into independent :class:`Slice` queries by expiration date so its pages do not all wait in
line.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from options.api.normalize import SnapshotRow
from options.api.polygon import PolygonClient
from options.config import Settings
from options.jobs.filters import ListingScope, contract_underlying, listing_scope
from options.store.db import bounded_db_connection
from options.store.rejects import Reject
from options.store.slots import ChainCommit, PlannedChain

SLICE_CONTRACTS = 2_500  # a known chain larger than this (10 pages) is split by expiration


@dataclass(eq=False)
class Chain:
    """One underlying's snapshot in progress: what is known, fetched, and how it ended."""

    underlying: str
    key: str
    resumed: bool = False
    expected: set[str] = field(default_factory=set)
    known: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)
    rows: list[SnapshotRow] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    rejected: int = 0
    slices: int = 1
    slices_done: int = 0
    slices_ended: int = 0
    pages: int = 0
    errors: list[str] = field(default_factory=list)
    committed: ChainCommit | None = None

    @property
    def read_to_end(self) -> bool:
        """Every slice's last page had no ``next_url`` and every page parsed."""
        return not self.errors and self.slices_done == self.slices

    @property
    def settled(self) -> bool:
        """Every slice has ended, read to the end or not."""
        return self.slices_ended >= self.slices

    def end_slice(self, *, done: bool, error: str | None = None) -> bool:
        """Count one slice as ended; returns whether that was the chain's last."""
        if error is not None:
            self.errors.append(error)
        self.slices_ended += 1
        self.slices_done += done
        return self.settled

    def to_commit(self) -> ChainCommit:
        """What the writer stores; the chain gives up its rows (they are the writer's now)."""
        commit = ChainCommit(
            key=self.key,
            rows=self.rows,
            expected=self.expected,
            rejects=self.rejects,
            rejected=self.rejected,
            pages=self.pages,
            read_to_end=self.read_to_end,
            error="; ".join(self.errors) or None,
            resumed=self.resumed,
        )
        self.rows, self.rejects = [], []
        self.expected, self.known, self.seen = set(), set(), set()
        return commit


@dataclass(frozen=True)
class Slice:
    """One independent query of a chain: the whole chain, or a range of expiration dates."""

    chain: Chain
    scope: ListingScope
    first_expiration: dt.date | None = None
    last_expiration: dt.date | None = None

    def api_params(self) -> dict[str, str]:
        """The chain query's filters: the configured scope, narrowed to this slice's dates."""
        params = self.scope.api_params()
        last = self.last_expiration
        if self.scope.max_expiration is not None:
            last = (
                self.scope.max_expiration if last is None else min(last, self.scope.max_expiration)
            )
        if self.first_expiration is not None:
            params["expiration_date.gte"] = self.first_expiration.isoformat()
        if last is not None:
            params["expiration_date.lte"] = last.isoformat()
        return params


def planned_chains(underlyings: Sequence[str]) -> list[PlannedChain]:
    """The chains of a new slot, one per underlying (an index is asked for as ``I:SPX``)."""
    return [PlannedChain(u, contract_underlying(u)) for u in underlyings]


async def plan_chain(
    settings: Settings,
    client: PolygonClient,
    pool: asyncpg.Pool,
    chain: Chain,
    *,
    today: dt.date,
) -> list[Slice]:
    """Learn what the database knows of ``chain``, then split it into slices.

    Sets the chain's ``known`` and ``expected`` contracts and its number of slices.

    Returns:
        The slices to fetch, from :func:`plan_slices`.
    """
    scope = await listing_scope(settings, client, chain.underlying, today=today)
    rows = await _known_contracts(pool, chain.key, today, scope)
    chain.known = {row[0] for row in rows}
    chain.expected = {row[0] for row in rows if row[1]}
    slices = plan_slices(chain, [row[2] for row in rows if row[3]], scope)
    chain.slices = len(slices)
    return slices


def plan_slices(
    chain: Chain, expirations: Sequence[dt.date | None], scope: ListingScope
) -> list[Slice]:
    """Split a chain into expiration ranges of about SLICE_CONTRACTS known contracts each.

    The ranges tile the whole date line (the first is open below, the last open above), so a
    contract with an expiration the database has never seen, or none at all, is still inside
    exactly one slice (the API is asked with the dates it has).
    """
    dated = [day for day in expirations if day is not None]
    if len(expirations) <= SLICE_CONTRACTS or not dated:
        return [Slice(chain, scope)]
    counts: dict[dt.date, int] = {}
    for day in dated:
        counts[day] = counts.get(day, 0) + 1
    bounds: list[dt.date] = []  # last expiration of each slice but the last
    running = 0
    for day in sorted(counts):
        running += counts[day]
        if running >= SLICE_CONTRACTS:
            bounds.append(day)
            running = 0
    if bounds and bounds[-1] == max(counts):
        bounds.pop()  # the last slice must not be empty by construction
    slices = []
    first: dt.date | None = None
    for last in bounds:
        slices.append(Slice(chain, scope, first, last))
        first = last + dt.timedelta(days=1)
    slices.append(Slice(chain, scope, first, None))
    if scope.max_expiration is not None:
        slices = [
            s
            for s in slices
            if s.first_expiration is None or s.first_expiration <= scope.max_expiration
        ]
    return slices


@bounded_db_connection("reading the known contracts of {underlying}")
async def _known_contracts(
    conn: asyncpg.Connection, underlying: str, today: dt.date, scope: ListingScope
) -> list[asyncpg.Record]:
    """The unexpired contracts of an underlying: (ticker, expected, expiration, active).

    ``expected``: active and inside the filters, so the chain should return it.
    """
    return await conn.fetch(
        """
        SELECT ticker,
               active AND ($3::text IS NULL OR contract_type = $3)
                      AND ($4::date IS NULL OR expiration_date <= $4)
                      AND ($5::numeric IS NULL OR strike_price >= $5)
                      AND ($6::numeric IS NULL OR strike_price <= $6),
               expiration_date,
               active
        FROM option_contracts
        WHERE underlying_ticker = $1 AND (expiration_date >= $2 OR expiration_date IS NULL)
        """,
        underlying,
        today,
        scope.contract_type,
        scope.max_expiration,
        scope.min_strike,
        scope.max_strike,
    )
