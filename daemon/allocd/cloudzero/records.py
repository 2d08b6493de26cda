"""The record rules of the CloudZero allocation telemetry API, kept once for the client and the emulator.

Every rule cites cloudzero-api.md: [doc] is CloudZero's public documentation, [seen] CloudZero's own tools,
[assume] our choice where nothing public says (configurable where it matters, named in the README).
Because the client and the emulator share these rules, a wrong rule would pass both; the golden tests in
tests/unit/test_records_golden.py pin them to the examples on CloudZero's own page.
"""

from __future__ import annotations

import calendar
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any

import orjson

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_DIMENSIONS",
    "MAX_ELEMENT_NAME_CHARS",
    "MAX_RECORDS_PER_REQUEST",
    "MAX_RECORD_BYTES",
    "MAX_STREAM_NAME_CHARS",
    "MAX_VALUES_PER_DIMENSION",
    "MESSAGES",
    "RATE_BURST_RECORDS",
    "RATE_RECORDS_PER_SECOND",
    "SIGNIFICANT_DIGITS",
    "CanonicalFilter",
    "Granularity",
    "Op",
    "Record",
    "RecordError",
    "bucket_start",
    "canonical_filter",
    "encode_body",
    "filter_from_canonical",
    "format_timestamp",
    "format_value",
    "needs_rounding",
    "parse_record",
    "parse_timestamp",
    "parse_value",
    "validate_element_name",
    "validate_filter",
    "validate_stream_name",
    "window_end",
]

# --- limits -------------------------------------------------------------------------------------------
MAX_DIMENSIONS = 5  # [doc] filter dimensions per stream
MAX_VALUES_PER_DIMENSION = 20  # [doc] values per dimension in one record
MAX_RECORD_BYTES = 10 * 1024  # [doc, legacy page] one record, encoded
MAX_BODY_BYTES = 5 * 1024 * 1024  # [doc] one request body
MAX_RECORDS_PER_REQUEST = 3000  # [seen] what CloudZero's own tools send; no cap is documented
MAX_STREAM_NAME_CHARS = 256  # [doc]
MAX_ELEMENT_NAME_CHARS = 256  # [assume] length of element_name is not documented
SIGNIFICANT_DIGITS = 15  # [doc] values are rounded to 15 significant digits
RATE_RECORDS_PER_SECOND = 100  # [doc] per organisation
RATE_BURST_RECORDS = 8_640_000  # [doc] one day's worth

# The documented response messages, one per rule, shared by the emulator (which answers them) and the
# tests (which expect them).
MESSAGES = {
    "forbidden": "Not authorized, make sure you're using a valid API key in the header Authorization",
    "invalid_json": "Invalid JSON",
    "missing_fields": "Invalid Schema: Missing required fields",
    "unrecognized_filter_keys": "Invalid Schema: Unrecognized filter keys",
    "filter_keys_differ": "All records in a stream must contain the same filter keys",
    "granularity_differs": (
        "All records in a stream must contain the same granularity as the stream's granularity"
    ),
    "future_timestamp": "Timestamp too far into the future",
    "rate_limited": "Rate limit exceeded, please retry after a short delay",
    "unavailable": "Service unavailable, please retry after a short delay with exponential backoff",
    "accepted": "Telemetry accepted",
    # [assume] the following are not documented word for word; the status codes are.
    "invalid_value": "Invalid Schema: value must be a number greater than 0",
    "value_on_delete": "Invalid Schema: value must not be sent to delete",
    "too_many_dimensions": f"Invalid Schema: at most {MAX_DIMENSIONS} filter dimensions are allowed",
    "too_many_values": (
        f"Invalid Schema: at most {MAX_VALUES_PER_DIMENSION} values are allowed for each filter dimension"
    ),
    "invalid_filter": "Invalid Schema: filter must map dimension names to lists of strings",
    "invalid_timestamp": "Invalid Schema: timestamp must be ISO 8601",
    "invalid_granularity": "Invalid Schema: granularity must be HOURLY, DAILY or MONTHLY",
    "invalid_element_name": (
        f"Invalid Schema: element_name must be 1 to {MAX_ELEMENT_NAME_CHARS} characters"
        " without control characters"
    ),
    "invalid_stream_name": (
        f"Invalid stream name: letters, digits, '_', '.', '-' only, 1 to {MAX_STREAM_NAME_CHARS} characters"
    ),
    "record_too_large": f"Invalid Schema: a record must not exceed {MAX_RECORD_BYTES} bytes",
    "body_too_large": f"Request body exceeds {MAX_BODY_BYTES} bytes",
    "invalid_records": "Invalid Schema: body must be an object with a non-empty 'records' list",
    "stream_not_found": "Stream not found",
}


