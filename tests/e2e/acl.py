"""The Redis ACL rule of OPERATIONS.md ("Redis ACL user"), filled in for a test: doc and tests cannot drift."""

from __future__ import annotations

import re
import shlex

import redis

from scripts.toolkit.processes import ROOT

USER = "processor"
_BLOCK = re.compile(r"^## Redis ACL user\b.*?^```acl\n(?P<rule>.*?)\n```", re.M | re.S)


def documented_rule() -> str:
    """The one-line rule of the ```acl block, placeholders as written."""
    match = _BLOCK.search((ROOT / "OPERATIONS.md").read_text())
    assert match, "OPERATIONS.md has no `## Redis ACL user` section with an ```acl block"
    rule = match["rule"].strip()
    assert "\n" not in rule, "the ```acl block is one line"
    return rule


def acl_rule(stream_key: str, dlq_key: str, password: str) -> str:
    """The documented ACL SETUSER command for this stream, DLQ and password."""
    filled = documented_rule().replace("<STREAM_KEY>", stream_key).replace("<DLQ_KEY>", dlq_key)
    return filled.replace("<PASSWORD>", password)


def permissions(rule: str) -> list[str]:
    """The +command and +command|subcommand grants of a rule."""
    return [word for word in rule.split() if word.startswith("+")]


def create_user(admin: redis.Redis, rule: str, without: tuple[str, ...] = ()) -> None:
    """Run `rule` as the admin, less the grants in `without` (e.g. "+xack")."""
    words = shlex.split(rule)
    assert words[:3] == ["ACL", "SETUSER", USER], words[:3]
    missing = set(without) - set(words)
    assert not missing, f"the rule grants no {missing}"
    admin.execute_command(*(word for word in words if word not in without))


def user_url(port: int, password: str) -> str:
    return f"redis://{USER}:{password}@127.0.0.1:{port}/0"


def denials(admin: redis.Redis) -> list[dict]:
    """ACL LOG entries, less redis-py's CLIENT SETINFO at connect on Redis 7.2+ (refused and ignored)."""
    entries = admin.acl_log()
    return [entry for entry in entries if entry.get("object") != "client|setinfo"]
