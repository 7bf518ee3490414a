-- Durable units: a chain's rows commit with its coverage row, a run holds a lease instead of a
-- session lock, rejected rows are kept, and the tracked underlyings are a table.

-- Runs: a lease kept alive by a heartbeat, and who holds it. One running row per job.
UPDATE ingest_runs
SET status = 'interrupted', finished_at = now(),
    error = 'closed when the run lease replaced the session lock (migration 0003)'
WHERE status = 'running';

ALTER TABLE ingest_runs
    ADD COLUMN heartbeat_at  timestamptz,
    ADD COLUMN host          text,
    ADD COLUMN boot_id       text,
    ADD COLUMN pid           integer,
    ADD COLUMN pid_started   bigint,
    ADD COLUMN lease_token   text,
    ADD COLUMN resumed       boolean NOT NULL DEFAULT false;

CREATE UNIQUE INDEX ingest_runs_one_running_idx ON ingest_runs (job) WHERE status = 'running';

-- Coverage: one row per planned (slot, underlying), written when the run plans the slot and
-- updated in the same transaction as the chain's rows. committed_at IS NULL: not stored yet.
ALTER TABLE snapshot_coverage
    ADD COLUMN requested_ticker text,
    ADD COLUMN rows_rejected    integer NOT NULL DEFAULT 0,
    ADD COLUMN read_to_end      boolean NOT NULL DEFAULT false,
    ADD COLUMN committed_at     timestamptz;

UPDATE snapshot_coverage
SET read_to_end = complete,
    complete = complete AND contracts_missing = 0,
    committed_at = captured_at;

ALTER TABLE snapshot_coverage
    ADD CONSTRAINT snapshot_coverage_complete_check CHECK (
        NOT complete
        OR (read_to_end AND contracts_missing = 0 AND rows_rejected = 0
            AND committed_at IS NOT NULL)
    );

-- Rows the normalizer or the database refused: the record as received and why (bounded per run).
CREATE TABLE rejected_rows (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id              bigint NOT NULL REFERENCES ingest_runs (id),
    underlying_ticker   text,
    captured_at         timestamptz,
    ticker              text,
    reason              text NOT NULL,
    record              text NOT NULL,
    rejected_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX rejected_rows_run_idx ON rejected_rows (run_id);

-- The underlyings the jobs work on: from UNDERLYINGS, or added with ingest_admin underlyings.
CREATE TABLE tracked_underlyings (
    ticker                      text PRIMARY KEY,
    -- as its contracts and snapshots name it: I:SPX is tracked, SPX is in the data; one row
    -- for both spellings of one underlying
    underlying_ticker           text NOT NULL UNIQUE
                                GENERATED ALWAYS AS (regexp_replace(ticker, '^I:', '')) STORED,
    enabled                     boolean NOT NULL DEFAULT true,
    origin                      text NOT NULL CHECK (origin IN ('UNDERLYINGS', 'admin')),
    disabled_by                 text CHECK (disabled_by IN ('UNDERLYINGS', 'admin')),
    added_at                    timestamptz NOT NULL DEFAULT now(),
    changed_at                  timestamptz NOT NULL DEFAULT now(),
    last_contract_sync_at       timestamptz,
    last_snapshot_at            timestamptz,
    last_complete_snapshot_at   timestamptz,
    last_error                  text,
    last_error_at               timestamptz,
    CHECK (enabled = (disabled_by IS NULL))
);

-- Per run and underlying, what ingest_options did: written in the transaction that stores the
-- underlying's contracts (or alone, for a failure that stored nothing). The contracts job's
-- counterpart of snapshot_coverage, and what makes a retried commit count once.
CREATE TABLE contract_syncs (
    run_id                  bigint NOT NULL REFERENCES ingest_runs (id),
    underlying_ticker       text NOT NULL,
    synced_at               timestamptz NOT NULL DEFAULT now(),
    succeeded               boolean NOT NULL,
    contracts_listed        integer NOT NULL,
    contracts_written       integer NOT NULL,
    rows_rejected           integer NOT NULL,
    contracts_deactivated   integer NOT NULL,
    error                   text,
    PRIMARY KEY (run_id, underlying_ticker)
);

CREATE INDEX contract_syncs_underlying_idx ON contract_syncs (underlying_ticker, synced_at DESC);
