-- Market snapshots: one row per contract per run, partitioned by day (UTC) of captured_at.
-- Partitions are created ahead by ingest_snapshots (option_snapshots_pYYYYMMDD).
CREATE TABLE option_snapshots (
    ticker              text NOT NULL,
    underlying_ticker   text NOT NULL,
    captured_at         timestamptz NOT NULL,
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
    fmv                 double precision,
    PRIMARY KEY (ticker, captured_at)
) PARTITION BY RANGE (captured_at);

-- Per run and underlying: how much of the chain was stored, and whether it was read to the end.
CREATE TABLE snapshot_coverage (
    captured_at         timestamptz NOT NULL,
    underlying_ticker   text NOT NULL,
    run_id              bigint NOT NULL REFERENCES ingest_runs (id),
    contracts_active    integer NOT NULL,
    snapshots_stored    integer NOT NULL,
    contracts_missing   integer NOT NULL,
    complete            boolean NOT NULL,
    pages               integer NOT NULL,
    error               text,
    PRIMARY KEY (captured_at, underlying_ticker)
);

ALTER TABLE ingest_runs ADD COLUMN captured_at timestamptz;

-- Both jobs look contracts up by underlying and expiration.
DROP INDEX option_contracts_underlying_idx;
CREATE INDEX option_contracts_underlying_expiration_idx
    ON option_contracts (underlying_ticker, expiration_date);
