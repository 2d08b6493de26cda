"""Decode + map: one raw message (a Kafka record value, or one element posted to the sidecar) → an `Event`.

The canonical shape needs no configuration:

    {"id": "...", "timestamp": "2026-11-27T10:15:03.120Z", "stream": "billing-usage",
     "element_name": "hooli", "filter": {"custom:feature": ["billing"]}, "value": 250}

`[events.mapping]` (config.MappingSettings, read through mapping.py) reads producers' own field names.
Anything that cannot be counted raises `InvalidEvent(reason, detail)` — the pipeline sends it to the DLQ
and moves on; `reason` is one of `REASONS` (a metric label and a DLQ header, so the codes are stable).
Nothing else ever escapes `decode`.

Validity never depends on when an event is read: lateness and future are judged against the record's own
timestamp (its arrival), so a replay classifies every event identically.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

import msgspec
import orjson

from allocd.cloudzero.records import (
    CanonicalFilter,
    Granularity,
    RecordError,
    canonical_filter,
    parse_value,
    validate_element_name,
    validate_filter,
    validate_stream_name,
)
from allocd.config import EventsSettings, StreamSettings
from allocd.errors import InvalidEvent
from allocd.mapping import (
    MAX_TIMESTAMP_MS,
    MIN_TIMESTAMP_MS,
    Path,
    dimension_values,
    iso_ms,
    lookup,
    split_path,
    timestamp_ms,
)

__all__ = [
    "REASONS",
    "Decoder",
    "Event",
    "EventFields",
]

REASONS = (
    "not_json",
    "not_object",
    "too_large",
    "missing_element",
    "missing_value",
    "invalid_value",
    "invalid_element",
    "missing_stream",
    "undeclared_stream",
    "invalid_stream",
    "invalid_timestamp",
    "too_late",
    "future",
    "too_many_dimensions",
    "too_many_values",
    "invalid_filter",
    "unknown_dimension",
    "dimension_mismatch",
)

# records.py's rules, renamed to our reasons.
_RULE_REASONS = {
    "invalid_element_name": "invalid_element",
    "invalid_value": "invalid_value",
    "invalid_stream_name": "invalid_stream",
    "invalid_timestamp": "invalid_timestamp",
    "invalid_filter": "invalid_filter",
    "too_many_dimensions": "too_many_dimensions",
    "too_many_values": "too_many_values",
    "unrecognized_filter_keys": "unknown_dimension",
}

_FILTER_CACHE_SIZE = 4096  # distinct (stream, filter) shapes kept; filter variety is small
_ELEMENT_CACHE_SIZE = 1 << 17  # validated element names kept (about 10 MB when full)
_FILTER_CACHE_MAX_KEY = 1024  # bytes; a larger filter is validated every time rather than pinned in memory
# [assume] a value must lie within a double's range, as the API's JSON number surely does.
_MAX_INT_VALUE = int(sys.float_info.max)
_INT_LIMIT = 1 << 1023  # ints below it pass parse_value's range check (bit_length <= 1023)
_MAX_DECIMAL_VALUE = Decimal(sys.float_info.max)
_MIN_DECIMAL_VALUE = Decimal(math.ulp(0.0))  # the smallest positive double, 5e-324
_MAX_VALUE_CHARS = 512
# orjson would otherwise write datetimes, dataclasses and str subclasses as JSON, so a filter holding them
# (possible only through decode_obj) would be judged by its JSON form rather than refused as the rules say.
_PLAIN_JSON_ONLY = (
    orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
)


# Event's fields as a plain tuple, in its order: what `Decoder.decode_fields` returns.
EventFields = tuple[str, int, str, CanonicalFilter, int | Decimal, str | None, Granularity]
_Fields = Callable[[bytes, int], EventFields]


@dataclass(slots=True)
class Event:
    """One usage event, ready to be added into its window's cell."""

    stream: str
    timestamp_ms: int  # event time, epoch milliseconds UTC
    element: str
    filter: CanonicalFilter  # records.canonical_filter form, the stream's constant filter merged in
    value: int | Decimal  # > 0, exact: integers stay int, anything else is the Decimal of its literal
    id: str | None
    granularity: Granularity


_INT64_LIMIT = 1 << 63
_TYPED_NAMES = ("element", "value", "ts", "stream", "id", "filter")


