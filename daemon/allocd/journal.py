"""Cycles journaled, delivered-through marks and the replay skip rule (DESIGN.md §2, lines 2–3).

The journal is an append-only log of small JSON entries, one log per consumer group:

    cycle  {c, b: [[topic, partition, boundary]...], w: [[stream, start]...]}   before a cycle's first request
    sent   {c, r, cells: [digest...]}                                           before request r goes out
    ack    {c, r, cells: [digest...]}        the cells of request r the API acknowledged (or the DLQ took)
    fail   {c, r}                            request r was not applied (nothing in doubt)
    ckpt   {tp: [topic, partition], pos, marks: [[stream, start, through]...], skips: [[digest, through]...]}

A partition's state is its latest `ckpt` plus every cycle journaled after it whose boundary names the
partition: each acknowledged cell of such a cycle becomes a skip entry `digest → boundary`. Replay skips an
event at offset `o` when `o < marks[window]` or `o < skips[cell]`. A request journaled as sent but neither
acknowledged nor failed is *in doubt*: its cells are re-derived and sent again (at-least-once), and counted.

The store is pluggable: a Kafka topic for the consumer-group daemon (sources/kafka.py), a file for the
sidecar (sources/spool.py), memory for unit tests.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from allocd.windows import TP, CellKey, Snapshot, WindowKey

__all__ = [
    "Journal",
    "JournalStore",
    "MemoryJournalStore",
    "PartitionState",
    "Recovered",
    "cell_digest",
    "recover",
]


def cell_digest(cell: CellKey) -> str:
    """A short stable name for a cell, so journal entries stay small (8 bytes of BLAKE2b)."""
    stream, start, element, flt = cell
    raw = orjson.dumps([stream, start, element, [[k, list(v)] for k, v in flt]])
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


@dataclass(slots=True)
class PartitionState:
    """What replay of one partition must know: where to start and what is already delivered."""

    position: int | None = None  # the checkpointed position: the lowest offset not yet delivered
    marks: dict[WindowKey, int] = field(default_factory=dict)  # window → delivered below this offset
    skips: dict[str, int] = field(default_factory=dict)  # cell digest → delivered below this offset

    def should_skip(self, offset: int, window: WindowKey, cell: CellKey) -> bool:
        mark = self.marks.get(window)
        if mark is not None and offset < mark:
            return True
        if self.skips:
            through = self.skips.get(cell_digest(cell))
            return through is not None and offset < through
        return False

    def prune(self, position: int) -> None:
        """Marks and skips at or below the committed position can no longer match a replayed event."""
        self.position = position
        self.marks = {w: t for w, t in self.marks.items() if t > position}
        self.skips = {d: t for d, t in self.skips.items() if t > position}

    def to_entry(self, tp: TP) -> dict[str, Any]:
        return {
            "t": "ckpt",
            "tp": [tp[0], tp[1]],
            "pos": self.position,
            "marks": [[s, start, t] for (s, start), t in self.marks.items()],
            "skips": [[d, t] for d, t in self.skips.items()],
        }


@dataclass(slots=True)
class Recovered:
    state: PartitionState
    in_doubt: dict[tuple[str, int], int] = field(default_factory=dict)  # (cycle, request) → cells in doubt
    interrupted_cycles: int = 0

    @property
    def in_doubt_requests(self) -> int:
        return len(self.in_doubt)

    @property
    def in_doubt_cells(self) -> int:
        return sum(self.in_doubt.values())


def _tp_of(entry: dict[str, Any]) -> TP:
    t, p = entry["tp"]
    return (t, int(p))


def recover(entries: Iterable[dict[str, Any]], tps: Iterable[TP]) -> dict[TP, Recovered]:
    """Apply the journal to `tps`: latest checkpoint, then the cycles journaled after it (pure)."""
    wanted = set(tps)
    entries = list(entries)
    last_ckpt: dict[TP, int] = {}
    owner: dict[TP, str] = {}  # the member of the latest claim (barrier) per partition
    for i, e in enumerate(entries):
        kind = e.get("t")
        if kind == "barrier":
            for t, p in e.get("claim", ()):
                owner[(t, int(p))] = e.get("member", "")
        elif kind == "ckpt" and _tp_of(e) in wanted:
            tp = _tp_of(e)
            # A checkpoint from a member that another member's claim has superseded is stale: it was
            # written by a member that lost the partition without noticing yet.
            if tp not in owner or e.get("m") in (None, owner[tp]):
                last_ckpt[tp] = i
    out: dict[TP, Recovered] = {}
    for tp in wanted:
        state = PartitionState()
        start = last_ckpt.get(tp, -1)
        if start >= 0:
            e = entries[start]
            state.position = e["pos"]
            state.marks = {(s, int(w)): int(t) for s, w, t in e["marks"]}
            state.skips = {d: int(t) for d, t in e["skips"]}
        out[tp] = _apply_cycles(state, tp, entries[start + 1 :])
    return out


def _apply_cycles(state: PartitionState, tp: TP, entries: list[dict[str, Any]]) -> Recovered:
    rec = Recovered(state)
    boundary: dict[str, int] = {}  # cycle id → this partition's boundary, for cycles that name it
    sent: dict[tuple[str, int], set[str]] = {}
    settled: dict[tuple[str, int], set[str]] = {}
    failed: set[tuple[str, int]] = set()
    for e in entries:
        kind = e.get("t")
        if kind == "cycle":
            for topic, part, b in e["b"]:
                if (topic, int(part)) == tp:
                    boundary[e["c"]] = int(b)
        elif kind in ("sent", "ack", "fail") and e["c"] in boundary:
            key = (e["c"], int(e["r"]))
            if kind == "sent":
                sent[key] = set(e["cells"])
            elif kind == "ack":
                settled.setdefault(key, set()).update(e["cells"])
            else:
                failed.add(key)
    for (cid, _r), cells in settled.items():
        b = boundary[cid]
        for d in cells:
            if state.skips.get(d, -1) < b:
                state.skips[d] = b
    for key, cells in sent.items():
        left = cells - settled.get(key, set())
        if left and key not in failed:
            rec.in_doubt[key] = len(left)
    rec.interrupted_cycles = len(boundary)
    return rec


class JournalStore(Protocol):
    """Durable, ordered storage for journal entries of one consumer group."""

    async def append(self, entries: list[dict[str, Any]]) -> None:
        """Store the entries durably, in order; raise when that cannot be done."""

    async def read_all(self, claim: Iterable[TP] = ()) -> list[dict[str, Any]]:
        """Every entry stored so far, in order (for Kafka: up to a barrier written first, which also
        records that this member now owns the partitions in `claim`)."""

    async def still_owner(self, tps: Iterable[TP]) -> bool:
        """False when another member claimed one of `tps` after this member did, as far as the journal
        has been written by this member (a member that lost its partitions without noticing)."""


class MemoryJournalStore:
    """For unit tests: a list."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    async def append(self, entries: list[dict[str, Any]]) -> None:
        self.entries.extend(orjson.loads(orjson.dumps(e)) for e in entries)

    async def read_all(self, claim: Iterable[TP] = ()) -> list[dict[str, Any]]:
        return list(self.entries)

    async def still_owner(self, tps: Iterable[TP]) -> bool:
        return True  # one process


