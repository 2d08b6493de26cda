"""The journal and the replay skip rule (DESIGN.md §2, lines 2–3), with plain values and a memory store.

The scenario tests pin each clause of the contract; the property test at the end simulates members that read,
cut whole windows, deliver cycles request by request, crash at any point and hand partitions over, and then
checks that one final replay from the journal counts every event exactly once (acknowledged + replayed).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocd.cloudzero.records import Granularity
from allocd.journal import (
    CorruptEntry,
    Entry,
    Journal,
    PartitionState,
    Recovered,
    cell_digest,
    claims,
    decode_entry,
    encode_entry,
    recover,
    scan_list,
)
from allocd.stores.files import FileJournalStore
from allocd.stores.memory import MemoryJournalStore
from allocd.windows import TP, Accumulator, CellKey, Snapshot

HOUR = 3_600_000
T0: TP = ("events", 0)
T1: TP = ("events", 1)
T2: TP = ("events", 2)
FLT = (("custom:feature", ("billing",)), ("tag:owner", ("frank", "sandy")))


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that never suspends (the memory store's) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("the coroutine suspended")


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that needs a loop (the file store works in a thread)."""
    return asyncio.run(coro)


def cell(window: int, element: str, stream: str = "s") -> CellKey:
    return (stream, window * HOUR, element, ())


def wk(window: int, stream: str = "s") -> tuple[str, int]:
    return (stream, window * HOUR)


def snapshot(cells: list[CellKey], boundary: dict[TP, int], value: int = 1) -> Snapshot:
    acc = Accumulator()
    for stream, start, element, flt in cells:
        acc.add(stream, Granularity.HOURLY, start, element, flt, value, T0, 0)
    return acc.take_all(boundary, "test")


def digests(*cells: CellKey) -> list[str]:
    return [cell_digest(c) for c in cells]


def recovered(journal: Journal, *tps: TP) -> dict[TP, Recovered]:
    recovered, _ = run(journal.recover(tps))
    store = journal.store
    assert isinstance(store, MemoryJournalStore)
    # The bounded read must recover exactly what the whole log does.
    assert recovered == recover(store.entries, tps), "bounded read != full log"
    return recovered


# --- cell digests ----------------------------------------------------------------------------------------
def test_cell_digest_is_short_stable_and_names_every_part_of_the_cell() -> None:
    base = ("s", HOUR, "hooli", FLT)
    d = cell_digest(base)
    assert d == cell_digest(("s", HOUR, "hooli", tuple((k, tuple(v)) for k, v in FLT)))
    assert len(d) == 16 and int(d, 16) >= 0
    others = [
        ("t", HOUR, "hooli", FLT),
        ("s", 2 * HOUR, "hooli", FLT),
        ("s", HOUR, "acme", FLT),
        ("s", HOUR, "hooli", ()),
        ("s", HOUR, "hooli", (("custom:feature", ("billing",)),)),
        ("s", HOUR, "hooli", (("custom:feature", ("billing",)), ("tag:owner", ("frank",)))),
    ]
    assert len({d, *(cell_digest(o) for o in others)}) == len(others) + 1


def test_cell_digest_does_not_confuse_neighbouring_strings() -> None:
    # A naive concatenation would make these equal; the digest of a JSON array does not.
    assert cell_digest(("ab", 0, "c", ())) != cell_digest(("a", 0, "bc", ()))
    assert cell_digest(("s", 0, "e", (("tag:a", ("b", "c")),))) != cell_digest(
        ("s", 0, "e", (("tag:a", ("b,c",)),))
    )


# --- PartitionState ----------------------------------------------------------------------------------------
def test_should_skip_below_a_mark_or_a_skip_only() -> None:
    st_ = PartitionState(position=0, marks={wk(1): 10}, skips={cell_digest(cell(2, "a")): 20})
    assert st_.should_skip(9, wk(1), cell(1, "x"))
    assert not st_.should_skip(10, wk(1), cell(1, "x"))  # the boundary is the next offset: not delivered
    assert st_.should_skip(19, wk(2), cell(2, "a"))
    assert not st_.should_skip(20, wk(2), cell(2, "a"))
    assert not st_.should_skip(5, wk(2), cell(2, "b"))  # another cell of the same window
    assert not st_.should_skip(5, wk(3), cell(3, "a"))  # the same element in another window
    assert not PartitionState().should_skip(0, wk(1), cell(1, "a"))


