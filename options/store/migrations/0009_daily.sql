-- Daily history per contract and trading session (ingest_daily): open interest, the closing
-- quote, greeks and IV, and the day bar, each group of values tagged with where it came from.

ALTER TABLE ingest_runs DROP CONSTRAINT ingest_runs_job_check;
ALTER TABLE ingest_runs ADD CONSTRAINT ingest_runs_job_check
    CHECK (job IN ('options', 'snapshots', 'daily'));

CREATE TABLE contract_days (
    ticker              text NOT NULL,
    session             date NOT NULL,          -- the trading day (New York)
    underlying_ticker   text NOT NULL,
    -- the open interest at the end of the session: the API gives it with the next session's
    -- snapshots, so it comes from that session's first complete slot
    open_interest       bigint,
    oi_source           text CHECK (oi_source IN ('snapshot')),
    oi_captured_at      timestamptz,
    -- the session's last complete slot: quote, IV, greeks, underlying price
    close_captured_at   timestamptz,
    bid                 double precision,
    ask                 double precision,
    midpoint            double precision,
    last_price          double precision,
    last_trade_at       timestamptz,
    implied_volatility  double precision,
    delta               double precision,
    gamma               double precision,
    theta               double precision,
    vega                double precision,
    underlying_price    double precision,
    -- as snapshot_greeks.source: the API's, computed (computed_greeks), or the API's IV with
    -- computed greeks
    greeks_source       text CHECK (greeks_source IN ('snapshot', 'computed', 'snapshot+computed')),
    -- the day bar, as the session's last complete slot gave it
    day_open            double precision,
    day_high            double precision,
    day_low             double precision,
    day_close           double precision,
    day_volume          bigint,
    day_vwap            double precision,
    day_trades          integer,    -- the bar's trade count, when the API gives it
    bar_source          text CHECK (bar_source IN ('snapshot', 'bars')),
    built_at            timestamptz NOT NULL,
    PRIMARY KEY (ticker, session)
);

CREATE INDEX contract_days_underlying_idx ON contract_days (underlying_ticker, session);

-- Per underlying and session: whether its daily rows are complete, and if not, why.
CREATE TABLE daily_coverage (
    underlying_ticker   text NOT NULL,
    session             date NOT NULL,
    run_id              bigint NOT NULL REFERENCES ingest_runs (id),
    close_captured_at   timestamptz,    -- the session's last complete slot used
    oi_captured_at      timestamptz,    -- the next session's first complete slot used
    contracts           integer NOT NULL,
    complete            boolean NOT NULL,
    reason              text,           -- why not complete
    -- what the rows come from: the stored snapshots, or (a session before collection) the
    -- past listing and the daily bars
    source              text NOT NULL DEFAULT 'snapshots' CHECK (source IN ('snapshots', 'bars')),
    built_at            timestamptz NOT NULL,
    PRIMARY KEY (underlying_ticker, session),
    CHECK (complete = (reason IS NULL))
);

-- Backfill (ingest_daily --from/--to): the contracts listed on a past session (as_of), stored
-- whole per underlying and session with its daily_listings row, and which contract's bar of
-- which session was asked for (a contract without a trade that day has no bar: not a gap).
CREATE TABLE daily_listings (
    underlying_ticker   text NOT NULL,
    session             date NOT NULL,
    contracts           integer NOT NULL,
    listed_at           timestamptz NOT NULL,
    PRIMARY KEY (underlying_ticker, session)
);

CREATE TABLE listed_contracts (
    underlying_ticker   text NOT NULL,
    session             date NOT NULL,
    ticker              text NOT NULL,
    PRIMARY KEY (underlying_ticker, session, ticker)
);

CREATE TABLE bar_checks (
    ticker              text NOT NULL,
    session             date NOT NULL,
    PRIMARY KEY (ticker, session)
);
