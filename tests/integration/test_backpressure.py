"""Backpressure and bounded memory (DESIGN.md §2.7) against a real broker, the emulator and `allocd run`.

An API outage must not turn into buffering: one cycle in flight, at most `max_pending_snapshots` behind it,
then the source pauses (Kafka is the buffer) while the daemon stays live; when the API is back, everything is
delivered exactly. The key cap must force early cycles (deltas) without changing any total.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from .harness import DaemonProcess, Generator, Stack, emulator_totals, metric_value, produce_live, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

OUTAGE_SECONDS = 20.0
RATE = 3000  # events/s while the API is down
PAD = 300  # bytes of an ignored field per event, so the outage brings tens of MB into Kafka
# Growth allowed after warm-up (from a moment after the source paused to the end of the outage). Paused,
# the daemon reads nothing, so its memory should stay flat: what remains is allocator noise, retry objects
# and broker metadata — a few MB. 15 MB is well below what not pausing would take in: ~60k events of ~0.5 KB
# (≈30 MB of payload alone) and ~60k distinct cells (≥ 200 B each in the accumulator or pending snapshots).
RSS_GROWTH_BOUND_KB = 15 * 1024


def rss_kb(pid: int) -> int:
    """The process's resident set size (VmRSS) in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class Sample:
    at: float  # monotonic
    paused: float
    pending: float
    consumed: float
    healthz: int
    rss_kb: int


@dataclass
class Sampler:
    """Scrapes the daemon, probes /healthz and reads its RSS every `every` seconds until stopped."""

    stack: Stack
    daemon: DaemonProcess
    every: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while not self.stop.is_set():
            text = await self.daemon.metrics(self.stack.session)
            self.samples.append(
                Sample(
                    time.monotonic(),
                    metric_value(text, "allocd_consumer_paused"),
                    metric_value(text, "allocd_snapshots_pending"),
                    metric_value(text, "allocd_events_consumed_total"),
                    await self.stack.probe(self.daemon, "/healthz"),
                    rss_kb(self.daemon.pid),
                )
            )
            try:
                await asyncio.wait_for(self.stop.wait(), timeout=self.every)
            except TimeoutError:
                pass

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None


async def produce_steady(stack: Stack, gen: Generator, rate: int, seconds: float, pad: int = 0) -> None:
    """`rate` live events per second for `seconds` from one producer (so the rate is really reached)."""
    producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap, acks="all", linger_ms=5)
    await producer.start()
    padding = b',"note":"' + b"x" * pad + b'"}' if pad else b"}"
    try:
        started, sent, total = time.monotonic(), 0, int(rate * seconds)
        while sent < total:
            due = min(int(rate * (time.monotonic() - started)) + 1, total)
            futures = [
                await producer.send(stack.topic, gen.event()[:-1] + padding) for _ in range(due - sent)
            ]
            sent = due
            await asyncio.gather(*futures)
            await asyncio.sleep(0.05)
    finally:
        await producer.stop()


async def test_api_outage_pauses_the_source_bounds_memory_and_delivers_exactly_after(stack: Stack) -> None:
    d = stack.daemon(
        "a",
        window_seconds=2,
        grace_seconds=0.5,
        records_per_second=1_000_000,
        retry_deadline=2,
        max_pending_snapshots=1,
        liveness_timeout=5,  # far below the outage: a delivery loop that stopped beating would show
    )
    d.start()
    await stack.ready(d)
    gen = Generator(seed=21, elements=50_000)  # nearly every event its own cell
    await stack.set_faults(error_503=1.0)
    sampler = Sampler(stack, d)
    sampling = asyncio.create_task(sampler.run())
    try:
        producing = asyncio.create_task(produce_steady(stack, gen, RATE, OUTAGE_SECONDS, PAD))

        async def paused() -> bool:
            s = sampler.latest()
            return s is not None and s.paused == 1

        await wait_for(paused, 15, "the source to pause for backpressure", interval=0.1)
        paused_at = time.monotonic()
        await producing
        outage_end = time.monotonic()
        await stack.set_faults()  # the API is back

        async def drained() -> bool:
            s = sampler.latest()
            text = await d.metrics(stack.session)
            accepted = metric_value(text, "allocd_events_accepted_total")
            open_cells = metric_value(text, "allocd_open_cells")
            return s is not None and s.paused == 0 and accepted == gen.produced and open_cells == 0

        await wait_for(drained, 60, "the backlog read and the source resumed", interval=0.5)
        await stack.totals_equal(gen.expected(), timeout=30)
    finally:
        sampler.stop.set()
        await sampling

    samples = sampler.samples
    assert gen.produced == int(RATE * OUTAGE_SECONDS)
    # The API was down for the whole production: paused, with one cycle in flight and at most one behind.
    assert max(s.pending for s in samples) <= 1
    assert all(s.healthz == 200 for s in samples), [(round(s.at - paused_at, 1), s.healthz) for s in samples]
    held = [s for s in samples if paused_at + 1 <= s.at <= outage_end]
    assert len(held) >= 10
    assert all(s.paused == 1 for s in held)
    assert len({s.consumed for s in held}) == 1, "events were read while paused: Kafka must be the buffer"
    assert held[0].consumed < gen.produced / 2
    # Memory after warm-up (2 s after the pause) stays within the bound while events keep arriving.
    warm = [s for s in held if s.at >= paused_at + 2]
    growth = max(s.rss_kb for s in warm) - warm[0].rss_kb
    assert growth <= RSS_GROWTH_BOUND_KB, f"RSS grew {growth} kB while paused (bound {RSS_GROWTH_BOUND_KB})"
    text = await d.metrics(stack.session)
    assert metric_value(text, "allocd_api_requests_total", status="503") > 0
    assert metric_value(text, "allocd_paused_seconds_total") >= OUTAGE_SECONDS / 2
    assert metric_value(text, "allocd_consumer_paused") == 0
    assert metric_value(text, "allocd_dlq_writes_total") == 0
    assert await d.terminate() == 0


async def test_key_cap_forces_early_cycles_and_totals_stay_exact(stack: Stack) -> None:
    window = 4
    d = stack.daemon("a", window_seconds=window, grace_seconds=0.5, max_open_keys=50)
    d.start()
    await stack.ready(d)
    gen = Generator(seed=22, elements=300)  # up to 1,200 cells per window: far above the cap
    await produce_live(stack.broker.bootstrap, stack.topic, gen, total=3000, seconds=2)
    await stack.totals_equal(gen.expected(), timeout=40)
    text = await d.metrics(stack.session)
    assert metric_value(text, "allocd_flush_cycles_total", trigger="key_cap", outcome="completed") > 0
    assert metric_value(text, "allocd_flush_cycles_total", outcome="abandoned") == 0
    # Forced cycles deliver open windows early, so some cells reach the API as several deltas.
    assert await stack.records_sent() > gen.cell_windows(window)
    assert metric_value(text, "allocd_open_cells") < 50
    assert await emulator_totals(stack.session, stack.emulator.url) == gen.expected()
    assert await d.terminate() == 0
