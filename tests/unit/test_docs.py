"""The README is a promise: every configuration key and every metric the code has is documented there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from allocd import config
from allocd.observability import METRIC_NAMES

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize(
    "key",
    [f"{name}.{f.name}" for name, cls in config._SECTIONS.items() for f in dataclasses.fields(cls)],
)
def test_every_config_key_is_in_the_readme(key: str) -> None:
    assert f"`{key}`" in README


@pytest.mark.parametrize("name", sorted(METRIC_NAMES))
def test_every_metric_is_in_the_readme(name: str) -> None:
    assert f"`{name}" in README


def test_the_readme_has_exactly_two_setup_commands() -> None:
    block = README.split("## Two commands", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make run", "make test"]
