"""The journal fence's cost per request: one `sent` append plus `still_owner`, as the pipeline does before
each request, against the embedded broker.

    python -m tests.bench.bench_fence [--rounds 200]

Prints milliseconds per round (mean and 95th percentile). Each check reads the checkpoint topic's tail up
to the entry just appended; the tail consumer stays in position between checks (before it seeked each
time, and each check waited out aiokafka's 500 ms fetch wait: about 200 ms per request).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiokafka import AIOKafkaProducer

from allocd.config import KafkaSettings
from allocd.embedded import EmbeddedBroker, create_topics
from allocd.stores.kafka import KafkaJournalStore

__all__ = ["main"]


async def measure(bootstrap: str, rounds: int) -> list[float]:
    """Seconds per append + check, `rounds` times, for one member that owns one partition."""
    await create_topics(bootstrap, {"bench-fence-ckpt": 1})
    settings = KafkaSettings(
        bootstrap_servers=bootstrap, group_id="bench", checkpoint_topic="bench-fence-ckpt"
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    store = KafkaJournalStore(settings, producer)
    try:
        await store.read_recent(claim=[("usage", 0)])
        times = []
        for i in range(rounds):
            started = time.perf_counter()
            await store.append([{"t": "sent", "cid": f"c{i}", "r": 0, "cells": []}])
            if not await store.still_owner([("usage", 0)]):
                raise AssertionError("no other member claimed the partition: still_owner must hold")
            times.append(time.perf_counter() - started)
        return times
    finally:
        await store.close()
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with EmbeddedBroker() as broker:
        times = sorted(asyncio.run(measure(broker.bootstrap, args.rounds)))
    mean = sum(times) / len(times)
    p95 = times[int(len(times) * 0.95) - 1]
    print(
        f"journal fence: {len(times)} rounds, {mean * 1000:.2f} ms mean, {p95 * 1000:.2f} ms p95 per request"
    )


if __name__ == "__main__":
    main()
