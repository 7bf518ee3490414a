"""What one listing of an underlying covers: the configured filters as bounds, and the names.

Both jobs push the filters down to the API and must judge "not seen" only within what was
asked for: a put is not gone because only calls were listed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from zoneinfo import ZoneInfo

from options.api.polygon import PolygonClient
from options.config import Settings
from options.errors import ApiError

MARKET_TZ = ZoneInfo("America/New_York")


@dataclass(frozen=True)
class ListingScope:
    """The part of an underlying's chain one listing covers: its API filters, as bounds."""

    contract_type: str | None = None
    max_expiration: dt.date | None = None
    min_strike: Decimal | None = None
    max_strike: Decimal | None = None

    def api_params(self) -> dict[str, str]:
        """The query parameters that push these bounds down to the API."""
        params = {}
        if self.contract_type:
            params["contract_type"] = self.contract_type
        if self.max_expiration:
            params["expiration_date.lte"] = self.max_expiration.isoformat()
        if self.min_strike is not None:
            params["strike_price.gte"] = str(self.min_strike)
        if self.max_strike is not None:
            params["strike_price.lte"] = str(self.max_strike)
        return params


def market_today() -> dt.date:
    """Today's date in New York, the calendar option expirations follow."""
    return dt.datetime.now(MARKET_TZ).date()


def contract_underlying(underlying: str) -> str:
    """The ``underlying_ticker`` contracts carry: index options list ``SPX`` for ``I:SPX``."""
    return underlying.removeprefix("I:")


async def listing_scope(
    settings: Settings, client: PolygonClient, underlying: str, *, today: dt.date
) -> ListingScope:
    """Turn the configured filters into the bounds of one underlying's listing.

    The strike band needs the underlying's price; the previous close is used.

    Raises:
        ApiError: the price could not be fetched, or the API has none for this ticker.
    """
    contract_type = settings.contract_types[0] if settings.contract_types else None
    max_expiration = None
    if settings.max_days_to_expiration is not None:
        max_expiration = today + dt.timedelta(days=settings.max_days_to_expiration)
    min_strike = max_strike = None
    if settings.strike_band_percent is not None:
        spot = await client.previous_close(underlying)
        if spot is None:
            raise ApiError(
                f"{underlying}: no previous close to centre STRIKE_BAND_PERCENT on",
                underlying=underlying,
            )
        band = Decimal(str(settings.strike_band_percent)) / 100
        price = Decimal(str(spot))
        min_strike = (price * (1 - band)).quantize(Decimal("0.001"))
        max_strike = (price * (1 + band)).quantize(Decimal("0.001"))
    return ListingScope(contract_type, max_expiration, min_strike, max_strike)
