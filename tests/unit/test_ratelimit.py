"""The token bucket: math on a fake clock, FIFO sharing between concurrent callers, and `stop`."""

from __future__ import annotations

import asyncio
import time

import pytest

from allocd.cloudzero.ratelimit import RateLimiter, sleep_or_stop

from .fakes import FakeClock


async def sleep_forever(seconds: float) -> None:
    await asyncio.Event().wait()


def limiter(clock: FakeClock, rate: float = 10.0, burst: float | None = 10.0, **kw: object) -> RateLimiter:
    return RateLimiter(rate, burst, clock=clock, sleep=clock.sleep, **kw)  # type: ignore[arg-type]


async def test_starts_full_then_waits_for_refill() -> None:
    clock = FakeClock()
    bucket = limiter(clock)
    assert await bucket.acquire(10) == 0.0
    assert await bucket.acquire(5) == pytest.approx(0.5)
    assert clock.now == pytest.approx(0.5)
    assert bucket.tokens == pytest.approx(0.0)


async def test_refill_is_rate_times_elapsed_and_capped_at_burst() -> None:
    clock = FakeClock()
    bucket = limiter(clock, rate=100.0, burst=50.0)
    await bucket.acquire(50)
    clock.now += 0.3
    assert bucket.tokens == pytest.approx(30.0)
    clock.now += 100.0
    assert bucket.tokens == pytest.approx(50.0)


async def test_default_burst_is_one_full_request() -> None:
    bucket = RateLimiter()
    assert bucket.rate == 100.0
    assert bucket.burst == 3000.0


async def test_request_larger_than_burst_waits_for_full_bucket_and_leaves_debt() -> None:
    clock = FakeClock()
    bucket = limiter(clock)
    await bucket.acquire(6)  # 4 left
    waited = await bucket.acquire(25)  # more than the burst of 10: waits until the bucket is full
    assert waited == pytest.approx(0.6)
    assert bucket.tokens == pytest.approx(-15.0)
    # The debt is repaid before the next request: 15 tokens of debt + 10 needed = 2.5 s at 10/s.
    assert await bucket.acquire(10) == pytest.approx(2.5)


async def test_long_run_rate_holds() -> None:
    clock = FakeClock()
    bucket = limiter(clock, rate=100.0, burst=300.0)
    for _ in range(20):
        await bucket.acquire(300)
    # 6,000 records: 300 from the initial burst, the other 5,700 at 100/s.
    assert clock.now == pytest.approx(57.0)


async def test_shared_by_concurrent_callers_in_arrival_order() -> None:
    clock = FakeClock()
    bucket = limiter(clock)
    order: list[int] = []
    went_at: list[float] = []

    async def take(i: int) -> None:
        await bucket.acquire(10)
        order.append(i)
        went_at.append(clock.now)

    await asyncio.gather(*(take(i) for i in range(5)))
    assert order == [0, 1, 2, 3, 4]
    # 50 records, 10 from the burst, 40 at 10/s: one request a second, never two at once.
    assert went_at == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])


async def test_stop_wakes_a_waiting_acquire_without_taking_tokens() -> None:
    clock = FakeClock()
    bucket = RateLimiter(10.0, 10.0, clock=clock, sleep=sleep_forever)
    await bucket.acquire(10)
    clock.now += 0.4  # 4 tokens
    stop = asyncio.Event()
    task = asyncio.create_task(bucket.acquire(10, stop))
    await asyncio.sleep(0)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 2)
    assert bucket.tokens == pytest.approx(4.0)


async def test_stop_already_set_returns_at_once() -> None:
    clock = FakeClock()
    bucket = RateLimiter(10.0, 10.0, clock=clock, sleep=sleep_forever)
    await bucket.acquire(10)
    stop = asyncio.Event()
    stop.set()
    assert await asyncio.wait_for(bucket.acquire(5, stop), 2) == 0.0
    assert bucket.tokens == pytest.approx(0.0)


async def test_stop_wakes_a_caller_queued_behind_another() -> None:
    clock = FakeClock()
    bucket = RateLimiter(10.0, 10.0, clock=clock, sleep=sleep_forever)
    await bucket.acquire(10)
    holder = asyncio.create_task(bucket.acquire(10))  # holds the lock, sleeping forever
    await asyncio.sleep(0)
    stop = asyncio.Event()
    queued = asyncio.create_task(bucket.acquire(1, stop))
    await asyncio.sleep(0)
    stop.set()
    await asyncio.wait_for(queued, 2)
    assert not holder.done()
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    # The lock was given back by both: a fresh caller gets through once tokens exist.
    clock.now += 1.0
    assert await asyncio.wait_for(bucket.acquire(10), 2) == 0.0


async def test_real_clock_default() -> None:
    bucket = RateLimiter(1000.0, 10.0)
    await bucket.acquire(10)
    start = time.monotonic()
    waited = await bucket.acquire(20)
    assert 0.005 <= waited < 1.0
    assert time.monotonic() - start >= 0.005


@pytest.mark.parametrize(("rate", "burst"), [(0, 10), (-1, 10), (10, 0)])
def test_rejects_bad_settings(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)


async def test_negative_acquire_is_an_error() -> None:
    with pytest.raises(ValueError):
        await RateLimiter().acquire(-1)


async def test_sleep_or_stop() -> None:
    clock = FakeClock()
    assert await sleep_or_stop(clock.sleep, 2.0, None) is True
    assert await sleep_or_stop(clock.sleep, 3.0, asyncio.Event()) is True
    assert clock.sleeps == [2.0, 3.0]
    stop = asyncio.Event()
    task = asyncio.create_task(sleep_or_stop(sleep_forever, 1000.0, stop))
    await asyncio.sleep(0)
    stop.set()
    assert await asyncio.wait_for(task, 2) is False


async def test_cancelling_a_queued_caller_does_not_leak_the_lock() -> None:
    clock = FakeClock()
    bucket = RateLimiter(10.0, 10.0, clock=clock, sleep=sleep_forever)
    await bucket.acquire(10)
    holder = asyncio.create_task(bucket.acquire(10))
    await asyncio.sleep(0)
    queued = asyncio.create_task(bucket.acquire(1, asyncio.Event()))
    await asyncio.sleep(0)
    queued.cancel()
    holder.cancel()
    for task in (queued, holder):
        with pytest.raises(asyncio.CancelledError):
            await task
    clock.now += 1.0
    assert await asyncio.wait_for(bucket.acquire(10), 2) == 0.0
