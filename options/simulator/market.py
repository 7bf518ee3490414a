"""The simulated market state: quotes, trades, greeks and bars of a chain in a wall-clock minute.

Values are a pure function of the chain and the minute (minutes since the epoch): they drift from
one minute to the next, so successive snapshots differ, yet two processes agree within a minute.
Prices come from Black-Scholes with zero rates on a per-contract volatility smile.

Every time served (quote, trade, bar, underlying) is at or before the start of the minute it is
rendered for: the app renders the current minute, so no time is ever later than the moment it
answers, as with the real API (a quote cannot have been updated after it was read).
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Sequence
from typing import Any

import orjson

from options.simulator.universe import Chain, Static, json_number

NS_PER_MINUTE = 60_000_000_000
DEEP_ITM_RATIO = 1.2
NO_TRADE_FRACTION = 0.03
SHAPES = 509
OPTION_EXCHANGES = (300, 301, 302, 303, 304, 307, 308, 309, 312, 313, 315, 316, 319, 322, 323)
TRADE_CONDITIONS = ([209], [219], [227], [232], [209, 219])
TIMEFRAME = "REAL-TIME"
# Where open interest sits in a contract's Static tuple (see _build_statics).
_OPEN_INTEREST = 8

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _make_shapes() -> tuple[tuple[tuple[Any, ...], ...], tuple[tuple[Any, ...], ...]]:
    """Return shared tables of day-bar and quote/trade constants that contracts pick from.

    A contract holds a reference to one row of each table instead of a dozen numbers of its own:
    this halves the cost of building an underlying, and nobody reads the repetition.
    """
    rng = random.Random("options-simulator-shapes")
    rand = rng.random
    day = tuple(
        (
            0.01 + 0.04 * rand(),  # relative half spread, below 2.00
            math.exp(0.1 * (rand() - 0.5)),  # previous close vs fair value
            math.exp(0.05 * (rand() - 0.5)),  # open vs previous close
            0.03 * rand(),  # high above max(open, close)
            0.03 * rand(),  # low below min(open, close)
            rand(),  # vwap position between low and high
        )
        for _ in range(SHAPES)
    )
    n_exch, n_cond = len(OPTION_EXCHANGES), len(TRADE_CONDITIONS)
    trade = tuple(
        (
            int(rand() * 500) + 1,  # bid size
            int(rand() * 500) + 1,  # ask size
            OPTION_EXCHANGES[int(rand() * n_exch)],  # bid exchange
            OPTION_EXCHANGES[int(rand() * n_exch)],  # ask exchange
            int(rand() * NS_PER_MINUTE),  # quote time within the minute before
            rand() < 0.5,  # last trade at the ask, else at the bid
            OPTION_EXCHANGES[int(rand() * n_exch)],  # trade exchange
            int(rand() * 20) + 1,  # trade size
            int(rand() * 90 * NS_PER_MINUTE),  # trade age
            TRADE_CONDITIONS[int(rand() * n_cond)],
        )
        for _ in range(SHAPES)
    )
    return day, trade


_DAY_SHAPES, _TRADE_SHAPES = _make_shapes()


def spot_at(chain: Chain, minute: int) -> float:
    """Return the underlying price in wall-clock ``minute`` (minutes since the epoch)."""
    ph1, ph2 = chain.phases
    wave = 0.012 * math.sin(minute / 97.0 + ph1) + 0.004 * math.sin(minute / 13.0 + ph2)
    return round(prev_close(chain, minute // 1440) * math.exp(wave), 4)


def prev_close(chain: Chain, day: int) -> float:
    """Return the previous session's close as of UTC ``day`` (days since the epoch)."""
    return round(chain.spot0 * math.exp(0.03 * math.sin(day * 0.7 + chain.phases[0])), 2)


