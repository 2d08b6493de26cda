"""The pipeline (poll loop, triggers, backpressure, delivery, rebalance) with tiny fakes around it.

The fakes: a source that is a list of messages per partition (seekable, so a replay re-reads), a client that
records what it was sent and follows a script (ok, an exception, or a gate that holds the request), the
memory journal, a dead-letter store that can be told to fail, and an injected wall clock (windows) and
monotonic clock (liveness). Metrics and Health are the real ones. `Pipeline.run` runs as a task and the
tests wait on conditions with deadlines; windows are 10 s long on the fake clock, so no test waits for time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import orjson
import pytest

from allocd.cloudzero.client import RequestOutcome
from allocd.config import EventsSettings, PipelineSettings
from allocd.errors import AuthError, TransientError
from allocd.events import Decoder
from allocd.journal import Journal, TailRead, cell_digest
from allocd.observability import Health, Metrics
from allocd.pipeline import Pipeline
from allocd.sources.base import AssignmentListener, Batch, Message
from allocd.stores.memory import MemoryJournalStore
from allocd.windows import CELL_BYTES_ESTIMATE, TP

from .fakes import FakeClock

pytestmark = pytest.mark.timeout(10)

T0 = 1_700_002_800.0  # 2023-11-14T23:00:00Z, an hour boundary
WINDOW = 10  # seconds (the test-only window override)
GRACE = 1.0
P0: TP = ("usage", 0)
P1: TP = ("usage", 1)
DECODER = EventsSettings.from_dict({"streams": {"s": {"granularity": "HOURLY", "dimensions": []}}})


def w(k: int, at: float = 1.0) -> float:
    """A time `at` seconds into window k (window 0 starts at T0)."""
    return T0 + k * WINDOW + at


def event(ts: float, element: str, value: int | str = 1) -> bytes:
    return orjson.dumps({"stream": "s", "timestamp": int(ts * 1000), "element_name": element, "value": value})


def stamp(ts: float) -> str:
    """The record timestamp of the window holding `ts` (what the API is sent)."""
    start = int(ts) - int(ts - T0) % WINDOW
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))


# --- fakes -----------------------------------------------------------------------------------------------
class FakeSource:
    """A log per partition; fetch hands out everything from the read position (nothing while paused)."""

    name = "fake"

    def __init__(self, clock: FakeClock, tps: tuple[TP, ...] = (P0,)) -> None:
        self.clock = clock
        self.tps = list(tps)
        self.log: dict[TP, list[Message]] = {tp: [] for tp in tps}
        self.pos: dict[TP, int] = {}
        self.frontier = math.inf
        self.flush_wanted = False
        self.paused = False
        self.calls: list[str] = []  # "pause" / "resume", in order
        self.seeks: list[tuple[TP, int]] = []
        self.commits: list[dict[TP, int]] = []
        self.fetches = 0
        self.hang = False  # fetch never returns (a stuck loop)
        self.release = asyncio.Event()
        self.listener: AssignmentListener | None = None
        self.on_commit: Callable[[dict[TP, int]], None] = lambda positions: None

    def append(self, value: bytes, tp: TP = P0, arrival: float | None = None) -> int:
        """Write a message; its record timestamp (arrival) is the clock's now unless given."""
        part = self.log[tp]
        ts = self.clock() if arrival is None else arrival
        part.append(Message(tp, len(part), int(ts * 1000), value))
        return len(part) - 1

    async def start(self, listener: AssignmentListener) -> None:
        self.listener = listener
        await listener.on_assigned(self.tps)

    async def fetch(self, timeout: float) -> list[Batch]:
        self.fetches += 1
        if self.hang:
            await self.release.wait()
        out: list[Batch] = []
        if not self.paused:
            for tp, pos in self.pos.items():
                if self.log[tp][pos:]:
                    out.append((tp, self.log[tp][pos:]))
                self.pos[tp] = len(self.log[tp])
        if not out:
            await asyncio.sleep(min(timeout, 0.002))
        return out

    def frontier_ms(self) -> float:
        return self.frontier

    def wants_flush(self) -> bool:
        return self.flush_wanted

    def pause(self) -> None:
        self.paused = True
        self.calls.append("pause")

    def resume(self) -> None:
        self.paused = False
        self.calls.append("resume")

    def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))
        self.pos[tp] = offset

    async def committed(self, tp: TP) -> int | None:
        return None

    async def reset_position(self, tp: TP) -> int:
        return 0

    async def commit(self, positions: dict[TP, int]) -> None:
        self.on_commit(positions)
        self.commits.append(dict(positions))

    async def end_offsets(self, tps: list[TP]) -> dict[TP, int]:
        return {tp: len(self.log[tp]) for tp in tps}

    async def stop(self) -> None:
        self.release.set()


