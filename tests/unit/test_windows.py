"""Window assignment and the accumulator, with plain numbers: UTC alignment, exact sums, whole windows."""

from __future__ import annotations

import calendar
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocd.cloudzero.records import Granularity, bucket_start, window_end
from allocd.errors import InvalidEvent
from allocd.windows import CELL_BYTES_ESTIMATE, Accumulator, Snapshot, window_bounds

PROPS = settings(max_examples=200, deadline=None)
HOUR = 3_600_000
DAY = 86_400_000
TP0 = ("events", 0)
TP1 = ("events", 1)
NOFILTER: tuple = ()
FLT = (("custom:feature", ("billing",)),)


def ms(*args: int) -> int:
    """Epoch milliseconds of a UTC datetime."""
    return calendar.timegm(datetime(*args, tzinfo=UTC).timetuple()) * 1000


# --- window_bounds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ts", "granularity", "expected"),
    [
        (ms(2020, 1, 25, 13, 45, 10), Granularity.HOURLY, (ms(2020, 1, 25, 13), ms(2020, 1, 25, 14))),
        (ms(2020, 1, 25, 13), Granularity.HOURLY, (ms(2020, 1, 25, 13), ms(2020, 1, 25, 14))),
        (ms(2020, 1, 25, 14) - 1, Granularity.HOURLY, (ms(2020, 1, 25, 13), ms(2020, 1, 25, 14))),
        (ms(2020, 1, 25, 23, 59), Granularity.DAILY, (ms(2020, 1, 25), ms(2020, 1, 26))),
        (ms(2020, 1, 25), Granularity.DAILY, (ms(2020, 1, 25), ms(2020, 1, 26))),
        (ms(2020, 2, 29, 12), Granularity.MONTHLY, (ms(2020, 2, 1), ms(2020, 3, 1))),  # leap year
        (ms(2021, 2, 28, 23, 59, 59), Granularity.MONTHLY, (ms(2021, 2, 1), ms(2021, 3, 1))),
        (ms(2021, 12, 31, 23, 59, 59), Granularity.MONTHLY, (ms(2021, 12, 1), ms(2022, 1, 1))),
        (ms(2021, 4, 1), Granularity.MONTHLY, (ms(2021, 4, 1), ms(2021, 5, 1))),  # 30-day month
        (ms(2021, 5, 1) - 1, Granularity.MONTHLY, (ms(2021, 4, 1), ms(2021, 5, 1))),
        (0, Granularity.HOURLY, (0, HOUR)),
        (-1, Granularity.HOURLY, (-HOUR, 0)),  # before the epoch: still floor-aligned
        (-1, Granularity.MONTHLY, (ms(1969, 12, 1), 0)),
    ],
)
def test_window_bounds_are_utc_aligned(ts: int, granularity: Granularity, expected: tuple[int, int]) -> None:
    assert window_bounds(ts, granularity) == expected


def test_override_replaces_every_granularity_size() -> None:
    for granularity in Granularity:
        assert window_bounds(25_001, granularity, override_ms=10_000) == (20_000, 30_000)
        assert window_bounds(20_000, granularity, override_ms=10_000) == (20_000, 30_000)
        assert window_bounds(19_999, granularity, override_ms=10_000) == (10_000, 20_000)


timestamps = st.integers(min_value=ms(1971, 1, 1), max_value=ms(2200, 12, 31, 23, 59, 59))


@PROPS
@given(ts=timestamps, granularity=st.sampled_from(list(Granularity)))
def test_window_holds_the_time_and_windows_tile(ts: int, granularity: Granularity) -> None:
    start, end = window_bounds(ts, granularity)
    assert start <= ts < end
    assert window_bounds(start, granularity) == (start, end)
    assert window_bounds(end - 1, granularity) == (start, end)
    assert window_bounds(end, granularity)[0] == end  # the next window starts where this one ends
    assert window_bounds(start - 1, granularity)[1] == start


