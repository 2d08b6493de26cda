"""Pacing: a token bucket counted in records, shared by every request of a process.

The API allows 100 records per second per organisation [doc]; records, not requests, are the scarce
resource, so the bucket holds records. Its burst defaults to one full request so a 3,000-record request can
pass; a request larger than the burst waits for a full bucket and then goes, leaving the bucket in debt
(negative), which later requests repay — the long-run rate holds and nothing deadlocks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from allocd.cloudzero.records import MAX_RECORDS_PER_REQUEST, RATE_RECORDS_PER_SECOND

__all__ = ["Clock", "RateLimiter", "Sleep", "sleep_or_stop"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


async def sleep_or_stop(sleep: Sleep, seconds: float, stop: asyncio.Event | None) -> bool:
    """Sleep `seconds` with `sleep`, waking at once when `stop` is set. True if the full sleep happened."""
    if stop is None:
        await sleep(seconds)
        return True
    if stop.is_set():
        return False
    sleeper = asyncio.ensure_future(sleep(seconds))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((sleeper, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Cancelled, not awaited: awaiting here could swallow a cancellation aimed at the caller.
        sleeper.cancel()
        stopper.cancel()
    return not stop.is_set()


class RateLimiter:
    """A token bucket in records: `rate` records per second, at most `burst` saved up. Starts full.

    Callers are served in arrival order (one waits while holding the lock), so a large request is not
    starved by a stream of small ones. `clock` and `sleep` are injectable so tests do not sleep for real.
    """

    def __init__(
        self,
        rate: float = RATE_RECORDS_PER_SECOND,
        burst: float | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        burst = float(MAX_RECORDS_PER_REQUEST if burst is None else burst)
        if not rate > 0:
            raise ValueError(f"rate must be > 0 records/s, got {rate!r}")
        if not burst >= 1:
            raise ValueError(f"burst must be >= 1 record, got {burst!r}")
        self.rate = float(rate)
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = burst
        self._updated = clock()
        self._lock = asyncio.Lock()

    @property
    def tokens(self) -> float:
        """Records that could go now (negative while a request larger than the burst is being repaid)."""
        self._refill()
        return self._tokens

    async def acquire(self, n: int, stop: asyncio.Event | None = None) -> float:
        """Wait until `n` records may be sent, take them, and return the seconds waited.

        A request larger than the burst waits for a full bucket and then goes. If `stop` is set first,
        returns at once *without* taking any tokens; the caller checks `stop` and does not send.
        """
        if n < 0:
            raise ValueError(f"cannot acquire {n} records")
        start = self._clock()
        if not await self._lock_or_stop(stop):
            return self._clock() - start
        try:
            need = min(float(n), self.burst)
            self._refill()
            missing = need - self._tokens
            if missing > 0:
                # Holding the lock, nobody else takes tokens meanwhile: one sleep covers the deficit.
                if not await sleep_or_stop(self._sleep, missing / self.rate, stop):
                    return self._clock() - start
                self._refill()
                # A timer firing a hair early, or clock rounding at a high rate, must not loop or stall.
                self._tokens = max(self._tokens, need)
            self._tokens -= n
        finally:
            self._lock.release()
        return self._clock() - start

    async def _lock_or_stop(self, stop: asyncio.Event | None) -> bool:
        """Take the lock (queueing behind earlier callers) unless `stop` is set first. True if taken."""
        if stop is None:
            await self._lock.acquire()
            return True
        if stop.is_set():
            return False
        taker = asyncio.ensure_future(self._lock.acquire())
        stopper = asyncio.ensure_future(stop.wait())
        completed = False
        try:
            await asyncio.wait((taker, stopper), return_when=asyncio.FIRST_COMPLETED)
            completed = True
        finally:
            stopper.cancel()
            # A pending `acquire` that is cancelled never ends up holding the lock (asyncio.Lock passes
            # it on), so only a finished one is ours — to keep, or to give back if we are not going on.
            taken = taker.done() and not taker.cancelled()
            taker.cancel()
            if taken and (not completed or stop.is_set()):
                self._lock.release()
                taken = False
        return taken

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
