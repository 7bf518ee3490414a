-- Option contracts as the reference endpoint lists them, one row per contract ever seen.
CREATE TABLE option_contracts (
    ticker                  text PRIMARY KEY,
    underlying_ticker       text NOT NULL,
    contract_type           text,
    exercise_style          text,
    expiration_date         date,
    strike_price            numeric,
    shares_per_contract     numeric,
    primary_exchange        text,
    cfi                     text,
    correction              integer,
    additional_underlyings  jsonb,
    active                  boolean NOT NULL DEFAULT true,
    first_seen_at           timestamptz NOT NULL,
    last_seen_at            timestamptz NOT NULL
) WITH (fillfactor = 85);  -- room for HOT updates: every sync rewrites last_seen_at

CREATE INDEX option_contracts_underlying_idx ON option_contracts (underlying_ticker);

-- One row per job run: what it did and how it ended.
CREATE TABLE ingest_runs (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job                     text NOT NULL CHECK (job IN ('options', 'snapshots')),
    started_at              timestamptz NOT NULL,
    finished_at             timestamptz,
    status                  text NOT NULL DEFAULT 'running'
                            CHECK (status IN ('running', 'succeeded', 'partial', 'failed', 'interrupted')),
    underlyings_requested   integer NOT NULL DEFAULT 0,
    underlyings_succeeded   integer NOT NULL DEFAULT 0,
    underlyings_failed      integer NOT NULL DEFAULT 0,
    rows_fetched            bigint NOT NULL DEFAULT 0,
    rows_written            bigint NOT NULL DEFAULT 0,
    rows_rejected           bigint NOT NULL DEFAULT 0,
    contracts_deactivated   bigint NOT NULL DEFAULT 0,
    api_requests            bigint NOT NULL DEFAULT 0,
    error                   text,
    CHECK ((status = 'running') = (finished_at IS NULL))
);

CREATE INDEX ingest_runs_job_started_idx ON ingest_runs (job, started_at DESC);
