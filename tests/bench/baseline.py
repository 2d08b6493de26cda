"""Scenario 1, the ceiling: the raw Kafka client alone, in its own process.

aiokafka `getmany` + `orjson.loads` + one dict `+=` per event — no validation, no windows by time (the hour is
the timestamp's first 13 characters), no delivery. The consumer is assigned the partitions directly (no group
join) with the same fetch settings allocd uses, and the clock runs from the first fetch to the last event.

    python -m tests.bench.baseline --bootstrap HOST:PORT --topic T --ends '{"0": 250000, ...}' --out r.json
"""

from __future__ import annotations

import argparse
import asyncio
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from allocd.config import KafkaSettings
from tests.bench.measure import self_cpu_seconds, self_peak_rss

__all__ = ["consume", "main"]


async def consume(bootstrap: str, topic: str, ends: dict[int, int]) -> dict[str, Any]:
    defaults = KafkaSettings()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=defaults.max_poll_records,
        fetch_max_bytes=defaults.fetch_max_bytes,
    )
    tps = [TopicPartition(topic, p) for p, end in ends.items() if end > 0]
    total = sum(ends.values())
    sums: dict[tuple[str, str, str], Any] = {}
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        count = 0
        started, cpu0 = time.monotonic(), self_cpu_seconds()
        while count < total:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for r in records:
                    ev = orjson.loads(r.value)
                    value = ev["value"]
                    key = (ev["stream"], ev["timestamp"][:13], ev["element_name"])
                    sums[key] = sums.get(key, 0) + (value if type(value) is int else Decimal(value))
                count += len(records)
        seconds, cpu = time.monotonic() - started, self_cpu_seconds() - cpu0
    finally:
        await consumer.stop()
    return {
        "events": count,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss": self_peak_rss(),
        "sums": [[*k, str(v)] for k, v in sums.items()],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the raw-client baseline (one process)")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--ends", required=True, help="JSON: partition -> end offset")
    parser.add_argument("--out", required=True, help="write the result as JSON here")
    args = parser.parse_args(argv)
    ends = {int(p): int(e) for p, e in orjson.loads(args.ends).items()}
    result = asyncio.run(consume(args.bootstrap, args.topic, ends))
    Path(args.out).write_bytes(orjson.dumps(result))


if __name__ == "__main__":
    main()
