-- The tables that go with a day into the archive, beside its snapshots
-- (options/store/archive_companions.py): the computed greeks of its slots (moved), and copies of
-- its coverage, greeks bookkeeping, daily rows and backfilled listings (PostgreSQL keeps them).
-- One file per table and day, verified like the snapshots' and recorded here.
CREATE TABLE archived_files (
    day          date NOT NULL,
    dataset      text NOT NULL,      -- the table, and the dataset's directory under ARCHIVE_URL
    url          text NOT NULL,
    rows         bigint NOT NULL CHECK (rows >= 0),
    bytes        bigint,             -- NULL: no rows, no file
    checksum     text NOT NULL,      -- the digest of every value (options/store/archive_digest.py)
    archived_at  timestamptz NOT NULL,
    PRIMARY KEY (day, dataset)
);

-- A copied table's rows of an archived day (or one being archived) that changed in PostgreSQL
-- since the copy was made (a backfill of a new underlying, a coverage row's reason): the next
-- archive run writes the copy again, verified, and clears the row if nothing changed meanwhile
-- (since is bumped by every change). The triggers below keep it, whatever writes the rows.
CREATE TABLE archive_pending (
    day      date NOT NULL,
    dataset  text NOT NULL,
    since    timestamptz NOT NULL,
    PRIMARY KEY (day, dataset)
);

CREATE FUNCTION mark_archive_pending() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- TG_ARGV[0]: the expression of a row's day over the transition table "changed"
    EXECUTE format(
        'INSERT INTO archive_pending (day, dataset, since)
         SELECT c.day, %L, clock_timestamp()
         FROM (SELECT DISTINCT %s AS day FROM changed) c
         JOIN stored_days d ON d.day = c.day AND d.tier IN (''archiving'', ''archived'')
         ON CONFLICT (day, dataset) DO UPDATE SET since = EXCLUDED.since',
        TG_TABLE_NAME, TG_ARGV[0]);
    RETURN NULL;
END
$$;

DO $$
DECLARE
    t record;
    event text;
BEGIN
    FOR t IN SELECT * FROM (VALUES
        ('contract_days', 'session'),
        ('daily_coverage', 'session'),
        ('daily_listings', 'session'),
        ('listed_contracts', 'session'),
        ('snapshot_coverage', '(captured_at AT TIME ZONE ''UTC'')::date'),
        ('greeks_slots', '(captured_at AT TIME ZONE ''UTC'')::date')
    ) AS v(name, day_of)
    LOOP
        FOREACH event IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
            EXECUTE format(
                'CREATE TRIGGER %I AFTER %s ON %I REFERENCING %s TABLE AS changed '
                'FOR EACH STATEMENT EXECUTE FUNCTION mark_archive_pending(%L)',
                t.name || '_archive_pending_' || event, event, t.name,
                CASE WHEN event = 'delete' THEN 'OLD' ELSE 'NEW' END, t.day_of);
        END LOOP;
    END LOOP;
END
$$;

-- The computed greeks of a day are read, copied and deleted by slot time when the day is
-- archived; a block range index finds them for a fraction of a byte a row (they are written
-- slot after slot).
CREATE INDEX computed_greeks_slot_idx ON computed_greeks USING brin (captured_at);
