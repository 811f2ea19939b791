"""`processor lag` reads trimming's history through the command line's client (fields as flat lists)."""

from __future__ import annotations

import orjson

from common.keys import trim_history_key
from tests.ops.letters import GROUP, run_cli


def test_lag_shows_the_next_trim_point_from_an_aged_history_entry(redis_client, redis_env, stream_key) -> None:
    """With retention on and a safe id recorded long enough ago, lag names what the next pass trims below."""
    first = redis_client.xadd(stream_key, {"data": b"{}"})
    redis_client.xgroup_create(stream_key, GROUP, id="$")
    redis_client.xadd(trim_history_key(stream_key), {"safe": first}, id="1-0")
    result = run_cli({**redis_env, "STREAM_RETENTION_MS": "1000"}, "lag", "--json")
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["trimming"]["next_trim_below"] == first.decode()
