-- The life of a day (options/store/lifecycle.py): which tier holds each day's data. A day is the
-- UTC day of captured_at (the day of its partitions). A day without a row is hot.
--
--   hot       option_snapshots: the jobs write here
--   compact   snapshot_rows: a late write is merged into the day's compact partition, verified
--   archiving being written to the archive (still read from snapshot_rows): writes wait for
--             the outcome (refused now, tried again later)
--   archived  the Parquet archive: PostgreSQL keeps the coverage rows; a late write is refused
--   deleted   dropped unarchived by retention (SNAPSHOT_DELETE_UNARCHIVED): writes are refused
--
-- Each change of tier commits in the transaction that moves the day's rows. Writers hold the
-- row FOR SHARE in the transaction that stores rows into the day; a move holds it FOR UPDATE:
-- a write and a move of the same day never overlap, and the write lands in the tier it saw.
CREATE TABLE stored_days (
    day         date PRIMARY KEY,
    tier        text NOT NULL CHECK (tier IN ('hot', 'compact', 'archiving', 'archived', 'deleted')),
    changed_at  timestamptz NOT NULL DEFAULT now(),
    -- the transaction that last moved the day: the table it emptied is dropped only once no
    -- snapshot older than that transaction is left, so no reader sees the day in neither tier
    moved_by    xid8
);

-- Where existing days stand: archived and dropped, compacted, or still hot.
INSERT INTO stored_days (day, tier)
SELECT day, 'archived' FROM archived_days WHERE dropped_at IS NOT NULL;

INSERT INTO stored_days (day, tier)
SELECT to_date(substr(c.relname, length('snapshot_rows_p') + 1), 'YYYYMMDD'), 'compact'
FROM pg_class c
WHERE c.relkind = 'r' AND c.relname ~ '^snapshot_rows_p[0-9]{8}$'
ON CONFLICT (day) DO NOTHING;

-- Derived rows of a slot: whether its IV and greeks were computed, and if a slot could not be
-- (its day archived before they were), why.
ALTER TABLE greeks_slots ADD COLUMN reason text;
