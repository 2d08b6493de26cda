"""Scenario 3: memory per open cell — 1,000,000 distinct (element, filter) cells in one hour, in one process.

The pipeline's own steps, without Kafka: canonical events are decoded and added to an `Accumulator` through
`add_batch`, the path the pipeline takes (in batches of 5,000 records). RSS is read after a warm-up
(imports, the decoder's filter cache) and again after the last cell, each after a full garbage collection;
the difference divided by the cells is the cost of one open cell: its dict slot, key, element string and
value.

    python -m tests.bench.cardinality --cells 1000000 --filters 4 --out r.json
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from allocd.config import EventsSettings
from allocd.events import Decoder
from allocd.windows import CELL_BYTES_ESTIMATE, Accumulator
from tests.bench.measure import proc_rss, self_cpu_seconds, self_peak_rss
from tests.bench.workload import HOUR_MS, iso_ms
from tests.integration.harness import STREAMS

_BATCH = 5_000  # records per add_batch, as a fetch hands them over

__all__ = ["events_config", "fill", "main"]


def events_config() -> dict[str, Any]:
    """The `events` table allocd is run with in the benchmarks (the integration harness's streams)."""
    return {
        "undeclared": "reject",
        "streams": {name: {"granularity": "HOURLY", "dimensions": list(d)} for name, d in STREAMS.items()},
    }


def _event(i: int, filters: int, hour_ms: int) -> bytes:
    ts = hour_ms + i % HOUR_MS
    return orjson.dumps(
        {
            "id": f"ev-{i}",
            "timestamp": iso_ms(ts),
            "stream": "search-usage",
            "element_name": f"cust-{i // filters:07d}",
            "filter": {"custom:feature": [f"feature-{i % filters}"]},
            "value": 1000 + i % 1000,  # beyond the small-int cache, as most real values are
        }
    )


class _Record(NamedTuple):
    offset: int
    timestamp: int
    value: bytes


def fill(decoder: Decoder, acc: Accumulator, cells: int, filters: int, hour_ms: int) -> None:
    record_ts = hour_ms + HOUR_MS - 1
    tp = ("bench", 0)
    for first in range(0, cells, _BATCH):
        batch = [
            _Record(i, record_ts, _event(i, filters, hour_ms))
            for i in range(first, min(cells, first + _BATCH))
        ]
        added = acc.add_batch(tp, batch, decoder.decode_fields, expect=first)
        assert not added.rejected, added.rejected[:1]


def measure(cells: int, filters: int) -> dict[str, Any]:
    now = int(time.time() * 1000)
    hour_ms = now - now % HOUR_MS - HOUR_MS
    decoder = Decoder(EventsSettings.from_dict(events_config()))
    acc = Accumulator()
    fill(decoder, Accumulator(), 10 * filters, filters, hour_ms)  # warm-up: caches, code paths
    gc.collect()
    before = proc_rss()
    cpu0 = self_cpu_seconds()
    fill(decoder, acc, cells, filters, hour_ms)
    cpu = self_cpu_seconds() - cpu0
    gc.collect()
    after = proc_rss()
    assert len(acc) == cells, (len(acc), cells)
    return {
        "cells": cells,
        "filters": filters,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "peak_rss_mb": self_peak_rss() / 2**20,
        "bytes_per_cell": (after - before) / cells,
        "estimate_bytes_per_cell": CELL_BYTES_ESTIMATE,
        "memory_estimate_mb": acc.memory_estimate() / 2**20,
        "cpu_seconds": cpu,
        "cpu_us_per_event": cpu / cells * 1e6,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="bytes of RSS per open accumulator cell")
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--filters", type=int, default=4, help="filter variants (elements = cells / filters)")
    parser.add_argument("--out", required=True, help="write the result as JSON here")
    args = parser.parse_args(argv)
    Path(args.out).write_bytes(orjson.dumps(measure(args.cells, args.filters)))


if __name__ == "__main__":
    main()
