"""Fuzz: whatever arrives, the decoder either returns a valid Event or raises InvalidEvent — nothing else."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocd.cloudzero.records import (
    MAX_DIMENSIONS,
    MAX_VALUES_PER_DIMENSION,
    Granularity,
    canonical_filter,
    filter_from_canonical,
    validate_element_name,
    validate_stream_name,
)
from allocd.config import EventsSettings, MappingSettings, StreamSettings
from allocd.errors import InvalidEvent
from allocd.events import REASONS, Decoder, Event
from allocd.mapping import MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS, _parse_iso_ms, iso_ms

from .test_events import CANONICAL

ARRIVAL = 1_795_774_503_120
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DIMENSIONS = ["custom:feature", "tag:environment", "region", "k8s_label:app", "custom:a.b", "feature", "tag:"]
STREAMS = {
    "billing-usage": StreamSettings(
        "billing-usage", dimensions=frozenset({"custom:feature", "tag:environment"})
    ),
    "plain": StreamSettings("plain", Granularity.DAILY),
    "const": StreamSettings(
        "const", dimensions=frozenset({"region"}), constant_filter=(("region", ("eu",)),)
    ),
}
DECODERS = [
    Decoder(EventsSettings(streams=STREAMS)),
    Decoder(EventsSettings(streams=STREAMS, undeclared="accept", default_stream="plain")),
    Decoder(
        EventsSettings(
            streams=STREAMS,
            undeclared="accept",
            mapping=MappingSettings(
                element="customer.id",
                value="usage.amount",
                timestamp="ts",
                timestamp_format="auto",
                dimensions={"custom:feature": "labels.feature", "tag:environment": "env"},
            ),
        )
    ),
    Decoder(
        EventsSettings(streams=STREAMS, mapping=MappingSettings(timestamp_format="epoch_s", filter=None))
    ),
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["0.1", "1e400", "-0", "NaN", "Infinity", " 7 ", "2026-11-27T10:15:03Z", "1e-400"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Plausible field values, so that most generated events get deep into the decoder (and many are valid).
names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30)
amounts = st.one_of(
    st.integers(min_value=1, max_value=10**9),
    st.floats(min_value=1e-9, max_value=1e9),
    st.decimals(min_value=Decimal("1e-9"), max_value=Decimal("1e9"), allow_nan=False).map(str),
)
near_times = st.one_of(
    st.integers(min_value=ARRIVAL - 8 * 86_400_000, max_value=ARRIVAL + 3_600_000),  # epoch ms
    st.integers(min_value=(ARRIVAL - 8 * 86_400_000) // 1000, max_value=(ARRIVAL + 3_600_000) // 1000),  # s
    st.integers(min_value=-(10**6), max_value=10**6).map(lambda s: f"2026-11-27T10:{s % 60:02d}:00Z"),
)
good_filters = st.dictionaries(
    st.sampled_from(DIMENSIONS), st.lists(st.text(max_size=6), min_size=1, max_size=3), max_size=3
)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(good, good, good, bad)


filters = mostly(
    good_filters,
    json_values
    | st.dictionaries(
        st.sampled_from(DIMENSIONS) | st.text(max_size=12),
        st.lists(st.text(max_size=6) | scalars, max_size=22) | scalars,
        max_size=7,
    ),
)
timestamps = mostly(
    near_times,
    scalars
    | st.integers(min_value=ARRIVAL - 10**10, max_value=ARRIVAL + 10**10)
    | st.floats(min_value=0, max_value=3e12)
    | st.datetimes().map(lambda d: d.isoformat()),
)
# Event-like objects for every decoder's mapping: each field usually plausible, sometimes absurd or absent.
events = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "timestamp": timestamps,
        "ts": timestamps,
        "stream": mostly(
            st.sampled_from([*STREAMS, "other"]), st.sampled_from(["bad name", ""]) | json_values
        ),
        "element_name": mostly(names, st.text(max_size=300) | json_values),
        "customer": st.fixed_dictionaries({"id": mostly(names, scalars)}) | json_values,
        "value": mostly(amounts, scalars),
        "usage": st.fixed_dictionaries({"amount": mostly(amounts, scalars)}) | json_values,
        "filter": filters,
        "labels": st.fixed_dictionaries(
            {"feature": mostly(names | st.lists(names, max_size=3), json_values)}
        ),
        "env": mostly(names, json_values),
    },
)

value_lists = st.lists(names, min_size=1, max_size=3)
# (stream, filter) pairs that fit the declared streams, or an undeclared stream the accepting decoders take.
routes = st.one_of(
    st.tuples(st.just("plain"), st.none()),
    st.tuples(
        st.just("billing-usage"),
        st.fixed_dictionaries({"custom:feature": value_lists, "tag:environment": value_lists}),
    ),
    st.tuples(st.just("const"), st.none() | st.fixed_dictionaries({"region": value_lists})),
    st.tuples(st.just("other"), good_filters),
)


@st.composite
def near_events(draw: st.DrawFn) -> dict[str, Any]:
    """Events that are valid for at least one decoder, with one field sometimes swapped for junk."""
    stream, flt = draw(routes)
    element, amount, ts = draw(names), draw(amounts), draw(near_times)
    obj: dict[str, Any] = {
        "stream": stream,
        "element_name": element,
        "customer": {"id": element},
        "value": amount,
        "usage": {"amount": amount},
        "timestamp": ts,
        "ts": ts,
        "id": draw(st.none() | names),
    }
    if flt is not None:
        obj["filter"] = flt
        obj["labels"] = {"feature": flt.get("custom:feature", ["x"])}
        obj["env"] = flt.get("tag:environment", ["y"])[0]
    if draw(st.booleans()):
        obj[draw(st.sampled_from(sorted(obj)))] = draw(json_values)
    return obj


def check(decoder: Decoder, call: Any) -> None:
    """Run `call`; it may only return a valid Event or raise InvalidEvent with a known reason."""
    try:
        ev = call()
    except InvalidEvent as exc:
        assert exc.reason in REASONS
        return
    assert isinstance(ev, Event)
    assert type(ev.value) in (int, Decimal)
    assert ev.value > 0
    assert validate_element_name(ev.element) == ev.element
    assert validate_stream_name(ev.stream) == ev.stream
    assert len(ev.filter) <= MAX_DIMENSIONS
    assert all(0 < len(values) <= MAX_VALUES_PER_DIMENSION for _, values in ev.filter)
    assert canonical_filter(filter_from_canonical(ev.filter)) == ev.filter
    assert MIN_TIMESTAMP_MS <= ev.timestamp_ms <= MAX_TIMESTAMP_MS
    orjson.dumps([ev.element, ev.filter, ev.id])  # what the API client and DLQ will encode
    spec = decoder.config.streams.get(ev.stream)
    if spec is not None:
        assert {name for name, _ in ev.filter} == spec.dimensions
        assert ev.granularity is spec.granularity


@FUZZ
@given(raw=st.binary(max_size=400), which=st.integers(0, len(DECODERS) - 1))
def test_arbitrary_bytes(raw: bytes, which: int) -> None:
    decoder = DECODERS[which]
    check(decoder, lambda: decoder.decode(raw, ARRIVAL))


@FUZZ
@given(obj=st.one_of(near_events(), events, json_values), which=st.integers(0, len(DECODERS) - 1))
def test_arbitrary_json_bytes(obj: Any, which: int) -> None:
    # The standard library writes NaN, Infinity and integers beyond 64 bits, which orjson must refuse
    # or read; Decimals go out as strings.
    raw = json.dumps(obj, default=str).encode("utf-8", "surrogatepass")
    decoder = DECODERS[which]
    check(decoder, lambda: decoder.decode(raw, ARRIVAL))


@FUZZ
@given(obj=st.one_of(near_events(), events, json_values), which=st.integers(0, len(DECODERS) - 1))
def test_arbitrary_objects(obj: Any, which: int) -> None:
    decoder = DECODERS[which]
    check(decoder, lambda: decoder.decode_obj(obj, ARRIVAL, 100))


@FUZZ
@given(
    element=st.text(min_size=1, max_size=40),
    value=st.one_of(
        st.integers(min_value=1, max_value=2**70),
        st.decimals(min_value=Decimal("1e-20"), max_value=Decimal("1e20"), allow_nan=False, places=None),
    ),
)
def test_valid_events_round_trip_exactly(element: str, value: int | Decimal) -> None:
    # Any element without control characters and any positive value come back unchanged, digits included.
    literal = str(value)
    raw = (
        b'{"stream":"plain","element_name":' + orjson.dumps(element) + b',"value":' + literal.encode() + b"}"
    )
    try:
        ev = DECODERS[0].decode(raw, ARRIVAL)
    except InvalidEvent as exc:
        assert exc.reason == "invalid_element"  # control characters in the generated text
        return
    assert ev.element == element
    assert ev.value == value
    assert type(ev.value) is (Decimal if "." in literal or "E" in literal else int)


# --- the ISO timestamp cache ------------------------------------------------------------------------------
_ISO_CHARS = st.sampled_from("0123456789-T:.Zz +٣")  # with a non-ASCII digit, which int() would read


@st.composite
def _iso_like(draw: st.DrawFn) -> str:
    """Near-canonical timestamps: mostly valid, sometimes with a field out of range or a character off."""
    year = draw(st.integers(1, 9999))
    parts = [
        f"{year:04d}",
        "-",
        f"{draw(st.integers(0, 13)):02d}",
        "-",
        f"{draw(st.integers(0, 32)):02d}",
        "T",
        f"{draw(st.integers(0, 24)):02d}",
        ":",
        f"{draw(st.integers(0, 60)):02d}",
        ":",
        f"{draw(st.integers(0, 60)):02d}",
        draw(st.sampled_from(["", ".", ".1", ".12", ".123", ".1234", ".123456"])),
        draw(st.sampled_from(["", "Z", "z", "+00:00", "+01:00", "-05:30"])),
    ]
    text = "".join(parts)
    if draw(st.booleans()):  # one character replaced
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + draw(_ISO_CHARS) + text[i + 1 :]
    return text


def _read(read: Any, text: str) -> int | str:
    try:
        return read(text)
    except InvalidEvent as exc:
        return exc.reason


@FUZZ
@given(st.lists(_iso_like(), min_size=1, max_size=20))
def test_cached_iso_reading_equals_the_uncached_one(texts: list[str]) -> None:
    """The cache answers from a second and a tail seen before; it must never answer differently, nor
    accept what the parser refuses. Each text is read twice, so the second read can come from the cache."""
    for text in texts + texts:
        assert _read(iso_ms, text) == _read(_parse_iso_ms, text), text


# --- the typed path against the general path -------------------------------------------------------------
# Fresh decoders of the same configurations, read only through the general path: their caches never see
# what the typed path stored, so a cache entry that changed an answer would show as a difference.
REFERENCE = [Decoder(d.config) for d in DECODERS]


def _outcome(fields: Any, raw: bytes) -> Any:
    try:
        return fields(raw, ARRIVAL)
    except InvalidEvent as exc:
        return exc.reason


def _agree(which: int, raw: bytes) -> None:
    assert _outcome(DECODERS[which]._fields, raw) == _outcome(REFERENCE[which]._general, raw), raw


@FUZZ
@given(obj=st.one_of(near_events(), events, json_values), which=st.integers(0, len(DECODERS) - 1))
def test_the_typed_path_answers_as_the_general_path(obj: Any, which: int) -> None:
    _agree(which, json.dumps(obj, default=str).encode("utf-8", "surrogatepass"))
    _agree(
        which,
        json.dumps(obj, default=str, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogatepass"
        ),
    )


# Byte-level damage to a canonical event: what a typed parser that skips over values could miss.
_SPLICES = st.sampled_from(
    [
        b"\xff",
        b"\xed\xa0\x80",
        b"\\",
        b"\\u00e9",
        b"1e400",
        b"NaN",
        b",",
        b"]",
        b"}",
        b"[",
        b"{",
        b'"',
        b" ",
        b"\x01",
        b"-0",
        b"18446744073709551616",
        b'"x":1,',
        b'"value":2,',
        b'"filter":{"custom:feature":["b"]},',
        b'"id":7,',
        b'"id":null,',
        b"\xc3\xa9",
        b"0",
        b"null",
        b"true",
        b"[[[[[[[[",
        b"]]]]]]]]",
    ]
)


@st.composite
def damaged_events(draw: st.DrawFn) -> bytes:
    stream, flt = draw(routes)
    obj: dict[str, Any] = {
        "id": draw(st.none() | st.text(max_size=6)),
        "timestamp": draw(near_times),
        "stream": stream,
        "element_name": draw(names),
        "value": draw(st.integers(1, 2**65) | amounts),
    }
    if flt is not None:
        obj["filter"] = flt
    raw = json.dumps(obj, default=str, separators=(",", ":")).encode("utf-8", "surrogatepass")
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(raw)))
        cut = draw(st.integers(0, 2))
        raw = raw[:i] + draw(_SPLICES) + raw[i + cut :]
    return raw


@FUZZ
@given(raw=damaged_events(), which=st.integers(0, len(DECODERS) - 1))
def test_the_typed_path_answers_as_the_general_path_on_damaged_bytes(raw: bytes, which: int) -> None:
    _agree(which, raw)


def test_the_typed_path_on_the_cases_it_must_hand_over() -> None:
    """The canonical event, and what the typed path must leave to the general path (same answers)."""
    dec = DECODERS[0]
    good = dict(CANONICAL)
    assert dec._fields(orjson.dumps(good), ARRIVAL)[4] == 250
    handed_over = [
        {**good, "extra": 1},  # an unmapped field
        {**good, "element_name": "hööli"},  # not ASCII
        {**good, "value": 2**64},  # read as a float by orjson
        {**good, "value": 1.5},
        {**good, "filter": {"custom:feature": ["bil\\ling"], "tag:environment": ["prod"]}},  # an escape
    ]
    for obj in handed_over:
        raw = json.dumps(obj).encode()
        assert _outcome(dec._fields, raw) == _outcome(REFERENCE[0]._general, raw)
    # A filter the typed parser skipped over but orjson refuses: not_json, as the general path says.
    assert _outcome(dec._fields, orjson.dumps(good).replace(b'["prod"]', b"[1e400]")) == "not_json"
