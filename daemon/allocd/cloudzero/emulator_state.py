"""What the CloudZero API emulator remembers: streams and cells, faults and hooks, rate buckets, and an
optional SQLite copy of the streams.

Pure state, no HTTP: `emulator.py` validates a request with `records.parse_record`, asks `EmulatorState.check`
whether the records fit their stream, and only then applies them, so one bad record changes nothing.
Sums use Decimal arithmetic with enough precision to be exact.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from decimal import Context, Decimal
from signal import Signals
from typing import Any

import orjson

from allocd.cloudzero.records import (
    CanonicalFilter,
    Granularity,
    Op,
    Record,
    RecordError,
    bucket_start,
    filter_from_canonical,
    format_timestamp,
    format_value,
    parse_timestamp,
)
from allocd.errors import ConfigError

__all__ = [
    "ArmedHook",
    "Cell",
    "CellKey",
    "DeleteMatch",
    "EmulatorState",
    "Faults",
    "Hook",
    "RateLimiter",
    "SqliteStore",
    "Stream",
    "StreamNotFound",
    "TokenBucket",
    "decimal_text",
    "is_number",
]

# (bucket start, element_name, canonical filter): what sum and replace match on [assume the exact key].
CellKey = tuple[datetime, str, CanonicalFilter]

# Wide enough that adding values of 15 significant digits at any two exponents never rounds.
_EXACT = Context(prec=1000)


def decimal_text(value: Decimal) -> str:
    """A plain decimal string without exponent or trailing zeros: `250000000`, `0.1`."""
    text = format(value.normalize(_EXACT), "f")
    return "0" if text in ("-0", "0") else text


def filter_keys(flt: CanonicalFilter) -> tuple[str, ...]:
    """The dimension names of a canonical filter (already sorted). An empty filter is the empty set."""
    return tuple(k for k, _ in flt)


@dataclass(slots=True)
class Cell:
    value: Decimal
    deleted: bool = False


@dataclass(slots=True)
class Stream:
    """A stream's granularity and dimension set are fixed by its first write [doc]."""

    granularity: Granularity
    filter_keys: tuple[str, ...]
    deleted: bool = False
    cells: dict[CellKey, Cell] = field(default_factory=dict)

    def live_cells(self) -> list[tuple[CellKey, Cell]]:
        return sorted((kv for kv in self.cells.items() if not kv[1].deleted), key=lambda kv: _sort_key(kv[0]))


@dataclass(frozen=True, slots=True)
class DeleteMatch:
    """One delete record: bucket required; element and filter are wildcards when None [assume]."""

    bucket: datetime
    element_name: str | None
    filter: CanonicalFilter | None

    def matches(self, key: CellKey) -> bool:
        return (self.element_name is None or self.element_name == key[1]) and (
            self.filter is None or self.filter == key[2]
        )


class StreamNotFound(LookupError):
    """delete on a stream that does not exist (or was deleted) [assume 404]."""


def _sort_key(key: CellKey) -> tuple[datetime, str, bytes]:
    return (key[0], key[1], orjson.dumps(key[2]))


def incoming_value(record: Record) -> Decimal:
    """The record's value as the API stores it: rounded to 15 significant digits [doc]."""
    assert record.value is not None
    return Decimal(format_value(record.value))