def _build_statics(chain: Chain) -> list[Static]:
    """Draw the per-contract constants the snapshot renderer unpacks (once per chain)."""
    rng = random.Random(f"{chain.seed}:{chain.name}:{chain.as_of.isoformat()}:market")
    rand = rng.random
    ln_spot0 = math.log(chain.spot0)
    vol = chain.vol
    n_day, n_trade = len(_DAY_SHAPES), len(_TRADE_SHAPES)
    sqrt_years = {
        iso: math.sqrt(max((dt.date.fromisoformat(iso) - chain.as_of).days, 0.5) / 365.0)
        for iso in set(chain.expirations)
    }
    heads = {
        is_call: f'{{"contract_type":"{"call" if is_call else "put"}",'
        f'"exercise_style":"{chain.exercise_style}","expiration_date":"'
        for is_call in (True, False)
    }
    # Strikes repeat across expirations: do their logs, smile and JSON text once.
    per_strike = {}
    for strike in set(chain.strikes):
        ln_strike = math.log(strike)
        away = abs(ln_strike - ln_spot0)
        per_strike[strike] = (
            ln_strike,
            vol * (1.0 + min(0.8 * away * away, 0.6)),
            math.exp(-3.0 * away),
            f',"strike_price":{json_number(strike)},"ticker":"',
        )
    fragment = orjson.Fragment
    statics: list[Static] = []
    append = statics.append
    for i, (ticker, strike, is_call, expiry, shares) in enumerate(
        zip(
            chain.tickers,
            chain.strikes,
            chain.is_call,
            chain.expirations,
            chain.shares,
            strict=True,
        )
    ):
        ln_strike, iv_base, liquidity, strike_json = per_strike[strike]
        activity = rand()
        details = (
            f'{heads[is_call]}{expiry}","shares_per_contract":{shares}{strike_json}{ticker}"}}'
        )
        append(
            (
                strike,
                ln_strike,
                sqrt_years[expiry],
                is_call,
                iv_base * (0.95 + 0.1 * rand()),
                i * 2.399963,  # IV drift phase: the golden angle spreads contracts evenly
                int(400.0 * liquidity * rand()) + 1,  # volume at midnight UTC
                0.5 * liquidity * activity,  # volume per minute
                int(8000.0 * liquidity * rand()),  # open interest
                activity < NO_TRADE_FRACTION,  # no trade yet today
                rand() < 0.5,  # when deep ITM, IV is missing too
                _DAY_SHAPES[int(rand() * n_day)],
                _TRADE_SHAPES[int(rand() * n_trade)],
                fragment(details.encode()),
            )
        )
    for i in chain.malformed_snapshots:
        # A string where a number belongs; details.ticker stays readable.
        static = statics[i]
        oi = _OPEN_INTEREST
        statics[i] = (*static[:oi], f"{static[oi]}x", *static[oi + 1 :])
    return statics


