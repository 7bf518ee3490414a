-- The archive tier: days of option_snapshots written to Parquet (ARCHIVE_URL), verified, then
-- dropped from PostgreSQL. A row is written only once the day's file was read back and its row
-- count and key checksum matched PostgreSQL's; dropped_at is set in the transaction that drops
-- the day's partition. Readers read the Parquet file of a day whose dropped_at is set.
-- The day's coverage rows (snapshot_coverage) stay in PostgreSQL.
CREATE TABLE archived_days (
    day          date PRIMARY KEY,   -- the UTC day of the partition option_snapshots_pYYYYMMDD
    url          text NOT NULL,      -- the day's file: <ARCHIVE_URL>/option_snapshots/date=.../part-0.parquet
    rows         bigint NOT NULL CHECK (rows > 0),
    bytes        bigint NOT NULL CHECK (bytes > 0),  -- the file's size
    checksum     text NOT NULL,      -- of (ticker, captured_at), see options/store/archive_files.py
    archived_at  timestamptz NOT NULL,
    dropped_at   timestamptz,
    CHECK (dropped_at IS NULL OR dropped_at >= archived_at)
);
