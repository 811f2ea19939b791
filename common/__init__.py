"""Code shared by the supervisor, the shards and the command line."""
