"""Decode + map: every rejection reason, the field mapping, exact values, time rules and config errors."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson
import pytest

from allocd.cloudzero.records import Granularity
from allocd.config import EventsSettings, MappingSettings, StreamSettings
from allocd.errors import ConfigError, InvalidEvent
from allocd.events import REASONS, Decoder, Event

T0 = 1_795_774_503_120  # 2026-11-27T10:15:03.120Z, the canonical example's time
ARRIVAL = T0 + 1_000  # the record timestamp: one second after the event
HOUR_MS = 3_600_000

CANONICAL = {
    "id": "e-1",
    "timestamp": "2026-11-27T10:15:03.120Z",
    "stream": "billing-usage",
    "element_name": "hooli",
    "filter": {"custom:feature": ["billing"], "tag:environment": ["prod"]},
    "value": 250,
}
BILLING = StreamSettings(
    "billing-usage", Granularity.HOURLY, frozenset({"custom:feature", "tag:environment"})
)
PLAIN = StreamSettings("plain", Granularity.DAILY)


def config(**over: Any) -> EventsSettings:
    return EventsSettings(streams={"billing-usage": BILLING, "plain": PLAIN}, **over)


def event(**over: Any) -> bytes:
    """The canonical event with fields replaced; a value of `...` removes the field."""
    obj = {**CANONICAL, **over}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def decode(raw: bytes, cfg: EventsSettings | None = None, record_ts_ms: int = ARRIVAL) -> Event:
    return Decoder(cfg or config()).decode(raw, record_ts_ms)


def reason(raw: bytes, cfg: EventsSettings | None = None, record_ts_ms: int = ARRIVAL) -> str:
    with pytest.raises(InvalidEvent) as info:
        decode(raw, cfg, record_ts_ms)
    assert info.value.reason in REASONS
    return info.value.reason


# --- the canonical shape -------------------------------------------------------------------------------
def test_canonical_event() -> None:
    ev = decode(event())
    assert ev == Event(
        stream="billing-usage",
        timestamp_ms=T0,
        element="hooli",
        filter=(("custom:feature", ("billing",)), ("tag:environment", ("prod",))),
        value=250,
        id="e-1",
        granularity=Granularity.HOURLY,
    )
    assert type(ev.value) is int


def test_filter_is_canonical_sorted_and_deduplicated() -> None:
    flt = {"tag:environment": ["prod", "dev", "prod"], "custom:feature": ["billing"]}
    ev = decode(event(filter=flt))
    assert ev.filter == (("custom:feature", ("billing",)), ("tag:environment", ("dev", "prod")))


def test_same_filter_decodes_identically_from_the_cache() -> None:
    decoder = Decoder(config())
    first = decoder.decode(event(element_name="a"), ARRIVAL)
    second = decoder.decode(event(element_name="b"), ARRIVAL)
    assert first.filter == second.filter
    assert (first.element, second.element) == ("a", "b")


def test_invalid_filter_is_rejected_every_time_not_cached_as_valid() -> None:
    decoder = Decoder(config())
    raw = event(filter={"custom:feature": "billing", "tag:environment": ["prod"]})
    for _ in range(2):
        with pytest.raises(InvalidEvent) as info:
            decoder.decode(raw, ARRIVAL)
        assert info.value.reason == "invalid_filter"


def test_granularity_comes_from_the_declared_stream() -> None:
    ev = decode(event(stream="plain", filter=...))
    assert ev.granularity is Granularity.DAILY
    assert ev.filter == ()


def test_id_is_optional_and_integers_become_strings() -> None:
    assert decode(event(id=...)).id is None
    assert decode(event(id=42)).id == "42"
    assert decode(event(id={"nested": 1})).id is None  # unusable ids are dropped, the event still counts


def test_numeric_element_becomes_a_string() -> None:
    assert decode(event(element_name=1234)).element == "1234"


def test_input_types() -> None:
    decoder = Decoder(config())
    assert decoder.decode(bytearray(event()), ARRIVAL).value == 250
    assert decoder.decode(memoryview(event()), ARRIVAL).value == 250
    assert decoder.decode(event().decode(), ARRIVAL).value == 250  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent) as info:
        decoder.decode(None, ARRIVAL)  # type: ignore[arg-type]  # a Kafka tombstone
    assert info.value.reason == "not_json"


# --- every rejection reason ----------------------------------------------------------------------------
LONG_AGO = "2026-11-01T00:00:00Z"
REJECTIONS: list[tuple[str, bytes, EventsSettings | None]] = [
    ("not_json", b'{"element_name": "x",', None),
    ("not_json", b"\xff\xfe not utf-8", None),
    ("not_json", b'{"element_name": "x", "value": NaN}', None),
    ("not_json", b'{"element_name": "x", "value": 1e400}', None),  # orjson refuses numbers beyond a double
    ("not_object", b"[1, 2, 3]", None),
    ("not_object", b'"just a string"', None),
    ("too_large", event(element_name="x" * 300), config(max_event_bytes=200)),
    ("missing_element", event(element_name=...), None),
    ("missing_element", event(element_name=None), None),
    ("missing_value", event(value=...), None),
    ("invalid_value", event(value=0), None),
    ("invalid_value", event(value=-5), None),
    ("invalid_value", event(value=True), None),
    ("invalid_value", event(value="NaN"), None),
    ("invalid_value", event(value="Infinity"), None),
    ("invalid_value", event(value="12 apples"), None),
    ("invalid_value", event(value=[1]), None),
    ("invalid_value", event(value="1e400"), None),  # a numeric string beyond a double's range
    ("invalid_value", event(value="1e-400"), None),
    ("invalid_value", event(value="1" * 600), None),  # bounded before any big-number arithmetic
    ("invalid_element", event(element_name=""), None),
    ("invalid_element", event(element_name="x" * 257), None),
    ("invalid_element", event(element_name="tab\there"), None),
    ("invalid_element", event(element_name=["hooli"]), None),
    ("missing_stream", event(stream=...), None),
    ("undeclared_stream", event(stream="other-stream"), None),
    ("invalid_stream", event(stream="has space"), None),
    ("invalid_stream", event(stream=7), None),
    ("invalid_timestamp", event(timestamp="yesterday"), None),
    ("invalid_timestamp", event(timestamp=True), None),
    ("invalid_timestamp", event(timestamp="0001-01-01T00:00:00+01:00"), None),  # before the year 1 in UTC
    ("too_late", event(timestamp=LONG_AGO), None),
    ("future", event(timestamp="2026-11-27T11:00:00Z"), None),
    ("too_many_dimensions", event(filter={f"custom:d{i}": ["x"] for i in range(6)}), None),
    (
        "too_many_values",
        event(filter={"custom:feature": [str(i) for i in range(21)], "tag:environment": ["p"]}),
        None,
    ),
    ("invalid_filter", event(filter=["custom:feature"]), None),
    ("invalid_filter", event(filter={"custom:feature": [], "tag:environment": ["prod"]}), None),
    ("invalid_filter", event(filter={"custom:feature": [1], "tag:environment": ["prod"]}), None),
    ("unknown_dimension", event(filter={"feature": ["billing"], "tag:environment": ["prod"]}), None),
    ("dimension_mismatch", event(filter={"custom:feature": ["billing"]}), None),
    ("dimension_mismatch", event(filter=...), None),
    ("dimension_mismatch", event(stream="plain"), None),  # a stream declared without dimensions
]


@pytest.mark.parametrize(("expected", "raw", "cfg"), REJECTIONS)
def test_rejection_reason(expected: str, raw: bytes, cfg: EventsSettings | None) -> None:
    assert reason(raw, cfg) == expected


def test_every_reason_has_a_rejection_case() -> None:
    assert {case[0] for case in REJECTIONS} == set(REASONS)
    assert len(set(REASONS)) == len(REASONS)


def test_rejection_detail_names_the_problem() -> None:
    with pytest.raises(InvalidEvent) as info:
        decode(event(stream="other-stream"))
    assert info.value.detail == "other-stream"
    with pytest.raises(InvalidEvent) as info:
        decode(event(filter={"custom:feature": ["billing"]}))
    assert "custom:feature, tag:environment" in info.value.detail


# --- exact values --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        (b"250", 250),
        (b'"250"', 250),
        (b"0.1", Decimal("0.1")),
        (b'"0.1"', Decimal("0.1")),
        (b"2.50", Decimal("2.50")),
        (b"1e5", Decimal("1E+5")),
        (b"0.10000000000000000001", Decimal("0.10000000000000000001")),  # a float would say 0.1
        (b"1180591620717411303424", 2**70),  # beyond 64 bits orjson hands out a float
        (b"123456789.123456789123", Decimal("123456789.123456789123")),
    ],
)
def test_values_are_exact(literal: bytes, expected: int | Decimal) -> None:
    raw = event(value="VALUE").replace(b'"VALUE"', literal)
    ev = decode(raw)
    assert ev.value == expected
    assert type(ev.value) is type(expected)


def test_decimal_values_sum_exactly() -> None:
    decoder = Decoder(config())
    a = decoder.decode(event(value=0.1), ARRIVAL).value
    b = decoder.decode(event(value="0.2"), ARRIVAL).value
    assert (a, b) == (Decimal("0.1"), Decimal("0.2"))
    assert a + b == Decimal("0.3")


def test_exact_value_when_escapes_or_repeated_keys_hide_the_literal() -> None:
    # A backslash anywhere, or another numeric "value" key, sends the decoder to the slow exact re-read.
    escaped = event(element_name='quote " inside', value="V").replace(b'"V"', b"0.10000000000000000001")
    assert decode(escaped).value == Decimal("0.10000000000000000001")
    nested = event(id={"value": 0.5}, value="V").replace(b'"V"', b"0.10000000000000000001")
    assert decode(nested).value == Decimal("0.10000000000000000001")
    spelled = b'{"stream":"plain","element_name":"e","val\\u0075e":0.30000000000000000001}'
    assert decode(spelled).value == Decimal("0.30000000000000000001")


def test_nested_value_path_keeps_its_literal() -> None:
    cfg = config(mapping=MappingSettings(value="usage.amount"))
    raw = b'{"stream":"plain","element_name":"e","usage":{"amount":2.000000000000000000001}}'
    assert decode(raw, cfg).value == Decimal("2.000000000000000000001")


# --- timestamps ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "raw", "expected"),
    [
        ("auto", "2026-11-27T10:15:03.120Z", T0),
        ("auto", "2026-11-27T11:15:03.120+01:00", T0),
        ("auto", "2026-11-27T10:15:03.120", T0),  # no offset: UTC
        ("auto", "2026-11-27t10:15:03.120z", T0),  # lowercase, via records.parse_timestamp
        ("iso", "2026-11-27T10:15:03.120Z", T0),
        ("auto", T0 // 1000, T0 - 120),  # a number below 1e11 is seconds
        ("auto", T0, T0),  # at or above, milliseconds
        ("auto", T0 / 1000, T0),  # float seconds, rounded to the millisecond
        ("epoch_s", T0 // 1000, T0 - 120),
        ("epoch_s", "1795774503.12", T0),
        ("epoch_ms", T0, T0),
        ("epoch_ms", str(T0), T0),
        ("epoch_ms", float(T0), T0),
    ],
)
def test_timestamp_formats(fmt: str, raw: Any, expected: int) -> None:
    cfg = config(mapping=MappingSettings(timestamp_format=fmt))
    assert decode(event(timestamp=raw), cfg).timestamp_ms == expected


def test_date_only_timestamp_is_midnight_utc() -> None:
    midnight = T0 - (10 * 3600 + 15 * 60 + 3) * 1000 - 120
    assert decode(event(timestamp="2026-11-27"), record_ts_ms=midnight).timestamp_ms == midnight


@pytest.mark.parametrize(
    ("fmt", "raw"),
    [("iso", T0), ("epoch_s", "2026-11-27T10:15:03Z"), ("epoch_ms", "12 o'clock"), ("epoch_ms", 10**30)],
)
def test_timestamp_not_in_its_format(fmt: str, raw: Any) -> None:
    assert (
        reason(event(timestamp=raw), config(mapping=MappingSettings(timestamp_format=fmt)))
        == "invalid_timestamp"
    )


def test_missing_timestamp_uses_the_record_timestamp() -> None:
    assert decode(event(timestamp=...), record_ts_ms=1234567890123).timestamp_ms == 1234567890123


def test_lateness_and_future_are_judged_against_the_record_timestamp_inclusive() -> None:
    cfg = config(max_lateness_ms=HOUR_MS, max_future_ms=60_000)
    assert decode(event(), cfg, record_ts_ms=T0 + HOUR_MS).timestamp_ms == T0  # exactly the limit: accepted
    assert reason(event(), cfg, record_ts_ms=T0 + HOUR_MS + 1) == "too_late"
    assert decode(event(), cfg, record_ts_ms=T0 - 60_000).timestamp_ms == T0
    assert reason(event(), cfg, record_ts_ms=T0 - 60_001) == "future"
    # An old event replayed years later is judged as it was on arrival: the wall clock plays no part.
    assert decode(event(timestamp="2001-01-01T00:00:00Z"), record_ts_ms=978_307_200_000).timestamp_ms > 0


# --- streams -------------------------------------------------------------------------------------------
def test_default_stream() -> None:
    ev = decode(event(stream=...), config(default_stream="billing-usage"))
    assert ev.stream == "billing-usage"
    assert decode(event(stream="plain", filter=...), config(default_stream="billing-usage")).stream == "plain"


def test_undeclared_stream_accepted_is_hourly_without_dimension_check() -> None:
    cfg = config(undeclared="accept")
    ev = decode(event(stream="anything.goes", filter={"custom:x": ["1"]}), cfg)
    assert (ev.stream, ev.granularity, ev.filter) == (
        "anything.goes",
        Granularity.HOURLY,
        (("custom:x", ("1",)),),
    )
    assert reason(event(stream="bad/name"), cfg) == "invalid_stream"
    assert (
        reason(event(stream="x", filter={"nope": ["1"]}), cfg) == "unknown_dimension"
    )  # the API's rule still


def test_undeclared_stream_rejected_by_default() -> None:
    assert reason(event(stream="anything.goes")) == "undeclared_stream"


# --- the field mapping ---------------------------------------------------------------------------------
PRODUCER = {
    "event_id": 99,
    "ts": T0,
    "kind": "billing-usage",
    "customer": {"id": "hooli", "region": "eu-1"},
    "usage": {"records": "250"},
    "labels": {"features": ["billing", "export"]},
}
PRODUCER_MAPPING = MappingSettings(
    element="customer.id",
    value="usage.records",
    timestamp="ts",
    timestamp_format="epoch_ms",
    stream="kind",
    id="event_id",
    filter=None,
    dimensions={"custom:feature": "labels.features", "tag:environment": "customer.region"},
)


def test_mapping_reads_nested_paths_scalars_and_lists() -> None:
    ev = decode(orjson.dumps(PRODUCER), config(mapping=PRODUCER_MAPPING))
    assert (ev.stream, ev.element, ev.value, ev.id, ev.timestamp_ms) == (
        "billing-usage",
        "hooli",
        250,
        "99",
        T0,
    )
    assert ev.filter == (("custom:feature", ("billing", "export")), ("tag:environment", ("eu-1",)))


def test_mapping_with_filter_none_ignores_a_filter_field() -> None:
    raw = orjson.dumps({**PRODUCER, "filter": {"custom:other": ["x"]}})
    assert decode(raw, config(mapping=PRODUCER_MAPPING)).filter[0] == (
        "custom:feature",
        ("billing", "export"),
    )


def test_mapped_dimensions_merge_with_the_filter_object() -> None:
    mapping = MappingSettings(dimensions={"custom:feature": "feature", "tag:environment": "env"})
    raw = event(filter={"custom:feature": ["billing"]}, feature="export", env=7)
    ev = decode(raw, config(mapping=mapping))
    assert ev.filter == (("custom:feature", ("billing", "export")), ("tag:environment", ("7",)))


def test_missing_mapped_dimension_is_absent() -> None:
    mapping = MappingSettings(dimensions={"tag:environment": "env"})
    assert (
        reason(event(filter={"custom:feature": ["billing"]}), config(mapping=mapping)) == "dimension_mismatch"
    )


def test_mapped_dimension_value_of_the_wrong_type() -> None:
    mapping = MappingSettings(dimensions={"tag:environment": "env"})
    raw = event(filter={"custom:feature": ["billing"]}, env={"a": 1})
    assert reason(raw, config(mapping=mapping)) == "invalid_filter"
    assert (
        reason(event(filter={"custom:feature": ["b"]}, env=1.5), config(mapping=mapping)) == "invalid_filter"
    )


def test_path_through_a_non_object_is_missing() -> None:
    cfg = config(mapping=MappingSettings(element="customer.id"))
    assert reason(event(customer="hooli"), cfg) == "missing_element"


def test_constant_filter_is_added_and_overrides_the_event() -> None:
    spec = StreamSettings(
        "billing-usage",
        dimensions=frozenset({"custom:feature", "tag:environment"}),
        constant_filter=(("tag:environment", ("prod",)),),
    )
    cfg = EventsSettings(streams={"billing-usage": spec})
    ev = decode(event(filter={"custom:feature": ["billing"]}), cfg)
    assert ev.filter == (("custom:feature", ("billing",)), ("tag:environment", ("prod",)))
    ev = decode(event(filter={"custom:feature": ["billing"], "tag:environment": ["dev"]}), cfg)
    assert ev.filter == (("custom:feature", ("billing",)), ("tag:environment", ("prod",)))


# --- decode_obj (the sidecar) --------------------------------------------------------------------------
def test_decode_obj_matches_decode() -> None:
    decoder = Decoder(config())
    assert decoder.decode_obj(dict(CANONICAL), ARRIVAL, 200) == decoder.decode(event(), ARRIVAL)


def test_decode_obj_rejections() -> None:
    decoder = Decoder(config(max_event_bytes=1000))

    def why(obj: Any, size: int = 100) -> str:
        with pytest.raises(InvalidEvent) as info:
            decoder.decode_obj(obj, ARRIVAL, size)
        return info.value.reason

    assert why(CANONICAL, size=1001) == "too_large"
    assert why([CANONICAL]) == "not_object"
    assert why({**CANONICAL, "value": float("nan")}) == "invalid_value"
    assert why({**CANONICAL, "value": Decimal("NaN")}) == "invalid_value"
    assert why({**CANONICAL, "element_name": "lone \ud800 surrogate"}) == "invalid_element"
    assert (
        why({**CANONICAL, "filter": {"custom:feature": ["\udfff"], "tag:environment": ["p"]}})
        == "invalid_filter"
    )
    assert why({**CANONICAL, "filter": {1: ["x"]}}) == "unknown_dimension"


def test_decode_obj_keeps_decimal_digits() -> None:
    value = Decimal("0.10000000000000000001")
    assert Decoder(config()).decode_obj({**CANONICAL, "value": value}, ARRIVAL, 200).value == value


# --- configuration -------------------------------------------------------------------------------------
def test_from_dict_full_example() -> None:
    cfg = EventsSettings.from_dict(
        {
            "streams": {
                "billing-usage": {
                    "granularity": "daily",
                    "dimensions": ["custom:feature", "tag:environment"],
                    "constant_filter": {"tag:environment": "prod"},
                },
                "plain": {},
            },
            "default_stream": "plain",
            "mapping": {
                "element": "customer.id",
                "timestamp_format": "epoch_ms",
                "filter": "",
                "dimensions": {"custom:feature": "labels.features"},
            },
            "max_lateness_ms": 1000,
        }
    )
    spec = cfg.streams["billing-usage"]
    assert spec == StreamSettings(
        "billing-usage",
        Granularity.DAILY,
        frozenset({"custom:feature", "tag:environment"}),
        (("tag:environment", ("prod",)),),
    )
    assert cfg.streams["plain"] == StreamSettings("plain")
    assert cfg.default_stream == "plain"
    assert cfg.mapping.filter is None and cfg.mapping.element == "customer.id"
    assert cfg.mapping.dimensions == {"custom:feature": "labels.features"}
    assert (cfg.max_lateness_ms, cfg.max_future_ms, cfg.undeclared) == (1000, 15 * 60 * 1000, "reject")


def test_from_dict_defaults() -> None:
    assert EventsSettings.from_dict({}) == EventsSettings(streams={})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"streams": {"billing": {"granularity": "WEEKLY"}}}, "streams.billing.granularity"),
        ({"streams": {"billing": {"granularity": 3}}}, "streams.billing.granularity"),
        ({"streams": {"billing": {"dimensions": ["feature"]}}}, "streams.billing.dimensions"),
        ({"streams": {"billing": {"dimensions": "custom:a"}}}, "streams.billing.dimensions"),
        (
            {"streams": {"billing": {"dimensions": [f"custom:{i}" for i in range(6)]}}},
            "streams.billing.dimensions",
        ),
        (
            {"streams": {"billing": {"constant_filter": {"tag:env": ["p"]}}}},
            "streams.billing.constant_filter",
        ),
        ({"streams": {"billing": {"constant_filter": {"tag:env": [1]}}}}, "streams.billing.constant_filter"),
        ({"streams": {"billing": {"colour": "red"}}}, "streams.billing.colour"),
        ({"streams": {"billing": "HOURLY"}}, "streams.billing"),
        ({"streams": {"bad name": {}}}, "streams.bad name"),
        ({"streams": ["billing"]}, "streams"),
        ({"colour": "red"}, "colour"),
        ({"undeclared": "maybe"}, "undeclared"),
        ({"default_stream": "nope"}, "default_stream"),
        ({"default_stream": "bad name", "undeclared": "accept"}, "default_stream"),
        ({"max_event_bytes": 0}, "max_event_bytes"),
        ({"max_lateness_ms": -1}, "max_lateness_ms"),
        ({"max_future_ms": "15m"}, "max_future_ms"),
        ({"mapping": {"timestamp_format": "unix"}}, "mapping.timestamp_format"),
        ({"mapping": {"element": "customer..id"}}, "mapping.element"),
        ({"mapping": {"value": 3}}, "mapping.value"),
        ({"mapping": {"dimensions": {"colour": "meta.colour"}}}, "mapping.dimensions.colour"),
        ({"mapping": {"dimensions": {"custom:region": ""}}}, "mapping.dimensions.custom:region"),
        ({"mapping": {"colour": "red"}}, "mapping.colour"),
        ({"mapping": "customer.id"}, "mapping"),
    ],
)
def test_from_dict_errors_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        EventsSettings.from_dict(data)
    assert info.value.key == key


def test_from_dict_prefix() -> None:
    with pytest.raises(ConfigError) as info:
        EventsSettings.from_dict({"streams": {"billing": {"granularity": "WEEKLY"}}}, prefix="events")
    assert info.value.key == "events.streams.billing.granularity"
    assert "events.streams.billing.granularity" in str(info.value)
