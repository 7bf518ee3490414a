-- Reads for people and tools (psql, pandas, BI): a chain as it was at a time, one contract's
-- history, the latest chain. Each row carries its contract's type, expiration and strike.
-- The functions are the interface: the storage beneath them may change, their columns do not.

CREATE TYPE snapshot_read AS (
    captured_at         timestamptz,
    underlying_ticker   text,
    ticker              text,
    contract_type       text,
    expiration_date     date,
    strike_price        numeric,
    bid                 double precision,
    bid_size            bigint,
    ask                 double precision,
    ask_size            bigint,
    midpoint            double precision,
    quote_updated_at    timestamptz,
    last_price          double precision,
    last_size           bigint,
    last_trade_at       timestamptz,
    day_open            double precision,
    day_high            double precision,
    day_low             double precision,
    day_close           double precision,
    day_volume          bigint,
    day_vwap            double precision,
    day_change          double precision,
    day_change_percent  double precision,
    day_previous_close  double precision,
    implied_volatility  double precision,
    delta               double precision,
    gamma               double precision,
    theta               double precision,
    vega                double precision,
    open_interest       bigint,
    break_even_price    double precision,
    underlying_price    double precision,
    fmv                 double precision
);

-- The latest complete slot of an underlying at or before a time.
CREATE INDEX snapshot_coverage_complete_idx
    ON snapshot_coverage (underlying_ticker, captured_at) WHERE complete;

CREATE FUNCTION snapshot_slot_at(p_underlying text, p_at timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE STRICT
AS $$
    SELECT max(captured_at) FROM snapshot_coverage
    WHERE underlying_ticker = regexp_replace(p_underlying, '^I:', '')
      AND complete AND captured_at <= p_at
$$;

-- The view the functions read: snapshots with their contracts' details.
CREATE VIEW snapshot_reads AS
SELECT s.captured_at, s.underlying_ticker, s.ticker, c.contract_type, c.expiration_date,
       c.strike_price, s.bid, s.bid_size, s.ask, s.ask_size, s.midpoint, s.quote_updated_at,
       s.last_price, s.last_size, s.last_trade_at, s.day_open, s.day_high, s.day_low,
       s.day_close, s.day_volume, s.day_vwap, s.day_change, s.day_change_percent,
       s.day_previous_close, s.implied_volatility, s.delta, s.gamma, s.theta, s.vega,
       s.open_interest, s.break_even_price, s.underlying_price, s.fmv
FROM option_snapshots s
LEFT JOIN option_contracts c ON c.ticker = s.ticker;

-- The chain of an underlying at its latest complete slot at or before p_at.
CREATE FUNCTION chain_at(p_underlying text, p_at timestamptz)
RETURNS SETOF snapshot_read
LANGUAGE sql STABLE STRICT
AS $$
    SELECT r.* FROM snapshot_reads r
    WHERE r.underlying_ticker = regexp_replace(p_underlying, '^I:', '')
      AND r.captured_at = snapshot_slot_at(p_underlying, p_at)
    ORDER BY r.expiration_date, r.strike_price, r.contract_type COLLATE "C", r.ticker COLLATE "C"
$$;

-- The latest complete chain of an underlying.
CREATE FUNCTION latest_chain(p_underlying text)
RETURNS SETOF snapshot_read
LANGUAGE sql STABLE STRICT
AS $$ SELECT * FROM chain_at(p_underlying, 'infinity') $$;

-- One contract's snapshots from p_from (included) to p_to (excluded), oldest first.
CREATE FUNCTION contract_history(p_ticker text, p_from timestamptz, p_to timestamptz)
RETURNS SETOF snapshot_read
LANGUAGE sql STABLE STRICT
AS $$
    SELECT r.* FROM snapshot_reads r
    WHERE r.ticker = p_ticker AND r.captured_at >= p_from AND r.captured_at < p_to
    ORDER BY r.captured_at
$$;
