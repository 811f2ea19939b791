"""Redis ACL denials, at top level and inside our Lua scripts, are refusals named in one line."""

from __future__ import annotations

import pytest
import redis.exceptions as rx

from common.errors import ConnectionRefusedForGood
from common.faults import Outcome, acl_refusal, classify

URL = "redis://processor:s3cret@redis:6379/0"

# As redis-py raises them: it strips the "ERR " of most replies and the "NOPERM " of NoPermissionError.
DENIALS = [
    (rx.NoPermissionError("this user has no permissions to run the 'xack' command"), "may not run XACK:"),
    (rx.NoPermissionError("this user has no permissions to access one of the keys used as arguments"), "may not access one of the keys"),
    (rx.NoPermissionError("this user has no permissions to access one of the channels used as arguments"), "pub/sub channels"),
    (rx.ResponseError("NOPERM this user has no permissions to run the 'publish' command"), "may not run PUBLISH:"),
    (  # Redis 7.0, inside a script: the command goes unnamed
        rx.ResponseError("The user executing the script can't run this command or subcommand script: f6, on @user_script:1."),
        "may not run a command inside a Lua script (ACL LOG names the command):",
    ),
    (
        rx.ResponseError("The user executing the script can't access at least one of the keys mentioned in the command arguments"),
        "may not access one of the keys a command names inside a Lua script",
    ),
    (  # a script of a pipeline (a shard's ACK with its dead letters): redis-py puts the command first
        rx.ResponseError(
            "Command # 2 (EVALSHA 9f 3 s s:dlq s:failures processor\n1-1) of pipeline caused error: "
            "The user executing the script can't run this command or subcommand script: 9f, on @user_script:6."
        ),
        "may not run a command inside a Lua script",
    ),
    (rx.ResponseError("EXEC without MULTI"), "may not run MULTI:"),  # MULTI refused: redis-py's EXEC fails so
    (  # Redis 7.2 and later, inside a script
        rx.ResponseError("ACL failure in script: User processor has no permissions to run the 'xautoclaim' command script: 9a"),
        "may not run XAUTOCLAIM inside a Lua script:",
    ),
]


@pytest.mark.parametrize(("exc", "phrase"), DENIALS, ids=lambda v: v if isinstance(v, str) else str(v)[:40])
def test_an_acl_denial_is_refused_and_named(exc: Exception, phrase: str) -> None:
    """Exit 78 rather than a panic, with the user and what it may not do, never the password."""
    assert classify(exc) is Outcome.REFUSED
    line = acl_refusal(exc, URL)
    assert line is not None and line.startswith("Redis user processor ") and phrase in line
    assert "s3cret" not in line and "\n" not in line


def test_a_denial_wrapped_by_the_retry_loop_is_found() -> None:
    """The shards' retry raises a ConnectionRefusedForGood from the server's error."""
    try:
        try:
            raise rx.NoPermissionError("this user has no permissions to run the 'xack' command")
        except rx.RedisError as cause:
            raise ConnectionRefusedForGood("redis refused") from cause
    except ConnectionRefusedForGood as exc:
        assert acl_refusal(exc, "redis://:pw@redis/0") == (
            "Redis user default may not run XACK: this user has no permissions to run the 'xack' command "
            "(OPERATIONS.md, Redis ACL user)"
        )


@pytest.mark.parametrize(
    "exc",
    [rx.AuthenticationError("invalid username-password pair"), rx.ResponseError("ERR syntax error"), ValueError("x")],
    ids=["wrong-password", "syntax", "not-redis"],
)
def test_other_errors_are_no_acl_denial(exc: Exception) -> None:
    assert acl_refusal(exc, URL) is None


def test_unknown_command_as_redis_py_raises_it_is_refused() -> None:
    """redis-py strips the "ERR " of "ERR unknown command": a server too old for a command is still refused."""
    assert classify(rx.ResponseError("unknown command 'XAUTOCLAIM', with args beginning with: ")) is Outcome.REFUSED


def test_a_pipeline_command_out_of_memory_is_an_outage() -> None:
    """The pipeline annotation does not hide what Redis said."""
    exc = rx.ResponseError("Command # 1 (XACK s g 1-1) of pipeline caused error: OOM command not allowed when used memory")
    assert classify(exc) is Outcome.OUTAGE