class EmulatorState:
    """All streams. `store` (optional) receives every change, write-through, so totals survive a restart."""

    def __init__(self, store: SqliteStore | None = None) -> None:
        self.store = store
        self.streams: dict[str, Stream] = store.load() if store else {}

    def live_stream(self, name: str) -> Stream | None:
        stream = self.streams.get(name)
        return stream if stream is not None and not stream.deleted else None

    # --- validation against the stream -----------------------------------------------------------------
    def check(self, name: str, op: Op, records: Sequence[Record], filter_given: Sequence[bool]) -> None:
        """Raise RecordError (with the record's index) or StreamNotFound if the records do not fit the stream.

        A new (or deleted) stream takes its granularity and filter key set from the first record [doc].
        A delete record's filter is checked only when it was given; omitted, it is a wildcard [assume].
        """
        stream = self.live_stream(name)
        if op is Op.DELETE and stream is None:
            raise StreamNotFound(name)
        granularity = stream.granularity if stream else records[0].granularity
        keys = stream.filter_keys if stream else filter_keys(records[0].filter)
        for i, rec in enumerate(records):
            if rec.granularity is not granularity:
                raise RecordError("granularity_differs", f"stream is {granularity}", index=i)
            if filter_given[i] and filter_keys(rec.filter) != keys:
                raise RecordError("filter_keys_differ", f"stream has {list(keys)}", index=i)

    # --- writes ----------------------------------------------------------------------------------------
    def apply(self, name: str, op: Op, records: Sequence[Record], filter_given: Sequence[bool]) -> int:
        """Apply records that passed `check` (with the same `filter_given`); return how many cells changed."""
        if op is Op.DELETE:
            return self._delete(name, records, filter_given)
        stream = self._stream_for_write(name, records[0])
        if op is Op.SUM:
            changed = [self._add(stream, _cell_key(rec), incoming_value(rec)) for rec in records]
        else:
            # [assume] records with the same key in one replace request are summed first.
            batch: dict[CellKey, Decimal] = {}
            for rec in records:
                key = _cell_key(rec)
                batch[key] = _EXACT.add(batch.get(key, Decimal(0)), incoming_value(rec))
            for key, value in batch.items():
                stream.cells[key] = Cell(value)
            changed = list(batch)
        self._save(name, stream, changed)
        return len(set(changed))

    def _stream_for_write(self, name: str, first: Record) -> Stream:
        stream = self.live_stream(name)
        if stream is None:
            # [assume] a write to a deleted stream recreates it fresh: new dimension set, no old cells.
            assert first.granularity is not None
            stream = Stream(first.granularity, filter_keys(first.filter))
            self.streams[name] = stream
            if self.store:
                self.store.drop_stream(name)
        return stream

    @staticmethod
    def _add(stream: Stream, key: CellKey, value: Decimal) -> CellKey:
        cell = stream.cells.get(key)
        # [assume] a sum on a soft-deleted key starts again from 0.
        base = cell.value if cell is not None and not cell.deleted else Decimal(0)
        stream.cells[key] = Cell(_EXACT.add(base, value))
        return key

    def _delete(self, name: str, records: Sequence[Record], filter_given: Sequence[bool]) -> int:
        stream = self.live_stream(name)
        assert stream is not None
        by_bucket: dict[datetime, list[DeleteMatch]] = {}
        for rec, given in zip(records, filter_given, strict=True):
            assert rec.granularity is not None
            flt = rec.filter if given else None
            match = DeleteMatch(bucket_start(rec.timestamp, rec.granularity), rec.element_name, flt)
            by_bucket.setdefault(match.bucket, []).append(match)
        changed = [
            key
            for key, cell in stream.cells.items()
            if not cell.deleted and any(m.matches(key) for m in by_bucket.get(key[0], ()))
        ]
        for key in changed:
            stream.cells[key].deleted = True  # soft delete: kept, hidden [doc]
        self._save(name, stream, changed)
        return len(changed)

    def delete_stream(self, name: str) -> bool:
        """Mark a live stream deleted [doc]; False when there is none."""
        stream = self.live_stream(name)
        if stream is None:
            return False
        stream.deleted = True
        self._save(name, stream, [])
        return True

    def clear(self) -> None:
        self.streams.clear()
        if self.store:
            self.store.clear()

    def _save(self, name: str, stream: Stream, keys: Iterable[CellKey]) -> None:
        if self.store:
            self.store.save(name, stream, keys)

    # --- reads -----------------------------------------------------------------------------------------
    def live_records(self, name: str) -> list[dict[str, object]] | None:
        """Live cells as API records (the read-back shape [assume]); None when the stream is not live."""
        stream = self.live_stream(name)
        if stream is None:
            return None
        return [_api_record(stream, key, cell) for key, cell in stream.live_cells()]

    def totals(self, name: str) -> dict[tuple[str, str, CanonicalFilter], Decimal]:
        stream = self.live_stream(name)
        if stream is None:
            return {}
        return {(format_timestamp(k[0]), k[1], k[2]): c.value for k, c in stream.live_cells()}

    def snapshot(self, only: str | None = None) -> dict[str, object]:
        """Every stream with every cell, deleted ones flagged: the admin view."""
        out: dict[str, object] = {}
        for name, stream in sorted(self.streams.items()):
            if only is not None and name != only:
                continue
            cells = sorted(stream.cells.items(), key=lambda kv: _sort_key(kv[0]))
            out[name] = {
                "granularity": stream.granularity.value,
                "filter_keys": list(stream.filter_keys),
                "deleted": stream.deleted,
                "cells": [
                    {
                        "timestamp": format_timestamp(key[0]),
                        "element_name": key[1],
                        "filter": filter_from_canonical(key[2]),
                        "value": decimal_text(cell.value),
                        "deleted": cell.deleted,
                    }
                    for key, cell in cells
                ],
            }
        return {"streams": out}