def snapshot_rows(
    chain: Chain, positions: Sequence[int], minute: int, *, deep_itm_without_greeks: bool
) -> list[dict[str, Any]]:
    """Render chain-snapshot objects for the contracts at ``positions`` in ``minute``."""
    if chain.statics is None:
        chain.statics = _build_statics(chain)
    statics = chain.statics
    spot = spot_at(chain, minute)
    ln_spot = math.log(spot)
    minute_ns = minute * NS_PER_MINUTE
    drift = minute * 0.05
    minute_of_day = minute % 1440
    asset_key = "value" if chain.is_index else "price"
    # Quote and underlying times fall in the minute before ``minute``: never in the future.
    last_minute_ns = minute_ns - NS_PER_MINUTE
    asset_ts = last_minute_ns + (minute * 7919 % 60_000) * 1_000_000
    asset_ticker = chain.name
    exp, erf, sin = math.exp, math.erf, math.sin
    inv_sqrt2, inv_sqrt_2pi, ratio = _INV_SQRT2, _INV_SQRT_2PI, DEEP_ITM_RATIO
    rows: list[dict[str, Any]] = []
    append = rows.append
    for i in positions:
        (
            strike,
            ln_strike,
            sqrt_t,
            is_call,
            iv0,
            phase,
            volume0,
            volume_rate,
            open_interest,
            no_trade,
            drop_iv,
            (spread, prev_f, open_f, high_f, low_f, vwap_w),
            (
                bid_size,
                ask_size,
                bid_exch,
                ask_exch,
                quote_off,
                at_ask,
                trade_exch,
                trade_size,
                trade_age,
                conditions,
            ),
            details,
        ) = statics[i]
        iv = iv0 * (1.0 + 0.03 * sin(drift + phase))
        sst = iv * sqrt_t
        d1 = (ln_spot - ln_strike) / sst + 0.5 * sst
        nd1 = 0.5 + 0.5 * erf(d1 * inv_sqrt2)
        call = spot * nd1 - strike * (0.5 + 0.5 * erf((d1 - sst) * inv_sqrt2))
        # Zero rates: put-call parity without discounting.
        price = call if is_call else call - spot + strike
        if price < 0.01:
            price = 0.01
        # Spreads are a few cents on cheap contracts and a fraction of a percent on dear ones.
        half = 0.005 + spread * (price if price < 2.0 else 2.0) + 0.002 * price
        bid_c = (price - half) * 100.0 // 1.0
        if bid_c < 1.0:
            bid_c = 1.0
        ask_c = (price + half) * 100.0 // 1.0 + 1.0
        mid = (bid_c + ask_c) / 200.0
        break_even = strike + mid if is_call else strike - mid
        if no_trade:
            day: dict[str, Any] = {}
        else:
            close_c = ask_c if at_ask else bid_c
            prev_c = price * prev_f * 100.0 // 1.0 or 1.0
            open_c = prev_c * open_f // 1.0 or 1.0
            high_c = (open_c if open_c > close_c else close_c) + price * high_f * 100.0 // 1.0
            low_c = (open_c if open_c < close_c else close_c) - price * low_f * 100.0 // 1.0
            if low_c < 1.0:
                low_c = 1.0
            close, previous = close_c / 100.0, prev_c / 100.0
            # as the API computes them (its recorded responses): in binary floating point
            change = close - previous
            day = {
                "change": change,
                "change_percent": change / previous * 100.0,
                "close": close,
                "high": high_c / 100.0,
                "last_updated": minute_ns,
                "low": low_c / 100.0,
                "open": open_c / 100.0,
                "previous_close": previous,
                "volume": volume0 + int(volume_rate * minute_of_day),
                "vwap": (low_c + (high_c - low_c) * vwap_w) * 100.0 // 1.0 / 10000.0,
            }
        row = {
            "break_even_price": break_even,
            "day": day,
            "details": details,
            "fmv": (price * 100.0 + 0.5) // 1.0 / 100.0,
            "last_quote": {
                "ask": ask_c / 100.0,
                "ask_exchange": ask_exch,
                "ask_size": ask_size,
                "bid": bid_c / 100.0,
                "bid_exchange": bid_exch,
                "bid_size": bid_size,
                "last_updated": last_minute_ns + quote_off,
                "midpoint": mid,
                "timeframe": TIMEFRAME,
            },
            "open_interest": open_interest,
            "underlying_asset": {
                "change_to_break_even": break_even - spot,
                "last_updated": asset_ts,
                asset_key: spot,
                "ticker": asset_ticker,
                "timeframe": TIMEFRAME,
            },
        }
        if not deep_itm_without_greeks or not (
            spot > ratio * strike if is_call else strike > ratio * spot
        ):
            pdf = exp(-0.5 * d1 * d1) * inv_sqrt_2pi
            row["greeks"] = {
                "delta": nd1 if is_call else nd1 - 1.0,
                "gamma": pdf / (spot * sst),
                "theta": -spot * pdf * iv / (2.0 * sqrt_t) / 365.0,
                "vega": spot * pdf * sqrt_t / 100.0,
            }
            row["implied_volatility"] = iv
        elif not drop_iv:
            row["implied_volatility"] = iv
        if not no_trade:
            row["last_trade"] = {
                "conditions": conditions,
                "exchange": trade_exch,
                "price": close_c / 100.0,
                "sip_timestamp": minute_ns - trade_age,
                "size": trade_size,
                "timeframe": TIMEFRAME,
            }
        append(row)
    return rows


