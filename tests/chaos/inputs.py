"""What the soak produces: valid events whose totals it computes itself, and poison, from one seed.

Ground truth is kept per *window cell* — (stream, window start ms, element, canonical filter), the daemon's
own cell key — because the emulator's request bodies name window cells too (a record's timestamp is its
window's start), so duplicates can be traced to the request that carried them. Values are exact Decimals of
the literal written, with few enough digits that no sum ever needs rounding (the API keeps 15).

Valid input is varied on purpose: unicode element names (NFC and NFD spellings are different cells), numeric
element ids, values as ints, floats, numeric strings (" 7 ", "1e2"), shuffled and repeated filter values,
timestamps as ISO with offsets or epoch milliseconds or absent (the record time counts), late events (a
closed window gets a delta) and events a little in the future, escaped JSON, unknown and nested extra fields.

Poison must end in the DLQ: random bytes, truncated JSON, huge messages, nesting past the parser's limit,
NaN/Infinity, zero and negative values, 21 values in a dimension, a sixth dimension, a switched dimension
set, undeclared streams, bad names, bad timestamps, lone surrogates, and objects with one field replaced by
a hypothesis-drawn value that the rules refuse. Hypothesis draws from a seeded RNG (its `ConjectureData`),
so a seed replays the same input.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import strategies as st
from hypothesis.control import BuildContext
from hypothesis.internal.conjecture.data import ConjectureData

from allocd.cloudzero.records import CanonicalFilter, canonical_filter

from .. import configs
from ..configs import Table

__all__ = [
    "POISON_KINDS",
    "STREAMS",
    "InputFactory",
    "Item",
    "WCell",
    "draw",
    "stream_tables",
]

WCell = tuple[str, int, str, CanonicalFilter]  # (stream, window start ms, element, canonical filter)

# name → (granularity, dimensions); the daemons declare exactly these (strict: undeclared is poison).
STREAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "billing-usage": ("HOURLY", ("custom:feature", "tag:environment")),
    "search-usage": ("HOURLY", ("custom:feature",)),
    "export.usage_v2": ("DAILY", ("custom:région",)),
}
_VALUES = {
    "custom:feature": ["billing", "export", "søk"],
    "tag:environment": ["prod"],
    "custom:région": ["eu-west", "ap-南"],
}
# Hand-picked unicode element names, each valid by the API's rules (no C0 control characters, ≤ 256).
UNICODE_ELEMENTS = [
    "cust-ü",
    "e\u0301",  # NFD
    "\u00e9",  # NFC: another cell
    "😀",
    "👩‍👩‍👧",  # ZWJ sequence
    "مرحبا",
    "\u200b",  # zero-width space alone
    "a\u00a0b",
    "\ufeffbom",
    "line\u2028sep",
    "nel\u0085",  # a C1 control: allowed by the rule
    "\U0010fffd",
    '"quoted"\\',
    "x" * 256,  # the longest name
]


def draw(strategy: st.SearchStrategy[Any], rng: random.Random) -> Any:
    """One example of `strategy`, determined by `rng`: hypothesis's engine driven outside a test (its
    internal `ConjectureData` and `BuildContext`, the two pieces a draw needs)."""
    data = ConjectureData(random=rng, max_choices=50_000)
    with BuildContext(data, is_final=True, wrapped_test=draw):
        return data.draw(strategy)


@dataclass(slots=True)
class Item:
    """One message to produce. `cell`/`amount` for valid events; `kind` names the poison otherwise."""

    value: bytes
    partition: int
    timestamp_ms: int
    kind: str  # "valid" or a poison kind
    cell: WCell | None = None
    amount: Decimal | None = None


def stream_tables() -> dict[str, Table]:
    """The `[events.streams.*]` tables declaring STREAMS (for tests/configs.py)."""
    return configs.stream_tables(STREAMS)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _iso_offset(ms: int) -> str:
    """The same instant written at +02:00."""
    local = ms + 2 * 3600 * 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(local // 1000)) + f".{local % 1000:03d}+02:00"


_JUNK_ELEMENT = st.one_of(
    st.none(),
    st.booleans(),
    st.just(""),
    st.lists(st.text(max_size=3), max_size=2),
    st.floats(allow_nan=False),
    st.text(min_size=257, max_size=300),
    st.text(alphabet="\x00\x01\x1f\x7f", min_size=1, max_size=4),  # control characters
)
_JUNK_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(max_value=0),
    st.floats(max_value=0.0),
    st.lists(st.integers(min_value=1), max_size=2),
    st.text(alphabet="abcxyz", max_size=5),
    st.sampled_from(["NaN", "Infinity", "-1", "0", "-0", "0.0", "1e400", "1e-400", "--1", "1..2"]),
)
_JUNK_FILTER = st.one_of(
    st.text(max_size=5),
    st.lists(st.text(max_size=3), max_size=2),
    st.just({"custom:feature": "billing"}),
    st.just({"custom:feature": []}),
    st.just({"custom:feature": [1, 2]}),
    st.dictionaries(st.sampled_from(["feature", "env", "custom:", "bogus:x"]), st.just(["v"]), min_size=1),
)
_JUNK_TIMESTAMP = st.one_of(
    st.booleans(),
    st.text(alphabet="yesterday ", min_size=1, max_size=9),
    st.just("2026-13-45T99:00:00Z"),
    st.lists(st.integers(), max_size=2),
)
_JUNK_STREAM = st.one_of(
    st.integers(),
    st.just("bad stream!"),
    st.just("x" * 300),
    st.sampled_from(["nope-usage", "billing_usage", "Billing-usage"]),
)


class InputFactory:
    """Seeded messages for `partitions` partitions; `truth` accumulates nothing (the soak adds on ack)."""

    def __init__(
        self,
        seed: int,
        partitions: int,
        window_seconds: int,
        *,
        elements: int = 12,
        poison_fraction: float = 0.02,
        huge_bytes: tuple[int, int] = (70_000, 300_000),
    ) -> None:
        self.rng = random.Random(seed * 7919 + 1)
        self.partitions = partitions
        self.window_ms = window_seconds * 1000
        self.poison_fraction = poison_fraction
        self.huge_bytes = huge_bytes
        self.elements = [f"cust-{i:02d}" for i in range(elements)]
        drawn = [
            draw(
                st.text(
                    st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), min_size=1, max_size=12
                ),
                self.rng,
            )
            for _ in range(6)
        ]
        self.unicode_elements = UNICODE_ELEMENTS + [d for d in drawn if d.strip("\ufeff")]
        self._poison: list[tuple[str, Callable[[int], bytes]]] = [
            ("random_bytes", lambda now: draw(st.binary(max_size=200), self.rng)),
            ("truncated_json", self._truncated),
            ("huge", self._huge),
            ("deep_nesting", self._deep),
            ("nan_infinity", self._nan),
            ("not_positive", self._not_positive),
            ("values_21", self._values_21),
            ("sixth_dimension", self._sixth_dimension),
            ("switched_dimensions", self._switched_dimensions),
            ("lone_surrogate", self._lone_surrogate),
            ("too_late", lambda now: self._event_bytes(now, timestamp=_iso(now - 8 * 86_400_000))),
            ("future", lambda now: self._event_bytes(now, timestamp=_iso(now + 3_600_000))),
            ("junk_element", lambda now: self._event_bytes(now, element_name=draw(_JUNK_ELEMENT, self.rng))),
            ("junk_value", lambda now: self._event_bytes(now, value=draw(_JUNK_VALUE, self.rng))),
            ("junk_filter", lambda now: self._event_bytes(now, filter=draw(_JUNK_FILTER, self.rng))),
            ("junk_timestamp", lambda now: self._event_bytes(now, timestamp=draw(_JUNK_TIMESTAMP, self.rng))),
            ("junk_stream", lambda now: self._event_bytes(now, stream=draw(_JUNK_STREAM, self.rng))),
            ("missing_field", self._missing_field),
            (
                "not_object",
                lambda now: json.dumps(draw(st.lists(st.integers(), max_size=3), self.rng)).encode(),
            ),
        ]

    # --- the stream of messages --------------------------------------------------------------------------
    def next(self, now_ms: int) -> Item:
        partition = self.rng.randrange(self.partitions)
        if self.rng.random() < self.poison_fraction:
            kind, make = self.rng.choice(self._poison)
            if kind == "huge" and self.rng.random() < 0.9:
                kind, make = self._poison[0]  # huge messages are rare: memory and fetch sizes
            return Item(make(now_ms), partition, now_ms, kind)
        value, cell, amount = self._valid(now_ms)
        return Item(value, partition, now_ms, "valid", cell, amount)

    # --- valid events --------------------------------------------------------------------------------
    def _valid(self, now_ms: int) -> tuple[bytes, WCell, Decimal]:
        rng = self.rng
        stream = rng.choice(sorted(STREAMS))
        _, dims = STREAMS[stream]
        rare = rng.random()
        element: Any = rng.choice(self.elements)
        if rare < 0.03:
            element = rng.choice(self.unicode_elements)
        elif rare < 0.04:
            element = rng.randrange(10_000, 10_010)  # a numeric customer id
        element_text = str(element)
        if rare < 0.04:  # rare elements get one filter per stream: they add cells, not cells × filters
            flt = {d: [_VALUES[d][0]] for d in dims}
        else:
            flt = {d: [rng.choice(_VALUES[d])] for d in dims}
        if rng.random() < 0.1:  # repeated / reordered values: the same cell as a set
            d = dims[0]
            other = rng.choice(_VALUES[d])
            flt[d] = [other, flt[d][0], other]
        value, amount = self._amount()
        ts_ms = now_ms
        roll = rng.random()
        if roll < 0.03:
            ts_ms = now_ms - rng.randrange(6_000, 60_000)  # late: its window has closed
        elif roll < 0.04:
            ts_ms = now_ms + rng.randrange(1_000, 15_000)  # a little in the future
        event: dict[str, Any] = {"id": uuid.UUID(int=rng.getrandbits(128)).hex, "stream": stream}
        form = rng.random()
        if form < 0.05:
            ts_ms = now_ms  # no timestamp: the record's own
        elif form < 0.10:
            event["timestamp"] = ts_ms  # epoch milliseconds
        elif form < 0.15:
            event["timestamp"] = _iso_offset(ts_ms)
        else:
            event["timestamp"] = _iso(ts_ms)
        event["element_name"] = element
        event["filter"] = flt
        event["value"] = value
        if rng.random() < 0.03:
            event["extra"] = {"nested": _nest(rng.randrange(5, 200))}
        raw = json.dumps(event).encode() if rng.random() < 0.1 else orjson.dumps(event)  # \u escapes
        start = ts_ms - ts_ms % self.window_ms
        return raw, (stream, start, element_text, canonical_filter(flt)), amount

    def _amount(self) -> tuple[Any, Decimal]:
        rng = self.rng
        roll = rng.random()
        if roll < 0.6:
            n = rng.randint(1, 1000)
            return n, Decimal(n)
        if roll < 0.75:
            text = f"{rng.randint(0, 99)}.{rng.randint(1, 99):02d}"
            return text, Decimal(text)
        if roll < 0.85:
            f = rng.randint(1, 4000) / 4  # exact in binary; its repr is the literal written
            return f, Decimal(repr(f))
        return rng.choice(
            [(" 7 ", Decimal(7)), ("1e2", Decimal(100)), ("42", Decimal(42)), ("0.001", Decimal("0.001"))]
        )

    def _event(self, now_ms: int, **override: Any) -> dict[str, Any]:
        stream = "billing-usage"
        event: dict[str, Any] = {
            "id": uuid.UUID(int=self.rng.getrandbits(128)).hex,
            "timestamp": _iso(now_ms),
            "stream": stream,
            "element_name": self.rng.choice(self.elements),
            "filter": {"custom:feature": ["billing"], "tag:environment": ["prod"]},
            "value": 5,
        }
        event.update(override)
        return event

    def _event_bytes(self, now_ms: int, **override: Any) -> bytes:
        return _dumps(self._event(now_ms, **override))

    # --- poison --------------------------------------------------------------------------------------
    def _truncated(self, now_ms: int) -> bytes:
        raw = self._event_bytes(now_ms)
        return raw[: self.rng.randrange(len(raw))]  # never the closing brace: never a whole object

    def _huge(self, now_ms: int) -> bytes:
        size = self.rng.randrange(*self.huge_bytes)
        return self._event_bytes(now_ms, pad="p" * size)

    def _deep(self, now_ms: int) -> bytes:
        depth = self.rng.randrange(1100, 3000)  # past orjson's 1024 levels
        return self._event_bytes(now_ms)[:-1] + b',"deep":' + b"[" * depth + b"]" * depth + b"}"

    def _nan(self, now_ms: int) -> bytes:
        literal = self.rng.choice([b"NaN", b"Infinity", b"-Infinity", b'"NaN"', b'"Infinity"', b"1e400"])
        return self._event_bytes(now_ms, value=0).replace(b'"value":0', b'"value":' + literal)

    def _not_positive(self, now_ms: int) -> bytes:
        return self._event_bytes(now_ms, value=self.rng.choice([0, -5, -0.01, 0.0, "0", "-0", "-3"]))

    def _values_21(self, now_ms: int) -> bytes:
        values = [f"v{i}" for i in range(21)]
        return self._event_bytes(now_ms, stream="search-usage", filter={"custom:feature": values})

    def _sixth_dimension(self, now_ms: int) -> bytes:
        flt = {f"custom:d{i}": ["x"] for i in range(5)}
        flt["custom:feature"] = ["billing"]
        return self._event_bytes(now_ms, stream="search-usage", filter=flt)

    def _switched_dimensions(self, now_ms: int) -> bytes:
        flt = self.rng.choice(
            [
                ("search-usage", {"tag:environment": ["prod"]}),
                ("billing-usage", {"custom:feature": ["billing"]}),
                ("billing-usage", {"custom:feature": ["billing"], "custom:région": ["eu-west"]}),
                ("export.usage_v2", {"custom:feature": ["export"]}),
            ]
        )
        return self._event_bytes(now_ms, stream=flt[0], filter=flt[1])

    def _lone_surrogate(self, now_ms: int) -> bytes:
        return self._event_bytes(now_ms, element_name="LONE").replace(b'"LONE"', b'"a\\ud800b"')

    def _missing_field(self, now_ms: int) -> bytes:
        event = self._event(now_ms)
        del event[self.rng.choice(["element_name", "value", "stream"])]
        return orjson.dumps(event)


def _dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # an integer beyond 64 bits: the standard library writes it
        return json.dumps(obj).encode()


def _nest(depth: int) -> Any:
    out: Any = 1
    for _ in range(depth):
        out = [out]
    return out


POISON_KINDS = (
    "random_bytes",
    "truncated_json",
    "huge",
    "deep_nesting",
    "nan_infinity",
    "not_positive",
    "values_21",
    "sixth_dimension",
    "switched_dimensions",
    "lone_surrogate",
    "too_late",
    "future",
    "junk_element",
    "junk_value",
    "junk_filter",
    "junk_timestamp",
    "junk_stream",
    "missing_field",
    "not_object",
)
