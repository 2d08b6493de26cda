"""Window assignment and the accumulator: cells (stream, window, element, filter) → exact sums.

Pure code, no I/O: times are epoch milliseconds, positions are (source, partition) → offset. Each window
remembers, per partition, the lowest offset of an event it holds — that is what keeps the committed position
from passing an undelivered event (DESIGN.md §2).
"""

from __future__ import annotations

import calendar
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from allocd.cloudzero.records import CanonicalFilter, Granularity
from allocd.errors import InvalidEvent

__all__ = [
    "CELL_BYTES_ESTIMATE",
    "TP",
    "Accumulator",
    "Added",
    "CellKey",
    "Decode",
    "RawRecord",
    "SkipRule",
    "Snapshot",
    "WindowKey",
    "WindowState",
    "window_bounds",
]

TP = tuple[str, int]  # (topic or source name, partition)
WindowKey = tuple[str, int]  # (stream, window start ms)
CellKey = tuple[str, int, str, CanonicalFilter]  # (stream, window start ms, element, filter)

_HOUR_MS = 3_600_000
_DAY_MS = 86_400_000


def window_bounds(ts_ms: int, granularity: Granularity, override_ms: int = 0) -> tuple[int, int]:
    """[start, end) of the UTC-aligned window holding `ts_ms`. `override_ms` (tests only) replaces the
    granularity's size with a fixed one, so windows close in seconds instead of hours."""
    if override_ms:
        start = ts_ms - ts_ms % override_ms
        return start, start + override_ms
    if granularity is Granularity.HOURLY:
        start = ts_ms - ts_ms % _HOUR_MS
        return start, start + _HOUR_MS
    if granularity is Granularity.DAILY:
        start = ts_ms - ts_ms % _DAY_MS
        return start, start + _DAY_MS
    d = datetime.fromtimestamp(ts_ms / 1000, UTC)
    start_dt = datetime(d.year, d.month, 1, tzinfo=UTC)
    start = calendar.timegm(start_dt.timetuple()) * 1000
    return start, start + calendar.monthrange(d.year, d.month)[1] * _DAY_MS


@dataclass(slots=True)
class WindowState:
    """One open window: its cells and, per partition, the lowest offset of an event in it.

    Cells are stored by filter, then element (`rows[filter][element]`): a window holds few distinct filters
    and many elements, so a cell costs one dict slot and no key tuple, and an add hashes the filter once.
    `cells` is the flat view, (element, filter) → sum.
    """

    end_ms: int
    granularity: Granularity
    opened_at: float = field(default=0.0, compare=False)  # wall-clock s of its first event (max interval)
    rows: dict[CanonicalFilter, dict[str, int | Decimal]] = field(default_factory=dict)
    min_offsets: dict[TP, int] = field(default_factory=dict)
    cell_count: int = 0

    @property
    def cells(self) -> dict[tuple[str, CanonicalFilter], int | Decimal]:
        """(element, filter) → sum, built on each call (for flush cycles and tests, not per event)."""
        return {(element, flt): value for flt, row in self.rows.items() for element, value in row.items()}