def prev_bar(chain: Chain, minute: int) -> dict[str, Any]:
    """Return the previous session's daily bar in the ``/v2/aggs/.../prev`` result shape."""
    day = minute // 1440
    close = prev_close(chain, day)
    rng = random.Random(f"{chain.seed}:{chain.name}:{day}:prev")
    open_ = round(close * math.exp(0.02 * (rng.random() - 0.5)), 2)
    high = round(max(open_, close) * (1 + 0.01 * rng.random()), 2)
    low = round(min(open_, close) * (1 - 0.01 * rng.random()), 2)
    session = dt.date(1970, 1, 1) + dt.timedelta(days=day - 1)
    while session.weekday() >= 5:
        session -= dt.timedelta(days=1)
    # 20:00 UTC is 16:00 New York in summer; close enough for a simulated bar time.
    stamp = dt.datetime.combine(session, dt.time(20), tzinfo=dt.UTC)
    return {
        "T": chain.name,
        "v": float(int(rng.uniform(1e6, 9e7))),
        "vw": round(low + (high - low) * rng.random(), 4),
        "o": open_,
        "c": close,
        "h": high,
        "l": low,
        "t": int(stamp.timestamp() * 1000),
        "n": int(rng.uniform(1e4, 9e5)),
    }


def stock_snapshot(chain: Chain, minute: int) -> dict[str, Any]:
    """Return the ``ticker`` object of the single-stock snapshot in ``minute``."""
    spot = spot_at(chain, minute)
    prev = prev_bar(chain, minute)
    close = prev["c"]
    day = minute // 1440
    open_ = round(close * math.exp(0.01 * math.sin(day * 1.9 + chain.phases[1])), 2)
    rng = random.Random(f"{chain.seed}:{chain.name}:{minute}:stock")
    minute_ns = minute * NS_PER_MINUTE
    last_minute_ns = minute_ns - NS_PER_MINUTE  # quote and trade times: never in the future
    high = round(max(open_, spot) * 1.004, 2)
    low = round(min(open_, spot) * 0.996, 2)
    volume = int(rng.uniform(1e5, 5e7))
    return {
        "day": {
            "c": spot,
            "h": high,
            "l": low,
            "o": open_,
            "v": volume,
            "vw": round((high + low + spot) / 3, 4),
        },
        "fmv": spot,
        "lastQuote": {
            "P": round(spot + 0.01, 2),
            "S": int(rng.uniform(1, 20)),
            "p": round(spot - 0.01, 2),
            "s": int(rng.uniform(1, 20)),
            "t": last_minute_ns + int(rng.random() * NS_PER_MINUTE),
        },
        "lastTrade": {
            "c": [14, 41],
            "i": str(int(rng.uniform(1e4, 1e6))),
            "p": spot,
            "s": 100 * int(rng.uniform(1, 10)),
            "t": last_minute_ns + int(rng.random() * NS_PER_MINUTE),
            "x": int(rng.uniform(1, 21)),
        },
        "min": {
            "av": volume,
            "c": spot,
            "h": round(spot * 1.001, 2),
            "l": round(spot * 0.999, 2),
            "o": round(spot * (1 + 0.001 * (rng.random() - 0.5)), 2),
            "v": int(rng.uniform(1e3, 3e5)),
            "vw": spot,
            "t": minute * 60_000,
            "n": int(rng.uniform(1, 500)),
        },
        "prevDay": {**{k: prev[k] for k in ("c", "h", "l", "o", "vw")}, "v": int(prev["v"])},
        "ticker": chain.name,
        "todaysChange": round(spot - close, 4),
        "todaysChangePerc": round((spot - close) / close * 100, 4),
        "updated": minute_ns,
    }
