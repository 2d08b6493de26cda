"""Wires source → decode → skip rule → accumulator → flush cycles → journal → commits (DESIGN.md §1–§2).

Two tasks share the state under one lock: the *poll loop* (fetch a batch, decode, skip what the journal says
is delivered, accumulate, dead-letter the invalid, cut snapshots when windows close or caps force them,
pause when snapshots pile up) and the *delivery loop* (one cycle at a time, in order). Rebalances and
shutdown go through one path — abandon: stop sending, discard memory, re-derive from the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from allocd.cloudzero.client import CloudZeroClient
from allocd.cloudzero.records import (
    Granularity,
    Op,
    filter_from_canonical,
    format_value,
    needs_rounding,
)
from allocd.config import PipelineSettings
from allocd.errors import AuthError, InvalidEvent, TransientError
from allocd.events import Decoder
from allocd.journal import Journal, PartitionState, cell_digest
from allocd.sources.base import Batch, DeadLetters, LostOwnership, Message, Source
from allocd.windows import TP, Accumulator, Snapshot, WindowKey, window_bounds

__all__ = ["Pipeline"]

T = TypeVar("T")

log = logging.getLogger("allocd.pipeline")


class _Abandoned(Exception):
    """The cycle or batch in progress must be dropped: a revoke or shutdown is under way."""


@dataclass(slots=True)
class _Request:
    stream: str
    records: list[dict[str, Any]]
    cells: list[str]  # digests, in record order


class Pipeline:
    """The daemon's main job. `run()` returns after a clean shutdown (stop event set)."""

    def __init__(
        self,
        settings: PipelineSettings,
        source: Source,
        decoder: Decoder,
        client: CloudZeroClient,
        journal: Journal,
        dead_letters: DeadLetters,
        metrics: Any,
        health: Any,
        *,
        clock: Callable[[], float] = time.time,
        on_auth_failure: Callable[[], bool] | None = None,
    ) -> None:
        self.s = settings
        self.source = source
        self.decoder = decoder
        self.client = client
        self.journal = journal
        self.dlq = dead_letters
        self.metrics = metrics
        self.health = health
        self.clock = clock
        self.reload_key = on_auth_failure or (lambda: False)
        self.flush_on_shutdown = settings.flushes_on_shutdown(source.name != "kafka")
        self.acc = Accumulator(settings.window_seconds * 1000, clock=clock)
        self.parts: dict[TP, PartitionState] = {}
        self.next_offset: dict[TP, int] = {}
        self.pending: deque[Snapshot] = deque()
        self.lock = asyncio.Lock()
        self.stop_sending = asyncio.Event()  # set: no new request or retry may start
        self.work = asyncio.Event()  # wakes the delivery loop
        self.idle = asyncio.Event()  # set while the delivery loop holds no cycle
        self.idle.set()
        self.abandoning = False
        self.paused = False
        self.stopping = False
        self.reopened: set[WindowKey] = set()  # closed windows that late events opened again (deltas)
        self._deliver_task: asyncio.Task[None] | None = None
        self.assignment = 0  # counts assignments; _poll_once drops a batch fetched across one

    # --- lifecycle -------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self.source.start(self)
        self._deliver_task = asyncio.create_task(self._delivery_loop(), name="allocd-delivery")
        try:
            while not stop.is_set():
                await self._poll_once()
                if self._deliver_task.done():  # a bug in delivery must not go unnoticed
                    self._deliver_task.result()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        """SIGTERM: stop fetching; with flush_on_shutdown deliver everything first; then abandon (§2.6)."""
        self.stopping = True
        deadline = time.monotonic() + self.s.shutdown_timeout_seconds
        self.source.pause()
        if self.flush_on_shutdown and not self.abandoning:
            async with self.lock:
                if len(self.acc):
                    self._cut(self.acc.take_all(self._boundary(), "shutdown"))
            await self._wait_drained(deadline - time.monotonic() - 1.0)
        await self._abandon("shutdown", max(0.5, deadline - time.monotonic() - 0.5))
        if self._deliver_task:
            self._deliver_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._deliver_task
        await self.source.stop()

    async def _wait_drained(self, budget: float) -> None:
        end = time.monotonic() + max(0.0, budget)
        while (self.pending or not self.idle.is_set()) and time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), timeout=min(0.2, end - time.monotonic()))
            await asyncio.sleep(0)

    # --- rebalance (AssignmentListener) ----------------------------------------------------------------
    async def on_revoked(self, tps: list[TP]) -> None:
        await self._abandon("revoke", self.s.shutdown_timeout_seconds)
        for tp in tps:
            self.metrics.forget_partition(tp[0], tp[1])
        self.health.set_condition("assigned", False, "rebalancing")

    async def on_assigned(self, tps: list[TP]) -> None:
        if self.stopping:
            # A rebalance completing while the consumer leaves the group (SIGTERM): the partitions go to
            # the next owner as soon as we are gone. Recovering them (reading the journal) would only
            # push the exit past shutdown_timeout (chaos seed 202: 9.3 s against 8).
            log.info("partitions assigned while stopping; not taken", extra={"partitions": len(tps)})
            return
        recovered = await self.journal.recover(tps)
        # One in-doubt request names every partition of its cycle: count it once, not once per partition.
        in_doubt: dict[tuple[str, int], int] = {}
        for rec in recovered.values():
            in_doubt.update(rec.in_doubt)
        if in_doubt:
            self.metrics.api_in_doubt_requests.labels("sum").inc(len(in_doubt))
            self.metrics.api_in_doubt_records.labels("sum").inc(sum(in_doubt.values()))
            log.warning(
                "recovered requests in doubt: their cells will be sent again (at-least-once)",
                extra={"requests": len(in_doubt), "cells": sum(in_doubt.values())},
            )
        async with self.lock:
            for tp in tps:
                rec = recovered[tp]
                state = rec.state
                origin = "checkpoint"
                if state.position is None:
                    committed = await self.source.committed(tp)
                    if committed is not None:
                        origin, state.position = "group commit", committed
                    else:
                        origin, state.position = "reset policy", await self.source.reset_position(tp)
                # Always seek: the fetcher may already have run ahead from another position. What it
                # fetched before this point is dropped whole by _poll_once (see _refetch): the offset
                # guard in _process drops only records below next_offset, not a batch that skips ahead.
                self.source.seek(tp, state.position)
                self.parts[tp] = state
                self.next_offset[tp] = state.position
                log.info(
                    "partition assigned",
                    extra={
                        "topic": tp[0],
                        "partition": tp[1],
                        "offset": state.position,
                        "origin": origin,
                        "marks": len(state.marks),
                        "skips": len(state.skips),
                    },
                )
            self.assignment += 1  # every batch whose fetch began before the seeks above is stale
            self.health.set_condition("assigned", bool(self.parts), "no partitions assigned")

    async def _abandon(self, why: str, budget: float) -> None:
        """Stop sending, let the request in flight finish (journaled by the delivery loop), then drop every
        snapshot and the accumulator: what was not delivered is re-derived from the source (§2.3)."""
        self.abandoning = True
        self.stop_sending.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), timeout=max(0.1, budget))
            if not self.idle.is_set() and self._deliver_task:
                log.warning("request in flight did not finish in time; it stays in doubt", extra={"why": why})
                self._deliver_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._deliver_task
                self.idle.set()
                if not self.stopping:
                    self._deliver_task = asyncio.create_task(self._delivery_loop(), name="allocd-delivery")
            async with self.lock:
                dropped = len(self.pending) + (1 if len(self.acc) else 0)
                self.pending.clear()
                self.acc.clear()
                self.reopened.clear()
                self.parts.clear()
                self.next_offset.clear()
                self._set_paused(False)
                self._publish_gauges()
            if dropped:
                log.info("in-memory state dropped; it will be re-derived", extra={"why": why})
        finally:
            self.stop_sending.clear()
            self.abandoning = False

    # --- the poll loop ---------------------------------------------------------------------------------
    async def _poll_once(self) -> None:
        assignment = self.assignment
        batch = await self.source.fetch(self.s.tick_seconds)
        self.health.beat("poll")
        if self.abandoning:
            return
        try:
            async with self.lock:
                if batch and assignment != self.assignment:
                    self._refetch(batch)
                elif batch:
                    await self._process(batch)
                self._maybe_cut()
                self._publish_gauges()
        except _Abandoned:
            pass

    def _refetch(self, batch: list[Batch]) -> None:
        """Drop a batch fetched while partitions were being assigned, and fetch its partitions again from
        where the pipeline stands. It may hold records from before the assignment's seek: processing them
        would move next_offset past records the seek brings back, which the offset guard then drops as
        re-fetched — lost (seen as a fetch from the reset position racing the journal recovery)."""
        for tp, _ in batch:
            if tp in self.next_offset:
                self.source.seek(tp, self.next_offset[tp])

    async def _process(self, batch: list[Batch]) -> None:
        decode = self.decoder.decode_fields
        parts = self.parts
        next_offset = self.next_offset
        acc = self.acc
        override_ms = self.acc.override_ms
        # Late is judged like closing (§3), against what the source has read too: a backlog is not late.
        horizon = min(self.clock() * 1000, self.source.frontier_ms())
        reopened = self.reopened
        grace_ms = int(self.s.grace_seconds * 1000)
        rejected: list[tuple[Message, str, str]] = []
        accepted: dict[str, int] = {}
        late: dict[str, int] = {}
        skipped = 0
        # Per stream, the window its previous event fell in: [start, end, key, WindowState and its rows once
        # an event counted, late, events counted]. Events come nearly in time order, so most hit it (a
        # stream's granularity is fixed by the decoder's config). Valid for one partition's run only: windows
        # are cut between batches, and a window notes each partition's lowest offset on its first count.
        seen: list[list[Any]] = []
        consumed = 0
        for tp, records in batch:
            consumed += len(records)
            state = parts.get(tp)
            if state is None:
                continue  # not ours any more
            may_skip = bool(state.marks or state.skips)
            expect = next_offset[tp]
            current: dict[str, list[Any]] = {}
            for rec in records:
                offset = rec.offset
                if offset < expect:
                    continue  # a re-fetch of what was processed
                expect = offset + 1
                try:
                    stream, ts, element, flt, value, _, granularity = decode(rec.value, rec.timestamp)
                except InvalidEvent as exc:
                    raw = rec.value if rec.value is not None else b""
                    rejected.append((Message(tp, offset, rec.timestamp, raw), exc.reason, exc.detail))
                    continue
                w = current.get(stream)
                if w is None or not w[0] <= ts < w[1]:
                    start, end = window_bounds(ts, granularity, override_ms)
                    w = current[stream] = [start, end, (stream, start), None, None, False, 0]
                    seen.append(w)
                if may_skip and state.should_skip(offset, w[2], (stream, w[0], element, flt)):
                    skipped += 1
                    continue
                rows = w[4]
                if rows is None:  # the window's first counted event in this run: is it late?
                    wk = w[2]
                    w[5] = wk in reopened or (w[1] + grace_ms <= horizon and wk not in acc.windows)
                    if w[5]:
                        reopened.add(wk)  # every event of a re-opened window is late, not only its first
                    window = w[3] = acc.window(wk, w[1], granularity)
                    if tp not in window.min_offsets:  # offsets rise in a partition: the first is the lowest
                        window.min_offsets[tp] = offset
                    rows = w[4] = window.rows
                w[6] += 1
                # WindowState.add, inlined: the call alone was a tenth of this loop's cost.
                row = rows.get(flt)
                if row is None:
                    row = rows[flt] = {}
                old = row.get(element)
                if old is None:
                    row[element] = value
                    w[3].cell_count += 1
                else:
                    row[element] = old + value
            next_offset[tp] = expect
        for w in seen:
            stream, counted = w[2][0], w[6]
            accepted[stream] = accepted.get(stream, 0) + counted
            if w[5]:
                late[stream] = late.get(stream, 0) + counted
        self.metrics.record_batch(
            self.source.name, consumed, accepted, late, skipped, [r for _, r, _ in rejected]
        )
        if rejected:
            await self._dead_letter(lambda: self.dlq.events(rejected), "event", len(rejected))

    async def _dead_letter(self, write: Callable[[], Any], kind: str, count: int) -> None:
        """Write to the DLQ or wait: a DLQ that cannot be written stops progress, it never drops (§1)."""
        delay = 0.2
        while True:
            try:
                await write()
                self.metrics.dlq_written(kind, count)
                return
            except Exception as exc:  # the store's error, whatever the backend
                self.metrics.dlq_write_errors.inc()
                log.error("dead-letter write failed; holding progress", extra={"error": repr(exc)})
            if self.abandoning or self.stop_sending.is_set():
                raise _Abandoned
            self._set_paused(True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _boundary(self) -> dict[TP, int]:
        return dict(self.next_offset)

    def _maybe_cut(self) -> None:
        # An idle delivery loop takes the next snapshot at once, so it does not count against the queue.
        room = len(self.pending) < self.s.max_pending_snapshots + (1 if self.idle.is_set() else 0)
        trigger = self._trigger()
        if trigger is None:
            self._set_paused(False)
            return
        if not room:
            # Kafka is the buffer: stop reading until the delivery loop catches up (still polled).
            self._set_paused(trigger != "closed" or len(self.pending) > 0)
            return
        if trigger == "closed":
            keys = self._closed()
            self._cut(self.acc.take(keys, self._boundary(), trigger))
        else:
            self._cut(self.acc.take_all(self._boundary(), trigger))
        self._set_paused(False)

    def _trigger(self) -> str | None:
        if not len(self.acc):
            return None
        if len(self.acc) >= self.s.max_open_keys:
            return "key_cap"
        if self.acc.memory_estimate() >= self.s.max_memory_bytes:
            return "memory_cap"
        if self.source.wants_flush():
            return "source_cap"
        if self.clock() - self.acc.oldest_opened() >= self.s.max_flush_interval_seconds:
            return "max_interval"  # bounds how long an event waits in memory (and the offset lag)
        if self._closed():
            return "closed"
        return None

    def _closed(self) -> list[WindowKey]:
        """Windows past end + grace on the wall clock and in what the source has read (§3)."""
        horizon = min(self.clock() * 1000, self.source.frontier_ms())
        if horizon == -math.inf:  # a partition with a backlog and nothing read yet
            return []
        return self.acc.closed(int(horizon), int(self.s.grace_seconds * 1000))

    def _cut(self, snap: Snapshot) -> None:
        self.reopened.difference_update(snap.windows)
        self.pending.append(snap)
        self.work.set()
        log.debug("snapshot cut", extra={"trigger": snap.trigger, "cells": snap.cell_count})

    def _set_paused(self, paused: bool) -> None:
        if paused == self.paused:
            return
        self.paused = paused
        if paused:
            self.source.pause()
        elif not self.stopping:
            self.source.resume()
        self.metrics.set_paused(paused)

    def _publish_gauges(self) -> None:
        self.metrics.set_accumulator(len(self.acc), len(self.acc.windows), self.acc.memory_estimate())
        self.metrics.snapshots_pending.set(len(self.pending))

    # --- the delivery loop -----------------------------------------------------------------------------
    async def _delivery_loop(self) -> None:
        while True:
            while not self.pending:
                self.work.clear()
                self.health.beat("flush")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.work.wait(), timeout=max(1.0, self.s.tick_seconds))
            if self.abandoning:
                await asyncio.sleep(0.05)
                continue
            snap = self.pending.popleft()
            self.idle.clear()
            started = time.monotonic()
            try:
                outcome = await self._run_cycle(snap)
            except _Abandoned:
                outcome = "abandoned"
            finally:
                self.idle.set()
            self.metrics.flush_cycle(snap.trigger, outcome, time.monotonic() - started, snap.cell_count)
            self.health.beat("flush")

    async def _run_cycle(self, snap: Snapshot) -> str:
        """One flush cycle, in the order correctness depends on:

        1. journal the cycle (boundary, windows) before its first request;
        2. per request: journal `sent` → send → dead-letter refused records → journal `ack` of its cells;
        3. the cycle completed: its windows' marks move to its boundary;
        4. checkpoint every owned partition (position + marks + skips) — the authority;
        5. commit the same positions to the group, for lag tools.
        A revoke or shutdown between steps abandons the cycle; the journal says what was delivered.
        """
        if not snap.cell_count:
            return "completed"
        # Step 1
        cid = await self._journaled(lambda: self.journal.cycle_started(snap))
        # Step 2
        for n, req in enumerate(self._requests(snap)):
            await self._deliver(cid, n, req, list(snap.boundary))
        # Step 3
        async with self.lock:
            if self.abandoning:
                raise _Abandoned
            for wk in snap.windows:
                for tp, boundary in snap.boundary.items():
                    state = self.parts.get(tp)
                    if state is not None and state.marks.get(wk, -1) < boundary:
                        state.marks[wk] = boundary
            positions = self._positions()
            for tp, pos in positions.items():
                self.parts[tp].prune(pos)
            states = {
                tp: PartitionState(s.position, dict(s.marks), dict(s.skips)) for tp, s in self.parts.items()
            }
        # Step 4 (only partitions still ours: a stale owner must not write over the new owner's checkpoint)
        if not await self._journaled(lambda: self.journal.still_owner(list(states))):
            self.metrics.fenced_requests.inc()
            raise _Abandoned
        await self._journaled(lambda: self.journal.checkpoint(states))
        # Step 5
        try:
            await self.source.commit(positions)
            self.metrics.commit_succeeded()
            for (topic, part), pos in positions.items():
                self.metrics.set_partition(topic, part, committed=pos)
        except LostOwnership as exc:
            log.warning("group commit failed: partitions lost; stopping delivery", extra={"error": str(exc)})
            self.stop_sending.set()
        return "completed"

    def _positions(self) -> dict[TP, int]:
        """Per partition, the lowest offset of any event not yet delivered (§2.1)."""
        positions = dict(self.next_offset)
        holders = [self.acc.min_offsets(), *(s.min_offsets for s in self.pending)]
        for mins in holders:
            for tp, off in mins.items():
                if tp in positions and off < positions[tp]:
                    positions[tp] = off
        return positions

    def _requests(self, snap: Snapshot) -> list[_Request]:
        by_stream: dict[str, tuple[list[dict[str, Any]], dict[int, str]]] = {}
        rounded = 0
        for cell, granularity, value in snap.cells():
            stream, start, element, flt = cell
            record = _record(start, granularity, element, flt, value)
            if needs_rounding(value):
                rounded += 1
            recs, digests = by_stream.setdefault(stream, ([], {}))
            recs.append(record)
            digests[id(record)] = cell_digest(cell)
        if rounded:
            self.metrics.rounded_cells.inc(rounded)
        out = []
        for stream, (recs, digests) in by_stream.items():
            for packed in self.client.pack(recs):
                out.append(_Request(stream, packed, [digests[id(r)] for r in packed]))
        return out

    async def _deliver(self, cid: str, n: int, req: _Request, tps: list[TP]) -> None:
        """Send one request until every record is settled; journal before and after each answer. Raise
        _Abandoned when told to stop: what was acknowledged is journaled first, and what may have been
        applied without an answer is left in doubt (no `fail` entry), to be counted by whoever recovers."""
        await self._journaled(lambda: self.journal.request_sent(cid, n, req.cells))
        if not await self._journaled(lambda: self.journal.still_owner(tps)):
            # Another member claimed one of these partitions: it re-derives them from the journal, which
            # does not hold this request's `sent` as in doubt once `fail` follows. Sending now would count
            # its events twice (DESIGN §2.6: a member that learns it lost its partitions stops at once).
            log.warning("partitions claimed by another member; not sending", extra={"cycle": cid})
            await self._journaled(lambda: self.journal.request_failed(cid, n))
            self.metrics.fenced_requests.inc()
            raise _Abandoned
        remaining = list(range(len(req.records)))
        doubt = False
        delay = 1.0
        while remaining:
            self.health.beat("flush")  # a cycle can span hours at 100 records/s: each request is progress
            if self.stop_sending.is_set():
                if not doubt:
                    await self._journaled(lambda: self.journal.request_failed(cid, n))
                raise _Abandoned
            records = [req.records[i] for i in remaining]
            try:
                out = await self._beating(
                    self.client.send_request(req.stream, Op.SUM, records, stop=self.stop_sending)
                )
            except (AuthError, TransientError) as exc:
                await self._wait_after(exc, delay)
                delay = min(delay * 2, 60.0)
                continue
            doubt = doubt or out.in_doubt > 0
            delivered = [remaining[i] for i in out.delivered]
            rejected = [(remaining[i], msg) for i, msg in out.rejected]
            if rejected:
                refused = [(req.records[i], msg) for i, msg in rejected]
                await self._dead_letter(
                    lambda r=refused: self.dlq.records(req.stream, r), "record", len(refused)
                )
                log.error("the API refused records; they are in the DLQ", extra={"stream": req.stream})
            settled = [req.cells[i] for i in delivered] + [req.cells[i] for i, _ in rejected]
            if settled:
                await self._journaled(lambda s=settled: self.journal.request_settled(cid, n, s))
            remaining = [remaining[i] for i in out.pending]
            if remaining and out.error is not None:
                await self._wait_after(out.error, delay)
                delay = min(delay * 2, 60.0)
        self.health.set_condition("api_key", True, "")

    async def _wait_after(self, exc: Exception, delay: float) -> None:
        """A request stopped early (retry deadline or 403): wait, and on 403 re-read the key (§2.7)."""
        if isinstance(exc, AuthError):
            self.health.set_condition("api_key", False, "api key rejected (403)")
            log.error("the API rejected the key (403); delivery paused until it is accepted")
            self.reload_key()
        else:
            log.warning("request still failing after retries; trying again", extra={"error": str(exc)})
        await self._interruptible_sleep(delay)

    async def _journaled(self, write: Callable[[], Awaitable[T]]) -> T:
        """Write to the journal, retrying while it is unavailable: sending waits meanwhile (an
        acknowledgement that cannot be recorded is a future double, §2.3). Gives up only when abandoned."""
        delay = 0.2
        while True:
            try:
                return await write()
            except Exception as exc:  # the store's error, whatever the backend
                log.error("journal write failed; delivery waits", extra={"error": repr(exc)})
            if self.abandoning and self.stop_sending.is_set():
                raise _Abandoned
            self.health.beat("flush")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _interruptible_sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await self._beating(asyncio.wait_for(self.stop_sending.wait(), timeout=seconds))

    async def _beating(self, aw: Awaitable[T]) -> T:
        """Await `aw`, beating liveness every second meanwhile: a request retrying through an API outage
        (bounded by the client's timeouts and retry deadline) or a back-off is slow, not stuck (§2.7)."""
        task = asyncio.ensure_future(aw)
        try:
            while not task.done():
                self.health.beat("flush")
                await asyncio.wait({task}, timeout=1.0)
            return task.result()
        finally:
            task.cancel()  # a no-op once done; propagates our own cancellation


def _record(start_ms: int, granularity: Granularity, element: str, flt: Any, value: Any) -> dict[str, Any]:
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start_ms // 1000))
    record: dict[str, Any] = {"timestamp": ts, "granularity": granularity.value, "element_name": element}
    if flt:
        record["filter"] = filter_from_canonical(flt)
    record["value"] = format_value(value)
    return record