class Journal:
    """The pipeline's side of the journal: typed calls that write the entries above."""

    def __init__(self, store: JournalStore) -> None:
        self.store = store

    async def cycle_started(self, snapshot: Snapshot) -> str:
        cid = uuid.uuid4().hex[:16]
        entry = {
            "t": "cycle",
            "c": cid,
            "b": [[t, p, b] for (t, p), b in snapshot.boundary.items()],
            "w": [[s, start] for s, start in snapshot.windows],
            "trigger": snapshot.trigger,
        }
        await self.store.append([entry])
        return cid

    async def request_sent(self, cid: str, request: int, cells: list[str]) -> None:
        await self.store.append([{"t": "sent", "c": cid, "r": request, "cells": cells}])

    async def request_settled(self, cid: str, request: int, cells: list[str]) -> None:
        await self.store.append([{"t": "ack", "c": cid, "r": request, "cells": cells}])

    async def request_failed(self, cid: str, request: int) -> None:
        await self.store.append([{"t": "fail", "c": cid, "r": request}])

    async def checkpoint(self, states: dict[TP, PartitionState]) -> None:
        await self.store.append([st.to_entry(tp) for tp, st in states.items()])

    async def recover(self, tps: Iterable[TP]) -> dict[TP, Recovered]:
        tps = list(tps)
        return recover(await self.store.read_all(claim=tps), tps)

    async def still_owner(self, tps: Iterable[TP]) -> bool:
        return await self.store.still_owner(tps)
