"""The poll loop and the pipeline's lifecycle: source → decode → skip rule → accumulator → snapshots, handed
to the flush cycle (flush.py) one at a time; triggers, backpressure, rebalance and shutdown.

Two tasks share the state under one lock: the *poll loop* (fetch a batch, add it to the accumulator — which
decodes, applies the journal's skip rule and counts — dead-letter the invalid, cut snapshots when windows
close or caps force them, pause when snapshots pile up) and the *delivery loop* (one flush cycle at a time,
in order). Rebalances and shutdown go through one path — abandon: stop sending, discard memory, re-derive
from the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from functools import partial

from allocd.cloudzero.client import CloudZeroClient
from allocd.config import PipelineSettings
from allocd.events import Decoder
from allocd.flush import Abandoned, FlushCycle
from allocd.journal import Journal, PartitionState
from allocd.observability import HealthSignals, PipelineMetrics
from allocd.sources.base import Batch, Message, Source
from allocd.stores.base import DeadLetters
from allocd.windows import TP, Accumulator, Snapshot, WindowKey

__all__ = ["Pipeline"]

log = logging.getLogger("allocd.pipeline")

# Of shutdown_timeout, kept for stopping the source (a consumer leaves its group) after the abandon.
_STOP_RESERVE_SECONDS = 1.5


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
        metrics: PipelineMetrics,
        health: HealthSignals,
        *,
        clock: Callable[[], float] = time.time,
        on_auth_failure: Callable[[], bool] | None = None,
    ) -> None:
        self.s = settings
        self.source = source
        self.decoder = decoder
        self.journal = journal
        self.dlq = dead_letters
        self.metrics = metrics
        self.health = health
        self.clock = clock
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
        self._deliver_task: asyncio.Task[None] | None = None
        self.assignment = 0  # counts assignments; _poll_once drops a batch fetched across one
        self.recheckpoint = False  # set by an assignment: checkpoint what was recovered
        self.cycle = FlushCycle(
            self,
            journal,
            client,
            dead_letters,
            source,
            metrics,
            health,
            on_auth_failure or (lambda: False),
            clock=clock,
        )

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
        await self._abandon("shutdown", max(0.5, deadline - time.monotonic() - _STOP_RESERVE_SECONDS))
        if self._deliver_task:
            self._deliver_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._deliver_task
        try:
            # Leaving the group can take a rejoin first (a rebalance under way); the deadline is the contract.
            await asyncio.wait_for(self.source.stop(), timeout=max(0.5, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("the source did not stop within shutdown_timeout; exiting without it")

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
        started = time.monotonic()
        recovered, read = await self.journal.recover(tps)
        seconds = time.monotonic() - started
        self.metrics.recovered(seconds)
        if read.corrupt:
            self.metrics.journal_corrupt(read.corrupt)
            log.error("corrupt journal entries were skipped", extra={"entries": read.corrupt})
        log.info(
            "journal read for the assignment",
            extra={
                "partitions": len(tps),
                "entries_scanned": read.scanned,
                "entries_kept": len(read.entries),
                "bytes": read.bytes,
                "seconds": round(seconds, 3),
                "to_start": read.reached_start,
            },
        )
        # One in-doubt request names every partition of its cycle: count it once, not once per partition.
        in_doubt: dict[tuple[str, int], int] = {}
        for rec in recovered.values():
            in_doubt.update(rec.in_doubt)
        if in_doubt:
            self.metrics.in_doubt_recovered(len(in_doubt), sum(in_doubt.values()))
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
                self.cycle.committed[tp] = state.position  # where the group commit stands, normally
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
            self.recheckpoint = True
            self.work.set()
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
        except Abandoned:
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
        # Late is judged like closing (§3), against what the source has read too: a backlog is not late.
        horizon = min(self.clock() * 1000, self.source.frontier_ms())
        grace_ms = int(self.s.grace_seconds * 1000)
        rejected: list[tuple[Message, str, str]] = []
        accepted: dict[str, int] = {}
        late: dict[str, int] = {}
        skipped = consumed = 0
        for tp, records in batch:
            consumed += len(records)
            state = self.parts.get(tp)
            if state is None:
                continue  # not ours any more
            added = self.acc.add_batch(
                tp,
                records,
                decode,
                expect=self.next_offset[tp],
                skip=state if state.marks or state.skips else None,
                horizon_ms=horizon,
                grace_ms=grace_ms,
            )
            self.next_offset[tp] = added.next_offset
            skipped += added.skipped
            for counts, more in ((accepted, added.accepted), (late, added.late)):
                for stream, n in more.items():
                    counts[stream] = counts.get(stream, 0) + n
            rejected.extend(
                (Message(tp, rec.offset, rec.timestamp, rec.value or b""), reason, detail)
                for rec, reason, detail in added.rejected
            )
        self.metrics.record_batch(
            self.source.name, consumed, accepted, late, skipped, [r for _, r, _ in rejected]
        )
        if rejected:
            await self.cycle.dead_letter(partial(self.dlq.events, rejected), "event", len(rejected))

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
        self.metrics.set_pending(len(self.pending))

    # --- what the flush cycle asks of the pipeline (flush.CycleHost) -------------------------------------
    def positions(self) -> dict[TP, int]:
        """Per partition, the lowest offset of any event not yet delivered (§2.1)."""
        positions = dict(self.next_offset)
        holders = [self.acc.min_offsets(), *(s.min_offsets for s in self.pending)]
        for mins in holders:
            for tp, off in mins.items():
                if tp in positions and off < positions[tp]:
                    positions[tp] = off
        return positions

    def hold(self) -> None:
        self._set_paused(True)

    # --- checkpoints between cycles ----------------------------------------------------------------------
    def _checkpoint_due(self) -> bool:
        """Just assigned (the recovered state becomes the newest checkpoint, so the next owner's read stops
        here), or no checkpoint for `checkpoint_interval_seconds` (an idle partition's authority must
        outlive the journal's retention, and a recent one keeps the next recovery's read short)."""
        if not self.parts or self.abandoning or self.stopping:
            return False
        return (
            self.recheckpoint
            or self.clock() - self.cycle.checkpointed_at >= self.s.checkpoint_interval_seconds
        )

    async def _checkpoint_only(self) -> None:
        self.recheckpoint = False
        self.idle.clear()
        try:
            await self.cycle.checkpoint()
        except Abandoned:
            pass
        finally:
            self.idle.set()

    # --- the delivery loop -----------------------------------------------------------------------------
    async def _delivery_loop(self) -> None:
        while True:
            while not self.pending:
                self.work.clear()
                self.health.beat("flush")
                if self._checkpoint_due():
                    await self._checkpoint_only()
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.work.wait(), timeout=max(1.0, self.s.tick_seconds))
            if self.abandoning:
                await asyncio.sleep(0.05)
                continue
            snap = self.pending.popleft()
            self.idle.clear()
            started = time.monotonic()
            try:
                outcome = await self.cycle.run(snap)
            except Abandoned:
                outcome = "abandoned"
            finally:
                self.idle.set()
            self.metrics.flush_cycle(snap.trigger, outcome, time.monotonic() - started, snap.cell_count)
            self.health.beat("flush")