Step = str | BaseException | asyncio.Event  # "ok", raise this, or hold the request until the gate opens


class FakeClient:
    """Records every request; follows `script` (one step per request, then "ok")."""

    def __init__(self, per_request: int = 1000) -> None:
        self.per_request = per_request
        self.script: deque[Step] = deque()
        self.requests: list[tuple[str, list[dict[str, Any]]]] = []
        self.acked: list[tuple[str, dict[str, Any]]] = []

    def pack(self, records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        n = self.per_request
        return [records[i : i + n] for i in range(0, len(records), n)]

    async def send_request(
        self, stream: str, op: Any, records: list[dict[str, Any]], stop: asyncio.Event | None = None
    ) -> RequestOutcome:
        self.requests.append((stream, list(records)))
        step = self.script.popleft() if self.script else "ok"
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, asyncio.Event) and not await _opened(step, stop):
            # Told to stop before the gate opened: nothing applied, everything still pending.
            return RequestOutcome(pending=list(range(len(records))), interrupted=True, attempts=1)
        self.acked.extend((stream, r) for r in records)
        return RequestOutcome(delivered=list(range(len(records))), attempts=1)

    def totals(self) -> dict[tuple[str, str, str], Decimal]:
        out: dict[tuple[str, str, str], Decimal] = {}
        for stream, r in self.acked:
            key = (stream, r["timestamp"], r["element_name"])
            out[key] = out.get(key, Decimal(0)) + Decimal(r["value"])
        return out

    def records_for(self, ts: float, element: str) -> list[Decimal]:
        return [
            Decimal(r["value"])
            for _, r in self.acked
            if (r["timestamp"], r["element_name"]) == (stamp(ts), element)
        ]


async def _opened(gate: asyncio.Event, stop: asyncio.Event | None) -> bool:
    waiters = [asyncio.ensure_future(gate.wait())]
    if stop is not None:
        waiters.append(asyncio.ensure_future(stop.wait()))
    _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return gate.is_set()


class FakeDeadLetters:
    """Stores what it is given, or raises while `failing`."""

    def __init__(self) -> None:
        self.stored_events: list[tuple[Message, str, str]] = []
        self.stored_records: list[tuple[str, dict[str, Any], str]] = []
        self.failing = False

    async def events(self, items: list[tuple[Message, str, str]]) -> None:
        if self.failing:
            raise OSError("dlq unavailable")
        self.stored_events.extend(items)

    async def records(self, stream: str, items: list[tuple[dict[str, Any], str]]) -> None:
        if self.failing:
            raise OSError("dlq unavailable")
        self.stored_records.extend((stream, r, m) for r, m in items)


# --- the rig -------------------------------------------------------------------------------------------
@dataclass
class Rig:
    pipeline: Pipeline
    source: FakeSource
    client: FakeClient
    store: MemoryJournalStore
    dlq: FakeDeadLetters
    metrics: Metrics
    health: Health
    clock: FakeClock
    mono: FakeClock
    reloads: list[int]
    violations: list[str] = field(default_factory=list)
    expected: dict[tuple[str, str, str], Decimal] = field(default_factory=dict)

    def add(self, ts: float, element: str, value: int | str = 1, tp: TP = P0, **kw: Any) -> int:
        """A valid event, remembered as ground truth."""
        key = ("s", stamp(ts), element)
        self.expected[key] = self.expected.get(key, Decimal(0)) + Decimal(str(value))
        return self.source.append(event(ts, element, value), tp, **kw)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def cycles(self, trigger: str, outcome: str = "completed") -> float:
        return self.metric("allocd_flush_cycles_total", trigger=trigger, outcome=outcome)

    def journal(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.store.entries if e["t"] == kind]

    def check_commit(self, positions: dict[TP, int]) -> None:
        """§2.1: a committed position never passes an event still held in memory (accumulator or pending)."""
        p = self.pipeline
        held = [p.acc.min_offsets(), *(s.min_offsets for s in p.pending)]
        for tp, pos in positions.items():
            for mins in held:
                if tp in mins and pos > mins[tp]:
                    self.violations.append(f"commit {tp}@{pos} passes undelivered offset {mins[tp]}")


