-- Where retention has dropped history (SPEC §5 "Retention"): the upper bound of the newest
-- partition of positions that partition maintenance ever dropped. The lowest partition's lower
-- bound says the same only until retention grows or goes back to 0: maintenance then makes a
-- partition reaching below the dropped range (down to MINVALUE), and a late fix replayed from
-- there would rebuild visits and odometers from history that is gone. The shards' replay reads
-- the greater of the two (shard/devices/replay.py); NULL row: nothing was ever dropped.
CREATE TABLE retention_floor (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    dropped_below timestamptz NOT NULL
);
GRANT SELECT ON retention_floor TO processor_runtime;
