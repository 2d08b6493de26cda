"""Golden tests: the record rules against the examples on CloudZero's own page.

The client and the emulator share records.py, so a wrong rule would pass both; these examples come from
docs.cloudzero.com/reference/allocation-telemetry-api-1 (kept in shared/reference/), held once in
tests/golden.py byte for byte, and must be accepted exactly as given.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest

from allocd.cloudzero.records import (
    MAX_DIMENSIONS,
    MAX_VALUES_PER_DIMENSION,
    MESSAGES,
    Granularity,
    Op,
    RecordError,
    canonical_filter,
    encode_body,
    parse_record,
    validate_filter,
    validate_stream_name,
)
from tests.golden import (
    DELETE_EXAMPLE,
    EXAMPLE_FILTER,
    EXAMPLE_STREAM,
    LIMITS_FILTER,
    REFERENCE,
    REPLACE_EXAMPLE,
    SUM_EXAMPLE,
)

HOOLI_FILTER = canonical_filter(EXAMPLE_FILTER)


def only_record(body: str) -> dict:
    records = json.loads(body)["records"]
    assert len(records) == 1
    return records[0]


def test_the_copies_match_the_reference_page() -> None:
    """When the stored page is at hand (it is outside the repository), tests/golden.py holds its examples."""
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} is not available")
    blocks = re.findall(r"```json JSON\n(.*?)```", REFERENCE.read_text(), flags=re.S)
    assert [json.loads(b) for b in blocks] == [
        json.loads(SUM_EXAMPLE),
        json.loads(REPLACE_EXAMPLE),
        json.loads(DELETE_EXAMPLE),
    ]
    assert '`{ "account": ["1", "2"], "service": ["A"] }`' in REFERENCE.read_text()


def test_the_sum_example_is_accepted_exactly_as_given() -> None:
    raw = only_record(SUM_EXAMPLE)
    rec = parse_record(raw, Op.SUM, index=0)
    assert rec.timestamp == datetime(2020, 1, 25, tzinfo=UTC)
    assert rec.granularity is Granularity.DAILY
    assert rec.element_name == "<HOOLI-CUSTOMER-ID>"
    assert rec.filter == HOOLI_FILTER
    assert rec.value == 250_000_000 and type(rec.value) is int  # a numeric string, exact
    assert rec.to_json() == raw  # what allocd would send is the example itself
    assert json.loads(encode_body([rec.to_json()])) == json.loads(SUM_EXAMPLE)


def test_the_replace_example_is_accepted_exactly_as_given() -> None:
    raw = only_record(REPLACE_EXAMPLE)
    rec = parse_record(raw, Op.REPLACE, index=0)
    assert rec.value == 150_000_000
    assert rec.key == parse_record(only_record(SUM_EXAMPLE), Op.SUM).key  # it replaces the summed record
    assert rec.to_json() == raw


def test_the_delete_example_is_accepted_for_delete() -> None:
    raw = only_record(DELETE_EXAMPLE)
    rec = parse_record(raw, Op.DELETE, index=0)
    assert rec.value is None
    assert rec.element_name == "<HOOLI-CUSTOMER-ID>"
    assert rec.filter == HOOLI_FILTER
    assert rec.to_json() == raw


def test_delete_rejects_a_value() -> None:
    """[doc] `value` must not be sent to delete: the sum example is not a valid delete record."""
    for body in (SUM_EXAMPLE, REPLACE_EXAMPLE):
        with pytest.raises(RecordError) as info:
            parse_record(only_record(body), Op.DELETE, index=0)
        assert info.value.rule == "value_on_delete"
        assert info.value.index == 0


@pytest.mark.parametrize("op", [Op.SUM, Op.REPLACE])
def test_the_delete_example_lacks_the_value_sum_and_replace_need(op: Op) -> None:
    with pytest.raises(RecordError) as info:
        parse_record(only_record(DELETE_EXAMPLE), op)
    assert info.value.rule == "missing_fields"
    assert info.value.detail == "value"


def test_delete_needs_only_timestamp_and_granularity() -> None:
    """[doc] "timestamp and granularity are minimally required" for delete."""
    rec = parse_record({"timestamp": "2020-01-25T00:00:00Z", "granularity": "DAILY"}, Op.DELETE)
    assert rec.filter == () and rec.element_name is None and rec.value is None
    for field in ("timestamp", "granularity"):
        raw = {k: v for k, v in only_record(DELETE_EXAMPLE).items() if k != field}
        with pytest.raises(RecordError) as info:
            parse_record(raw, Op.DELETE)
        assert info.value.rule == "missing_fields"


def test_the_example_stream_name_is_valid() -> None:
    assert validate_stream_name(EXAMPLE_STREAM) == EXAMPLE_STREAM


def test_the_limits_example_filter_is_valid() -> None:
    assert validate_filter(LIMITS_FILTER) == LIMITS_FILTER
    assert canonical_filter(LIMITS_FILTER) == (("account", ("1", "2")), ("service", ("A",)))


def test_the_documented_limits() -> None:
    """[doc] 5 filter dimensions in a stream, at most 20 values for each dimension in a record."""
    assert (MAX_DIMENSIONS, MAX_VALUES_PER_DIMENSION) == (5, 20)
    raw = only_record(SUM_EXAMPLE)
    raw["filter"] = {**raw["filter"], "custom:a": ["1"], "custom:b": ["2"]}  # 5 dimensions
    assert len(parse_record(raw, Op.SUM).filter) == 5
    raw["filter"]["custom:c"] = ["3"]
    with pytest.raises(RecordError) as info:
        parse_record(raw, Op.SUM)
    assert info.value.rule == "too_many_dimensions"
    raw = only_record(SUM_EXAMPLE)
    raw["filter"]["tag:owner"] = [f"owner{i}" for i in range(21)]
    with pytest.raises(RecordError) as info:
        parse_record(raw, Op.SUM)
    assert info.value.rule == "too_many_values"


@pytest.mark.parametrize(
    "timestamp", ["2020-01-25T00:00:00Z", "2020-01-25T00:00:00+00:00", "2020-01-25"]
)  # the examples' form, the offset form of CloudZero's tools [seen], and a date only [doc]
def test_documented_timestamp_forms_name_the_same_bucket(timestamp: str) -> None:
    raw = {**only_record(SUM_EXAMPLE), "timestamp": timestamp}
    rec = parse_record(raw, Op.SUM)
    assert rec.timestamp == datetime(2020, 1, 25, tzinfo=UTC)
    assert rec.to_json()["timestamp"] == "2020-01-25T00:00:00Z"


def test_a_json_number_value_is_accepted_like_the_string() -> None:
    """[doc] value is a JSON number or a numeric string."""
    raw = {**only_record(SUM_EXAMPLE), "value": 250000000}
    assert parse_record(raw, Op.SUM).value == 250_000_000


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("forbidden", "Not authorized, make sure you're using a valid API key in the header Authorization"),
        ("invalid_json", "Invalid JSON"),
        ("missing_fields", "Invalid Schema: Missing required fields"),
        ("unrecognized_filter_keys", "Invalid Schema: Unrecognized filter keys"),
        ("filter_keys_differ", "All records in a stream must contain the same filter keys"),
        (
            "granularity_differs",
            "All records in a stream must contain the same granularity as the stream's granularity",
        ),
        ("future_timestamp", "Timestamp too far into the future"),
        ("accepted", "Telemetry accepted"),
    ],
)
def test_documented_messages_word_for_word(rule: str, message: str) -> None:
    assert MESSAGES[rule] == message
    assert RecordError(rule).message == message