class RecordError(ValueError):
    """A record breaks an API rule. `rule` is a key of MESSAGES; `index` the record's place in its request."""

    def __init__(self, rule: str, detail: str = "", index: int | None = None) -> None:
        self.rule = rule
        self.detail = detail
        self.index = index
        super().__init__(self.describe())

    @property
    def message(self) -> str:
        """The API's message for this rule (what the emulator answers)."""
        return MESSAGES[self.rule]

    def describe(self) -> str:
        where = f"record {self.index}: " if self.index is not None else ""
        extra = f" ({self.detail})" if self.detail else ""
        return f"{where}{MESSAGES[self.rule]}{extra}"


class Op(enum.StrEnum):
    SUM = "sum"
    REPLACE = "replace"
    DELETE = "delete"


class Granularity(enum.StrEnum):
    HOURLY = "HOURLY"
    DAILY = "DAILY"
    MONTHLY = "MONTHLY"


# A filter as a comparable value: dimensions sorted, each with its sorted, de-duplicated values.
# Matching treats a filter as a set of dimension -> set of values [assume the exact key].
CanonicalFilter = tuple[tuple[str, tuple[str, ...]], ...]

# --- names ---------------------------------------------------------------------------------------------
_STREAM_NAME = re.compile(rf"[A-Za-z0-9_.\-]{{1,{MAX_STREAM_NAME_CHARS}}}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# [seen in the old API text; exact list assume] the recognised filter keys.
_PREFIXED_KEY = re.compile(r"(custom|tag|k8s_label):[^\x00-\x1f\x7f]{1,256}")
BUILTIN_DIMENSIONS = frozenset(
    {
        "account",
        "service",
        "region",
        "cloud_provider",
        "usage_family",
        "k8s_cluster",
        "k8s_namespace",
        "k8s_pod",
        "k8s_workload",
        "availability_zone",
        "billing_line_item",
        "resource_type",
    }
)


def validate_stream_name(name: str) -> str:
    """Letters, digits, `_ . -`, at most 256 characters [doc]."""
    if not isinstance(name, str) or not _STREAM_NAME.fullmatch(name):
        raise RecordError("invalid_stream_name", repr(name)[:80])
    return name


def validate_element_name(name: Any) -> str:
    """Required, non-empty; length and charset are [assume] ≤ 256 chars without control characters."""
    if not isinstance(name, str) or not name or len(name) > MAX_ELEMENT_NAME_CHARS or _CONTROL.search(name):
        raise RecordError("invalid_element_name")
    return name


def is_recognised_dimension(key: str) -> bool:
    return key in BUILTIN_DIMENSIONS or bool(_PREFIXED_KEY.fullmatch(key))


def validate_filter(raw: Any) -> dict[str, list[str]]:
    """≤ 5 dimensions, ≤ 20 values each, recognised keys [doc]; values are strings [assume]."""
    if not isinstance(raw, Mapping):
        raise RecordError("invalid_filter")
    if len(raw) > MAX_DIMENSIONS:
        raise RecordError("too_many_dimensions", f"{len(raw)} given")
    out: dict[str, list[str]] = {}
    for key, values in raw.items():
        if not isinstance(key, str) or not is_recognised_dimension(key):
            raise RecordError("unrecognized_filter_keys", repr(key)[:80])
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise RecordError("invalid_filter", f"dimension {key!r}")
        if len(values) > MAX_VALUES_PER_DIMENSION:
            raise RecordError("too_many_values", f"dimension {key!r} has {len(values)}")
        out[key] = values
    return out


def canonical_filter(raw: Mapping[str, list[str]] | None) -> CanonicalFilter:
    """The filter as a set of dimension → set of values, in a hashable, ordered form."""
    if not raw:
        return ()
    return tuple(sorted((k, tuple(sorted(set(v)))) for k, v in raw.items()))


def filter_from_canonical(canon: CanonicalFilter) -> dict[str, list[str]]:
    return {k: list(v) for k, v in canon}


# --- values --------------------------------------------------------------------------------------------
_NUMERIC_STRING = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*")


def parse_value(raw: Any) -> int | Decimal:
    """A JSON number or numeric string, finite and > 0 [doc]. Integers stay int; others become Decimal.

    Floats are converted through their shortest repr, so 0.1 stays 0.1 rather than its binary expansion.
    """
    if isinstance(raw, bool):
        raise RecordError("invalid_value", "boolean")
    if isinstance(raw, int):
        value: int | Decimal = raw
    elif isinstance(raw, float):
        if raw != raw or raw in (float("inf"), float("-inf")):
            raise RecordError("invalid_value", "not finite")
        value = Decimal(repr(raw))
    elif isinstance(raw, str) and _NUMERIC_STRING.fullmatch(raw):
        try:
            value = Decimal(raw.strip())
        except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid literals
            raise RecordError("invalid_value", "not a number") from exc
        if value == value.to_integral_value() and "." not in raw and "e" not in raw.lower():
            value = int(value)
    else:
        raise RecordError("invalid_value", "not a number")
    if value <= 0:
        raise RecordError("invalid_value", "must be > 0")
    if _out_of_range(value):
        raise RecordError("invalid_value", "out of range")
    return value


def _out_of_range(value: int | Decimal) -> bool:
    """[assume] values stay within a double's range (the API's JSON numbers are doubles); beyond it a value
    is a producer bug, and formatting it would build a string of thousands of digits."""
    if isinstance(value, int):
        return value.bit_length() > 1023
    return not -308 <= value.adjusted() <= 308


def needs_rounding(value: int | Decimal) -> bool:
    """True when the API would round the value: it has more than 15 significant digits [doc]."""
    # Count the digits directly: normalize() would first round to the context's 28 digits, so 10**30 + 1
    # would look exact although format_value rounds it.
    digits = "".join(map(str, Decimal(value).as_tuple().digits)).rstrip("0")
    return len(digits) > SIGNIFICANT_DIGITS


def format_value(value: int | Decimal) -> str:
    """The value as a JSON-safe numeric string, rounded to 15 significant digits like the API [doc].

    A string keeps precision that a JSON float would lose; the API accepts numeric strings [doc].
    """
    if isinstance(value, int) and abs(value) < 10**SIGNIFICANT_DIGITS:
        return str(value)
    with localcontext() as ctx:
        ctx.prec = SIGNIFICANT_DIGITS
        d = (+Decimal(value)).normalize()
    if d == d.to_integral_value():
        return str(int(d))
    text = format(d, "f")
    return text


# --- time ----------------------------------------------------------------------------------------------
def parse_timestamp(raw: Any) -> datetime:
    """ISO 8601 with `Z`, an offset, or none (UTC), or a date only [doc]; returns an aware UTC datetime."""
    if not isinstance(raw, str) or not raw:
        raise RecordError("invalid_timestamp", "not a string")
    text = raw.strip()
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=UTC)
        ts = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise RecordError("invalid_timestamp", repr(raw)[:60]) from exc
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC)


