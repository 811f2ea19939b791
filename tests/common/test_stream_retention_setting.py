"""STREAM_RETENTION_MS: milliseconds, or `off`."""

from __future__ import annotations

import pytest

from common.config import Settings
from common.errors import ConfigError


def test_default_is_one_hour_and_off_disables() -> None:
    """Unset: 3,600,000 ms; `off` in any case: None (never trim); `0` is a retention of zero."""
    assert Settings.from_env({}).stream_retention_ms == 3_600_000
    assert Settings.from_env({"STREAM_RETENTION_MS": " Off "}).stream_retention_ms is None
    assert Settings.from_env({"STREAM_RETENTION_MS": "0"}).stream_retention_ms == 0
    assert Settings.from_env({"STREAM_RETENTION_MS": "60000"}).stream_retention_ms == 60_000


@pytest.mark.parametrize("value", ["-1", "1.5", "1e3", "never", "", "2592000001"])
def test_malformed_retention_is_a_configuration_error(value: str) -> None:
    """Anything but a whole number of milliseconds up to 30 days, or `off`, is refused naming the variable."""
    with pytest.raises(ConfigError, match="STREAM_RETENTION_MS"):
        Settings.from_env({"STREAM_RETENTION_MS": value})
