-- Data quality of each stored chain, counted on its stored rows when the chain commits.
ALTER TABLE snapshot_coverage
    ADD COLUMN crossed_quotes          integer NOT NULL DEFAULT 0,  -- bid > ask
    ADD COLUMN negative_prices         integer NOT NULL DEFAULT 0,  -- a bid, ask or last below 0
    ADD COLUMN iv_out_of_range         integer NOT NULL DEFAULT 0,  -- IV not in (0, 10]
    ADD COLUMN negative_open_interest  integer NOT NULL DEFAULT 0,
    ADD COLUMN stale_quotes            integer NOT NULL DEFAULT 0,  -- quoted STALE_QUOTE_AGE before the slot
    ADD COLUMN greeks_missing          integer NOT NULL DEFAULT 0;  -- a quote but no delta
