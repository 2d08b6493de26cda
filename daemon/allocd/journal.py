"""The journal: its entries (wire format), delivered-through marks and the replay skip rule (README,
Correctness; DESIGN.md §2, lines 2–3).

The journal is an append-only log of small JSON objects, one log per consumer group. Every kind written:

    barrier {id, member, claim: [[topic, partition]...]}     first in an assignment's recovery read; a
                                                             *claim*: this member owns these partitions
    cycle   {c, b: [[topic, partition, boundary]...], w: [[stream, start]...], trigger}
                                                             before a cycle's first request
    sent    {c, r, cells: [digest...]}                       before request r goes out
    ack     {c, r, cells: [digest...]}                       cells of request r the API acknowledged (or the
                                                             DLQ took)
    fail    {c, r}                                           request r was not applied (nothing in doubt)
    ckpt    {tp: [topic, partition], pos, marks: [[stream, start, through]...], skips: [[digest, through]...]}

Every entry has `t` (its kind). The Kafka store adds `g` (the group, the topic is shared) and `m` (the
member that wrote it, for the claim rule below); the file store writes entries as they are.

A partition's state is its latest valid `ckpt` plus every cycle journaled after it whose boundary names the
partition: each acknowledged cell of such a cycle becomes a skip entry `digest → boundary`. Replay skips an
event at offset `o` when `o < marks[window]` or `o < skips[cell]`. A request journaled as sent but neither
acknowledged nor failed is *in doubt*: its cells are re-derived and sent again (at-least-once), and counted.
A `ckpt` is valid unless another member claimed the partition before it was written (a stale owner's).

Stores (allocd.stores) keep the entries: the checkpoint topic for the consumer-group daemon, a file in the
spool directory for the sidecar, memory for unit tests. This module is pure: no I/O but through a store.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NotRequired, Protocol, TypedDict, cast

import orjson

from allocd.windows import TP, CellKey, Snapshot, WindowKey

__all__ = [
    "AckEntry",
    "BarrierEntry",
    "CheckpointEntry",
    "CycleEntry",
    "Entry",
    "FailEntry",
    "Journal",
    "JournalStore",
    "PartitionState",
    "Recovered",
    "SentEntry",
    "barrier_entry",
    "cell_digest",
    "claims",
    "compaction_start",
    "decode_entry",
    "encode_entry",
    "position_floor",
    "recover",
]


# --- the entries --------------------------------------------------------------------------------------
class _Stamped(TypedDict):
    g: NotRequired[str]  # the consumer group (Kafka store)
    m: NotRequired[str]  # the member that wrote the entry (Kafka store)


class BarrierEntry(_Stamped):
    t: Literal["barrier"]
    id: str
    member: str
    claim: list[list[str | int]]  # [topic, partition]


class CycleEntry(_Stamped):
    t: Literal["cycle"]
    c: str  # cycle id
    b: list[list[str | int]]  # [topic, partition, boundary]
    w: list[list[str | int]]  # [stream, window start ms]
    trigger: NotRequired[str]


class SentEntry(_Stamped):
    t: Literal["sent"]
    c: str
    r: int  # request number within the cycle
    cells: list[str]


class AckEntry(_Stamped):
    t: Literal["ack"]
    c: str
    r: int
    cells: list[str]


class FailEntry(_Stamped):
    t: Literal["fail"]
    c: str
    r: int


class CheckpointEntry(_Stamped):
    t: Literal["ckpt"]
    tp: list[str | int]  # [topic, partition]
    pos: int | None
    marks: list[list[str | int]]  # [stream, window start ms, through]
    skips: list[list[str | int]]  # [digest, through]


Entry = BarrierEntry | CycleEntry | SentEntry | AckEntry | FailEntry | CheckpointEntry
KINDS = frozenset({"barrier", "cycle", "sent", "ack", "fail", "ckpt"})


def encode_entry(entry: Entry) -> bytes:
    return orjson.dumps(entry)


def decode_entry(raw: bytes | str) -> Entry | None:
    """One stored entry, or None for anything that is not a journal entry (raises on unreadable JSON)."""
    entry = orjson.loads(raw)
    if isinstance(entry, dict) and entry.get("t") in KINDS:
        return cast(Entry, entry)
    return None


def barrier_entry(member: str, claim: Iterable[TP]) -> BarrierEntry:
    return {"t": "barrier", "id": uuid.uuid4().hex, "member": member, "claim": [[t, p] for t, p in claim]}


def claims(entry: Entry) -> list[TP]:
    """The partitions a barrier claims (none for other entries)."""
    if entry["t"] != "barrier":
        return []
    return [(str(t), int(p)) for t, p in entry.get("claim", ())]


def _tp(raw: Sequence[str | int]) -> TP:
    t, p = raw
    return (str(t), int(p))


def cell_digest(cell: CellKey) -> str:
    """A short stable name for a cell, so journal entries stay small (8 bytes of BLAKE2b)."""
    stream, start, element, flt = cell
    raw = orjson.dumps([stream, start, element, [[k, list(v)] for k, v in flt]])
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def position_floor(entries: Iterable[Entry], tp: TP) -> int:
    """The highest position the journal names for `tp` (checkpoints, their marks and skips, cycle
    boundaries); 0 when none. The sidecar's spool numbers new records above it, so a record written after
    a corrupt tail was cut can never inherit a position the journal says is delivered."""
    found: list[int | str | None] = [0]
    for e in entries:
        if e["t"] == "ckpt" and _tp(e["tp"]) == tp:
            found += [
                e.get("pos") or 0,
                *(m[2] for m in e.get("marks", ())),
                *(s[1] for s in e.get("skips", ())),
            ]
        elif e["t"] == "cycle":
            found += [b for t, p, b in e.get("b", ()) if (t, int(p)) == tp]
    return max(int(x or 0) for x in found)


def compaction_start(entries: Sequence[Entry]) -> int | None:
    """Index of the first entry recovery can still need: the oldest of the partitions' latest checkpoints
    (what a store may drop everything before). None when there is no checkpoint."""
    latest: dict[TP, int] = {}
    for i, e in enumerate(entries):
        if e["t"] == "ckpt":
            latest[_tp(e["tp"])] = i
    return min(latest.values()) if latest else None


# --- replay state and the recovery rule ---------------------------------------------------------------
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

    def copy(self) -> PartitionState:
        return PartitionState(self.position, dict(self.marks), dict(self.skips))

    def to_entry(self, tp: TP) -> CheckpointEntry:
        return {
            "t": "ckpt",
            "tp": [tp[0], tp[1]],
            "pos": self.position,
            "marks": [[s, start, t] for (s, start), t in self.marks.items()],
            "skips": [[d, t] for d, t in self.skips.items()],
        }

    @classmethod
    def from_entry(cls, entry: CheckpointEntry) -> PartitionState:
        return cls(
            entry["pos"],
            {(str(s), int(w)): int(t) for s, w, t in entry["marks"]},
            {str(d): int(t) for d, t in entry["skips"]},
        )


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


def recover(entries: Iterable[Entry], tps: Iterable[TP]) -> dict[TP, Recovered]:
    """Apply the journal to `tps`: latest valid checkpoint, then the cycles journaled after it (pure)."""
    wanted = set(tps)
    entries = list(entries)
    last_ckpt: dict[TP, int] = {}
    owner: dict[TP, str] = {}  # the member of the latest claim (barrier) per partition
    for i, e in enumerate(entries):
        if e["t"] == "barrier":
            for tp in claims(e):
                owner[tp] = e.get("member", "")
        elif e["t"] == "ckpt" and (tp := _tp(e["tp"])) in wanted:
            # A checkpoint from a member that another member's claim has superseded is stale: it was
            # written by a member that lost the partition without noticing yet.
            if tp not in owner or e.get("m") in (None, owner[tp]):
                last_ckpt[tp] = i
    out: dict[TP, Recovered] = {}
    for tp in wanted:
        state = PartitionState()
        start = last_ckpt.get(tp, -1)
        if start >= 0:
            ckpt = entries[start]
            assert ckpt["t"] == "ckpt"
            state = PartitionState.from_entry(ckpt)
        out[tp] = _apply_cycles(state, tp, entries[start + 1 :])
    return out


def _apply_cycles(state: PartitionState, tp: TP, entries: list[Entry]) -> Recovered:
    rec = Recovered(state)
    boundary: dict[str, int] = {}  # cycle id → this partition's boundary, for cycles that name it
    sent: dict[tuple[str, int], set[str]] = {}
    settled: dict[tuple[str, int], set[str]] = {}
    failed: set[tuple[str, int]] = set()
    for e in entries:
        if e["t"] == "cycle":
            for topic, part, b in e["b"]:
                if (topic, int(part)) == tp:
                    boundary[e["c"]] = int(b)
        elif e["t"] == "sent" and e["c"] in boundary:
            sent[(e["c"], int(e["r"]))] = set(e["cells"])
        elif e["t"] == "ack" and e["c"] in boundary:
            settled.setdefault((e["c"], int(e["r"])), set()).update(e["cells"])
        elif e["t"] == "fail" and e["c"] in boundary:
            failed.add((e["c"], int(e["r"])))
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


# --- storage ------------------------------------------------------------------------------------------
class JournalStore(Protocol):
    """Durable, ordered storage for journal entries of one consumer group (implementations: allocd.stores)."""

    async def append(self, entries: list[Entry]) -> None:
        """Store the entries durably, in order; raise when that cannot be done."""

    async def read_all(self, claim: Iterable[TP] = ()) -> list[Entry]:
        """Every entry stored so far, in order (for Kafka: up to a barrier written first, which also
        records that this member now owns the partitions in `claim`)."""

    async def still_owner(self, tps: Iterable[TP]) -> bool:
        """False when another member claimed one of `tps` after this member did, as far as the journal
        has been written by this member (a member that lost its partitions without noticing)."""


class Journal:
    """The pipeline's side of the journal: typed calls that write the entries above."""

    def __init__(self, store: JournalStore) -> None:
        self.store = store

    async def cycle_started(self, snapshot: Snapshot) -> str:
        cid = uuid.uuid4().hex[:16]
        entry: CycleEntry = {
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
