"""The shell scripts that install the tools and build the image pass shellcheck."""

from __future__ import annotations

from tests.deploy.deploytools import ROOT, run, tool

SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))


def test_scripts_exist() -> None:
    assert {p.name for p in SCRIPTS} >= {"install-tools.sh", "build-image.sh"}


def test_shellcheck() -> None:
    run([tool("shellcheck"), "--severity", "style", *map(str, SCRIPTS)])


def test_scripts_are_executable_and_strict() -> None:
    for script in SCRIPTS:
        assert script.stat().st_mode & 0o111, f"{script.name} is not executable"
        assert "set -euo pipefail" in script.read_text(), script.name
