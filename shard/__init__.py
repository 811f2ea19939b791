"""A shard: one consumer of the group, running one uvloop event loop in its own process."""