def _cell_key(rec: Record) -> CellKey:
    bucket, element, flt = rec.key
    assert element is not None
    return (bucket, element, flt)


def _api_record(stream: Stream, key: CellKey, cell: Cell) -> dict[str, object]:
    out: dict[str, object] = {
        "timestamp": format_timestamp(key[0]),
        "granularity": stream.granularity.value,
        "element_name": key[1],
    }
    if key[2]:
        out["filter"] = filter_from_canonical(key[2])
    out["value"] = decimal_text(cell.value)
    return out


# --- faults and hooks (set at start or at run time through the admin API) ---------------------------
_FRACTIONS = ("error_503", "error_429", "reset", "hang")
_HOOK_ACTIONS = ("hang", "signal", "fail503")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _reject_unknown(raw: Any, cls: type, what: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(what, "must be a JSON object")
    unknown = sorted(set(raw) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(what, f"unknown fields {unknown}")
    return raw


@dataclass(frozen=True, slots=True)
class Faults:
    """Injected faults. Fractions are probabilities per write request, drawn from the seeded RNG.

    `latency` delays every write (seconds); `reset` closes the connection before reading the body (nothing
    applied); `hang` applies the write and never answers; `retry_after` (seconds, None = no header) is sent
    with every 429 and 503.
    """

    latency: float = 0.0
    error_503: float = 0.0
    error_429: float = 0.0
    retry_after: float | None = None
    reset: float = 0.0
    hang: float = 0.0

    def __post_init__(self) -> None:
        for name in _FRACTIONS:
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value <= 1:
                raise ConfigError(name, f"must be a fraction between 0 and 1, got {value!r}")
        if not is_number(self.latency) or self.latency < 0:
            raise ConfigError("latency", f"must be seconds >= 0, got {self.latency!r}")
        if self.retry_after is not None and (not is_number(self.retry_after) or self.retry_after < 0):
            raise ConfigError("retry_after", f"must be seconds >= 0 or null, got {self.retry_after!r}")

    @classmethod
    def from_json(cls, raw: Any) -> Faults:
        """Missing fields take their defaults (off); unknown fields are an error."""
        return cls(**_reject_unknown(raw, cls, "faults"))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Hook:
    """A crash point: when the `after_request`-th applied write (of `op`, if given) since the hook was set
    has been applied, do `action` instead of answering normally. Fires once.

    - `hang`: never answer (until the client leaves or the server stops).
    - `signal`: send `signal` to `pid`, then hang (the daemon is dying anyway).
    - `fail503`: answer 503 although the write was applied (an ambiguous failure).
    With `apply` false the hook fires *instead of* applying its request (the N-th valid write): a crash
    point after requests 1..N-1 were answered, with nothing of request N applied. With `key`, only
    requests made with that API key count (tests give each daemon its own key).
    """

    after_request: int
    action: str
    pid: int | None = None
    signal: str = "SIGTERM"
    op: Op | None = None
    apply: bool = True
    key: str | None = None  # count only requests made with this API key (one daemon among several)

    def __post_init__(self) -> None:
        if not isinstance(self.after_request, int) or isinstance(self.after_request, bool):
            raise ConfigError("after_request", "must be an integer >= 1")
        if self.after_request < 1:
            raise ConfigError("after_request", "must be an integer >= 1")
        if self.action not in _HOOK_ACTIONS:
            raise ConfigError("action", f"must be one of {list(_HOOK_ACTIONS)}")
        if self.action == "signal" and (not isinstance(self.pid, int) or self.pid <= 0):
            raise ConfigError("pid", "a positive process id is required for action 'signal'")
        self.signum()  # validates the name

    def signum(self) -> Signals:
        name = str(self.signal).upper()
        try:
            return Signals[name if name.startswith("SIG") else f"SIG{name}"]
        except KeyError:
            raise ConfigError("signal", f"unknown signal {self.signal!r}") from None

    @classmethod
    def from_json(cls, raw: Any) -> Hook:
        data = dict(_reject_unknown(raw, cls, "hook"))
        if data.get("op") is not None:
            try:
                data["op"] = Op(data["op"])
            except ValueError:
                raise ConfigError("op", f"must be one of {[o.value for o in Op]}") from None
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["op"] = self.op.value if self.op else None
        out["key"] = "****" if self.key else None  # keys never leave the emulator
        return out


@dataclass(slots=True)
class ArmedHook:
    """A hook as set, with how many matching writes it has counted and the request it fired on."""

    hook: Hook
    seen: int = 0
    fired_on: int | None = None


# --- rate limit ----------------------------------------------------------------------------------------
class TokenBucket:
    """Refills `rate` tokens a second up to `burst`; starts full."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, n: float, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if n > self.tokens:
            return False
        self.tokens -= n
        return True


class RateLimiter:
    """One token bucket per API key, counted in records [doc rate and burst; per key is assume]."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, records: int) -> bool:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(records, now)

    def clear(self) -> None:
        self._buckets.clear()


# --- persistence ---------------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    name TEXT PRIMARY KEY, granularity TEXT NOT NULL, filter_keys TEXT NOT NULL, deleted INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    stream TEXT NOT NULL, ts TEXT NOT NULL, element TEXT NOT NULL, filter TEXT NOT NULL,
    value TEXT NOT NULL, deleted INTEGER NOT NULL, PRIMARY KEY (stream, ts, element, filter));
"""


class SqliteStore:
    """Streams and cells in a SQLite file (stdlib sqlite3), written through on every applied request."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path)
        self._db.executescript(_SCHEMA)

    def load(self) -> dict[str, Stream]:
        streams: dict[str, Stream] = {}
        for name, gran, keys, deleted in self._db.execute("SELECT * FROM streams"):
            streams[name] = Stream(Granularity(gran), tuple(orjson.loads(keys)), bool(deleted))
        for name, ts, element, flt, value, deleted in self._db.execute("SELECT * FROM cells"):
            canon = tuple((k, tuple(v)) for k, v in orjson.loads(flt))
            streams[name].cells[(parse_timestamp(ts), element, canon)] = Cell(Decimal(value), bool(deleted))
        return streams

    def save(self, name: str, stream: Stream, keys: Iterable[CellKey]) -> None:
        rows = [
            (name, format_timestamp(k[0]), k[1], orjson.dumps(k[2]).decode(), str(c.value), int(c.deleted))
            for k in set(keys)
            for c in (stream.cells[k],)
        ]
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO streams VALUES (?, ?, ?, ?)",
                (
                    name,
                    stream.granularity.value,
                    orjson.dumps(stream.filter_keys).decode(),
                    int(stream.deleted),
                ),
            )
            self._db.executemany("INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, ?, ?)", rows)

    def drop_stream(self, name: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM cells WHERE stream = ?", (name,))
            self._db.execute("DELETE FROM streams WHERE name = ?", (name,))

    def clear(self) -> None:
        with self._db:
            self._db.execute("DELETE FROM cells")
            self._db.execute("DELETE FROM streams")

    def close(self) -> None:
        self._db.close()
