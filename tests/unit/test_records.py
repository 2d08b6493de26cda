"""The record rules: values to 15 significant digits, timestamps, names, filters and parse_record's checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocd.cloudzero.records import (
    MAX_DIMENSIONS,
    MAX_ELEMENT_NAME_CHARS,
    MAX_RECORD_BYTES,
    MAX_STREAM_NAME_CHARS,
    MAX_VALUES_PER_DIMENSION,
    MESSAGES,
    Granularity,
    Op,
    Record,
    RecordError,
    bucket_start,
    canonical_filter,
    encode_body,
    filter_from_canonical,
    format_timestamp,
    format_value,
    needs_rounding,
    parse_record,
    parse_timestamp,
    parse_value,
    validate_element_name,
    validate_filter,
    validate_stream_name,
    window_end,
)

PROPS = settings(max_examples=200, deadline=None)
NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


def rule_of(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(RecordError) as info:
        call(*args, **kwargs)
    return info.value.rule


def record(**over: Any) -> dict[str, Any]:
    """A valid sum record with fields replaced; a value of `...` removes the field."""
    base = {
        "timestamp": "2026-11-27T09:00:00Z",
        "granularity": "HOURLY",
        "element_name": "hooli",
        "filter": {"custom:feature": ["billing"]},
        "value": "250",
    }
    return {k: v for k, v in {**base, **over}.items() if v is not ...}


# --- parse_value --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (250, 250),
        ("250000000", 250000000),
        (" 7 ", 7),
        ("+5", 5),
        (10**30, 10**30),
        ("1000000000000000000000000000001", 10**30 + 1),  # big integers stay exact
        (0.1, Decimal("0.1")),  # through the float's shortest repr, not its binary expansion
        (1e16, Decimal("1E+16")),
        ("0.1", Decimal("0.1")),
        (".5", Decimal("0.5")),
        ("1.", Decimal("1")),
        ("1.50", Decimal("1.50")),
        ("1e3", Decimal("1000")),
        ("2.5E-3", Decimal("0.0025")),
    ],
)
def test_parse_value_accepts_numbers_and_numeric_strings(raw: Any, expected: int | Decimal) -> None:
    value = parse_value(raw)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    "raw",
    [0, -1, "0", "-0", "0.000", "-2.5", 0.0, -0.1, True, False, None, "", " ", "abc", "1,000", "0x10", "1e",
     "e5", "1.2.3", "NaN", "nan", "Infinity", "-Infinity", "inf", float("nan"), float("inf"), float("-inf"),
     [1], {"v": 1}, Decimal("1")],
)  # fmt: skip
def test_parse_value_rejects_what_is_not_a_positive_finite_number(raw: Any) -> None:
    assert rule_of(parse_value, raw) == "invalid_value"


# --- 15 significant digits ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "text", "rounded"),
    [
        (250000000, "250000000", False),
        (999_999_999_999_999, "999999999999999", False),  # 15 digits: exact
        (10**15, "1000000000000000", False),  # 16 digits long, 1 significant
        (1_234_567_890_123_456, "1234567890123460", True),
        (1_234_567_890_123_455, "1234567890123460", True),  # half-even at the 15th digit
        (1_234_567_890_123_445, "1234567890123440", True),
        (999_999_999_999_999_5, "10000000000000000", True),  # 9999999999999995 → 1.0E+16
        (10**30 + 1, "1000000000000000000000000000000", True),  # beyond the default context's 28 digits
        (10**40, "1" + "0" * 40, False),
        (Decimal("0.1"), "0.1", False),
        (Decimal("1.50"), "1.5", False),
        (Decimal("2.000"), "2", False),
        (Decimal("1E+3"), "1000", False),
        (Decimal("1.5E+20"), "150000000000000000000", False),
        (Decimal("0.000000000000000000001"), "0.000000000000000000001", False),  # never exponent notation
        (Decimal("0.1234567890123456"), "0.123456789012346", True),
        (Decimal("123456789012345.6"), "123456789012346", True),
        (Decimal("1.000000000000001"), "1", True),
        (Decimal("3.00000000000000000000000000000001"), "3", True),
    ],
)
def test_format_value_rounds_to_15_significant_digits(value: int | Decimal, text: str, rounded: bool) -> None:
    assert format_value(value) == text
    assert needs_rounding(value) is rounded
    assert "e" not in text.lower()


positive_values = st.one_of(
    st.integers(min_value=1, max_value=10**45),
    st.decimals(min_value=Decimal("1e-30"), max_value=Decimal("1e30"), allow_nan=False, allow_infinity=False),
    st.builds(
        lambda digits, exp: Decimal(digits).scaleb(exp),
        st.integers(min_value=1, max_value=10**35),
        st.integers(min_value=-40, max_value=40),
    ),
).filter(lambda v: v > 0)


@PROPS
@given(value=positive_values)
def test_formatted_values_parse_back_and_needs_rounding_says_when_they_change(value: int | Decimal) -> None:
    text = format_value(value)
    back = parse_value(text)  # the API accepts what we send: a positive numeric string
    assert not needs_rounding(back)  # formatting is idempotent: the result has at most 15 digits
    assert format_value(back) == text
    assert (back != value) is needs_rounding(value)
    # Rounding moves the value by at most half a unit of the 15th significant digit.
    exact = Decimal(value)
    ulp = Decimal(1).scaleb(exact.adjusted() - 14)
    assert abs(Decimal(back) - exact) <= ulp / 2


@PROPS
@given(value=st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False))
def test_a_float_keeps_its_shortest_repr(value: float) -> None:
    parsed = parse_value(value)
    assert parsed == Decimal(repr(value))
    if len(repr(value).split("e")[0].replace(".", "").strip("0")) <= 15:
        assert float(format_value(parsed)) == value  # a short float survives formatting exactly
    else:
        assert needs_rounding(parsed)  # a 16- or 17-digit float is rounded by the API, and counted


@pytest.mark.parametrize("raw", ["1e5000", "1e309", 2**1024, "1e-400"])
def test_values_beyond_a_doubles_range_are_refused(raw: object) -> None:
    with pytest.raises(RecordError) as exc:
        parse_value(raw)
    assert exc.value.rule == "invalid_value"


def test_the_largest_accepted_value_can_be_formatted() -> None:
    assert format_value(parse_value("9.99e307")).startswith("999")


# --- timestamps ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2020-01-25T00:00:00Z", datetime(2020, 1, 25, tzinfo=UTC)),
        ("2020-01-25T00:00:00z", datetime(2020, 1, 25, tzinfo=UTC)),
        ("2020-01-25T00:00:00+00:00", datetime(2020, 1, 25, tzinfo=UTC)),  # [seen] CloudZero's tools
        ("2020-01-25T02:30:00+02:00", datetime(2020, 1, 25, 0, 30, tzinfo=UTC)),
        ("2020-01-24T22:00:00-02:00", datetime(2020, 1, 25, tzinfo=UTC)),
        ("2020-01-25T00:00:00", datetime(2020, 1, 25, tzinfo=UTC)),  # no offset: UTC
        ("2020-01-25T13:45:10.123456Z", datetime(2020, 1, 25, 13, 45, 10, 123456, tzinfo=UTC)),
        ("2020-01-25 13:45:10Z", datetime(2020, 1, 25, 13, 45, 10, tzinfo=UTC)),
        ("2024-09-01", datetime(2024, 9, 1, tzinfo=UTC)),  # [doc] date only
        (" 2024-09-01 ", datetime(2024, 9, 1, tzinfo=UTC)),
    ],
)
def test_parse_timestamp_returns_aware_utc(raw: str, expected: datetime) -> None:
    ts = parse_timestamp(raw)
    assert ts == expected
    assert ts.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "raw",
    [None, "", 1579910400, "1579910400", "2020-13-01", "2020-02-30", "yesterday", "2020-01-25T25:00:00Z",
     "2020-01-25T00:00:00Z+01:00", ["2020-01-25"], datetime(2020, 1, 25, tzinfo=UTC)],
)  # fmt: skip
def test_parse_timestamp_rejects_what_is_not_iso_8601_text(raw: Any) -> None:
    assert rule_of(parse_timestamp, raw) == "invalid_timestamp"


def test_format_timestamp_is_the_examples_form_in_utc() -> None:
    assert format_timestamp(datetime(2020, 1, 25, tzinfo=UTC)) == "2020-01-25T00:00:00Z"
    tz = timezone(timedelta(hours=2))
    assert format_timestamp(datetime(2020, 1, 25, 2, 30, 5, 999999, tzinfo=tz)) == "2020-01-25T00:30:05Z"
    assert parse_timestamp(format_timestamp(NOW)) == NOW


@pytest.mark.parametrize(
    ("ts", "granularity", "start", "end"),
    [
        (datetime(2020, 1, 25, 13, 45, 10, 5, tzinfo=UTC), Granularity.HOURLY,
         datetime(2020, 1, 25, 13, tzinfo=UTC), datetime(2020, 1, 25, 14, tzinfo=UTC)),
        (datetime(2020, 1, 25, 23, 59, tzinfo=UTC), Granularity.DAILY,
         datetime(2020, 1, 25, tzinfo=UTC), datetime(2020, 1, 26, tzinfo=UTC)),
        (datetime(2020, 2, 29, 12, tzinfo=UTC), Granularity.MONTHLY,
         datetime(2020, 2, 1, tzinfo=UTC), datetime(2020, 3, 1, tzinfo=UTC)),
        (datetime(2021, 12, 31, 23, tzinfo=UTC), Granularity.MONTHLY,
         datetime(2021, 12, 1, tzinfo=UTC), datetime(2022, 1, 1, tzinfo=UTC)),
        (datetime(2020, 1, 25, 0, 30, tzinfo=timezone(timedelta(hours=2))), Granularity.DAILY,
         datetime(2020, 1, 24, tzinfo=UTC), datetime(2020, 1, 25, tzinfo=UTC)),  # buckets are UTC
    ],
)  # fmt: skip
def test_buckets_are_utc_aligned(
    ts: datetime, granularity: Granularity, start: datetime, end: datetime
) -> None:
    assert bucket_start(ts, granularity) == start
    assert window_end(start, granularity) == end


# --- names and filters --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["my-allocation-stream", "a", "A.b_c-9", "x" * MAX_STREAM_NAME_CHARS])
def test_valid_stream_names(name: str) -> None:
    assert validate_stream_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "a b", "a/b", "a:b", "é", "x" * (MAX_STREAM_NAME_CHARS + 1), "a\n", None, 5]
)
def test_invalid_stream_names(name: Any) -> None:
    assert rule_of(validate_stream_name, name) == "invalid_stream_name"


@pytest.mark.parametrize(
    "name", ["hooli", "<HOOLI-CUSTOMER-ID>", "a b/c:d", "ünïcödé 名前", "x" * MAX_ELEMENT_NAME_CHARS]
)
def test_valid_element_names(name: str) -> None:
    assert validate_element_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "a\tb", "a\nb", "a\x00", "a\x7f", "x" * (MAX_ELEMENT_NAME_CHARS + 1), None, 5]
)
def test_invalid_element_names(name: Any) -> None:
    assert rule_of(validate_element_name, name) == "invalid_element_name"


def test_validate_filter_accepts_builtin_and_prefixed_dimensions() -> None:
    raw = {
        "account": ["1", "2"],
        "custom:feature": ["billing"],
        "tag:environment": ["prod"],
        "k8s_label:app.kubernetes.io/name": ["api"],
        "k8s_namespace": ["default"],
    }
    assert validate_filter(raw) == raw


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        ({"feature": ["x"]}, "unrecognized_filter_keys"),
        ({"custom:": ["x"]}, "unrecognized_filter_keys"),
        ({"Custom:feature": ["x"]}, "unrecognized_filter_keys"),
        ({"tag:a\nb": ["x"]}, "unrecognized_filter_keys"),
        ({1: ["x"]}, "unrecognized_filter_keys"),
        ({"account": "1"}, "invalid_filter"),
        ({"account": []}, "invalid_filter"),
        ({"account": [1]}, "invalid_filter"),
        ({"account": ["1", None]}, "invalid_filter"),
        ([["account", ["1"]]], "invalid_filter"),
        ("account=1", "invalid_filter"),
        ({f"custom:d{i}": ["x"] for i in range(MAX_DIMENSIONS + 1)}, "too_many_dimensions"),
        ({"account": [str(i) for i in range(MAX_VALUES_PER_DIMENSION + 1)]}, "too_many_values"),
    ],
)
def test_validate_filter_rejections(raw: Any, rule: str) -> None:
    assert rule_of(validate_filter, raw) == rule


def test_the_limits_themselves_are_allowed() -> None:
    raw = {f"custom:d{i}": [str(v) for v in range(MAX_VALUES_PER_DIMENSION)] for i in range(MAX_DIMENSIONS)}
    assert validate_filter(raw) == raw


def test_canonical_filter_is_a_set_of_dimensions_to_sets_of_values() -> None:
    a = canonical_filter({"tag:owner": ["sandy", "frank", "sandy"], "custom:feature": ["billing"]})
    b = canonical_filter({"custom:feature": ["billing"], "tag:owner": ["frank", "sandy"]})
    assert a == b == (("custom:feature", ("billing",)), ("tag:owner", ("frank", "sandy")))
    assert hash(a) == hash(b)
    assert canonical_filter(None) == canonical_filter({}) == ()
    assert filter_from_canonical(a) == {"custom:feature": ["billing"], "tag:owner": ["frank", "sandy"]}
    assert canonical_filter(filter_from_canonical(a)) == a
    assert filter_from_canonical(()) == {}


# --- parse_record -------------------------------------------------------------------------------------------
def test_parse_record_builds_a_record_and_renders_it_back() -> None:
    rec = parse_record(record(), Op.SUM, now=NOW)
    assert rec == Record(
        datetime(2026, 11, 27, 9, tzinfo=UTC),
        Granularity.HOURLY,
        "hooli",
        (("custom:feature", ("billing",)),),
        250,
    )
    assert rec.to_json() == record()
    assert rec.key == (datetime(2026, 11, 27, 9, tzinfo=UTC), "hooli", (("custom:feature", ("billing",)),))


def test_the_key_buckets_the_timestamp() -> None:
    rec = parse_record(record(timestamp="2026-11-27T09:59:59Z", granularity="DAILY"), Op.REPLACE)
    assert rec.key[0] == datetime(2026, 11, 27, tzinfo=UTC)
    assert rec.to_json()["timestamp"] == "2026-11-27T09:59:59Z"  # the record keeps its own timestamp


@pytest.mark.parametrize("op", [Op.SUM, Op.REPLACE])
@pytest.mark.parametrize("missing", ["timestamp", "granularity", "element_name", "value"])
def test_sum_and_replace_require_their_fields(op: Op, missing: str) -> None:
    with pytest.raises(RecordError) as info:
        parse_record(record(**{missing: ...}), op, index=7)
    assert info.value.rule == "missing_fields"
    assert info.value.index == 7
    assert missing in info.value.detail
    assert str(info.value).startswith(f"record 7: {MESSAGES['missing_fields']}")


def test_all_missing_fields_are_named() -> None:
    with pytest.raises(RecordError) as info:
        parse_record({}, Op.SUM)
    assert info.value.detail == "timestamp, granularity, element_name, value"
    assert info.value.index is None and not str(info.value).startswith("record")


@pytest.mark.parametrize("missing", ["timestamp", "granularity"])
def test_delete_requires_timestamp_and_granularity(missing: str) -> None:
    assert rule_of(parse_record, record(value=..., **{missing: ...}), Op.DELETE) == "missing_fields"


def test_delete_takes_no_value_and_needs_no_element_or_filter() -> None:
    assert rule_of(parse_record, record(), Op.DELETE) == "value_on_delete"
    assert rule_of(parse_record, record(value=None), Op.DELETE) == "value_on_delete"  # present is present
    rec = parse_record(record(value=..., element_name=..., filter=...), Op.DELETE)
    assert rec.value is None and rec.element_name is None and rec.filter == ()
    assert rec.to_json() == {"timestamp": "2026-11-27T09:00:00Z", "granularity": "HOURLY"}
    assert rule_of(parse_record, record(value=..., element_name=""), Op.DELETE) == "invalid_element_name"


@pytest.mark.parametrize(
    ("over", "rule"),
    [
        ({"timestamp": "not a time"}, "invalid_timestamp"),
        ({"timestamp": 1579910400}, "invalid_timestamp"),
        ({"granularity": "daily"}, "invalid_granularity"),
        ({"granularity": "WEEKLY"}, "invalid_granularity"),
        ({"granularity": None}, "invalid_granularity"),
        ({"granularity": ["HOURLY"]}, "invalid_granularity"),
        ({"element_name": None}, "invalid_element_name"),
        ({"element_name": ""}, "invalid_element_name"),
        ({"value": "0"}, "invalid_value"),
        ({"value": None}, "invalid_value"),
        ({"value": True}, "invalid_value"),
        ({"filter": {"feature": ["x"]}}, "unrecognized_filter_keys"),
        ({"filter": []}, "invalid_filter"),
        ({"element_name": "x" * (MAX_RECORD_BYTES + 1)}, "record_too_large"),
    ],
)
def test_parse_record_names_the_rule(over: dict[str, Any], rule: str) -> None:
    with pytest.raises(RecordError) as info:
        parse_record(record(**over), Op.SUM, index=3)
    assert info.value.rule == rule
    assert info.value.index == 3
    assert info.value.message == MESSAGES[rule]
    assert info.value.describe().startswith(f"record 3: {MESSAGES[rule]}")


def test_no_filter_and_a_null_filter_both_mean_none() -> None:
    assert parse_record(record(filter=...), Op.SUM).filter == ()
    assert parse_record(record(filter=None), Op.SUM).filter == ()
    assert "filter" not in parse_record(record(filter=...), Op.SUM).to_json()


def test_future_timestamps_are_judged_against_now_and_max_future() -> None:
    limit = NOW + timedelta(days=1)
    assert parse_record(record(timestamp=format_timestamp(limit)), Op.SUM, now=NOW).timestamp == limit
    late = format_timestamp(limit + timedelta(seconds=1))
    assert rule_of(parse_record, record(timestamp=late), Op.SUM, now=NOW) == "future_timestamp"
    assert parse_record(record(timestamp=late), Op.SUM).timestamp  # without `now`, no future check
    soon = format_timestamp(NOW + timedelta(minutes=20))
    short = timedelta(minutes=15)
    assert (
        rule_of(parse_record, record(timestamp=soon), Op.SUM, now=NOW, max_future=short) == "future_timestamp"
    )


def test_the_size_limit_is_on_the_encoded_record() -> None:
    base = len(orjson.dumps(record(element_name="")))
    at_limit = record(element_name="x" * (MAX_RECORD_BYTES - base))
    assert len(orjson.dumps(at_limit)) == MAX_RECORD_BYTES
    # At the limit the size rule passes (the element's own length rule is what fails); one byte more does not.
    assert rule_of(parse_record, at_limit, Op.SUM) == "invalid_element_name"
    over = record(element_name="x" * (MAX_RECORD_BYTES - base + 1))
    assert rule_of(parse_record, over, Op.SUM) == "record_too_large"
    big_filter = {f"custom:d{i}": [f"{i}{'v' * 90}{j}" for j in range(20)] for i in range(5)}
    assert len(orjson.dumps(record(filter=big_filter))) <= MAX_RECORD_BYTES
    assert parse_record(record(filter=big_filter), Op.SUM).filter == canonical_filter(big_filter)


def test_not_an_object_is_missing_fields() -> None:
    for raw in (None, [], "record", 5):
        assert rule_of(parse_record, raw, Op.SUM) == "missing_fields"


def test_record_error_message_is_the_apis_and_describe_adds_the_detail() -> None:
    err = RecordError("invalid_value", "must be > 0", index=2)
    assert err.message == MESSAGES["invalid_value"]
    assert err.describe() == f"record 2: {MESSAGES['invalid_value']} (must be > 0)"
    assert str(RecordError("invalid_json")) == "Invalid JSON"
    assert isinstance(err, ValueError)


def test_every_message_key_is_a_rule_that_can_be_raised() -> None:
    for rule in MESSAGES:
        assert RecordError(rule).message == MESSAGES[rule]


def test_encode_body_wraps_records() -> None:
    body = encode_body([record()])
    assert orjson.loads(body) == {"records": [record()]}


@PROPS
@given(
    element=st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cs"]), min_size=1, max_size=50),
    value=positive_values,
    values=st.lists(st.text(max_size=10), min_size=1, max_size=MAX_VALUES_PER_DIMENSION),
    granularity=st.sampled_from(list(Granularity)),
)
def test_a_rendered_record_parses_to_the_same_record(
    element: str, value: int | Decimal, values: list[str], granularity: Granularity
) -> None:
    rec = Record(NOW, granularity, element, canonical_filter({"tag:x": values}), value)
    again = parse_record(orjson.loads(encode_body([rec.to_json()]))["records"][0], Op.SUM)
    assert again.key == rec.key
    assert again.granularity == rec.granularity
    assert Decimal(format_value(value)) == again.value