def test_prune_drops_marks_and_skips_at_or_below_the_position() -> None:
    a, b, c = digests(cell(1, "a"), cell(1, "b"), cell(1, "c"))
    state = PartitionState(position=0, marks={wk(1): 9, wk(2): 10, wk(3): 11}, skips={a: 9, b: 10, c: 11})
    state.prune(10)
    assert state.position == 10
    assert state.marks == {wk(3): 11}
    assert state.skips == {c: 11}
    # What survives still decides for every offset replay can reach from the position.
    assert state.should_skip(10, wk(3), cell(3, "z")) and not state.should_skip(11, wk(3), cell(3, "z"))
    assert state.should_skip(10, wk(1), cell(1, "c"))


def test_a_checkpoint_entry_round_trips_through_recover() -> None:
    a = cell_digest(cell(1, "a"))
    state = PartitionState(position=42, marks={wk(1): 50, ("other", 7): 45}, skips={a: 48})
    journal = Journal(MemoryJournalStore())
    run(journal.checkpoint({T0: state}))
    got = recovered(journal, T0)[T0]
    assert got.state == state
    assert (got.in_doubt_requests, got.in_doubt_cells, got.interrupted_cycles) == (0, 0, 0)


def test_no_journal_means_no_position_and_nothing_to_skip() -> None:
    got = recover([], [T0, T1])
    assert set(got) == {T0, T1}
    for rec in got.values():
        assert rec.state == PartitionState() and rec.state.position is None
        assert (rec.in_doubt_requests, rec.in_doubt_cells, rec.interrupted_cycles) == (0, 0, 0)


def test_entries_of_unknown_kinds_are_ignored() -> None:
    entries = [
        {"t": "barrier", "id": "x"},
        {"t": "ckpt", "tp": ["events", 0], "pos": 3, "marks": [], "skips": []},
    ]
    assert recover(entries, [T0])[T0].state.position == 3


# --- line 2: a completed cycle and its checkpoint -----------------------------------------------------------
def complete_cycle(
    journal: Journal, snap: Snapshot, parts: dict[TP, PartitionState], positions: dict[TP, int]
) -> str:
    """What the pipeline does for a cycle that completes: journal, deliver, marks, prune, checkpoint."""
    cid = run(journal.cycle_started(snap))
    cells = [cell_digest(c) for c, _, _ in snap.cells()]
    run(journal.request_sent(cid, 0, cells))
    run(journal.request_settled(cid, 0, cells))
    for w in snap.windows:
        for tp, b in snap.boundary.items():
            if parts[tp].marks.get(w, -1) < b:
                parts[tp].marks[w] = b
    for tp, pos in positions.items():
        parts[tp].prune(pos)
    run(journal.checkpoint(parts))
    return cid


def test_completed_cycle_then_checkpoint_marks_skip_below_the_boundary_only() -> None:
    journal = Journal(MemoryJournalStore())
    parts = {T0: PartitionState(position=0), T1: PartitionState(position=0)}
    snap = snapshot([cell(1, "a"), cell(1, "b")], {T0: 100, T1: 40})
    # Window 2 is still open and holds offset 60 of T0 and 35 of T1: the committed position stops there.
    complete_cycle(journal, snap, parts, {T0: 60, T1: 35})
    got = recovered(journal, T0, T1)
    assert got[T0].state.position == 60 and got[T1].state.position == 35
    assert got[T0].state.marks == {wk(1): 100} and got[T1].state.marks == {wk(1): 40}
    assert got[T0].interrupted_cycles == 0 and got[T0].in_doubt_requests == 0
    s0, s1 = got[T0].state, got[T1].state
    assert s0.should_skip(99, wk(1), cell(1, "a")) and s0.should_skip(60, wk(1), cell(1, "zzz"))
    assert not s0.should_skip(100, wk(1), cell(1, "a"))  # at the boundary: a late event, counted
    assert not s0.should_skip(150, wk(1), cell(1, "b"))
    assert not s0.should_skip(61, wk(2), cell(2, "a"))  # the open window is replayed
    assert s1.should_skip(39, wk(1), cell(1, "a")) and not s1.should_skip(40, wk(1), cell(1, "a"))


def test_a_later_completed_cycle_of_the_same_window_moves_its_mark() -> None:
    journal = Journal(MemoryJournalStore())
    parts = {T0: PartitionState(position=0)}
    complete_cycle(journal, snapshot([cell(1, "a")], {T0: 10}), parts, {T0: 5})
    complete_cycle(journal, snapshot([cell(1, "a")], {T0: 30}), parts, {T0: 5})  # a late delta
    state = recovered(journal, T0)[T0].state
    assert state.marks == {wk(1): 30}
    assert state.should_skip(29, wk(1), cell(1, "a")) and not state.should_skip(30, wk(1), cell(1, "a"))


