-- Implied volatility and greeks computed for the snapshots the API left without them
-- (options/jobs/greeks.py), beside the provider's values, never over them; or why they could
-- not be computed. The model's assumptions are stored with each row.
CREATE TABLE computed_greeks (
    ticker              text NOT NULL,
    captured_at         timestamptz NOT NULL,
    implied_volatility  double precision,
    delta               double precision,
    gamma               double precision,
    theta               double precision,
    vega                double precision,
    reason              text,               -- why there are no values
    model               text NOT NULL,      -- 'black-scholes-merton'
    rate                double precision NOT NULL,
    dividend_yield      double precision NOT NULL,
    years               double precision,   -- to 16:00 New York on the expiration day
    computed_at         timestamptz NOT NULL,
    PRIMARY KEY (ticker, captured_at),
    CHECK ((reason IS NULL) = (implied_volatility IS NOT NULL))
);

-- Each snapshot's IV and greeks: the API's where it gave them, else the computed ones; the
-- source says which (for a row the API gave IV but no greeks, the IV is the API's and the
-- greeks computed from the mid quote).
CREATE VIEW snapshot_greeks AS
SELECT r.captured_at, r.underlying_ticker, r.ticker,
       coalesce(r.implied_volatility, g.implied_volatility) AS implied_volatility,
       coalesce(r.delta, g.delta) AS delta,
       coalesce(r.gamma, g.gamma) AS gamma,
       coalesce(r.theta, g.theta) AS theta,
       coalesce(r.vega, g.vega) AS vega,
       CASE WHEN r.implied_volatility IS NOT NULL AND r.delta IS NOT NULL THEN 'snapshot'
            WHEN g.implied_volatility IS NOT NULL
                 THEN CASE WHEN r.implied_volatility IS NULL AND r.delta IS NULL
                           THEN 'computed' ELSE 'snapshot+computed' END
            WHEN r.implied_volatility IS NOT NULL OR r.delta IS NOT NULL THEN 'snapshot'
       END AS source,
       g.reason AS not_computed_because
FROM snapshot_reads r
LEFT JOIN computed_greeks g ON g.ticker = r.ticker AND g.captured_at = r.captured_at;

-- The slots whose missing values were computed, and when: a slot whose chains were committed
-- after that (a resumed slot) is computed again for its new rows.
CREATE TABLE greeks_slots (
    captured_at     timestamptz PRIMARY KEY,
    computed        integer NOT NULL,
    not_computed    integer NOT NULL,
    computed_at     timestamptz NOT NULL
);
