"""The soak's oracle must say what the rules say: each valid event lands in the cell with the amount the
generator recorded, each poison message is refused (this checks the generator, not the decoder — that has
its own fuzz target in tests/unit/test_events_fuzz.py)."""

from __future__ import annotations

import time
import tomllib
from collections import Counter
from decimal import Decimal

from allocd.config import EventsSettings
from allocd.errors import InvalidEvent
from allocd.events import Decoder
from allocd.windows import window_bounds

from ..configs import render_toml
from .inputs import POISON_KINDS, InputFactory, stream_tables


def decoder() -> Decoder:
    events = {"events": {"undeclared": "reject", "streams": stream_tables()}}
    table = tomllib.loads(render_toml(events))["events"]
    return Decoder(EventsSettings.from_dict(table, prefix="events"))


def test_generator_truth_agrees_with_the_rules() -> None:
    dec = decoder()
    factory = InputFactory(seed=5, partitions=6, window_seconds=5, poison_fraction=0.4)
    now = int(time.time() * 1000)
    kinds: Counter[str] = Counter()
    for i in range(3000):
        item = factory.next(now + i)
        kinds[item.kind] += 1
        assert 0 <= item.partition < 6
        if item.kind == "valid":
            event = dec.decode(item.value, item.timestamp_ms)
            start, _ = window_bounds(event.timestamp_ms, event.granularity, 5000)
            assert (event.stream, start, event.element, event.filter) == item.cell, item.value
            assert Decimal(event.value) == item.amount
        else:
            try:
                dec.decode(item.value, item.timestamp_ms)
            except InvalidEvent:
                continue
            raise AssertionError(f"poison {item.kind} accepted: {item.value[:200]!r}")
    assert set(kinds) == {"valid", *POISON_KINDS}  # every kind, deterministic for this seed


def test_same_seed_same_messages() -> None:
    now = 1_795_774_503_120
    a = InputFactory(seed=9, partitions=4, window_seconds=5, poison_fraction=0.5)
    b = InputFactory(seed=9, partitions=4, window_seconds=5, poison_fraction=0.5)
    assert [a.next(now).value for _ in range(300)] == [b.next(now).value for _ in range(300)]
