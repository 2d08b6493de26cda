"""Fixtures shared by every test directory: one real Tansu broker per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from allocd.embedded import EmbeddedBroker


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """The session's broker; synchronous so it is bound to no event loop. Stopped by PID at the end."""
    embedded = EmbeddedBroker()
    embedded.start(timeout=30)
    try:
        yield embedded
    finally:
        embedded.stop(timeout=10)
