"""A shard: one consumer of the group, running one uvloop event loop in its own process."""

from shard import compiled

compiled.install()  # before any other module of the package is imported
