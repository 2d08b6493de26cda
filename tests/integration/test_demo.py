"""`make run` is a promise: `allocd demo` runs the main job end to end on the embedded stack and says so."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


def test_allocd_demo_delivers_exact_totals_end_to_end() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "allocd.cli",
            "demo",
            "--seconds",
            "3",
            "--window-seconds",
            "2",
            "--timeout",
            "90",
        ],
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "RESULT: totals match exactly" in done.stdout
    assert "allocd says: events consumed" in done.stdout
    assert "events dead-lettered 0" in done.stdout
