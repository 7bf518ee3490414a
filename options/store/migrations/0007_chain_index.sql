-- A chain at a time: the rows of one underlying at one captured_at. Deduplicated (a chain's
-- rows share the key), this index costs about 7 bytes a stored snapshot. A contract's history
-- uses the primary key (ticker, captured_at).
CREATE INDEX option_snapshots_chain_idx ON option_snapshots (underlying_ticker, captured_at);
