"""Time budgets that the supervisor and its shards must agree on, defined once.

All in seconds, on the monotonic clock.
"""

# A shard's close() (after its drain) takes at most this long: the last ACKs, the
# liveness key, closing connections.
SHARD_CLOSE_BUDGET_S = 3.0
# The supervisor waits DRAIN_TIMEOUT_S plus this for its shards before SIGKILL; one second
# more than a shard's close so that a shard that keeps its budget is never killed.
STOP_MARGIN_S = SHARD_CLOSE_BUDGET_S + 1.0
# After a second signal, both sides cut the drain to this.
QUICK_STOP_S = 2.0

# A shard beats (status board, from inside its event loop) and refreshes its liveness key
# this often; /healthz calls a shard unhealthy when it has not beaten for HEALTHY_BEAT_S.
HEARTBEAT_INTERVAL_S = 1.0
HEALTHY_BEAT_S = 5.0 * HEARTBEAT_INTERVAL_S

# A consumer's liveness key lives this long unless refreshed; claimers look for expired
# keys every LIVENESS_CHECK_S, so a dead consumer's entries move within TTL + check.
LIVENESS_TTL_S = 5
LIVENESS_CHECK_S = 2.0
