"""The benchmark's input: N canonical events on the embedded broker, and the totals the API must end up with.

Arrivals are spread evenly over `hours` whole UTC hours that all ended more than an hour ago, in order,
round-robin over the partitions; each record's Kafka timestamp is its arrival, and the event's own time lies
up to `skew_ms` before it (so a few events near an hour's start belong to the hour before). A consumer reading
the backlog sees time advance as a live run would, every window has closed on the wall clock, and once all
is read every window is due (the default grace of 5 minutes has long passed).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from allocd.cloudzero.records import CanonicalFilter, canonical_filter
from allocd.embedded import Message, create_topics, produce
from tests.integration.harness import STREAMS

__all__ = [
    "HOUR_MS",
    "Truth",
    "TruthKey",
    "Workload",
    "fill_topic",
    "generate",
    "hour_text",
    "iso_ms",
    "truth_by_hour",
    "write_truth",
]

HOUR_MS = 3_600_000
TruthKey = tuple[str, int, str, CanonicalFilter]  # (stream, hour start ms, element, canonical filter)
Truth = dict[TruthKey, int | Decimal]


def hour_text(start_ms: int) -> str:
    """An hour start as the emulator's admin view spells it."""
    return time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(start_ms // 1000))


def iso_ms(ts_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts_ms // 1000)) + f".{ts_ms % 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class Workload:
    """What to generate. `filters` distinct filter objects per stream; `decimal_share` of values are decimal
    strings ("12.34"), the rest integers 1..1000."""

    events: int = 1_000_000
    partitions: int = 4
    elements: int = 1_000
    filters: int = 4
    hours: int = 3
    decimal_share: float = 0.0
    skew_ms: int = 60_000  # an event's time lies up to this before its arrival (the record timestamp)
    seed: int = 1
    first_hour_ms: int = 0  # 0: hours + 1 whole hours before the current hour

    def start_ms(self) -> int:
        if self.first_hour_ms:
            return self.first_hour_ms
        now = int(time.time() * 1000)
        return now - now % HOUR_MS - (self.hours + 1) * HOUR_MS

    def filter_objects(self) -> dict[str, list[dict[str, list[str]]]]:
        """Per stream, the filter variants an event picks from (the stream's declared dimension set)."""
        out = {}
        for stream, dims in sorted(STREAMS.items()):
            variants = []
            for i in range(self.filters):
                flt = {"custom:feature": [f"feature-{i}"]}
                if "tag:environment" in dims:
                    flt["tag:environment"] = ["prod" if i % 2 == 0 else "staging"]
                variants.append(flt)
            out[stream] = variants
        return out

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def generate(w: Workload, start_ms: int, truth: Truth) -> Iterator[Message]:
    """The events, in arrival order, each to its partition; adds every value into `truth`."""
    rng = random.Random(w.seed)
    streams = sorted(STREAMS)
    variants = w.filter_objects()
    canon = {s: [canonical_filter(f) for f in variants[s]] for s in streams}
    step = w.hours * HOUR_MS / w.events
    for i in range(w.events):
        arrival = start_ms + int(i * step)
        ts = arrival - rng.randrange(w.skew_ms) if w.skew_ms else arrival
        stream = streams[rng.randrange(len(streams))]
        element = f"cust-{rng.randrange(w.elements)}"
        f = rng.randrange(w.filters)
        value: int | str = rng.randint(1, 1000)
        exact: int | Decimal = value
        if w.decimal_share and rng.random() < w.decimal_share:
            value = f"{rng.randint(0, 99)}.{rng.randint(1, 99):02d}"
            exact = Decimal(value)
        event = {
            "id": f"ev-{i}",
            "timestamp": iso_ms(ts),
            "stream": stream,
            "element_name": element,
            "filter": variants[stream][f],
            "value": value,
        }
        key = (stream, ts - ts % HOUR_MS, element, canon[stream][f])
        truth[key] = truth.get(key, 0) + exact
        yield Message(orjson.dumps(event), partition=i % w.partitions, timestamp_ms=arrival)


async def fill_topic(bootstrap: str, topic: str, w: Workload) -> tuple[dict[int, int], Truth]:
    """Create `topic`, produce the workload and return (acknowledged end offset per partition, truth)."""
    await create_topics(bootstrap, {topic: w.partitions})
    truth: Truth = {}
    ends = await produce(bootstrap, topic, generate(w, w.start_ms(), truth), linger_ms=20, timeout=900)
    return {p: ends.get(p, 0) for p in range(w.partitions)}, truth


def truth_by_hour(truth: Truth) -> dict[tuple[str, str, str], int | Decimal]:
    """The truth summed over filters: what the baseline (no filter handling) can be checked against."""
    out: dict[tuple[str, str, str], int | Decimal] = {}
    for (stream, hour, element, _flt), value in truth.items():
        key = (stream, hour_text(hour)[:13], element)
        out[key] = out.get(key, 0) + value
    return out


def write_truth(path: Path, truth: Truth) -> None:
    rows = [[s, hour_text(h), e, [[k, list(v)] for k, v in f], str(v)] for (s, h, e, f), v in truth.items()]
    path.write_bytes(orjson.dumps(rows))
