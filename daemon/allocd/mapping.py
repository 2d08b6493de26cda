"""Where producers keep an event's fields in their own schema, and how those fields become allocd's values.

A `FieldMapping` names a dotted path per field (`customer.id` walks `{"customer": {"id": ...}}`); a dot always
separates, so a key that itself contains a dot cannot be addressed. A missing step and JSON `null` both mean
"absent". The functions here raise `InvalidEvent` with a reason from `events.REASONS`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from allocd.cloudzero.records import RecordError, parse_timestamp
from allocd.errors import ConfigError, InvalidEvent

__all__ = [
    "MAX_TIMESTAMP_MS",
    "MIN_TIMESTAMP_MS",
    "TIMESTAMP_FORMATS",
    "Path",
    "dimension_values",
    "iso_ms",
    "lookup",
    "split_path",
    "timestamp_ms",
]

Path = tuple[str, ...]

TIMESTAMP_FORMATS = ("auto", "iso", "epoch_s", "epoch_ms")
# The range a datetime can hold, so windows.py can always turn an event time back into one.
MIN_TIMESTAMP_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
MAX_TIMESTAMP_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
# In "auto", an epoch number at or above this is milliseconds: 1e11 seconds is the year 5138, 1e11 ms 1973.
_AUTO_MS_FROM = 100_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_EPOCH_STRING = re.compile(r"-?\d{1,20}(\.\d{1,9})?")


def split_path(path: str, key: str = "path") -> Path:
    """`"customer.id"` → `("customer", "id")`; an empty segment is a ConfigError naming `key`."""
    parts = tuple(path.split("."))
    if not all(parts):
        raise ConfigError(key, f"empty segment in field path {path!r}")
    return parts


def lookup(obj: Any, path: Path) -> Any:
    """The value at `path`, or None when a step is missing or not an object."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def dimension_values(raw: Any) -> list[str] | None:
    """A mapped dimension's values: a string or integer becomes a one-value list; None means absent."""
    if raw is None:
        return None
    if type(raw) is list:
        return [_dimension_scalar(v) for v in raw]
    return [_dimension_scalar(raw)]


def _dimension_scalar(raw: Any) -> str:
    if type(raw) is str:
        return raw
    if type(raw) is int:  # ids are often numbers in producers' schemas; bool is not an int here
        return str(raw)
    raise InvalidEvent(
        "invalid_filter", f"a mapped dimension value must be a string or integer, not {type(raw).__name__}"
    )


def timestamp_ms(raw: Any, fmt: str) -> int:
    """Event time in epoch milliseconds UTC, read as `fmt` (one of TIMESTAMP_FORMATS)."""
    if type(raw) is str:
        if fmt == "auto" or fmt == "iso":
            ms = iso_ms(raw)
        elif _EPOCH_STRING.fullmatch(raw):
            ms = _epoch_ms(Decimal(raw), fmt == "epoch_ms")
        else:
            raise InvalidEvent("invalid_timestamp", f"not an epoch number: {raw[:40]!r}")
    elif type(raw) is int or type(raw) is float:
        if fmt == "iso":
            raise InvalidEvent("invalid_timestamp", "expected an ISO 8601 string")
        in_ms = fmt == "epoch_ms" or (fmt == "auto" and abs(raw) >= _AUTO_MS_FROM)
        ms = _epoch_ms(raw, in_ms)
    else:
        raise InvalidEvent("invalid_timestamp", f"expected a string or number, not {type(raw).__name__}")
    if not MIN_TIMESTAMP_MS <= ms <= MAX_TIMESTAMP_MS:
        raise InvalidEvent("invalid_timestamp", "outside the years 1 to 9999")
    return ms


# ISO 8601 in the canonical shape ("2026-11-27T10:15:03.120Z") is read as a whole second plus a tail, each
# looked up in a small cache: a stream's events share their seconds and the tails are at most 2,002 strings.
# `iso_ms` is a third of the decoder's own cost otherwise (datetime arithmetic, not parsing).
_SECOND_SHAPE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}")
_TAIL_SHAPE = re.compile(r"(?:\.[0-9]{3})?Z?")
_CACHED_LENGTHS = frozenset((19, 20, 23, 24))  # "", "Z", ".fff", ".fffZ" after the second
_SECONDS_CACHE_SIZE = 8192  # distinct seconds kept (an hour and more of a busy stream)
_seconds: dict[str, int] = {}  # "YYYY-MM-DDTHH:MM:SS" → epoch ms
_tails: dict[str, int] = {}  # ".fffZ" → ms


def iso_ms(text: str) -> int:
    """An ISO 8601 string as epoch milliseconds UTC (no offset means UTC); the caller checks the range."""
    if len(text) in _CACHED_LENGTHS:
        second = _seconds.get(text[:19])
        if second is not None:
            tail = _tails.get(text[19:])
            if tail is not None:
                return second + tail
        ms = _parse_iso_ms(text)
        _remember(text, ms)
        return ms
    return _parse_iso_ms(text)


def _remember(text: str, ms: int) -> None:
    """Cache `text`'s second and tail when both have the canonical shape and read back as `ms`."""
    head, tail = text[:19], text[19:]
    if not (_SECOND_SHAPE.fullmatch(head) and _TAIL_SHAPE.fullmatch(tail)):
        return
    tail_ms = int(tail[1:4]) if tail[:1] == "." else 0
    try:
        second = _parse_iso_ms(head)
    except InvalidEvent:
        return
    if second + tail_ms != ms:  # never expected; a cache must not change an answer
        return
    if len(_seconds) >= _SECONDS_CACHE_SIZE:
        _seconds.clear()
    _seconds[head] = second
    _tails[tail] = tail_ms


def _parse_iso_ms(text: str) -> int:
    try:
        ts = datetime.fromisoformat(text)  # the fast path: Python 3.11 reads "Z" itself
    except ValueError:
        try:
            ts = parse_timestamp(text)  # the API's rule, for what fromisoformat alone refuses ("z", spaces)
        except (RecordError, OverflowError):
            raise InvalidEvent("invalid_timestamp", f"not ISO 8601: {text[:40]!r}") from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)  # no offset means UTC, as the API reads it
    return (ts - _EPOCH) // _ONE_MS  # integer arithmetic: a float timestamp() could be off by a millisecond


def _epoch_ms(n: int | float | Decimal, in_ms: bool) -> int:
    limit = MAX_TIMESTAMP_MS if in_ms else MAX_TIMESTAMP_MS // 1000 + 1
    if not -limit <= n <= limit:  # checked first: n * 1000 could overflow a float
        raise InvalidEvent("invalid_timestamp", "outside the years 1 to 9999")
    if type(n) is int:
        return n if in_ms else n * 1000
    scaled = n if in_ms else n * 1000
    if isinstance(scaled, Decimal):
        return int(scaled.to_integral_value(ROUND_HALF_EVEN))
    return round(scaled)  # to the nearest millisecond, half to even like Decimal