@PROPS
@given(ts=timestamps, granularity=st.sampled_from(list(Granularity)))
def test_window_bounds_agree_with_the_record_buckets(ts: int, granularity: Granularity) -> None:
    """windows.py and records.py each compute buckets; a record's timestamp must be its window's start."""
    dt = datetime.fromtimestamp(ts // 1000, UTC).replace(microsecond=(ts % 1000) * 1000)
    b_start = bucket_start(dt, granularity)
    b_end = window_end(b_start, granularity)
    expected = (calendar.timegm(b_start.timetuple()) * 1000, calendar.timegm(b_end.timetuple()) * 1000)
    assert window_bounds(ts, granularity) == expected


# --- the accumulator -------------------------------------------------------------------------------------
def test_add_sums_exactly_per_cell_and_returns_the_window() -> None:
    acc = Accumulator()
    t = ms(2020, 1, 25, 13, 5)
    assert acc.add("s", Granularity.HOURLY, t, "hooli", FLT, 250, TP0, 10) == ("s", ms(2020, 1, 25, 13))
    acc.add("s", Granularity.HOURLY, t + 60_000, "hooli", FLT, 750, TP0, 11)
    acc.add("s", Granularity.HOURLY, t, "hooli", NOFILTER, 1, TP0, 12)  # another filter: another cell
    acc.add("s", Granularity.HOURLY, t, "acme", FLT, Decimal("0.1"), TP1, 3)
    acc.add("s", Granularity.HOURLY, t, "acme", FLT, Decimal("0.2"), TP1, 4)
    acc.add("s", Granularity.HOURLY, t + HOUR, "hooli", FLT, 5, TP0, 13)  # the next hour
    acc.add("other", Granularity.HOURLY, t, "hooli", FLT, 7, TP0, 14)  # another stream
    w = acc.windows[("s", ms(2020, 1, 25, 13))]
    assert w.cells == {("hooli", FLT): 1000, ("hooli", NOFILTER): 1, ("acme", FLT): Decimal("0.3")}
    assert w.end_ms == ms(2020, 1, 25, 14)
    assert w.granularity is Granularity.HOURLY
    assert acc.windows[("s", ms(2020, 1, 25, 14))].cells == {("hooli", FLT): 5}
    assert acc.windows[("other", ms(2020, 1, 25, 13))].cells == {("hooli", FLT): 7}
    assert len(acc) == acc.cell_count == 5
    assert acc.memory_estimate() == 5 * CELL_BYTES_ESTIMATE


def test_int_and_decimal_values_mix_without_float_drift() -> None:
    acc = Accumulator()
    for _ in range(10):
        acc.add("s", Granularity.DAILY, 0, "e", NOFILTER, Decimal("0.1"), TP0, 0)
    acc.add("s", Granularity.DAILY, 0, "e", NOFILTER, 2, TP0, 1)
    value = acc.windows[("s", 0)].cells[("e", NOFILTER)]
    assert value == Decimal("3.0")
    assert isinstance(value, Decimal)


def test_min_offsets_hold_the_lowest_offset_per_partition_per_window() -> None:
    acc = Accumulator()
    acc.add("s", Granularity.HOURLY, 10, "a", NOFILTER, 1, TP0, 100)
    acc.add("s", Granularity.HOURLY, 20, "b", NOFILTER, 1, TP0, 101)
    acc.add("s", Granularity.HOURLY, 30, "a", NOFILTER, 1, TP1, 7)
    acc.add("s", Granularity.HOURLY, HOUR + 1, "a", NOFILTER, 1, TP0, 102)
    assert acc.windows[("s", 0)].min_offsets == {TP0: 100, TP1: 7}
    assert acc.windows[("s", HOUR)].min_offsets == {TP0: 102}
    assert acc.min_offsets() == {TP0: 100, TP1: 7}
    acc.take([("s", 0)], {TP0: 103, TP1: 8}, "closed")
    assert acc.min_offsets() == {TP0: 102}  # what is left holds the committed position back


class Rec(NamedTuple):
    """A source record as the accumulator reads it."""

    offset: int
    timestamp: int
    value: bytes | None


def test_add_is_add_batch_of_one_decoded_record() -> None:
    """`add` (tests, tools) and the pipeline's `add_batch` are one path: same windows, offsets and counts."""
    a, b = Accumulator(), Accumulator()
    ts = ms(2021, 3, 3, 3)
    a.add("s", Granularity.HOURLY, ts, "e", FLT, 3, TP0, 5)
    a.add("s", Granularity.HOURLY, ts + 1, "e", FLT, 4, TP0, 6)
    records = [Rec(5, ts, b"x"), Rec(6, ts + 1, b"y")]
    fields = {
        b"x": ("s", ts, "e", FLT, 3, None, Granularity.HOURLY),
        b"y": ("s", ts + 1, "e", FLT, 4, None, Granularity.HOURLY),
    }
    added = b.add_batch(TP0, records, lambda raw, _ts: fields[raw])
    assert a.windows == b.windows
    assert len(a) == len(b) == 1
    assert (added.next_offset, added.accepted, added.late, added.skipped) == (7, {"s": 2}, {}, 0)


def test_add_batch_skips_refetched_and_delivered_records_and_returns_rejections() -> None:
    acc = Accumulator()

    class Delivered:
        def should_skip(self, offset: int, window: tuple[str, int], cell: object) -> bool:
            return offset == 11

    def decode(raw: bytes | None, ts: int) -> tuple:
        if raw == b"bad":
            raise InvalidEvent("not_json", "no")
        return ("s", ts, raw.decode(), NOFILTER, 1, None, Granularity.HOURLY)

    recs = [Rec(9, 0, b"a"), Rec(10, 0, b"a"), Rec(11, 0, b"b"), Rec(12, 0, b"bad"), Rec(13, HOUR, b"c")]
    added = acc.add_batch(TP0, recs, decode, expect=10, skip=Delivered())
    assert added.next_offset == 14
    assert [(r.offset, reason) for r, reason, _ in added.rejected] == [(12, "not_json")]
    assert added.skipped == 1 and added.accepted == {"s": 2}
    assert acc.windows[("s", 0)].cells == {("a", NOFILTER): 1}  # offset 9 was below `expect`
    assert acc.windows[("s", 0)].min_offsets == {TP0: 10}


def test_add_batch_counts_a_delivered_window_as_late_until_taken_again() -> None:
    acc = Accumulator()
    decode = lambda raw, ts: ("s", ts, "e", NOFILTER, 1, None, Granularity.HOURLY)  # noqa: E731
    late = acc.add_batch(TP0, [Rec(0, 10, b"")], decode, horizon_ms=2 * HOUR, grace_ms=0)
    assert late.late == {"s": 1} and acc.reopened == {("s", 0)}
    again = acc.add_batch(TP0, [Rec(1, 20, b"")], decode, expect=1, horizon_ms=2 * HOUR)
    assert again.late == {"s": 1}  # the window is open again, but it is still a delta
    acc.take([("s", 0)], {TP0: 2}, "closed")
    assert acc.reopened == set()
    fresh = acc.add_batch(
        TP0, [Rec(2, HOUR + 5, b"")], decode, expect=2, horizon_ms=HOUR + 10, grace_ms=60_000
    )
    assert fresh.late == {}


def test_override_window_size_is_used_by_add() -> None:
    acc = Accumulator(override_ms=10_000)
    assert acc.add("s", Granularity.MONTHLY, 25_001, "e", NOFILTER, 1, TP0, 0) == ("s", 20_000)
    assert acc.windows[("s", 20_000)].end_ms == 30_000


def test_closed_is_end_plus_grace_on_the_wall_clock_even_without_new_events() -> None:
    acc = Accumulator()
    acc.add("s", Granularity.HOURLY, 10, "e", NOFILTER, 1, TP0, 0)  # [0, HOUR)
    acc.add("s", Granularity.HOURLY, HOUR + 10, "e", NOFILTER, 1, TP0, 1)  # [HOUR, 2 HOUR)
    grace = 300_000
    assert acc.closed(HOUR + grace - 1, grace) == []
    assert acc.closed(HOUR + grace, grace) == [("s", 0)]  # closes exactly at end + grace
    assert sorted(acc.closed(2 * HOUR + grace, grace)) == [("s", 0), ("s", HOUR)]
    assert acc.closed(HOUR, 0) == [("s", 0)]


def test_take_removes_whole_windows_and_keeps_the_rest() -> None:
    acc = Accumulator()
    acc.add("s", Granularity.HOURLY, 1, "a", NOFILTER, 1, TP0, 0)
    acc.add("s", Granularity.HOURLY, 2, "b", FLT, 2, TP1, 0)
    acc.add("s", Granularity.HOURLY, HOUR, "a", NOFILTER, 3, TP0, 1)
    boundary = {TP0: 2, TP1: 1}
    snap = acc.take([("s", 0)], boundary, "closed")
    boundary[TP0] = 99  # the snapshot keeps its own copy: the pipeline goes on reading
    assert snap.boundary == {TP0: 2, TP1: 1}
    assert snap.trigger == "closed"
    assert list(snap.windows) == [("s", 0)]
    assert snap.cell_count == 2
    assert sorted(snap.cells(), key=repr) == sorted(
        [(("s", 0, "a", NOFILTER), Granularity.HOURLY, 1), (("s", 0, "b", FLT), Granularity.HOURLY, 2)],
        key=repr,
    )
    assert snap.min_offsets == {TP0: 0, TP1: 0}
    assert list(acc.windows) == [("s", HOUR)]
    assert len(acc) == 1
    # A late event for the taken window opens it again, from zero: the next cycle carries a delta.
    acc.add("s", Granularity.HOURLY, 5, "a", NOFILTER, 4, TP0, 2)
    assert acc.windows[("s", 0)].cells == {("a", NOFILTER): 4}
    assert acc.windows[("s", 0)].min_offsets == {TP0: 2}
    assert len(acc) == 2


def test_take_all_and_clear_empty_the_accumulator() -> None:
    acc = Accumulator()
    for i in range(5):
        acc.add("s", Granularity.HOURLY, i * HOUR, "e", NOFILTER, 1, TP0, i)
    snap = acc.take_all({TP0: 5}, "max_interval")
    assert len(snap.windows) == 5 and snap.cell_count == 5
    assert len(acc) == 0 and not acc.windows and acc.min_offsets() == {}
    acc.add("s", Granularity.HOURLY, 0, "e", NOFILTER, 1, TP0, 5)
    acc.clear()
    assert len(acc) == 0 and not acc.windows


def test_an_empty_snapshot_has_no_cells_and_no_min_offsets() -> None:
    snap = Accumulator().take([], {TP0: 0}, "closed")
    assert snap.cell_count == 0 and snap.cells() == [] and snap.min_offsets == {}


def test_snapshot_min_offsets_are_the_minimum_over_its_windows() -> None:
    acc = Accumulator()
    acc.add("s", Granularity.HOURLY, 0, "e", NOFILTER, 1, TP0, 50)
    acc.add("s", Granularity.HOURLY, HOUR, "e", NOFILTER, 1, TP0, 40)  # a later window, earlier offset
    acc.add("s", Granularity.HOURLY, HOUR, "e", NOFILTER, 1, TP1, 9)
    snap = Snapshot(dict(acc.windows), {TP0: 60, TP1: 10}, "test")
    assert snap.min_offsets == {TP0: 40, TP1: 9}


events = st.lists(
    st.tuples(
        st.sampled_from(["s", "t"]),
        st.integers(min_value=0, max_value=4 * HOUR),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from([NOFILTER, FLT]),
        st.one_of(st.integers(1, 10**20), st.decimals(min_value="0.001", max_value="1000", places=3)),
        st.sampled_from([TP0, TP1]),
    ),
    max_size=60,
)


@PROPS
@given(evs=events, take_mask=st.integers(0, 2**10))
def test_every_value_ends_up_in_exactly_one_cell(evs: list, take_mask: int) -> None:
    acc = Accumulator()
    expected: Counter = Counter()
    offsets = {TP0: 0, TP1: 0}
    lowest: dict = {}
    for stream, ts, element, flt, value, tp in evs:
        wk = acc.add(stream, Granularity.HOURLY, ts, element, flt, value, tp, offsets[tp])
        lowest.setdefault((wk, tp), offsets[tp])
        offsets[tp] += 1
        expected[(stream, wk[1], element, flt)] += value
    assert len(acc) == len(expected)
    keys = sorted(acc.windows)
    chosen = [k for i, k in enumerate(keys) if take_mask >> i & 1]
    snap = acc.take(chosen, dict(offsets), "test")
    assert set(snap.windows).isdisjoint(acc.windows)
    got: Counter = Counter()
    for cell, _, value in snap.cells():
        got[cell] += value
    rest = acc.take_all(dict(offsets), "rest")
    for cell, _, value in rest.cells():
        got[cell] += value
    assert got == expected
    for (wk, tp), off in lowest.items():
        held = snap if wk in snap.windows else rest
        assert held.windows[wk].min_offsets[tp] == off


def test_oldest_opened_is_when_the_longest_held_window_got_its_first_event() -> None:
    now = [100.0]
    acc = Accumulator(clock=lambda: now[0])
    assert acc.oldest_opened() == float("inf")
    acc.add("s", Granularity.HOURLY, ms(2021, 3, 3, 3), "e", FLT, 1, TP0, 0)
    now[0] = 200.0
    acc.add("s", Granularity.HOURLY, ms(2021, 3, 3, 4), "e", FLT, 1, TP0, 1)
    acc.add("s", Granularity.HOURLY, ms(2021, 3, 3, 3), "f", FLT, 1, TP0, 2)  # an old window: unchanged
    assert acc.oldest_opened() == 100.0
    acc.take([("s", window_bounds(ms(2021, 3, 3, 3), Granularity.HOURLY)[0])], {}, "closed")
    assert acc.oldest_opened() == 200.0