@dataclass(slots=True)
class Snapshot:
    """Whole windows taken out of the accumulator for one flush cycle.

    `boundary[tp]` is the next offset the pipeline would have read when the snapshot was cut: the cells
    hold every undelivered event of these windows below it. `min_offsets[tp]` is the lowest offset held.
    """

    windows: dict[WindowKey, WindowState]
    boundary: dict[TP, int]
    trigger: str
    min_offsets: dict[TP, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for w in self.windows.values():
            for tp, off in w.min_offsets.items():
                if off < self.min_offsets.get(tp, sys.maxsize):
                    self.min_offsets[tp] = off

    @property
    def cell_count(self) -> int:
        return sum(w.cell_count for w in self.windows.values())

    def cells(self) -> list[tuple[CellKey, Granularity, int | Decimal]]:
        out = []
        for (stream, start), w in self.windows.items():
            for flt, row in w.rows.items():
                for element, value in row.items():
                    out.append(((stream, start, element, flt), w.granularity, value))
        return out


class SkipRule(Protocol):
    """The journal's replay rule for one partition (journal.PartitionState): was this event delivered?"""

    def should_skip(self, offset: int, window: WindowKey, cell: CellKey) -> bool: ...


class RawRecord(Protocol):
    """What the accumulator reads of a source's record (sources.base.Record has this shape)."""

    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...


R = TypeVar("R", bound=RawRecord)

# decode(raw, record timestamp) → (stream, ts ms, element, filter, value, id, granularity), as
# events.Decoder.decode_fields returns them; raises InvalidEvent.
Decode = Callable[[Any, int], tuple[str, int, str, CanonicalFilter, int | Decimal, str | None, Granularity]]


@dataclass(slots=True)
class Added(Generic[R]):
    """What one `add_batch` did: the next offset to expect, the records refused (with reason and detail),
    and per-stream counts of accepted and late events."""

    next_offset: int
    rejected: list[tuple[R, str, str]] = field(default_factory=list)
    accepted: dict[str, int] = field(default_factory=dict)
    late: dict[str, int] = field(default_factory=dict)
    skipped: int = 0


class _Run:
    """The window a stream's previous event fell in, within one `add_batch`: events come nearly in time
    order, so most hit it and cost no window lookup."""

    __slots__ = ("counted", "end", "key", "late", "rows", "start", "window")

    def __init__(self, start: int, end: int, key: WindowKey) -> None:
        self.start = start
        self.end = end
        self.key = key
        self.window: WindowState | None = None
        self.rows: dict[CanonicalFilter, dict[str, int | Decimal]] | None = None  # once an event counted
        self.late = False
        self.counted = 0


# Rough bytes per cell for the memory cap: dict slot, element string, value. The high-cardinality benchmark
# (tests/bench, 1,000,000 cells) measures 135 B when every cell has its own element and 86 B when four
# filters share each element's string; 200 leaves room for long element names and Decimal values (104 B).
CELL_BYTES_ESTIMATE = 200


class Accumulator:
    """Sums event values into cells. Not thread-safe; the pipeline calls it from one task.

    `reopened` holds windows that were already taken (delivered) when a late event opened them again: every
    event of such a window is late — a delta — until the window is taken once more.
    """

    def __init__(self, override_ms: int = 0, clock: Callable[[], float] = time.time) -> None:
        self.override_ms = override_ms
        self.clock = clock
        self.windows: dict[WindowKey, WindowState] = {}
        self.reopened: set[WindowKey] = set()

    @property
    def cell_count(self) -> int:
        """Open cells: summed over the open windows (a handful), so adding never has to count."""
        return sum(w.cell_count for w in self.windows.values())

    def add_batch(
        self,
        tp: TP,
        records: Sequence[R],
        decode: Decode,
        *,
        expect: int = 0,
        skip: SkipRule | None = None,
        horizon_ms: float = -math.inf,
        grace_ms: int = 0,
    ) -> Added[R]:
        """Decode one partition's records (in offset order) and add each into its cell: the one path every
        event takes. Records below `expect` are a re-fetch and ignored. An event `skip` says was delivered is
        skipped; one that `decode` refuses is returned in `rejected`. A window is late when it is not open
        and its end plus `grace_ms` is at or before `horizon_ms` (what the clock and the source have passed).
        The first counted event of a window notes the partition's offset in it (offsets rise, so the lowest).

        This loop runs once per event: its state lives in locals and `_Run`s, and a cell add is a dict
        lookup per filter and per element (no call, no key tuple)."""
        override_ms = self.override_ms
        windows = self.windows
        reopened = self.reopened
        out: Added[R] = Added(expect)
        rejected = out.rejected
        skipped = 0
        runs: list[_Run] = []
        current: dict[str, _Run] = {}
        for rec in records:
            offset = rec.offset
            if offset < expect:
                continue  # a re-fetch of what was processed
            expect = offset + 1
            try:
                stream, ts, element, flt, value, _, granularity = decode(rec.value, rec.timestamp)
            except InvalidEvent as exc:
                rejected.append((rec, exc.reason, exc.detail))
                continue
            run = current.get(stream)
            if run is None or not run.start <= ts < run.end:
                start, end = window_bounds(ts, granularity, override_ms)
                run = current[stream] = _Run(start, end, (stream, start))
                runs.append(run)
            if skip is not None and skip.should_skip(offset, run.key, (stream, run.start, element, flt)):
                skipped += 1
                continue
            rows = run.rows
            if rows is None:  # the window's first counted event in this batch: is it late?
                key = run.key
                run.late = key in reopened or (run.end + grace_ms <= horizon_ms and key not in windows)
                if run.late:
                    reopened.add(key)  # every event of a re-opened window is late, not only its first
                window = run.window = self.window(key, run.end, granularity)
                if tp not in window.min_offsets:
                    window.min_offsets[tp] = offset
                rows = run.rows = window.rows
            run.counted += 1
            row = rows.get(flt)
            if row is None:
                row = rows[flt] = {}
            old = row.get(element)
            if old is None:
                row[element] = value
                run.window.cell_count += 1  # type: ignore[union-attr]  # set with rows
            else:
                row[element] = old + value
        out.next_offset = expect
        out.skipped = skipped
        accepted, late = out.accepted, out.late
        for run in runs:
            stream, counted = run.key[0], run.counted
            accepted[stream] = accepted.get(stream, 0) + counted
            if run.late:
                late[stream] = late.get(stream, 0) + counted
        return out

    def add(
        self,
        stream: str,
        granularity: Granularity,
        ts_ms: int,
        element: str,
        flt: CanonicalFilter,
        value: int | Decimal,
        tp: TP,
        offset: int,
    ) -> WindowKey:
        """One decoded event, through `add_batch` (for tests and tools: the pipeline adds whole batches)."""
        fields = (stream, ts_ms, element, flt, value, None, granularity)
        self.add_batch(tp, [_Decoded(offset, ts_ms)], lambda _raw, _ts: fields)
        return (stream, window_bounds(ts_ms, granularity, self.override_ms)[0])

    def window(self, wk: WindowKey, end_ms: int, granularity: Granularity) -> WindowState:
        """The open window `wk`, created when missing."""
        w = self.windows.get(wk)
        if w is None:
            w = self.windows[wk] = WindowState(end_ms, granularity, self.clock())
        return w

    def closed(self, now_ms: int, grace_ms: int) -> list[WindowKey]:
        """Windows whose end plus grace has passed on the wall clock — also when no event came since."""
        return [wk for wk, w in self.windows.items() if w.end_ms + grace_ms <= now_ms]

    def take(self, keys: list[WindowKey], boundary: dict[TP, int], trigger: str) -> Snapshot:
        """Remove whole windows and return them as a snapshot (cycles never take part of a window)."""
        taken = {wk: self.windows.pop(wk) for wk in keys}
        self.reopened.difference_update(taken)
        return Snapshot(taken, dict(boundary), trigger)

    def take_all(self, boundary: dict[TP, int], trigger: str) -> Snapshot:
        return self.take(list(self.windows), boundary, trigger)

    def oldest_opened(self) -> float:
        """When the longest-held window received its first event (+inf when empty)."""
        return min((w.opened_at for w in self.windows.values()), default=math.inf)

    def min_offsets(self) -> dict[TP, int]:
        out: dict[TP, int] = {}
        for w in self.windows.values():
            for tp, off in w.min_offsets.items():
                if off < out.get(tp, sys.maxsize):
                    out[tp] = off
        return out

    def memory_estimate(self) -> int:
        return self.cell_count * CELL_BYTES_ESTIMATE

    def clear(self) -> None:
        self.windows.clear()
        self.reopened.clear()

    def __len__(self) -> int:
        return self.cell_count


class _Decoded(NamedTuple):
    """A record whose fields are already decoded (`Accumulator.add`)."""

    offset: int
    timestamp: int
    value: bytes | None = None