# --- line 3: an interrupted cycle ---------------------------------------------------------------------------
A, B, C, D = cell(1, "a"), cell(1, "b"), cell(2, "c"), cell(2, "d")


def interrupted(*, fail: bool = False, ack_in_r1: tuple[CellKey, ...] = ()) -> Journal:
    """A checkpoint, then a cycle over T0 and T1: request 0 (A, B) acknowledged, request 1 (C, D) sent."""
    journal = Journal(MemoryJournalStore())
    run(journal.checkpoint({T0: PartitionState(position=5), T1: PartitionState(position=2)}))
    snap = snapshot([A, B, C, D], {T0: 100, T1: 50})
    cid = run(journal.cycle_started(snap))
    run(journal.request_sent(cid, 0, digests(A, B)))
    run(journal.request_settled(cid, 0, digests(A, B)))
    run(journal.request_sent(cid, 1, digests(C, D)))
    if ack_in_r1:
        run(journal.request_settled(cid, 1, digests(*ack_in_r1)))
    if fail:
        run(journal.request_failed(cid, 1))
    return journal


def test_interrupted_cycle_skips_acknowledged_cells_below_each_partitions_boundary() -> None:
    got = recovered(interrupted(), T0, T1)
    for tp, boundary, position in ((T0, 100, 5), (T1, 50, 2)):
        state = got[tp].state
        assert state.position == position  # the checkpoint's, not the boundary: nothing else moved
        assert state.marks == {}  # the cycle did not complete: no window is delivered whole
        for c in (A, B):
            assert state.should_skip(position, (c[0], c[1]), c)
            assert state.should_skip(boundary - 1, (c[0], c[1]), c)
            assert not state.should_skip(boundary, (c[0], c[1]), c)
        for c in (C, D):  # sent without an answer: not skipped, re-derived and sent again
            assert not state.should_skip(position, (c[0], c[1]), c)
        assert got[tp].interrupted_cycles == 1


def test_a_request_sent_without_an_answer_is_in_doubt() -> None:
    got = recovered(interrupted(), T0, T1)
    for tp in (T0, T1):
        assert got[tp].in_doubt_requests == 1
        assert got[tp].in_doubt_cells == 2


def test_a_failed_request_is_not_in_doubt() -> None:
    got = recovered(interrupted(fail=True), T0, T1)
    for tp in (T0, T1):
        assert (got[tp].in_doubt_requests, got[tp].in_doubt_cells) == (0, 0)
        assert not got[tp].state.should_skip(10, wk(2), C)  # and its cells are replayed


def test_a_partly_acknowledged_request_skips_what_was_acknowledged() -> None:
    got = recovered(interrupted(ack_in_r1=(C,)), T0)[T0]
    assert got.state.should_skip(99, wk(2), C)
    assert not got.state.should_skip(99, wk(2), D)
    assert (got.in_doubt_requests, got.in_doubt_cells) == (1, 1)  # only D is in doubt
    got = recovered(interrupted(ack_in_r1=(C,), fail=True), T0)[T0]
    assert got.state.should_skip(99, wk(2), C)
    assert (got.in_doubt_requests, got.in_doubt_cells) == (0, 0)
    got = recovered(interrupted(ack_in_r1=(C, D)), T0)[T0]
    assert (got.in_doubt_requests, got.in_doubt_cells) == (0, 0)


def test_a_cycle_journaled_before_any_request_delivered_nothing() -> None:
    journal = Journal(MemoryJournalStore())
    run(journal.cycle_started(snapshot([A], {T0: 100})))
    got = recovered(journal, T0)[T0]
    assert got.state.skips == {} and got.interrupted_cycles == 1 and got.in_doubt_requests == 0
    assert not got.state.should_skip(0, wk(1), A)


def test_cycles_whose_boundary_does_not_name_a_partition_do_not_affect_it() -> None:
    got = recovered(interrupted(), T2)[T2]
    assert got.state == PartitionState()
    assert (got.in_doubt_requests, got.in_doubt_cells, got.interrupted_cycles) == (0, 0, 0)
    assert not got.state.should_skip(0, wk(1), A)


