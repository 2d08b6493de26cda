"""Integration fixtures: one real Tansu broker per test session, uniquely named topics.

Tests here talk to real processes on 127.0.0.1; mark them `pytest.mark.integration` (a module-level
`pytestmark` does it). Consumers in tests should use short session timeouts (Tansu takes about
session_timeout_ms / 2 to complete a group join) and wait on conditions with deadlines.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from allocd.embedded import EmbeddedBroker, create_topics

from .harness import Stack

__all__ = ["EMULATOR_KEYS", "EmulatorHandle", "TopicFactory"]

EMULATOR_KEYS = ("key-a", "key-b", "key-c")

TopicFactory = Callable[..., Awaitable[str]]


@pytest.fixture
def topic_factory(broker: EmbeddedBroker) -> TopicFactory:
    """`await topic_factory(partitions=4, prefix="t")` creates a fresh topic and returns its name."""

    async def make(partitions: int = 4, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        await create_topics(broker.bootstrap, {name: partitions})
        return name

    return make


@dataclass
class EmulatorHandle:
    url: str
    runner: Any

    @property
    def state(self) -> Any:
        """The in-process Emulator, for direct inspection."""
        from allocd.cloudzero.emulator import get_emulator

        return get_emulator(self.runner.app)


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorHandle]:
    """The CloudZero emulator in the test's event loop on a free loopback port, admin routes on, two keys
    (tests give each daemon its own), a rate limit high enough not to get in the way unless a test says."""
    from allocd.cloudzero.emulator import EmulatorConfig, bound_port, serve

    runner = await serve(
        EmulatorConfig(keys=EMULATOR_KEYS, admin=True, rate=1_000_000, burst=10_000_000), "127.0.0.1", 0
    )
    try:
        yield EmulatorHandle(f"http://127.0.0.1:{bound_port(runner)}", runner)
    finally:
        await runner.cleanup()


@pytest.fixture
async def stack(
    broker: EmbeddedBroker, emulator: EmulatorHandle, topic_factory: TopicFactory, tmp_path: Path
) -> AsyncIterator[Stack]:
    """A fresh topic (4 partitions) and group with its checkpoint and DLQ topics; daemons stopped after."""
    topic = await topic_factory(partitions=4, prefix="usage")
    group = f"g-{uuid.uuid4().hex[:8]}"
    await create_topics(broker.bootstrap, {f"{group}-ckpt": 1, f"{group}-dlq": 1})
    async with aiohttp.ClientSession() as session:
        s = Stack(broker, emulator, topic, tmp_path, session, group, [])
        try:
            yield s
        finally:
            for d in s.daemons:
                await d.stop()