def _typed_parser(keys: tuple[str | None, ...]) -> Callable[[bytes], Any] | None:
    """msgspec's decoder for an object holding only the mapped keys (any other key fails the parse), the
    filter kept as its raw JSON (an empty Raw when absent). None unless every field is mapped, each to its
    own key: the general path handles the rest."""
    if None in keys or len(set(keys)) != len(keys):
        return None
    fields: list[tuple[str, Any, Any]] = [(name, Any, None) for name in _TYPED_NAMES[:-1]]
    fields.append(("filter", msgspec.Raw, msgspec.Raw()))
    rename = {name: key for name, key in zip(_TYPED_NAMES, keys, strict=True) if key is not None}
    struct = msgspec.defstruct("TypedEvent", fields, rename=rename, forbid_unknown_fields=True)
    return msgspec.json.Decoder(struct).decode


def _reject(exc: RecordError, fallback: str) -> InvalidEvent:
    return InvalidEvent(_RULE_REASONS.get(exc.rule, fallback), exc.detail)


def _encodable(text: str) -> bool:
    """False for strings holding lone surrogates, which orjson (and so the API client) cannot encode."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _element_text(element: Any) -> Any:
    if element is None:
        raise InvalidEvent("missing_element")
    if type(element) is int:
        return str(element)  # numeric customer ids are common in producers' schemas
    return element  # validate_element_name refuses it


def _check_magnitude(number: int | Decimal) -> None:
    """[assume] the API's JSON number is a double: a value must be a positive finite one."""
    if type(number) is int:
        ok = number <= _MAX_INT_VALUE
    else:
        ok = _MIN_DECIMAL_VALUE <= number <= _MAX_DECIMAL_VALUE
    if not ok:
        raise InvalidEvent("invalid_value", "beyond a double's range")


def _id_text(eid: Any) -> str | None:
    """[assume] an integer id becomes a string; an unusable one is dropped rather than failing the event."""
    if type(eid) is int:
        return str(eid)
    if type(eid) is str and _encodable(eid):
        return eid
    return None


