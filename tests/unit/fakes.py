"""Small fakes shared by unit tests."""

from __future__ import annotations

import asyncio

__all__ = ["FakeClock"]


class FakeClock:
    """A clock that moves only when a test sets `now` (or adds to it) or someone sleeps on it.

    Call it for the time; `await clock.sleep(s)` records `s` in `sleeps` and moves `now` by it. It stands in
    for wall clocks and monotonic clocks alike: `now` starts wherever the test says (0.0 by default).
    """

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)