def test_cycles_of_other_members_interleaved_in_the_log_are_kept_apart() -> None:
    """Two members share the group's journal: each cycle names only its own partitions."""
    journal = Journal(MemoryJournalStore())
    c0 = run(journal.cycle_started(snapshot([A, B], {T0: 100})))
    c1 = run(journal.cycle_started(snapshot([A, B], {T1: 70})))
    run(journal.request_sent(c1, 0, digests(A)))
    run(journal.request_sent(c0, 0, digests(A, B)))
    run(journal.request_settled(c1, 0, digests(A)))
    run(journal.request_settled(c0, 0, digests(B)))  # A of c0 is in doubt, B acknowledged
    run(journal.checkpoint({T1: PartitionState(position=70)}))  # the other member completes
    got = recovered(journal, T0, T1)
    assert got[T0].state.skips == {cell_digest(B): 100}
    assert (got[T0].in_doubt_requests, got[T0].in_doubt_cells) == (1, 1)
    assert got[T1].state == PartitionState(position=70)
    assert (got[T1].in_doubt_requests, got[T1].interrupted_cycles) == (0, 0)


def test_the_same_cell_in_several_interrupted_cycles_skips_up_to_the_highest_boundary() -> None:
    journal = Journal(MemoryJournalStore())
    for boundary in (40, 90, 60):  # in practice boundaries only rise; the rule takes the highest anyway
        cid = run(journal.cycle_started(snapshot([A], {T0: boundary})))
        run(journal.request_sent(cid, 0, digests(A)))
        run(journal.request_settled(cid, 0, digests(A)))
    got = recovered(journal, T0)[T0]
    assert got.state.skips == {cell_digest(A): 90}
    assert got.interrupted_cycles == 3


# --- the checkpoint is the authority ------------------------------------------------------------------------
def test_a_later_checkpoint_supersedes_earlier_cycles() -> None:
    journal = interrupted()
    run(journal.checkpoint({T0: PartitionState(position=200)}))
    got = recovered(journal, T0, T1)
    assert got[T0].state == PartitionState(position=200)
    assert (got[T0].in_doubt_requests, got[T0].interrupted_cycles) == (0, 0)
    # T1's latest checkpoint is still the one before the cycle: the cycle applies to it.
    assert got[T1].state.skips == {cell_digest(A): 50, cell_digest(B): 50}
    assert got[T1].in_doubt_requests == 1


def test_the_checkpoints_carried_skips_apply_and_later_cycles_add_to_them() -> None:
    journal = interrupted()
    carried = PartitionState(position=5, skips={cell_digest(A): 100, cell_digest(B): 100})
    run(journal.checkpoint({T0: carried}))  # a new owner completed a cycle, carrying the recovered skips
    snap = snapshot([C], {T0: 150})
    cid = run(journal.cycle_started(snap))
    run(journal.request_sent(cid, 0, digests(C)))
    run(journal.request_settled(cid, 0, digests(C)))
    got = recovered(journal, T0)[T0]
    assert got.state.skips == {cell_digest(A): 100, cell_digest(B): 100, cell_digest(C): 150}
    assert got.state.should_skip(99, wk(1), A) and not got.state.should_skip(100, wk(1), A)
    assert got.state.should_skip(149, wk(2), C)
    assert not got.state.should_skip(5, wk(2), D)  # D was in doubt before the checkpoint: not counted again
    assert (got.in_doubt_requests, got.interrupted_cycles) == (0, 1)


def test_acks_after_a_checkpoint_for_a_cycle_before_it_are_ignored() -> None:
    """A zombie's late ack: its cycle is older than the partition's checkpoint, which is the authority."""
    journal = Journal(MemoryJournalStore())
    cid = run(journal.cycle_started(snapshot([A], {T0: 100})))
    run(journal.request_sent(cid, 0, digests(A)))
    run(journal.checkpoint({T0: PartitionState(position=0)}))
    run(journal.request_settled(cid, 0, digests(A)))
    got = recovered(journal, T0)[T0]
    assert got.state.skips == {} and got.in_doubt_requests == 0


