"""The flush cycle: a snapshot of whole windows → journaled API requests → marks, checkpoint, group commit.

A cycle runs in the order correctness depends on (README, Correctness):

1. journal the cycle (its boundary per partition, its windows) before its first request;
2. per request: journal `sent` → check the journal's claims (a stale owner stops here) → send → dead-letter
   the records the API refused → journal the `ack` of the cells settled; repeat until every cell is settled;
3. the cycle completed: its windows' marks move to its boundary, and marks below the new positions go;
4. checkpoint every partition still owned (position + marks + skips) — the authority for replay;
5. commit the same positions to the group, for lag tools.

A revoke or shutdown between any two steps abandons the cycle (`Abandoned`); the journal says what was
delivered, and whoever owns the partitions next re-derives the rest. Journal and dead-letter writes that fail
are retried while sending waits: an acknowledgement that cannot be recorded is a future double count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any, Protocol, TypeVar

from allocd.cloudzero.client import CloudZeroClient
from allocd.cloudzero.records import CanonicalFilter, Granularity, Op, Record, needs_rounding
from allocd.errors import AuthError, TransientError
from allocd.journal import Journal, PartitionState, cell_digest
from allocd.observability import HealthSignals, PipelineMetrics
from allocd.sources.base import LostOwnership
from allocd.stores.base import DeadLetters
from allocd.windows import TP, Snapshot

__all__ = ["Abandoned", "CycleHost", "FlushCycle", "Request", "to_record"]

T = TypeVar("T")

log = logging.getLogger("allocd.flush")


class Abandoned(Exception):
    """The cycle or batch in progress must be dropped: a revoke or shutdown is under way."""


class CycleHost(Protocol):
    """What a cycle needs of the pipeline that runs it (pipeline.Pipeline)."""

    lock: asyncio.Lock  # guards `parts` and the accumulator against the poll loop
    stop_sending: asyncio.Event  # set: no new request or retry may start
    parts: dict[TP, PartitionState]  # the partitions owned, with their replay state

    @property
    def abandoning(self) -> bool: ...

    def positions(self) -> dict[TP, int]:
        """Per partition, the lowest offset of any event not yet delivered."""

    def hold(self) -> None:
        """Stop reading while a durable write waits (a DLQ that cannot be written stops progress)."""


class Committer(Protocol):
    async def commit(self, positions: dict[TP, int]) -> None: ...


@dataclass(slots=True)
class Request:
    """One API request of a cycle: records of one stream and the digests of their cells, in order."""

    stream: str
    records: list[dict[str, Any]]
    cells: list[str]


def to_record(
    start_ms: int, granularity: Granularity, element: str, flt: CanonicalFilter, value: int | Decimal
) -> dict[str, Any]:
    """A cell as the API's record, by the record rules' own encoder."""
    ts = datetime.fromtimestamp(start_ms // 1000, UTC)
    return Record(ts, granularity, element, flt, value).to_json()


class FlushCycle:
    """Runs cycles one at a time for the pipeline (`host`), through the journal and the API client."""

    def __init__(
        self,
        host: CycleHost,
        journal: Journal,
        client: CloudZeroClient,
        dead_letters: DeadLetters,
        source: Committer,
        metrics: PipelineMetrics,
        health: HealthSignals,
        reload_key: Callable[[], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.clock = clock
        self.checkpointed_at = clock()  # when this process last checkpointed its partitions
        self.committed: dict[TP, int] = {}  # what this process last committed to the group (or recovered)
        self.journal = journal
        self.client = client
        self.dlq = dead_letters
        self.source = source
        self.metrics = metrics
        self.health = health
        self.reload_key = reload_key

    async def run(self, snap: Snapshot) -> str:
        """One cycle (the steps in the module docstring); returns its outcome or raises Abandoned."""
        if not snap.cell_count:
            return "completed"
        # Step 1
        cid = await self.journaled(lambda: self.journal.cycle_started(snap))
        # Step 2
        for n, req in enumerate(self.requests(snap)):
            await self._deliver(cid, n, req, list(snap.boundary))
        # Step 3
        host = self.host
        async with host.lock:
            if host.abandoning:
                raise Abandoned
            for wk in snap.windows:
                for tp, boundary in snap.boundary.items():
                    state = host.parts.get(tp)
                    if state is not None and state.marks.get(wk, -1) < boundary:
                        state.marks[wk] = boundary
            states, positions = self._owned()
        # Steps 4 and 5
        await self._checkpoint(states, positions, commit=True)
        return "completed"

    async def checkpoint(self) -> None:
        """Steps 4 and 5 alone, between cycles: the positions and marks as they stand. The group commit
        follows only where a position moved (events skipped or dead-lettered since the last commit)."""
        async with self.host.lock:
            if self.host.abandoning or not self.host.parts:
                return
            states, positions = self._owned()
        moved = any(self.committed.get(tp) != pos for tp, pos in positions.items())
        await self._checkpoint(states, positions, commit=moved)

    def _owned(self) -> tuple[dict[TP, PartitionState], dict[TP, int]]:
        """Under the host's lock: every owned partition's state at its committable position."""
        positions = self.host.positions()
        for tp, pos in positions.items():
            self.host.parts[tp].prune(pos)
        return {tp: s.copy() for tp, s in self.host.parts.items()}, positions

    async def _checkpoint(
        self, states: dict[TP, PartitionState], positions: dict[TP, int], *, commit: bool
    ) -> None:
        # Step 4 (only partitions still ours: a stale owner must not write over the new owner's checkpoint)
        if not await self.journaled(lambda: self.journal.still_owner(list(states))):
            self.metrics.fenced()
            raise Abandoned
        await self.journaled(lambda: self.journal.checkpoint(states))
        self.checkpointed_at = self.clock()
        if not commit:
            return
        # Step 5
        try:
            await self.source.commit(positions)
            self.committed = dict(positions)
            self.metrics.committed(positions)
        except LostOwnership as exc:
            log.warning("group commit failed: partitions lost; stopping delivery", extra={"error": str(exc)})
            self.host.stop_sending.set()

    def requests(self, snap: Snapshot) -> list[Request]:
        """The snapshot's cells as API records, per stream, packed into requests."""
        by_stream: dict[str, tuple[list[dict[str, Any]], dict[int, str]]] = {}
        rounded = 0
        for cell, granularity, value in snap.cells():
            stream, start, element, flt = cell
            record = to_record(start, granularity, element, flt, value)
            if needs_rounding(value):
                rounded += 1
            recs, digests = by_stream.setdefault(stream, ([], {}))
            recs.append(record)
            digests[id(record)] = cell_digest(cell)
        if rounded:
            self.metrics.rounded(rounded)
        out = []
        for stream, (recs, digests) in by_stream.items():
            for packed in self.client.pack(recs):
                out.append(Request(stream, packed, [digests[id(r)] for r in packed]))
        return out

    async def _deliver(self, cid: str, n: int, req: Request, tps: list[TP]) -> None:
        """Send one request until every record is settled; journal before and after each answer. Raise
        Abandoned when told to stop: what was acknowledged is journaled first, and what may have been
        applied without an answer is left in doubt (no `fail` entry), to be counted by whoever recovers."""
        stop = self.host.stop_sending
        await self.journaled(lambda: self.journal.request_sent(cid, n, req.cells))
        if not await self.journaled(lambda: self.journal.still_owner(tps)):
            # Another member claimed one of these partitions: it re-derives them from the journal, which
            # does not hold this request's `sent` as in doubt once `fail` follows. Sending now would count
            # its events twice (a member that learns it lost its partitions stops at once).
            log.warning("partitions claimed by another member; not sending", extra={"cycle": cid})
            await self.journaled(lambda: self.journal.request_failed(cid, n))
            self.metrics.fenced()
            raise Abandoned
        remaining = list(range(len(req.records)))
        doubt = False
        delay = 1.0
        while remaining:
            self.health.beat("flush")  # a cycle can span hours at 100 records/s: each request is progress
            if stop.is_set():
                if not doubt:
                    await self.journaled(lambda: self.journal.request_failed(cid, n))
                raise Abandoned
            records = [req.records[i] for i in remaining]
            try:
                out = await self._beating(self.client.send_request(req.stream, Op.SUM, records, stop=stop))
            except (AuthError, TransientError) as exc:
                await self._wait_after(exc, delay)
                delay = min(delay * 2, 60.0)
                continue
            doubt = doubt or out.in_doubt > 0
            delivered = [remaining[i] for i in out.delivered]
            rejected = [(remaining[i], msg) for i, msg in out.rejected]
            if rejected:
                refused = [(req.records[i], msg) for i, msg in rejected]
                await self.dead_letter(partial(self.dlq.records, req.stream, refused), "record", len(refused))
                log.error("the API refused records; they are in the DLQ", extra={"stream": req.stream})
            settled = [req.cells[i] for i in delivered] + [req.cells[i] for i, _ in rejected]
            if len(settled) == len(req.cells):  # the whole request in one answer: no need to name its cells
                await self.journaled(partial(self.journal.request_settled_whole, cid, n))
            elif settled:
                await self.journaled(partial(self.journal.request_settled, cid, n, settled))
            remaining = [remaining[i] for i in out.pending]
            if remaining and out.error is not None:
                await self._wait_after(out.error, delay)
                delay = min(delay * 2, 60.0)
        self.health.set_condition("api_key", True, "")

    async def _wait_after(self, exc: Exception, delay: float) -> None:
        """A request stopped early (retry deadline or 403): wait, and on 403 re-read the key."""
        if isinstance(exc, AuthError):
            self.health.set_condition("api_key", False, "api key rejected (403)")
            log.error("the API rejected the key (403); delivery paused until it is accepted")
            self.reload_key()
        else:
            log.warning("request still failing after retries; trying again", extra={"error": str(exc)})
        with contextlib.suppress(TimeoutError):
            await self._beating(asyncio.wait_for(self.host.stop_sending.wait(), timeout=delay))

    async def journaled(self, write: Callable[[], Awaitable[T]]) -> T:
        """Write to the journal, retrying while it is unavailable: sending waits meanwhile (an
        acknowledgement that cannot be recorded is a future double). Gives up only when abandoned."""
        delay = 0.2
        while True:
            try:
                return await write()
            except Exception as exc:  # the store's error, whatever the backend
                log.error("journal write failed; delivery waits", extra={"error": repr(exc)})
            if self.host.abandoning and self.host.stop_sending.is_set():
                raise Abandoned
            self.health.beat("flush")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def dead_letter(self, write: Callable[[], Awaitable[None]], kind: str, count: int) -> None:
        """Write to the DLQ or wait: a DLQ that cannot be written stops progress, it never drops. Used by
        the poll loop for invalid events too."""
        delay = 0.2
        while True:
            try:
                await write()
                self.metrics.dlq_written(kind, count)
                return
            except Exception as exc:  # the store's error, whatever the backend
                self.metrics.dlq_write_failed()
                log.error("dead-letter write failed; holding progress", extra={"error": repr(exc)})
            if self.host.abandoning or self.host.stop_sending.is_set():
                raise Abandoned
            self.host.hold()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _beating(self, aw: Awaitable[T]) -> T:
        """Await `aw`, beating liveness every second meanwhile: a request retrying through an API outage
        (bounded by the client's timeouts and retry deadline) or a back-off is slow, not stuck."""
        task = asyncio.ensure_future(aw)
        try:
            while not task.done():
                self.health.beat("flush")
                await asyncio.wait({task}, timeout=1.0)
            return task.result()
        finally:
            task.cancel()  # a no-op once done; propagates our own cancellation
