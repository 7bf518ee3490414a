-- The compact tier: finished days of option_snapshots, rewritten at about 145 bytes a snapshot
-- instead of about 345 (options/store/compaction.py). option_snapshots keeps the days being
-- written (the hot tier: the COPY path stays as fast as it was); once a day is over, its rows
-- move here in one transaction per day, which leaves its option_snapshots partition empty.
-- snapshot_reads reads both tiers, so every reader sees every stored snapshot exactly once.
--
-- Encodings (each decoded by snapshot_reads; a value an encoding cannot give back exactly goes
-- into extra, as the API gave it, and is read from there):
--   ticker, underlying    integer / smallint ids (snapshot_tickers, snapshot_underlyings)
--   prices                integer, in 1e-4 dollars (exact for every price of 4 decimals or
--                         fewer whose size is below $214,748)
--   sizes                 smallint; volume and open interest integer
--   quote and trade times integer milliseconds after captured_at: kept to the millisecond
--   IV and greeks         real: 24-bit mantissa, a relative precision of 6e-8
--   midpoint, day change, day change percent, break-even price: not stored; computed from the
--                         quote, the day bar and the contract as the API computes them
CREATE TABLE snapshot_tickers (
    id      integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ticker  text NOT NULL UNIQUE,
    -- the type and strike the ticker spells (O:AAPL261218C00150000: a call at 150), for the
    -- break-even price; NULL for a ticker not spelled so
    is_call boolean,
    strike  double precision
);

CREATE TABLE snapshot_underlyings (
    id      smallint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ticker  text NOT NULL UNIQUE
);

-- Columns ordered by width, so that no byte is lost to alignment.
CREATE TABLE snapshot_rows (
    captured_at         timestamptz NOT NULL,
    contract_id         integer NOT NULL,
    bid                 integer,
    ask                 integer,
    last_price          integer,
    day_open            integer,
    day_high            integer,
    day_low             integer,
    day_close           integer,
    day_vwap            integer,
    day_previous_close  integer,
    underlying_price    integer,
    fmv                 integer,
    day_volume          integer,
    open_interest       integer,
    quote_ms            integer,
    trade_ms            integer,
    implied_volatility  real,
    delta               real,
    gamma               real,
    theta               real,
    vega                real,
    underlying_id       smallint NOT NULL,
    bid_size            smallint,
    ask_size            smallint,
    last_size           smallint,
    extra               jsonb
) PARTITION BY RANGE (captured_at);

-- One contract's history: about 7 bytes a snapshot (deduplicated: 39 rows a day share a key).
CREATE INDEX snapshot_rows_contract_idx ON snapshot_rows (contract_id);
-- A chain at a time: the rows are stored in (captured_at, underlying_id) order, so a block
-- range index finds a slot's chain for a fraction of a byte a snapshot.
CREATE INDEX snapshot_rows_chain_idx ON snapshot_rows
    USING brin (captured_at, underlying_id) WITH (pages_per_range = 16);

-- The encodings, one function each (options/store/compaction.py writes with them); an encoding
-- gives NULL for a value it cannot hold, which then goes into extra.
CREATE FUNCTION snapshot_price(code integer) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT code::float8 / 10000 $$;

CREATE FUNCTION snapshot_price_code(price double precision) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN abs(price) < 214748 AND round(price * 10000) / 10000 = price
                THEN round(price * 10000)::integer END
$$;

CREATE FUNCTION snapshot_int_code(value bigint) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE WHEN value BETWEEN -2147483648 AND 2147483647 THEN value::integer END $$;

CREATE FUNCTION snapshot_size_code(value bigint) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE WHEN value BETWEEN -32768 AND 32767 THEN value::smallint END $$;