def format_timestamp(ts: datetime) -> str:
    """`2020-01-25T00:00:00Z`, the form of CloudZero's own examples [doc]."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def bucket_start(ts: datetime, granularity: Granularity) -> datetime:
    """The UTC-aligned start of the granularity bucket holding `ts` (finer data is combined into it [doc])."""
    ts = ts.astimezone(UTC)
    if granularity is Granularity.HOURLY:
        return ts.replace(minute=0, second=0, microsecond=0)
    if granularity is Granularity.DAILY:
        return ts.replace(hour=0, minute=0, second=0, microsecond=0)
    return ts.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def window_end(start: datetime, granularity: Granularity) -> datetime:
    if granularity is Granularity.HOURLY:
        return start + timedelta(hours=1)
    if granularity is Granularity.DAILY:
        return start + timedelta(days=1)
    days = calendar.monthrange(start.year, start.month)[1]
    return start + timedelta(days=days)


# --- records -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Record:
    """One validated allocation record. `value` is None only for delete."""

    timestamp: datetime
    granularity: Granularity | None
    element_name: str | None
    filter: CanonicalFilter
    value: int | Decimal | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"timestamp": format_timestamp(self.timestamp)}
        if self.granularity is not None:
            out["granularity"] = self.granularity.value
        if self.element_name is not None:
            out["element_name"] = self.element_name
        if self.filter:
            out["filter"] = filter_from_canonical(self.filter)
        if self.value is not None:
            out["value"] = format_value(self.value)
        return out

    @property
    def key(self) -> tuple[datetime, str | None, CanonicalFilter]:
        """What sum/replace match on within a stream: bucket, element, filter [assume the exact key]."""
        assert self.granularity is not None
        return (bucket_start(self.timestamp, self.granularity), self.element_name, self.filter)


def parse_record(
    raw: Any,
    op: Op,
    *,
    now: datetime | None = None,
    max_future: timedelta = timedelta(days=1),
    index: int | None = None,
) -> Record:
    """Validate one record as the API would for `op`; raise RecordError naming the rule and the index.

    `max_future` is how far ahead of `now` a timestamp may lie [doc that a limit exists; value assume].
    """
    try:
        return _parse_record(raw, op, now, max_future)
    except RecordError as exc:
        exc.index = index
        exc.args = (exc.describe(),)
        raise


def _parse_record(raw: Any, op: Op, now: datetime | None, max_future: timedelta) -> Record:
    if not isinstance(raw, Mapping):
        raise RecordError("missing_fields", "record is not an object")
    required = (
        ("timestamp", "granularity") if op is Op.DELETE else ("timestamp", "granularity", "element_name")
    )
    missing = [f for f in required if f not in raw]
    if op is not Op.DELETE and "value" not in raw:
        missing.append("value")
    if missing:
        raise RecordError("missing_fields", ", ".join(missing))
    if op is Op.DELETE and "value" in raw:
        raise RecordError("value_on_delete")
    if len(orjson.dumps(raw)) > MAX_RECORD_BYTES:
        raise RecordError("record_too_large")
    ts = parse_timestamp(raw["timestamp"])
    if now is not None and ts > now + max_future:
        raise RecordError("future_timestamp")
    try:
        granularity = Granularity(raw["granularity"])
    except (ValueError, TypeError) as exc:
        raise RecordError("invalid_granularity", repr(raw["granularity"])[:40]) from exc
    element = raw.get("element_name")
    if element is not None or op is not Op.DELETE:
        element = validate_element_name(element)
    flt = canonical_filter(validate_filter(raw["filter"])) if raw.get("filter") is not None else ()
    value = None if op is Op.DELETE else parse_value(raw["value"])
    return Record(ts, granularity, element, flt, value)


def encode_body(records: list[dict[str, Any]]) -> bytes:
    """The request body the API expects: `{"records": [...]}` [doc]."""
    return orjson.dumps({"records": records})