# --- the Journal's entries ----------------------------------------------------------------------------------
def test_journal_entries_are_written_in_order_with_their_fields() -> None:
    store = MemoryJournalStore()
    journal = Journal(store)
    snap = snapshot([A, C], {T0: 10, T1: 20})
    cid = run(journal.cycle_started(snap))
    run(journal.request_sent(cid, 0, ["d1"]))
    run(journal.request_settled(cid, 0, ["d1"]))
    run(journal.request_failed(cid, 1))
    run(journal.checkpoint({T0: PartitionState(position=3)}))
    kinds = [e["t"] for e in store.entries]
    assert kinds == ["cycle", "sent", "ack", "fail", "ckpt"]
    first = store.entries[0]
    assert first["c"] == cid and isinstance(cid, str) and cid
    assert sorted(first["b"]) == [["events", 0, 10], ["events", 1, 20]]
    assert sorted(first["w"]) == [["s", HOUR], ["s", 2 * HOUR]]
    assert store.entries[1] == {"t": "sent", "c": cid, "r": 0, "cells": ["d1"]}
    assert store.entries[4] == {"t": "ckpt", "tp": ["events", 0], "pos": 3, "marks": [], "skips": []}
    assert run(journal.cycle_started(snap)) != cid  # cycle ids are unique


def test_memory_store_keeps_copies_not_the_callers_objects() -> None:
    store = MemoryJournalStore()
    entry: dict[str, Any] = {"t": "sent", "c": "x", "r": 0, "cells": ["a"]}
    run(store.append([entry]))
    entry["cells"].append("b")
    assert run(store.read_all()) == [{"t": "sent", "c": "x", "r": 0, "cells": ["a"]}]


# --- the property: a crash anywhere, then one replay, counts every event exactly once -----------------------
TPS: list[TP] = [T0, T1, T2]
ELEMENTS = ["a", "b", "c"]
MODES = ["before_sent", "in_doubt", "failed", "partial_in_doubt", "partial_failed", "before_checkpoint"]


@dataclass
class Model:
    """The world: the events in each partition, the shared journal and what the API acknowledged."""

    events: dict[TP, list[tuple[int, str, int]]]  # offset → (window, element, value)
    journal: Journal = field(default_factory=lambda: Journal(MemoryJournalStore()))
    acked: Counter = field(default_factory=Counter)  # cell → value the API acknowledged
    # tp → cells in doubt since its latest checkpoint, as recovery counts them
    in_doubt_since_ckpt: Counter = field(default_factory=Counter)

    def checkpointed(self, tps: list[TP]) -> None:
        for tp in tps:
            self.in_doubt_since_ckpt[tp] = 0


class Member:
    """A consumer that owns some partitions: the pipeline's pure steps, in the pipeline's order."""

    def __init__(self, model: Model, tps: list[TP], req_size: int) -> None:
        self.model = model
        self.req_size = req_size
        self.recovered = recovered(model.journal, *tps)
        self.parts = {tp: rec.state for tp, rec in self.recovered.items()}
        for state in self.parts.values():
            if state.position is None:
                state.position = 0  # no checkpoint: the reset policy, earliest
        self.next_offset = {tp: state.position for tp, state in self.parts.items()}
        self.acc = Accumulator()
        self.queue: list[Snapshot] = []

    def read(self, tp: TP, count: int) -> None:
        state, evs = self.parts[tp], self.model.events[tp]
        start = self.next_offset[tp]
        end = min(start + count, len(evs))
        for offset in range(start, end):
            window, element, value = evs[offset]
            if state.should_skip(offset, wk(window), cell(window, element)):
                continue
            self.acc.add("s", Granularity.HOURLY, window * HOUR + offset, element, (), value, tp, offset)
        self.next_offset[tp] = end

    def cut(self, mask: int) -> None:
        keys = sorted(self.acc.windows)
        chosen = [k for i, k in enumerate(keys) if mask >> i & 1] or keys  # whole windows, never part
        if chosen:
            self.queue.append(self.acc.take(chosen, dict(self.next_offset), "test"))

    def run_cycle(self, crash_at: int | None, mode: str) -> bool:
        """Deliver the oldest snapshot; return False when the member crashed on the way."""
        if not self.queue:
            return True
        snap = self.queue.pop(0)
        journal = self.model.journal
        cid = run(journal.cycle_started(snap))
        cells = snap.cells()
        requests = [cells[i : i + self.req_size] for i in range(0, len(cells), self.req_size)]
        for n, req in enumerate(requests):
            names = [cell_digest(c) for c, _, _ in req]
            if n == crash_at and mode != "before_checkpoint":
                self._interrupt(cid, n, req, names, mode, snap)
                return False
            run(journal.request_sent(cid, n, names))
            self._ack(req)
            run(journal.request_settled(cid, n, names))
        if crash_at is not None:  # every request acknowledged, the crash comes before the checkpoint
            return False
        for w in snap.windows:  # step 3: the windows are delivered whole up to the boundary
            for tp, b in snap.boundary.items():
                if self.parts[tp].marks.get(w, -1) < b:
                    self.parts[tp].marks[w] = b
        positions = dict(self.next_offset)
        for mins in (self.acc.min_offsets(), *(s.min_offsets for s in self.queue)):
            for tp, off in mins.items():
                positions[tp] = min(positions[tp], off)
        for tp, pos in positions.items():
            self.parts[tp].prune(pos)
        run(journal.checkpoint(self.parts))  # step 4
        self.model.checkpointed(list(self.parts))
        return True

    def _interrupt(self, cid: str, n: int, req: list, names: list[str], mode: str, snap: Snapshot) -> None:
        journal = self.model.journal
        if mode == "before_sent":
            return
        run(journal.request_sent(cid, n, names))
        half = len(req) // 2 if mode.startswith("partial") else 0
        if half:
            self._ack(req[:half])
            run(journal.request_settled(cid, n, names[:half]))
        if mode.endswith("failed"):
            run(journal.request_failed(cid, n))
        else:  # in doubt: whether the API applied it is unknown; it is not counted as acknowledged
            for tp in snap.boundary:
                self.model.in_doubt_since_ckpt[tp] += len(req) - half

    def _ack(self, req: list) -> None:
        for c, _, value in req:
            self.model.acked[c] += value