def make_rig(tps: tuple[TP, ...] = (P0,), per_request: int = 1000, **settings: Any) -> Rig:
    clock, mono = FakeClock(w(0, 0.5)), FakeClock(1000.0)
    base = PipelineSettings(
        window_seconds=WINDOW,
        grace_seconds=GRACE,
        tick_seconds=0.01,
        flush_on_shutdown=False,
        shutdown_timeout_seconds=2.0,
    )
    source, client, store, dlq = (
        FakeSource(clock, tps),
        FakeClient(per_request),
        MemoryJournalStore(),
        FakeDeadLetters(),
    )
    metrics = Metrics(clock=clock)
    health = Health(liveness_timeout=30.0, startup_grace=0.0, conditions=("assigned",), clock=mono)
    health.set_condition("api_key", True, "")
    reloads: list[int] = []
    pipeline = Pipeline(
        replace(base, **settings),
        source,
        Decoder(DECODER),
        client,  # type: ignore[arg-type]  # duck-typed: pack + send_request
        Journal(store),
        dlq,
        metrics,
        health,
        clock=clock,
        on_auth_failure=lambda: bool(reloads.append(1)),
    )
    rig = Rig(pipeline, source, client, store, dlq, metrics, health, clock, mono, reloads)
    source.on_commit = rig.check_commit
    return rig


@asynccontextmanager
async def running(rig: Rig) -> AsyncIterator[Rig]:
    stop = asyncio.Event()
    task = asyncio.create_task(rig.pipeline.run(stop))
    try:
        await until(lambda: bool(rig.pipeline.parts) or task.done(), "partitions assigned")
        yield rig
    finally:
        stop.set()
        rig.source.release.set()
        await asyncio.wait_for(task, 5)
    assert not rig.violations, rig.violations


