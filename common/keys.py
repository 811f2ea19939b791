"""Names of everything the Processor keeps in Redis and Postgres, in one place."""

# Every entry carries its fix in this field (SPEC §2).
DATA_FIELD = b"data"

# Fields added to a dead letter (SPEC §5).
DLQ_ERROR_FIELDS = (
    "error",
    "error_kind",
    "source_id",
    "source_stream",
    "failures",
    "consumer",
    "failed_at",
)

# Postgres advisory-lock key for migrations: any constant shared by every instance.
MIGRATION_LOCK_KEY = 0x50524F43  # "PROC"
# Postgres advisory-lock key for partition maintenance of `positions` (supervisor/partitions.py):
# one instance at a time creates and drops partitions; the others skip their pass.
PARTITION_LOCK_KEY = 0x50524F50  # "PROP"


def consumer_name(instance_id: str, shard_index: int) -> str:
    """Consumer name in the group, fixed by SPEC §4."""
    return f"{instance_id}-{shard_index}"


def group_prefix(stream_key: str, group: str) -> str:
    """What the keys of one consumer group's own bookkeeping start with. Two deployments reading
    one stream through two groups (each into its own database) count failures and losses apart.
    Each such key ends in a name of its own, so no group's name can make two of them one."""
    return f"{stream_key}:group:{group}:"


def failures_key(stream_key: str, group: str) -> str:
    """Hash of entry id → how often Postgres rejected that entry for this group; survives shard restarts."""
    return f"{group_prefix(stream_key, group)}failures"


def lettered_key(stream_key: str) -> str:
    """Sorted set of `<entry id> <group>` whose dead letters were written (score: the id's
    milliseconds): an entry its group reads again (reset with XGROUP SETID, or created anew)
    gets no second letter. The maintenance pass forgets those below the stream's first entry."""
    return f"{stream_key}:lettered"


def rehydrate_channel(stream_key: str) -> str:
    """Pub/sub channel on which `processor rehydrate` tells every shard to drop a device."""
    return f"{stream_key}:rehydrate"


def liveness_prefix(stream_key: str) -> str:
    """What every consumer's liveness key starts with."""
    return f"{stream_key}:alive:"


def liveness_key(stream_key: str, consumer: str | bytes) -> bytes:
    """Key each running shard keeps alive with a short TTL, so claimers know it is not dead.

    A consumer's name as Redis reports it may be any bytes, and is used as it is."""
    return liveness_prefix(stream_key).encode() + (consumer if isinstance(consumer, bytes) else consumer.encode())


def lost_key(stream_key: str, group: str) -> str:
    """Counter of entries deleted or trimmed before the group's Processor processed them, all instances together."""
    return f"{group_prefix(stream_key, group)}lost"


def trim_history_key(stream_key: str) -> str:
    """Stream of (Redis time, id below which every group was done then): what retention trims to."""
    return f"{stream_key}:trim:history"


def trim_last_key(stream_key: str) -> str:
    """Hash describing the last trimming pass of any instance (for `processor lag`)."""
    return f"{stream_key}:trim:last"


def loss_watch_key(stream_key: str, group: str) -> str:
    """Hash: what the last maintenance pass saw of the group's read counters, to count entries lost before delivery once."""
    return f"{group_prefix(stream_key, group)}lost-watch"


def legacy_loss_watch_key(stream_key: str) -> str:
    """The loss watch of releases before the keys were the group's: a group without a watch of its
    own starts from it, rather than counting again what it had counted."""
    return f"{stream_key}:lost:watch"


def reserved_keys(stream_key: str, group: str) -> frozenset[str]:
    """The stream and every key the Processor keeps beside it (liveness keys apart: a prefix,
    `<stream_key>:alive:`): none of them may double as the dead-letter stream."""
    return frozenset(
        {stream_key, failures_key(stream_key, group), lost_key(stream_key, group), trim_history_key(stream_key),
         trim_last_key(stream_key), loss_watch_key(stream_key, group), lettered_key(stream_key)}
    )


# The first key of the two-key advisory lock every transaction that changes a device's
# state holds (second key: hashtext(device_id)): the writer and `processor rehydrate`.
DEVICE_LOCK_CLASS = 0x50524F44  # "PROD"