class Decoder:
    """Turns raw messages into Events under one EventsSettings, keeping a bounded cache of checked filters."""

    def __init__(self, config: EventsSettings) -> None:
        self._config = config
        m = config.mapping
        self._streams = dict(config.streams)
        self._default_stream = config.default_stream
        self._accept_undeclared = config.undeclared == "accept"
        self._max_bytes = config.max_event_bytes
        self._max_late = config.max_lateness_ms
        self._max_future = config.max_future_ms
        self._ts_format = m.timestamp_format
        paths: tuple[Path | None, ...] = tuple(
            split_path(p) if p else None for p in (m.element, m.value, m.timestamp, m.stream, m.id, m.filter)
        )
        self._paths = paths
        self._flat = all(p is None or len(p) == 1 for p in paths)
        self._keys = tuple(p[0] if p else None for p in paths)  # used when every path is one key
        self._value_path: Path = paths[1] or ("value",)
        self._dimension_names = tuple(sorted(m.dimensions))
        self._dimension_paths = tuple(split_path(m.dimensions[n]) for n in self._dimension_names)
        # The JSON number written for the value's key, to read its exact literal (see _exact_literal).
        key = re.escape(self._value_path[-1].encode())
        self._value_literal = re.compile(
            rb'"' + key + rb'"\s*:\s*(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)'
        )
        self._iso = m.timestamp_format in ("auto", "iso")  # a string timestamp is read as ISO 8601
        # Validated values by their text, so a repeated element or filter costs one dict lookup. The element
        # cache also hands out one string object per name, so the accumulator's cells share it.
        self._elements: dict[str, str] = {}
        self._filters: dict[bytes, CanonicalFilter] = {}
        self._fields, self._decode, self._general = self._hot_path()

    @property
    def config(self) -> EventsSettings:
        return self._config

    def decode(self, raw: bytes, record_ts_ms: int) -> Event:
        """Decode one message; `record_ts_ms` is its source timestamp (arrival). Raises InvalidEvent only."""
        return Event(*self.decode_fields(raw, record_ts_ms))

    @property
    def decode_fields(self) -> _Fields:
        """`decode` without building the Event, as a plain function (raw, record_ts_ms) → the Event's fields
        as a tuple, in its order. For the pipeline's per-event loop: no object, no method call per event."""
        return self._fields

    def decode_obj(self, obj: Any, record_ts_ms: int, size: int) -> Event:
        """Decode an already-parsed JSON value whose encoded form is `size` bytes (the sidecar's path).

        Floats are read through their shortest repr; a parser with `parse_float=Decimal` keeps every digit.
        """
        if size > self._max_bytes:
            raise InvalidEvent("too_large", f"{size} bytes > {self._max_bytes}")
        return Event(*self._decode(obj, record_ts_ms, None))

    # --- the hot path ---------------------------------------------------------------------------------
    def _hot_path(self) -> tuple[_Fields, Callable[[Any, int, Any], EventFields], _Fields]:
        """(decode_fields, _decode, the general path's decode_fields) as closures over the configuration:
        this runs once per event, and closure variables are read faster than attributes. The caches are
        bound as objects: cleared, never replaced.

        `decode_fields` first tries a typed parse (msgspec) that reads the mapped fields straight into a
        struct and keeps the filter as its raw JSON bytes, the filter cache's key: half the cost of building
        the dict (orjson) and re-encoding the filter for the key. It takes only messages it provably reads
        as the general path would — ASCII without escapes, no fields but the mapped ones, the common types
        — and hands everything else to the general path, so the answer never depends on the path
        (test_events_fuzz.py compares the two on arbitrary input)."""
        max_bytes = self._max_bytes
        max_late, max_future = self._max_late, self._max_future
        flat, paths = self._flat, self._paths
        k_element, k_value, k_ts, k_stream, k_id, k_filter = self._keys
        dimension_paths = self._dimension_paths
        default_stream = self._default_stream
        streams, elements, filters = self._streams, self._elements, self._filters
        iso, ts_format = self._iso, self._ts_format
        check_element, check_number, check_stream, check_filter = (
            self._element,
            self._number,
            self._undeclared,
            self._filter,
        )
        loads, dumps, json_error = orjson.loads, orjson.dumps, orjson.JSONDecodeError
        hourly = Granularity.HOURLY
        typed = _typed_parser(self._keys) if flat and not dimension_paths else None
        # Declared stream → {raw filter JSON → canonical filter}, for the typed path.
        raw_filters: dict[str, dict[bytes, CanonicalFilter]] = {name: {} for name in streams}

        def stream_and_time(
            stream: Any, ts: Any, record_ts_ms: int
        ) -> tuple[str, StreamSettings | None, int]:
            if stream is None:
                stream = default_stream
                if stream is None:
                    raise InvalidEvent("missing_stream")
            spec = streams.get(stream) if type(stream) is str else None
            if spec is None:
                check_stream(stream)
            if ts is None:
                return stream, spec, record_ts_ms
            if type(ts) is str and iso:
                ts_ms = iso_ms(ts)
                if not MIN_TIMESTAMP_MS <= ts_ms <= MAX_TIMESTAMP_MS:
                    raise InvalidEvent("invalid_timestamp", "outside the years 1 to 9999")
            else:
                ts_ms = timestamp_ms(ts, ts_format)
            if ts_ms < record_ts_ms - max_late:
                raise InvalidEvent("too_late", f"{record_ts_ms - ts_ms} ms before arrival")
            if ts_ms > record_ts_ms + max_future:
                raise InvalidEvent("future", f"{ts_ms - record_ts_ms} ms after arrival")
            return stream, spec, ts_ms

        def decode(obj: Any, record_ts_ms: int, raw: bytes | None) -> EventFields:
            """The general path: any JSON value, any mapping."""
            if not isinstance(obj, dict):
                raise InvalidEvent("not_object", type(obj).__name__)
            if flat:
                get = obj.get
                element, value, ts, stream, eid = (
                    get(k_element),
                    get(k_value),
                    get(k_ts),
                    get(k_stream),
                    get(k_id),
                )
                flt = get(k_filter) if k_filter is not None else None
            else:
                element, value, ts, stream, eid, flt = (lookup(obj, path) if path else None for path in paths)

            # Each field's common case is inline; the rules are records.py's.
            checked = elements.get(element) if type(element) is str else None
            element = checked if checked is not None else check_element(element)
            if type(value) is int and 0 < value < _INT_LIMIT:
                number: int | Decimal = value  # what parse_value and _check_magnitude would let through
            else:
                number = check_number(value, raw)
            stream, spec, ts_ms = stream_and_time(stream, ts, record_ts_ms)

            if dimension_paths:
                parts = [stream, flt, *(lookup(obj, path) for path in dimension_paths)]
            else:
                parts = [stream, flt]
            try:  # the filter cache's key: the JSON of the stream, the filter object and the mapped values
                key = dumps(parts, option=_PLAIN_JSON_ONLY)
            except TypeError:  # not plain JSON (decode_obj's arbitrary objects): validated, never cached
                key = None
            canon = filters.get(key) if key is not None else None
            if canon is None:
                canon = check_filter(stream, parts[1:], key)

            if eid is not None and (type(eid) is not str or not eid.isascii()):
                eid = _id_text(eid)
            return (stream, ts_ms, element, canon, number, eid, spec.granularity if spec else hourly)

        def general(raw: Any, record_ts_ms: int) -> EventFields:
            if type(raw) is not bytes:
                raw = _as_bytes(raw)
            if len(raw) > max_bytes:
                raise InvalidEvent("too_large", f"{len(raw)} bytes > {max_bytes}")
            try:
                obj = loads(raw)
            except json_error as exc:
                # orjson also refuses NaN/Infinity literals and numbers beyond a double (1e400)
                raise InvalidEvent("not_json", str(exc)[:120]) from None
            return decode(obj, record_ts_ms, raw)

        if typed is None:
            return general, decode, general

        def fields(raw: bytes, record_ts_ms: int) -> EventFields:
            # ASCII without backslashes: every string reads the same in both parsers, none can be invalid.
            if type(raw) is not bytes or len(raw) > max_bytes or not raw.isascii() or b"\\" in raw:
                return general(raw, record_ts_ms)
            try:
                ev = typed(raw)
            except Exception:  # malformed, another shape, an unknown field: the general path says what
                return general(raw, record_ts_ms)
            element, value, ts, stream, eid = ev.element, ev.value, ev.ts, ev.stream, ev.id
            if not (
                type(element) is str
                and type(value) is int
                and 0 < value < _INT64_LIMIT  # orjson reads larger integers as floats
                and (type(ts) is str or ts is None)
                and (type(stream) is str or stream is None)
                and (type(eid) is str or eid is None)
            ):
                return general(raw, record_ts_ms)
            key = bytes(ev.filter)
            named = stream if stream is not None else default_stream
            known = raw_filters.get(named) if named is not None else None
            canon = known.get(key) if known is not None else None
            if canon is None and key:
                # Parsed before any rule can reject the event: the typed parser only skipped over the
                # filter, so JSON that orjson refuses must reach the general path (not_json) first.
                try:
                    flt = loads(key)
                except json_error:
                    return general(raw, record_ts_ms)
            else:
                flt = None
            checked = elements.get(element)
            element = checked if checked is not None else check_element(element)
            stream, spec, ts_ms = stream_and_time(stream, ts, record_ts_ms)
            if canon is None:  # through the general path's cache; remembered by raw JSON when declared
                parts = [stream, flt]
                general_key = dumps(parts)
                canon = filters.get(general_key)
                if canon is None:  # (an empty filter is a valid, falsy canonical filter)
                    canon = check_filter(stream, parts[1:], general_key)
                if known is not None and len(key) <= _FILTER_CACHE_MAX_KEY:
                    if len(known) >= _FILTER_CACHE_SIZE:
                        known.clear()
                    known[key] = canon
            return (stream, ts_ms, element, canon, value, eid, spec.granularity if spec else hourly)

        return fields, decode, general

    def _element(self, element: Any) -> str:
        """Validate an element name not in the cache; cache it (a bounded number of names)."""
        if type(element) is not str:
            element = _element_text(element)
        try:
            validate_element_name(element)
        except RecordError as exc:
            raise _reject(exc, "invalid_element") from None
        if not element.isascii() and not _encodable(element):
            raise InvalidEvent("invalid_element", "not valid unicode")
        if type(element) is str:  # a str subclass (decode_obj) is passed on as it came, never cached
            if len(self._elements) >= _ELEMENT_CACHE_SIZE:
                self._elements.clear()  # O(1) per event; a working set larger than the cache just misses
            self._elements[element] = element
        return cast(str, element)

    def _number(self, value: Any, raw: bytes | None) -> int | Decimal:
        """The exact value of anything but a plain positive int."""
        if type(value) is not int:
            value = self._value_text(value, raw)
        try:
            number = parse_value(value)
        except RecordError as exc:
            raise _reject(exc, "invalid_value") from None
        if type(number) is not int or number > _MAX_INT_VALUE:
            _check_magnitude(number)
        return number

    def _value_text(self, value: Any, raw: bytes | None) -> Any:
        """What parse_value should read for a value that is not an int."""
        if value is None:
            raise InvalidEvent("missing_value")
        if type(value) is float and raw is not None:
            value = self._exact_literal(raw, value)
        elif type(value) is Decimal:
            value = str(value)  # parse_value reads numeric strings; "NaN"/"Infinity" fail there
        if type(value) is str and len(value) > _MAX_VALUE_CHARS:
            # a double's range needs fewer; turning 60,000 digits into an int would take 0.1 s
            raise InvalidEvent("invalid_value", f"numeric text longer than {_MAX_VALUE_CHARS} characters")
        return value

    def _exact_literal(self, raw: bytes, parsed: float) -> str | float:
        """The value's JSON literal as written, so 0.1 stays 0.1 and 2**70 an int; `parsed` when unsure.

        orjson hands out a float for any number with a fraction or exponent and for integers beyond 64 bits,
        losing digits past the 17th. Where `raw` has no backslash, every quote delimits a string and every
        key is spelled as written, so `"<key>": <number>` can only be a key and its number; a single match
        whose float equals the parsed one is the value's own literal (the only number under that key name).
        Otherwise the standard library re-reads the message keeping literals (slow, and rare).
        """
        if b"\\" not in raw:
            found = self._value_literal.findall(raw)
            if len(found) == 1 and float(found[0]) == parsed:
                return str(found[0].decode())
        try:
            literal = lookup(json.loads(raw, parse_float=str, parse_int=str), self._value_path)
            if isinstance(literal, str) and float(literal) == parsed:
                return literal
        except Exception:  # best effort only: orjson already accepted the message
            pass
        return parsed

    def _undeclared(self, stream: Any) -> None:
        if type(stream) is not str:
            raise InvalidEvent("invalid_stream", f"expected a string, not {type(stream).__name__}")
        try:
            validate_stream_name(stream)
        except RecordError as exc:
            raise _reject(exc, "invalid_stream") from None
        if not self._accept_undeclared:
            raise InvalidEvent("undeclared_stream", stream)

    # --- filters ---------------------------------------------------------------------------------------
    def _filter(self, stream: str, parts: list[Any], key: bytes | None) -> CanonicalFilter:
        """A filter missing from the cache: validate it, and cache it under `key` (when not None or huge)."""
        canon = self._build_filter(stream, parts)  # raises for an invalid filter: never cached
        if key is not None and len(key) <= _FILTER_CACHE_MAX_KEY:
            if len(self._filters) >= _FILTER_CACHE_SIZE:
                self._filters.clear()
            self._filters[key] = canon
        return canon

    def _build_filter(self, stream: str, parts: list[Any]) -> CanonicalFilter:
        flt, *mapped = parts
        spec = self._streams.get(stream)
        try:
            merged = dict(validate_filter(flt)) if flt is not None else {}
            for name, raw in zip(self._dimension_names, mapped, strict=True):
                values = dimension_values(raw)
                if values is not None:
                    merged[name] = merged[name] + values if name in merged else values
            if spec is not None:
                merged.update((name, list(values)) for name, values in spec.constant_filter)
            if merged:
                validate_filter(merged)  # again: merging may add dimensions
            canon = canonical_filter(merged)
        except RecordError as exc:
            raise _reject(exc, "invalid_filter") from None
        if spec is not None and (
            len(canon) != len(spec.dimensions) or any(name not in spec.dimensions for name, _ in canon)
        ):
            have = ", ".join(name for name, _ in canon) or "none"
            want = ", ".join(sorted(spec.dimensions)) or "none"
            raise InvalidEvent("dimension_mismatch", f"stream {stream} has {want}; event has {have}")
        try:
            orjson.dumps(canon)  # lone surrogates (only possible via decode_obj) would break the API client
        except TypeError:
            raise InvalidEvent("invalid_filter", "not valid unicode") from None
        return canon


def _as_bytes(raw: Any) -> bytes:
    """Kafka tombstones (None), str and buffer types, as bytes or a not_json rejection."""
    if isinstance(raw, bytearray | memoryview):
        return bytes(raw)
    if isinstance(raw, str):
        try:
            return raw.encode()
        except UnicodeEncodeError:
            raise InvalidEvent("not_json", "not valid unicode") from None
    raise InvalidEvent("not_json", "no value" if raw is None else f"not bytes: {type(raw).__name__}")
