"""Scenario 4: records per key-hour in a steady run with default settings (HOURLY, grace 5 minutes).

Method: a live run of several hours, replayed in simulated time. An in-process `Pipeline` is built from the
same parts as `allocd run` (real Kafka source, journal and DLQ on the embedded broker, the real API client
against the emulator) but takes a fake clock. Events arrive in steps of `step_s` simulated seconds: the
step's events (arrival = Kafka record timestamp, event time up to the workload's skew earlier) are produced,
the pipeline reads them, then the clock moves to the step's end — so the clock never runs ahead of what was
read, as in a live run that keeps up. Windows close on that clock (end + grace) and are delivered while later
events keep arriving. At the end the clock moves past the last window's end plus grace and the run waits until
every event is committed. The ratio is records the emulator accepted / distinct (stream, hour, element,
filter) in the ground truth; 1.0 means every window's cell reached the API as exactly one record.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiokafka import AIOKafkaProducer
from prometheus_client import generate_latest

from allocd.config import load_settings
from allocd.embedded import Message, create_topics, read_committed
from allocd.events import Decoder
from allocd.journal import Journal
from allocd.kafka_conn import make_producer
from allocd.observability import Health, Metrics
from allocd.pipeline import Pipeline
from allocd.sources.kafka import KafkaSource
from allocd.stores.kafka import KafkaDeadLetters, KafkaJournalStore
from allocd.wiring import make_client, make_key
from tests.bench.end_to_end import bench_config, compare_totals, records_sent
from tests.bench.measure import Result
from tests.bench.workload import HOUR_MS, Truth, Workload, generate
from tests.integration.harness import metric_value

__all__ = ["run_keyhour"]

GRACE_S = 300  # the default grace; the config below states it so the claim does not rest on a default


def _steps(events: list[Message], start_ms: int, step_ms: int) -> list[tuple[int, list[Message]]]:
    """The events cut into consecutive steps by arrival: (step end ms, events arriving before it)."""
    out: list[tuple[int, list[Message]]] = []
    end, current = start_ms + step_ms, []
    for msg in events:
        assert msg.timestamp_ms is not None
        while msg.timestamp_ms >= end:
            out.append((end, current))
            end, current = end + step_ms, []
        current.append(msg)
    out.append((end, current))
    return out


async def _produce(
    producer: AIOKafkaProducer, topic: str, batch: list[Message], ends: dict[int, int]
) -> None:
    futures = [
        await producer.send(topic, m.value, partition=m.partition, timestamp_ms=m.timestamp_ms) for m in batch
    ]
    for meta in await asyncio.gather(*futures):
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def run_keyhour(
    bootstrap: str, api_url: str, workdir: Path, w: Workload, *, step_s: int = 300, timeout: float = 300
) -> Result:
    tag = uuid.uuid4().hex[:8]
    topic, group = f"bench-steady-{tag}", f"bench-steady-{tag}"
    await create_topics(bootstrap, {topic: w.partitions, f"{group}-ckpt": 1, f"{group}-dlq": 1})
    start = w.start_ms()
    truth: Truth = {}
    steps = _steps(list(generate(w, start, truth)), start, step_s * 1000)
    config_path = workdir / "steady.toml"
    config_path.write_text(bench_config(bootstrap, topic, api_url, group, workdir, "steady", GRACE_S))
    settings = load_settings(config_path, env={})
    now_ms = [start]
    metrics = Metrics()
    k = settings.kafka
    journal_producer = make_producer(k)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await journal_producer.start()
    await producer.start()
    health = Health(conditions=("assigned",))
    client = make_client(settings.api, make_key(settings.api), metrics, health)
    store = KafkaJournalStore(k, journal_producer)
    pipeline = Pipeline(
        settings.pipeline,
        KafkaSource(k),
        Decoder(settings.events),
        client,
        Journal(store),
        KafkaDeadLetters(k.dlq_topic, journal_producer),
        metrics,
        health,
        clock=lambda: now_ms[0] / 1000,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop))
    ends: dict[int, int] = {}
    tps = [(topic, p) for p in range(w.partitions)]
    started = time.monotonic()
    try:
        await _until(lambda: len(pipeline.parts) == w.partitions, 60, "partitions assigned")
        for step_end, batch in steps:
            await _produce(producer, topic, batch, ends)

            def read_all() -> bool:
                if task.done():
                    task.result()
                return all(pipeline.next_offset.get(tp, -1) >= ends.get(tp[1], 0) for tp in tps)

            await _until(read_all, timeout, "the pipeline to read a step")
            now_ms[0] = step_end
        last_end = max(h for _, h, _, _ in truth) + HOUR_MS
        now_ms[0] = max(now_ms[0], last_end + GRACE_S * 1000 + 1000)
        deadline = time.monotonic() + timeout
        while True:
            committed = await read_committed(bootstrap, group, topic, range(w.partitions))
            if all((committed.get(p) or 0) >= end for p, end in ends.items()):
                break
            if task.done():
                task.result()
            if time.monotonic() > deadline:
                raise TimeoutError(f"not everything was committed: {committed} < {ends}")
            await asyncio.sleep(0.1)
        seconds = time.monotonic() - started
        async with aiohttp.ClientSession() as session:
            match, differ = await compare_totals(session, api_url, truth)
            sent = await records_sent(session, api_url)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await client.close()
        await store.close()  # its journal-tail consumer
        await producer.stop()
        await journal_producer.stop()
    text = generate_latest(metrics.registry).decode()
    return {
        "scenario": "records per key-hour (steady)",
        "events": sum(ends.values()),
        "simulated_hours": (now_ms[0] - start) / HOUR_MS,
        "step_s": step_s,
        "seconds": seconds,
        "totals_match": match,
        "cells_differ": len(differ),
        "differ_sample": [[repr(k), str(e), str(g)] for k, e, g in differ[:5]],
        "records_sent": sent,
        "key_hours": len(truth),
        "records_per_key_hour": sent / len(truth),
        "cycles_closed": int(metric_value(text, "allocd_flush_cycles_total", trigger="closed")),
        "cycles_forced": int(
            sum(
                metric_value(text, "allocd_flush_cycles_total", trigger=t)
                for t in ("key_cap", "memory_cap", "max_interval")
            )
        ),
        "late_events": int(metric_value(text, "allocd_events_late_total")),
    }
