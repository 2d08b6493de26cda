"""Integration fixtures: one real Tansu broker per test session, uniquely named topics.

Tests here talk to real processes on 127.0.0.1; mark them `pytest.mark.integration` (a module-level
`pytestmark` does it). Consumers in tests should use short session timeouts (Tansu takes about
session_timeout_ms / 2 to complete a group join) and wait on conditions with deadlines.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterator

import pytest

from allocd.embedded import EmbeddedBroker, create_topics

__all__ = ["TopicFactory"]

TopicFactory = Callable[..., Awaitable[str]]


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """The session's broker; synchronous so it is bound to no event loop. Stopped by PID at the end."""
    embedded = EmbeddedBroker()
    embedded.start(timeout=30)
    try:
        yield embedded
    finally:
        embedded.stop(timeout=10)


@pytest.fixture
def topic_factory(broker: EmbeddedBroker) -> TopicFactory:
    """`await topic_factory(partitions=4, prefix="t")` creates a fresh topic and returns its name."""

    async def make(partitions: int = 4, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        await create_topics(broker.bootstrap, {name: partitions})
        return name

    return make


# The `emulator` fixture (the CloudZero API emulator subprocess) belongs here too; another engineer owns it.