async def until(check: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def polls(rig: Rig, n: int = 5) -> None:
    """Let the poll loop run `n` more iterations (to show something does *not* happen)."""
    target = rig.source.fetches + n
    await until(lambda: rig.source.fetches >= target, f"{n} polls")


def accepted(rig: Rig) -> float:
    return rig.metric("allocd_events_accepted_total", stream="s")


# --- windows and triggers ------------------------------------------------------------------------------
async def test_closed_windows_are_cut_together_as_one_snapshot_of_whole_windows() -> None:
    rig = make_rig(per_request=2)
    async with running(rig):
        # A backlog: the source has read only up to window 0, so nothing closes while it catches up,
        # although the wall clock is already in window 2.
        rig.source.frontier = T0 * 1000
        rig.clock.now = w(2, 5)
        rig.add(w(0, 1), "a", "0.1", arrival=w(0, 1))
        rig.add(w(0, 2), "b", 2, arrival=w(0, 2))
        rig.add(w(1, 1), "a", 5, arrival=w(1, 1))
        rig.add(w(0, 3), "a", "0.2", arrival=w(1, 2))  # out of order within the backlog
        rig.add(w(1, 2), "c", 1, arrival=w(1, 2))
        rig.add(w(2, 1), "d", 7, arrival=w(2, 1))  # window 2 is still open
        await until(lambda: accepted(rig) == 6, "events accepted")
        await polls(rig)
        assert rig.client.requests == [] and rig.cycles("closed") == 0
        rig.source.frontier = math.inf  # caught up: windows 0 and 1 are closed, window 2 is not
        await until(lambda: rig.cycles("closed") == 1, "one cycle")
        (cycle,) = rig.journal("cycle")
        assert sorted(start for _, start in cycle["w"]) == [int(T0 * 1000), int(w(1, 0) * 1000)]
        assert cycle["trigger"] == "closed"
        # Every cell of both windows, across the cycle's requests (2 records each), one record per cell.
        assert len(rig.client.acked) == 4 and len(rig.client.requests) == 2
        assert rig.client.records_for(w(0), "a") == [Decimal("0.3")]
        assert rig.client.records_for(w(1), "a") == [Decimal(5)]
        assert rig.client.records_for(w(2), "d") == []
        assert list(rig.pipeline.acc.windows) == [("s", int(w(2, 0) * 1000))]
        rig.clock.now = w(3, 5)
        await until(lambda: rig.client.totals() == rig.expected, "window 2 delivered at its close")
        assert rig.cycles("closed") == 2


@pytest.mark.parametrize(
    ("settings", "trigger", "cells"),
    [
        ({"max_open_keys": 3}, "key_cap", 3),
        ({"max_memory_bytes": 2 * CELL_BYTES_ESTIMATE}, "memory_cap", 2),
    ],
)
async def test_caps_force_a_cycle_of_open_windows_and_the_rest_follows_as_a_delta(
    settings: dict[str, int], trigger: str, cells: int
) -> None:
    rig = make_rig(**settings)
    async with running(rig):
        for i in range(cells):
            rig.add(w(0, 1), f"e{i}", 10 + i)
        await until(lambda: rig.cycles(trigger) == 1, f"a {trigger} cycle")
        assert rig.journal("cycle")[0]["trigger"] == trigger
        assert len(rig.client.acked) == cells  # the open window, delivered early
        assert rig.metric("allocd_open_cells") == 0
        rig.add(w(0, 2), "e0", 5)  # same window, after the forced cycle: a delta at close
        await polls(rig)
        assert rig.cycles(trigger) == 1 and len(rig.client.acked) == cells
        rig.clock.now = w(1, 5)
        await until(lambda: rig.cycles("closed") == 1, "the window's close")
        assert rig.client.records_for(w(0), "e0") == [Decimal(10), Decimal(5)]
        assert rig.client.totals() == rig.expected


async def test_a_source_that_needs_room_forces_a_cycle_of_open_windows() -> None:
    rig = make_rig()
    async with running(rig):
        rig.add(w(0), "a", 2)
        await until(lambda: accepted(rig) == 1, "accepted")
        await polls(rig)
        assert rig.client.requests == []
        rig.source.flush_wanted = True
        await until(lambda: rig.cycles("source_cap") == 1, "a source_cap cycle")
        assert rig.client.totals() == rig.expected
        assert rig.cycles("closed") == 0


async def test_max_flush_interval_forces_a_cycle_of_an_open_window() -> None:
    rig = make_rig(window_seconds=0, max_flush_interval_seconds=60)  # hourly windows
    async with running(rig):
        rig.add(T0 + 1, "a", 3)
        await until(lambda: accepted(rig) == 1, "accepted")
        rig.clock.now = T0 + 50  # the hour is open and the interval not over
        await polls(rig)
        assert rig.client.requests == []
        rig.clock.now = T0 + 62
        await until(lambda: rig.cycles("max_interval") == 1, "a max_interval cycle")
        assert rig.client.totals() == {("s", "2023-11-14T23:00:00Z", "a"): Decimal(3)}
        assert rig.cycles("closed") == 0


async def test_late_events_reach_the_api_as_a_delta_and_are_counted() -> None:
    rig = make_rig()
    async with running(rig):
        rig.add(w(0, 1), "a", 1)
        await until(lambda: accepted(rig) == 1, "read while window 0 is open")
        rig.clock.now = w(1, 5)
        await until(lambda: rig.cycles("closed") == 1, "window 0 delivered")
        assert rig.metric("allocd_events_late_total", stream="s") == 0
        # Three events for window 0 arrive after it was delivered (their arrival is now: not too late).
        rig.add(w(0, 2), "a", 2)
        rig.add(w(0, 3), "a", 3)
        rig.add(w(0, 4), "b", 4)
        await until(lambda: rig.cycles("closed") == 2, "the delta cycle")
        assert rig.client.records_for(w(0), "a") == [Decimal(1), Decimal(5)]
        assert rig.client.records_for(w(0), "b") == [Decimal(4)]
        assert rig.client.totals() == rig.expected
        assert rig.metric("allocd_events_late_total", stream="s") == 3


async def test_a_backlog_of_old_windows_is_not_counted_late() -> None:
    """Catching up after downtime: old windows are read behind the frontier; they are not late (nothing
    of them was delivered) and each reaches the API as one record."""
    rig = make_rig()
    async with running(rig):
        rig.clock.now = w(5, 5)
        rig.source.frontier = w(0, 3) * 1000
        rig.add(w(0, 1), "a", 1, arrival=w(0, 1))
        rig.add(w(0, 2), "a", 2, arrival=w(0, 2))
        await until(lambda: accepted(rig) == 2, "accepted")
        rig.source.frontier = math.inf
        await until(lambda: rig.cycles("closed") == 1, "window 0 delivered")
        assert rig.client.records_for(w(0), "a") == [Decimal(3)]
        assert rig.metric("allocd_events_late_total", stream="s") == 0


# --- backpressure and positions ------------------------------------------------------------------------
async def test_full_snapshot_queue_pauses_the_source_and_draining_resumes_it() -> None:
    rig = make_rig(max_pending_snapshots=1)
    gate = asyncio.Event()
    rig.client.script.append(gate)
    async with running(rig):
        rig.add(w(0), "a", 1)
        await until(lambda: accepted(rig) == 1, "window 0 read")
        rig.clock.now = w(1, 5)
        await until(lambda: len(rig.client.requests) == 1, "window 0 in flight")
        rig.add(w(1), "a", 2)
        await until(lambda: accepted(rig) == 2, "window 1 read")
        rig.clock.now = w(2, 5)
        await until(lambda: len(rig.pipeline.pending) == 1, "window 1 waiting behind it")
        assert not rig.source.paused  # one snapshot may wait
        rig.add(w(2), "a", 3)
        await until(lambda: accepted(rig) == 3, "window 2 read")
        rig.clock.now = w(3, 5)  # window 2 closes with no room for it
        await until(lambda: rig.source.paused, "the source paused")
        assert rig.metric("allocd_consumer_paused") == 1
        assert rig.metric("allocd_snapshots_pending") == 1
        rig.add(w(3), "a", 4)  # Kafka is the buffer: not read while paused
        await polls(rig)
        assert rig.metric("allocd_events_consumed_total", source="fake") == 3
        assert rig.source.commits == []
        gate.set()
        await until(lambda: not rig.source.paused, "the source resumed")
        assert rig.source.calls == ["pause", "resume"]
        assert rig.metric("allocd_consumer_paused") == 0
        rig.clock.now = w(4, 5)
        await until(lambda: rig.client.totals() == rig.expected, "every window delivered")
        await until(lambda: rig.source.commits[-1] == {P0: 4}, "everything committed")
        assert rig.metric("allocd_paused_seconds_total") >= 0
        assert rig.cycles("closed") == 4


async def test_committed_positions_never_pass_an_undelivered_event() -> None:
    """Events of an old and a new window interleave in each partition: delivering the old window may
    commit only up to the first event of the new one (the accumulator still holds it)."""
    rig = make_rig(tps=(P0, P1))
    async with running(rig):
        for i in range(6):
            for tp in (P0, P1):
                k = i % 2
                rig.add(w(k, 1 + i), f"e{tp[1]}", 1, tp=tp, arrival=w(1, 1))
        await until(lambda: accepted(rig) == 12, "events read")
        rig.clock.now = w(1, 1 + 8)  # window 0 closed (end + grace), window 1 open
        await until(lambda: rig.cycles("closed") == 1, "window 0 delivered")
        await until(lambda: len(rig.source.commits) == 1, "a commit")
        assert rig.source.commits[0] == {P0: 1, P1: 1}  # offset 1 holds window 1's first event
        latest = {e["tp"][1]: e["pos"] for e in rig.journal("ckpt")}  # the cycle's, after the assignment's
        assert latest == {0: 1, 1: 1}
        rig.clock.now = w(2, 5)
        await until(lambda: len(rig.source.commits) == 2, "window 1 delivered")
        assert rig.source.commits[1] == {P0: 6, P1: 6}
        assert rig.client.totals() == rig.expected


async def test_dead_letter_failure_holds_progress_and_pauses() -> None:
    rig = make_rig()
    gate = asyncio.Event()
    async with running(rig):
        rig.add(w(0), "a", 1)
        rig.add(w(0), "b", 1)
        await until(lambda: accepted(rig) == 2, "window 0 read")
        rig.client.script.append(gate)
        rig.clock.now = w(1, 5)
        await until(lambda: len(rig.client.requests) == 1, "window 0 in flight")
        rig.dlq.failing = True
        rig.source.append(b"not json")  # offset 2
        rig.add(w(1), "c", 1)  # offset 3
        await until(lambda: rig.metric("allocd_dlq_write_errors_total") >= 2, "failed DLQ writes")
        assert rig.source.paused and rig.metric("allocd_consumer_paused") == 1
        gate.set()  # window 0 is acknowledged, but its cycle may not commit past the event held
        await until(lambda: len(rig.client.acked) == 2, "window 0 acknowledged")
        await until(lambda: rig.metric("allocd_dlq_write_errors_total") >= 3, "another failed DLQ write")
        # No commit, and no checkpoint but the one the assignment wrote (at the recovered position, 0).
        assert rig.source.commits == [] and [e["pos"] for e in rig.journal("ckpt")] == [0]
        rig.dlq.failing = False
        await until(lambda: bool(rig.source.commits), "the cycle commits")
        assert rig.source.commits == [{P0: 3}]  # past the dead-lettered event, not past the open window
        ((msg, reason, _),) = rig.dlq.stored_events
        assert (msg.offset, reason) == (2, "not_json")
        await until(lambda: not rig.source.paused, "resumed")
        assert rig.metric("allocd_dlq_writes_total", kind="event") == 1
        assert rig.metric("allocd_events_rejected_total", reason="not_json") == 1


# --- rebalance -----------------------------------------------------------------------------------------
async def test_revoke_abandons_the_cycle_and_assignment_recovers_from_the_journal() -> None:
    rig = make_rig(per_request=2)
    gate = asyncio.Event()
    async with running(rig):
        rig.add(w(0), "z", 9)  # offset 0: window 0, delivered and checkpointed first
        await until(lambda: accepted(rig) == 1, "window 0 read")
        rig.clock.now = w(1, 5)
        await until(lambda: len(rig.source.commits) == 1, "window 0 committed")
        assert rig.source.commits == [{P0: 1}]
        for i, element in enumerate("abcd"):  # offsets 1-4: window 1, two requests of two cells
            rig.add(w(1, i), element, 10 + i)
        await until(lambda: accepted(rig) == 5, "window 1 read")
        rig.client.script.extend(["ok", gate])  # the second request is held: in flight at the revoke
        rig.clock.now = w(2, 5)
        await until(lambda: len(rig.client.requests) == 3, "window 1's second request in flight")
        rig.add(w(2), "y", 1)  # offset 5, in memory only
        await until(lambda: accepted(rig) == 6, "window 2 read")

        await rig.pipeline.on_revoked([P0])
        assert rig.cycles("closed", "abandoned") == 1
        assert len(rig.pipeline.acc) == 0 and not rig.pipeline.pending and not rig.pipeline.parts
        assert not rig.health.readiness().ok
        first_half = [cell_digest(("s", int(w(1, 0) * 1000), e, ())) for e in "ab"]
        last_ack = rig.journal("ack")[-1]  # the first request, settled in one answer: `all` its cells
        assert last_ack.get("all") and last_ack["r"] == 0
        (sent,) = [e for e in rig.journal("sent") if e["c"] == last_ack["c"] and e["r"] == 0]
        assert sent["cells"] == first_half
        assert rig.journal("fail")[-1]["r"] == 1  # the held request: known not applied, not in doubt
        # The one written at the assignment (0) and window 0's cycle's (1): the interrupted cycle wrote none.
        assert [e["pos"] for e in rig.journal("ckpt")] == [0, 1]

        await rig.pipeline.on_assigned([P0])
        assert rig.source.seeks[-1] == (P0, 1)  # the checkpoint, not the start of the partition
        assert rig.health.readiness().ok
        rig.clock.now = w(3, 5)
        await until(lambda: rig.client.totals() == rig.expected, "exact totals after recovery")
        # Replay skipped the acknowledged half of the interrupted cycle: every cell sent once.
        assert rig.metric("allocd_events_skipped_total") == 2
        sent = [(r["timestamp"], r["element_name"]) for _, r in rig.client.acked]
        assert len(sent) == len(set(sent)) == 6
        # The cycle commits after its last acknowledgement (the poll loop may hold the lock a moment).
        await until(lambda: rig.source.commits[-1] == {P0: 6}, "the cycle committed")


# --- the API key and liveness --------------------------------------------------------------------------
async def test_rejected_key_turns_readiness_false_until_the_api_accepts_it() -> None:
    rig = make_rig()
    rig.client.script.append(AuthError("the API refused the key", 403))
    async with running(rig):
        rig.add(w(0), "a", 1)
        await until(lambda: accepted(rig) == 1, "window 0 read")
        rig.clock.now = w(1, 5)
        await until(lambda: not rig.health.readiness().ok, "readiness false")
        assert "api_key: api key rejected (403)" in rig.health.readiness().body["reasons"]
        assert rig.reloads == [1]  # the key file was re-read
        assert rig.dlq.stored_events == [] and rig.client.acked == []
        await until(lambda: rig.health.readiness().ok, "readiness back", timeout=4)
        assert rig.client.totals() == rig.expected
        assert rig.health.liveness().ok


async def test_transient_failures_keep_the_cycle_and_deliver_it_later() -> None:
    rig = make_rig()
    rig.client.script.append(TransientError("retry deadline passed", 503))
    async with running(rig):
        rig.add(w(0), "a", 1)
        await until(lambda: accepted(rig) == 1, "window 0 read")
        rig.clock.now = w(1, 5)
        await until(lambda: rig.client.totals() == rig.expected, "delivered after the retry", timeout=4)
        assert len(rig.client.requests) == 2
        assert rig.cycles("closed") == 1 and rig.dlq.stored_records == []


async def test_idle_loops_keep_beating() -> None:
    rig = make_rig()
    async with running(rig):
        rig.mono.now += 1000  # far beyond the liveness timeout of 30 s
        assert not rig.health.liveness().ok  # nobody has beaten since the jump ...
        await until(lambda: rig.health.liveness().ok, "beats after the jump", timeout=3)  # ... idle loops do
        assert set(rig.health.liveness().body["seconds_since_beat"]) == {"poll", "flush"}


async def test_stuck_fetch_fails_liveness_after_the_timeout() -> None:
    rig = make_rig()
    async with running(rig):
        rig.source.hang = True
        target = rig.source.fetches + 1
        await until(lambda: rig.source.fetches >= target, "a fetch that never returns")
        rig.mono.now += 29
        await polls_of_flush(rig)
        assert rig.health.liveness().ok  # within the timeout
        rig.mono.now += 2
        await polls_of_flush(rig)
        probe = rig.health.liveness()
        assert not probe.ok and probe.body["stalled"] == ["poll"]  # the delivery loop still beats


async def polls_of_flush(rig: Rig) -> None:
    """Wait until the delivery loop has beaten at the monotonic clock's current time."""
    rig.pipeline.work.set()  # wake it: it beats on every idle wake-up
    await until(lambda: rig.health.liveness().body["seconds_since_beat"]["flush"] == 0, "a delivery beat")


async def test_delivery_waiting_through_an_api_outage_stays_alive() -> None:
    """A cycle that retries for longer than the liveness timeout is slow, not stuck: the delivery loop must
    keep beating while it backs off and while a request (bounded by the client's deadlines) is in flight."""
    rig = make_rig()
    gate = asyncio.Event()
    rig.client.script.extend([TransientError("retry deadline passed", 503), gate])
    async with running(rig):
        rig.add(w(0), "a", 1)
        await until(lambda: accepted(rig) == 1, "window 0 read")
        rig.clock.now = w(1, 5)
        await until(lambda: len(rig.client.requests) == 1, "the first attempt failed")
        rig.mono.now += 31  # backing off, past the liveness timeout
        await until(lambda: rig.health.liveness().ok, "a beat while backing off")
        await until(lambda: len(rig.client.requests) == 2, "the request retried and in flight")
        rig.mono.now += 31  # the request is held (the client retrying inside its deadline)
        await until(lambda: rig.health.liveness().ok, "a beat while the request is in flight")
        gate.set()
        await until(lambda: rig.client.totals() == rig.expected, "delivered")


class HangingJournalStore(MemoryJournalStore):
    def __init__(self) -> None:
        super().__init__()
        self.hang = asyncio.Event()  # set: appends never finish

    async def append(self, entries: list[dict[str, Any]]) -> None:
        if self.hang.is_set():
            await asyncio.Event().wait()
        await super().append(entries)


async def test_stuck_delivery_fails_liveness() -> None:
    rig = make_rig(shutdown_timeout_seconds=1.0)  # shutdown waits for the stuck cycle that long
    store = HangingJournalStore()
    rig.pipeline.journal = rig.pipeline.cycle.journal = Journal(store)
    async with running(rig):
        rig.add(w(0), "a", 1)
        await until(lambda: accepted(rig) == 1, "window 0 read")
        store.hang.set()
        rig.clock.now = w(1, 5)
        await until(
            lambda: rig.metric("allocd_snapshots_pending") == 0 and not rig.pipeline.idle.is_set(),
            "a cycle started",
        )
        rig.mono.now += 31
        await polls(rig)
        probe = rig.health.liveness()
        assert not probe.ok and probe.body["stalled"] == ["flush"]


class StaleFetchSource(FakeSource):
    """A fetch that spans an assignment: it reads from where the consumer stood, then the rebalance callback
    runs (and seeks elsewhere) before the batch is handed over — what aiokafka can do under load."""

    stale_once = False

    async def fetch(self, timeout: float) -> list[Batch]:
        if not self.stale_once:
            return await super().fetch(timeout)
        self.stale_once = False
        self.fetches += 1
        out: list[Batch] = [(tp, self.log[tp][pos:]) for tp, pos in self.pos.items()]
        for tp in self.pos:
            self.pos[tp] = len(self.log[tp])
        assert self.listener is not None
        await self.listener.on_assigned(self.tps)  # seeks back to the recovered position (0)
        return out


async def test_a_batch_fetched_across_an_assignment_is_fetched_again_not_lost() -> None:
    rig = make_rig()
    rig.source.__class__ = StaleFetchSource
    async with running(rig):
        for i in range(10):
            rig.add(w(0), f"e{i}")
        await until(lambda: accepted(rig) == 10, "the first events accumulated")
        await rig.pipeline.on_revoked([P0])  # memory dropped: the next owner re-derives from offset 0
        for i in range(10, 20):
            rig.add(w(0), f"e{i}")
        rig.source.stale_once = True  # the next fetch returns offsets 10-19 after the seek to 0
        await until(lambda: accepted(rig) >= 30, "every event re-derived after the assignment")
        rig.clock.now = w(1, GRACE + 0.5)  # window 0 closes
        await until(lambda: rig.client.totals() == rig.expected, "exact totals")
        assert accepted(rig) == 30  # 10 before the revoke, then all 20 once each


async def test_an_assignment_during_shutdown_is_not_recovered() -> None:
    """A rebalance that completes while the consumer leaves the group must not read the journal (slow)
    nor take the partitions: the exit would miss shutdown_timeout, and nothing would be fetched anyway."""
    rig = make_rig()
    reads: list[list[TP]] = []
    read_recent = rig.store.read_recent

    async def counting(claim: Any = ()) -> TailRead:
        reads.append(list(claim))
        return await read_recent(claim)

    rig.store.read_recent = counting  # type: ignore[method-assign]
    async with running(rig):
        await until(lambda: P0 in rig.pipeline.parts, "the first assignment")
        assert reads == [[P0]]
        rig.pipeline.stopping = True
        await rig.pipeline.on_assigned([("usage", 9)])
        assert ("usage", 9) not in rig.pipeline.parts
        assert reads == [[P0]]  # no recovery read
        rig.pipeline.stopping = False


# --- checkpoints between cycles -------------------------------------------------------------------------
async def test_an_assignment_checkpoints_what_it_recovered_and_an_idle_partition_is_checkpointed_again() -> (
    None
):
    rig = make_rig(checkpoint_interval_seconds=60.0)
    async with running(rig):
        await until(lambda: len(rig.journal("ckpt")) == 1, "the assignment's checkpoint")
        assert rig.journal("ckpt")[0]["pos"] == 0 and rig.source.commits == []  # nothing moved: no commit
        rig.clock.now += 59
        assert not rig.pipeline._checkpoint_due()  # not yet
        rig.clock.now += 2  # idle for the interval: checkpointed again, with no cycle
        await until(lambda: len(rig.journal("ckpt")) == 2, "the idle partition's checkpoint")
        assert rig.cycles("closed") == 0


async def test_skipped_events_move_the_position_of_an_idle_checkpoint_and_its_commit() -> None:
    rig = make_rig(checkpoint_interval_seconds=60.0)
    async with running(rig):
        await until(lambda: len(rig.journal("ckpt")) == 1, "the assignment's checkpoint")
        rig.source.append(b"not json")  # dead-lettered: nothing held in memory, the position moves on
        await until(lambda: rig.metric("allocd_dlq_writes_total", kind="event") == 1, "dead-lettered")
        rig.clock.now += 61
        await until(lambda: rig.source.commits == [{P0: 1}], "the position committed")
        assert rig.journal("ckpt")[-1]["pos"] == 1


async def test_a_partition_without_a_checkpoint_starts_from_the_group_commit_then_the_reset_policy() -> None:
    rig = make_rig()
    commits = {P0: 4}

    async def committed(tp: TP) -> int | None:
        return commits.get(tp)

    rig.source.committed = committed  # type: ignore[method-assign]
    async with running(rig):
        assert rig.source.seeks[-1] == (P0, 4)  # no checkpoint: the group commit
        await rig.pipeline.on_revoked([P0])
        rig.store.entries.clear()  # the journal lost it (retention, or a new checkpoint topic)
        commits.clear()
        await rig.pipeline.on_assigned([P0])
        assert rig.source.seeks[-1] == (P0, 0)  # neither: the reset policy (earliest here)


async def test_a_source_that_will_not_stop_does_not_hold_the_exit_past_shutdown_timeout() -> None:
    """aiokafka's stop can rejoin the group first (a rebalance under way): the deadline still holds."""
    rig = make_rig(shutdown_timeout_seconds=1.0)
    stuck = asyncio.Event()

    async def stop() -> None:
        await stuck.wait()  # never set

    rig.source.stop = stop  # type: ignore[method-assign]
    done = asyncio.Event()
    task = asyncio.create_task(rig.pipeline.run(done))
    await until(lambda: bool(rig.pipeline.parts), "partitions assigned")
    loop = asyncio.get_running_loop()
    started = loop.time()
    done.set()
    rig.source.release.set()
    await asyncio.wait_for(task, 5)
    assert loop.time() - started <= 1.2
