-- Fencing a dead lease holder: a run records the lease it promised to renew within and the
-- application_name every session of its process's pool carries (unique to that pool), so the
-- copy that takes it over can end exactly those sessions before it closes the run.
ALTER TABLE ingest_runs
    ADD COLUMN lease_seconds     double precision CHECK (lease_seconds > 0),
    ADD COLUMN application_name  text;