-- A real holds 0, infinities, NaN and magnitudes from 1e-37 to 1e37 (the API's IV and greeks)
CREATE FUNCTION snapshot_real_code(value double precision) RETURNS real
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN value = 0
                  OR NOT (abs(value) < 1e-37 OR (abs(value) > 1e37 AND abs(value) < 'Infinity'))
                THEN value::real END
$$;

-- Milliseconds from the slot to a quote or trade time (rounded down), within 24 days
CREATE FUNCTION snapshot_ms_code(moment timestamptz, slot timestamptz) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN ms BETWEEN -2147483648 AND 2147483647 THEN ms::integer END
    FROM (SELECT floor(extract(epoch FROM moment - slot) * 1000) AS ms) m
$$;

-- The compact tier decoded: the columns of snapshot_reads.
CREATE VIEW compact_reads AS
SELECT r.captured_at, u.ticker AS underlying_ticker, t.ticker, c.contract_type,
       c.expiration_date, c.strike_price, d.bid, d.bid_size, d.ask, d.ask_size,
       CASE WHEN r.extra ? 'midpoint' THEN (r.extra->>'midpoint')::float8
            ELSE (r.bid::int8 + r.ask)::float8 / 20000 END AS midpoint,
       CASE WHEN r.extra ? 'quote_updated_at' THEN (r.extra->>'quote_updated_at')::timestamptz
            ELSE r.captured_at + r.quote_ms * interval '1 millisecond' END AS quote_updated_at,
       d.last_price, d.last_size,
       CASE WHEN r.extra ? 'last_trade_at' THEN (r.extra->>'last_trade_at')::timestamptz
            ELSE r.captured_at + r.trade_ms * interval '1 millisecond' END AS last_trade_at,
       d.day_open, d.day_high, d.day_low, d.day_close, d.day_volume, d.day_vwap,
       CASE WHEN r.extra ? 'day_change' THEN (r.extra->>'day_change')::float8
            ELSE d.day_close - d.day_previous_close END AS day_change,
       CASE WHEN r.extra ? 'day_change_percent' THEN (r.extra->>'day_change_percent')::float8
            ELSE (d.day_close - d.day_previous_close) / nullif(d.day_previous_close, 0) * 100
       END AS day_change_percent,
       d.day_previous_close,
       CASE WHEN r.extra ? 'implied_volatility' THEN (r.extra->>'implied_volatility')::float8
            ELSE r.implied_volatility END AS implied_volatility,
       CASE WHEN r.extra ? 'delta' THEN (r.extra->>'delta')::float8 ELSE r.delta END AS delta,
       CASE WHEN r.extra ? 'gamma' THEN (r.extra->>'gamma')::float8 ELSE r.gamma END AS gamma,
       CASE WHEN r.extra ? 'theta' THEN (r.extra->>'theta')::float8 ELSE r.theta END AS theta,
       CASE WHEN r.extra ? 'vega' THEN (r.extra->>'vega')::float8 ELSE r.vega END AS vega,
       d.open_interest,
       CASE WHEN r.extra ? 'break_even_price' THEN (r.extra->>'break_even_price')::float8
            WHEN t.is_call THEN t.strike + (r.bid::int8 + r.ask)::float8 / 20000
            ELSE t.strike - (r.bid::int8 + r.ask)::float8 / 20000 END AS break_even_price,
       d.underlying_price, d.fmv
FROM snapshot_rows r
JOIN snapshot_tickers t ON t.id = r.contract_id
JOIN snapshot_underlyings u ON u.id = r.underlying_id
LEFT JOIN option_contracts c ON c.ticker = t.ticker
CROSS JOIN LATERAL (
    SELECT
        CASE WHEN r.extra ? 'bid' THEN (r.extra->>'bid')::float8
             ELSE snapshot_price(r.bid) END AS bid,
        CASE WHEN r.extra ? 'bid_size' THEN (r.extra->>'bid_size')::int8
             ELSE r.bid_size END AS bid_size,
        CASE WHEN r.extra ? 'ask' THEN (r.extra->>'ask')::float8
             ELSE snapshot_price(r.ask) END AS ask,
        CASE WHEN r.extra ? 'ask_size' THEN (r.extra->>'ask_size')::int8
             ELSE r.ask_size END AS ask_size,
        CASE WHEN r.extra ? 'last_price' THEN (r.extra->>'last_price')::float8
             ELSE snapshot_price(r.last_price) END AS last_price,
        CASE WHEN r.extra ? 'last_size' THEN (r.extra->>'last_size')::int8
             ELSE r.last_size END AS last_size,
        CASE WHEN r.extra ? 'day_open' THEN (r.extra->>'day_open')::float8
             ELSE snapshot_price(r.day_open) END AS day_open,
        CASE WHEN r.extra ? 'day_high' THEN (r.extra->>'day_high')::float8
             ELSE snapshot_price(r.day_high) END AS day_high,
        CASE WHEN r.extra ? 'day_low' THEN (r.extra->>'day_low')::float8
             ELSE snapshot_price(r.day_low) END AS day_low,
        CASE WHEN r.extra ? 'day_close' THEN (r.extra->>'day_close')::float8
             ELSE snapshot_price(r.day_close) END AS day_close,
        CASE WHEN r.extra ? 'day_volume' THEN (r.extra->>'day_volume')::int8
             ELSE r.day_volume END AS day_volume,
        CASE WHEN r.extra ? 'day_vwap' THEN (r.extra->>'day_vwap')::float8
             ELSE snapshot_price(r.day_vwap) END AS day_vwap,
        CASE WHEN r.extra ? 'day_previous_close' THEN (r.extra->>'day_previous_close')::float8
             ELSE snapshot_price(r.day_previous_close) END AS day_previous_close,
        CASE WHEN r.extra ? 'open_interest' THEN (r.extra->>'open_interest')::int8
             ELSE r.open_interest END AS open_interest,
        CASE WHEN r.extra ? 'underlying_price' THEN (r.extra->>'underlying_price')::float8
             ELSE snapshot_price(r.underlying_price) END AS underlying_price,
        CASE WHEN r.extra ? 'fmv' THEN (r.extra->>'fmv')::float8
             ELSE snapshot_price(r.fmv) END AS fmv
) d;

-- Every stored snapshot, from either tier, with its contract's type, expiration and strike.
CREATE OR REPLACE VIEW snapshot_reads AS
SELECT s.captured_at, s.underlying_ticker, s.ticker, c.contract_type, c.expiration_date,
       c.strike_price, s.bid, s.bid_size, s.ask, s.ask_size, s.midpoint, s.quote_updated_at,
       s.last_price, s.last_size, s.last_trade_at, s.day_open, s.day_high, s.day_low,
       s.day_close, s.day_volume, s.day_vwap, s.day_change, s.day_change_percent,
       s.day_previous_close, s.implied_volatility, s.delta, s.gamma, s.theta, s.vega,
       s.open_interest, s.break_even_price, s.underlying_price, s.fmv
FROM option_snapshots s
LEFT JOIN option_contracts c ON c.ticker = s.ticker
UNION ALL
SELECT * FROM compact_reads;

-- The reads, as before, over both tiers. The slot is found once (an InitPlan), not once a row
-- as a bitmap scan's recheck would; the planner's guess of the chain's size before it knows
-- the slot (every day's partition) is large enough to start JIT compilation, which costs more
-- than the query: it is off for these functions.
CREATE OR REPLACE FUNCTION chain_at(p_underlying text, p_at timestamptz)
RETURNS SETOF snapshot_read
LANGUAGE sql STABLE STRICT
SET jit = off
AS $$
    SELECT r.* FROM snapshot_reads r
    WHERE r.underlying_ticker = regexp_replace(p_underlying, '^I:', '')
      AND r.captured_at = (SELECT snapshot_slot_at(p_underlying, p_at))
    ORDER BY r.expiration_date, r.strike_price, r.contract_type COLLATE "C", r.ticker COLLATE "C"
$$;

CREATE OR REPLACE FUNCTION contract_history(p_ticker text, p_from timestamptz, p_to timestamptz)
RETURNS SETOF snapshot_read
LANGUAGE sql STABLE STRICT
SET jit = off
AS $$
    SELECT r.* FROM snapshot_reads r
    WHERE r.ticker = p_ticker AND r.captured_at >= p_from AND r.captured_at < p_to
    ORDER BY r.captured_at
$$;