event_lists = st.lists(
    st.tuples(st.integers(0, 3), st.sampled_from(ELEMENTS), st.integers(1, 1000)), min_size=1, max_size=30
)
# Weighted so that most scripts read, cut and deliver several cycles before and after their crashes.
KINDS = ["read"] * 5 + ["cut"] * 2 + ["run"] * 2 + ["cut_run"] * 3 + ["crash_in_cycle"] * 2 + ["handover"]
actions = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 2**16)), min_size=10, max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    evs=st.tuples(event_lists, event_lists, event_lists),
    first_owner=st.integers(1, 7),
    script=actions,
    req_size=st.integers(1, 3),
)
def test_replay_after_any_crash_counts_every_event_exactly_once(
    evs: tuple[list, list, list], first_owner: int, script: list[tuple[str, int]], req_size: int
) -> None:
    model = Model(events=dict(zip(TPS, evs, strict=True)))
    members: list[Member] = []

    def assign(mask: int) -> None:
        owned = {tp for m in members for tp in m.parts}
        free = [tp for tp in TPS if tp not in owned]
        chosen = [tp for i, tp in enumerate(free) if mask >> i & 1] or free
        if chosen:
            members.append(Member(model, chosen, req_size))

    assign(first_owner)
    assign(7)  # the rest, to a second member
    for kind, p in script:
        if kind == "handover":  # a member crashes and a new owner takes its partitions, or free ones
            if len({tp for m in members for tp in m.parts}) < len(TPS):
                assign(p)
            elif members:
                members.pop(p % len(members))
            continue
        if not members:
            assign(p)
        member = members[p % len(members)]
        p //= len(members)
        if kind == "read":
            tps = list(member.parts)
            member.read(tps[p % len(tps)], p // len(tps) % 10 + 1)
        elif kind in ("cut", "cut_run"):
            member.cut(p)
        if kind in ("run", "cut_run"):
            member.run_cycle(None, "")
        elif kind == "crash_in_cycle":
            member.cut(p)
            if not member.run_cycle(p % 4, MODES[p // 4 % len(MODES)]):
                members.remove(member)

    # Everyone crashes; one owner recovers every partition and replays to the end.
    final = Member(model, TPS, req_size)
    for tp in TPS:
        final.read(tp, len(model.events[tp]))
        assert final.recovered[tp].in_doubt_cells == model.in_doubt_since_ckpt[tp]
    replayed: Counter = Counter()
    for snap_cell, _, value in final.acc.take_all(dict(final.next_offset), "final").cells():
        replayed[snap_cell] += value
    total: Counter = Counter()
    for tp in TPS:
        for window, element, value in model.events[tp]:
            total[cell(window, element)] += value
    for c in set(total) | set(model.acked) | set(replayed):
        assert model.acked[c] + replayed[c] == total[c], c


@pytest.mark.parametrize("mode", MODES)
def test_one_scripted_crash_per_mode_counts_every_event_once(mode: str) -> None:
    """The property's model on one fixed script, so each crash mode is exercised on every run."""
    events = {tp: [(i % 3, ELEMENTS[i % 2], i + 1) for i in range(12)] for tp in TPS}
    model = Model(events=events)
    member = Member(model, TPS, req_size=1)
    for tp in TPS:
        member.read(tp, 6)
    member.cut(0b11)
    assert member.run_cycle(None, "")
    for tp in TPS:
        member.read(tp, 6)
    member.cut(0)  # every window: the late deltas of the ones delivered before
    assert not member.run_cycle(1, mode)
    final = Member(model, TPS, req_size=1)
    expected_doubt = {"in_doubt": 1, "partial_in_doubt": 1}.get(mode, 0)
    for tp in TPS:
        assert final.recovered[tp].in_doubt_cells == expected_doubt
        final.read(tp, 12)
    replayed: Counter = Counter()
    for c, _, value in final.acc.take_all({}, "final").cells():
        replayed[c] += value
    total: Counter = Counter()
    for tp in TPS:
        for window, element, value in events[tp]:
            total[cell(window, element)] += value
    assert {c: model.acked[c] + replayed[c] for c in total} == dict(total)
    assert model.acked  # the first cycle really delivered something


def test_a_checkpoint_written_after_another_members_claim_is_ignored() -> None:
    """A stale owner (its partition claimed by a new owner) must not overwrite the new owner's view."""
    tp = ("usage", 0)
    entries = [
        {"t": "barrier", "member": "a", "claim": [["usage", 0]]},
        {"t": "ckpt", "tp": ["usage", 0], "pos": 10, "marks": [], "skips": [], "m": "a"},
        {"t": "barrier", "member": "b", "claim": [["usage", 0]]},
        {"t": "ckpt", "tp": ["usage", 0], "pos": 50, "marks": [], "skips": [], "m": "a"},  # stale
    ]
    assert recover(entries, [tp])[tp].state.position == 10
    entries.append({"t": "ckpt", "tp": ["usage", 0], "pos": 30, "marks": [], "skips": [], "m": "b"})
    assert recover(entries, [tp])[tp].state.position == 30


# --- the stored form ---------------------------------------------------------------------------------------
DIGESTS = [cell_digest(cell(w, e)) for w in range(1500) for e in "ab"]  # one full request


def test_an_entry_round_trips_through_its_stored_form() -> None:
    entries: list[Entry] = [
        {"t": "cycle", "c": "c1", "b": [["usage", 0, 7]], "w": [["s", 0]], "trigger": "closed"},
        {"t": "sent", "c": "c1", "r": 0, "cells": DIGESTS[:5], "g": "grp", "m": "mem"},
        {"t": "ack", "c": "c1", "r": 0, "all": True},
        {"t": "fail", "c": "c1", "r": 1},
        {"t": "ckpt", "tp": ["usage", 0], "pos": 7, "marks": [["s", 0, 7]], "skips": [], "m": "mem", "v": 3},
        {"t": "barrier", "id": "b1", "member": "mem", "claim": [["usage", 0]]},
    ]
    for e in entries:
        assert decode_entry(encode_entry(e)) == e


def test_a_flipped_digit_is_caught_by_the_checksum_and_never_applied() -> None:
    raw = encode_entry({"t": "ckpt", "tp": ["usage", 0], "pos": 1234, "marks": [], "skips": []})
    flipped = raw.replace(b'"pos":1234', b'"pos":1294')
    with pytest.raises(CorruptEntry, match="checksum"):
        decode_entry(flipped)
    with pytest.raises(CorruptEntry):
        decode_entry(raw.replace(b'"x":', b'"y":'))  # the checksum's own key: an unknown key
    with pytest.raises(CorruptEntry):
        decode_entry(raw[:-3])  # torn
    # Entries written before checksums existed are read on their form alone.
    assert decode_entry(b'{"t":"fail","c":"c","r":0}') == {"t": "fail", "c": "c", "r": 0}
    with pytest.raises(CorruptEntry, match="keys"):
        decode_entry(b'{"t":"fail","c":"c"}')
    assert decode_entry(b'{"not": "ours"}') is None


def test_a_request_journals_a_third_of_the_bytes_it_used_to() -> None:
    """3,000 cells: `sent` with the digests packed, and an `ack` that settles the whole request at once."""
    before = len(orjson.dumps({"t": "sent", "c": "c" * 16, "r": 0, "cells": DIGESTS})) + len(
        orjson.dumps({"t": "ack", "c": "c" * 16, "r": 0, "cells": DIGESTS})
    )
    after = len(encode_entry({"t": "sent", "c": "c" * 16, "r": 0, "cells": DIGESTS})) + len(
        encode_entry({"t": "ack", "c": "c" * 16, "r": 0, "all": True})
    )
    assert before > 110_000 and after < 33_000, (before, after)


def test_a_corrupt_checkpoint_in_the_file_journal_falls_back_to_the_one_before(tmp_path: Path) -> None:
    path = tmp_path / "journal.ndjson"
    store = FileJournalStore(path)
    journal = Journal(store)
    run_async(journal.checkpoint({T0: PartitionState(10)}))
    run_async(journal.checkpoint({T0: PartitionState(20)}))
    store.close()
    path.write_bytes(path.read_bytes().replace(b'"pos":20', b'"pos":90'))
    recovered, read = run_async(Journal(FileJournalStore(path)).recover([T0]))
    assert read.corrupt == 1
    assert recovered[T0].state.position == 10  # not 90, and not silently 20


# --- the bounded read ---------------------------------------------------------------------------------------
TP0 = ("usage", 0)
TP1 = ("usage", 1)
MEMBERS = ["a", "b", "c"]


class Writer:
    """A Kafka store's member in miniature: claims, how far it has examined the log, and the `v` it stamps."""

    def __init__(self, name: str, log: list[Entry]) -> None:
        self.name, self.log = name, log
        self.claimed: dict[TP, int] = {}
        self.examined = -1

    def claim(self, tps: list[TP]) -> None:
        self.log.append(
            {
                "t": "barrier",
                "id": f"{self.name}{len(self.log)}",
                "member": self.name,
                "claim": [[t, p] for t, p in tps],
            }
        )
        for tp in tps:
            self.claimed[tp] = len(self.log) - 1
        self.examined = len(self.log) - 1

    def lost(self, tp: TP) -> bool:
        mine = self.claimed.get(tp, -1)
        return any(
            e["t"] == "barrier" and e["member"] != self.name and (tp[0], tp[1]) in claims(e)
            for e in self.log[mine + 1 : self.examined + 1]
        )

    def checkpoint(self, tp: TP, pos: int, fenced: bool) -> None:
        if fenced:  # still_owner: examine the log first, and write nothing when the partition is lost
            self.examined = len(self.log) - 1
            if self.lost(tp):
                return
        v = self.claimed.get(tp, -1) if self.lost(tp) else self.examined
        self.log.append(
            {"t": "ckpt", "tp": [tp[0], tp[1]], "pos": pos, "marks": [], "skips": [], "m": self.name, "v": v}
        )

    def cycle(self, tp: TP, n: int, acked: bool) -> None:
        cid = f"{self.name}-{len(self.log)}"
        self.log.append({"t": "cycle", "c": cid, "b": [[tp[0], tp[1], n]], "w": []})
        self.log.append({"t": "sent", "c": cid, "r": 0, "cells": [f"d{n}"]})
        if acked:
            self.log.append({"t": "ack", "c": cid, "r": 0, "all": True})


steps = st.lists(
    st.tuples(
        st.sampled_from(["claim", "claim", "ckpt", "ckpt", "stale_ckpt", "cycle", "legacy_ckpt"]),
        st.sampled_from(MEMBERS),
        st.sampled_from([[TP0], [TP1], [TP0, TP1]]),
        st.integers(0, 500),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(script=steps)
def test_the_bounded_read_recovers_what_the_whole_log_does(script: list) -> None:
    """Members claim, checkpoint (fenced, or stale without looking), write cycles and old-style checkpoints
    without `v`, in any order: recovery from the bounded read equals recovery from the whole log."""
    log: list[Entry] = []
    writers = {name: Writer(name, log) for name in MEMBERS}
    for kind, name, tps, n in script:
        w = writers[name]
        if kind == "claim":
            w.claim(tps)
        elif kind in ("ckpt", "stale_ckpt"):
            for tp in tps:
                w.checkpoint(tp, n, fenced=kind == "ckpt")
        elif kind == "legacy_ckpt":
            log.append(
                {"t": "ckpt", "tp": [tps[0][0], tps[0][1]], "pos": n, "marks": [], "skips": [], "m": name}
            )
        else:
            w.cycle(tps[0], n, acked=n % 2 == 0)
    for wanted in ([TP0], [TP1], [TP0, TP1]):
        read = scan_list(log, wanted)
        assert recover(read.entries, wanted) == recover(log, wanted)
