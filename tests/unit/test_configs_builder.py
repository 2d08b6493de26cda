"""The tests' own TOML writer (tests/configs.py) writes what tomllib reads back, whatever the strings hold."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.configs import daemon_toml, render_toml


def test_values_and_keys_read_back_as_written() -> None:
    tables = {
        "a": {
            "text": 'quote " backslash \\ tab \t newline \n nul \x00 del \x7f ünï 😀',
            "flag": False,
            "count": 3,
            "ratio": 0.5,
            "big": 1e300,
            "path": Path("/tmp/x y"),
            "list": ["x", 1, 2.5, True],
            "skipped": None,
            "sub": {"dotted.key": {"k": "v"}, "bare-key_1": {}},
        }
    }
    assert tomllib.loads(render_toml(tables)) == {
        "a": {
            "text": 'quote " backslash \\ tab \t newline \n nul \x00 del \x7f ünï 😀',
            "flag": False,
            "count": 3,
            "ratio": 0.5,
            "big": 1e300,
            "path": "/tmp/x y",
            "list": ["x", 1, 2.5, True],
            "sub": {"dotted.key": {"k": "v"}, "bare-key_1": {}},
        }
    }


def test_sidecar_mode_has_no_kafka_table_and_kafka_settings_need_a_bootstrap() -> None:
    toml = tomllib.loads(daemon_toml(api_url="http://x", key_file="/k", sidecar={"spool_dir": "/s"}))
    assert "kafka" not in toml
    assert toml["sidecar"] == {"enabled": True, "host": "127.0.0.1", "port": 0, "spool_dir": "/s"}
    with pytest.raises(ValueError):
        daemon_toml(api_url="http://x", key_file="/k", topics=["t"])
    with pytest.raises(ValueError):
        daemon_toml(api_url="http://x", key_file="/k", bootstrap="b:1", topics=["t"])  # no group
