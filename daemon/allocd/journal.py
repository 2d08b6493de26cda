"""The journal: its entries (wire format), delivered-through marks and the replay skip rule (README,
Correctness; DESIGN.md §2, lines 2–3).

The journal is an append-only log of small JSON objects, one log per consumer group. Every kind written:

    barrier {id, member, claim: [[topic, partition]...]}     first in an assignment's recovery read; a
                                                             *claim*: this member owns these partitions
    cycle   {c, b: [[topic, partition, boundary]...], w: [[stream, start]...], trigger}
                                                             before a cycle's first request
    sent    {c, r, cells: [digest...]}                       before request r goes out
    ack     {c, r, cells: [digest...]} | {c, r, all: true}  cells of request r the API acknowledged (or the
                                                             DLQ took); `all`: every cell of its `sent`
    fail    {c, r}                                           request r was not applied (nothing in doubt)
    ckpt    {tp: [topic, partition], pos, marks: [[stream, start, through]...], skips: [[digest, through]...]}

Every entry has `t` (its kind). The Kafka store adds `g` (the group, the topic is shared), `m` (the member
that wrote it, for the claim rule below) and, on a `ckpt`, `v` (the writer had examined the journal up to
that offset and seen no newer claim of the partition); the file store writes entries as they are.

Stored form (`encode_entry`): the entry's JSON with `cells` packed (the 8-byte digests concatenated, one
base64 text) and a CRC-32 of the rest as its last key, `x`. A stored entry that fails its checksum or its
form is `CorruptEntry`: counted, logged and skipped — never applied. (Entries from before checksums, with
no `x`, are read on their form alone.)

A partition's state is its latest valid `ckpt` plus every cycle journaled after it whose boundary names the
partition: each acknowledged cell of such a cycle becomes a skip entry `digest → boundary`. Replay skips an
event at offset `o` when `o < marks[window]` or `o < skips[cell]`. A request journaled as sent but neither
acknowledged nor failed is *in doubt*: its cells are re-derived and sent again (at-least-once), and counted.
A `ckpt` is valid unless another member claimed the partition before it was written (a stale owner's).

The bounded read (`TailScan`): recovery needs only the newest valid checkpoint of each partition and what
follows it, so a store reads backwards from the newest entry and stops there. What keeps that short: every
owned partition is checkpointed after each cycle, right after each assignment, and at least every
`pipeline.checkpoint_interval_seconds` while idle; and `v` lets a reader judge a checkpoint's validity from
the few entries between `v` and it, instead of searching back for the claim its writer made.

Stores (allocd.stores) keep the entries: the checkpoint topic for the consumer-group daemon, a file in the
spool directory for the sidecar, memory for unit tests. This module is pure: no I/O but through a store.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NotRequired, Protocol, TypedDict, cast

import orjson

from allocd.windows import TP, CellKey, Snapshot, WindowKey

__all__ = [
    "AckEntry",
    "BarrierEntry",
    "CheckpointEntry",
    "CorruptEntry",
    "CycleEntry",
    "Entry",
    "FailEntry",
    "Journal",
    "JournalStore",
    "PartitionState",
    "Recovered",
    "SentEntry",
    "TailRead",
    "TailScan",
    "barrier_entry",
    "cell_digest",
    "claims",
    "compaction_start",
    "decode_entry",
    "encode_entry",
    "position_floor",
    "recover",
    "scan_list",
]


# --- the entries --------------------------------------------------------------------------------------
class _Stamped(TypedDict):
    g: NotRequired[str]  # the consumer group (Kafka store)
    m: NotRequired[str]  # the member that wrote the entry (Kafka store)
    v: NotRequired[int]  # ckpt (Kafka store): the writer had examined the journal up to this offset


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
    cells: NotRequired[list[str]]
    all: NotRequired[bool]  # every cell of the request's `sent`


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


class CorruptEntry(ValueError):
    """A stored journal entry that fails its checksum or its form: counted and skipped, never applied."""


# Keys each kind may carry beside the stamps (g, m, v) and the checksum (x); the first set is required.
_FORMS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "barrier": (frozenset({"t", "id", "member", "claim"}), frozenset()),
    "cycle": (frozenset({"t", "c", "b", "w"}), frozenset({"trigger"})),
    "sent": (frozenset({"t", "c", "r", "cells"}), frozenset()),
    "ack": (frozenset({"t", "c", "r"}), frozenset({"cells", "all"})),
    "fail": (frozenset({"t", "c", "r"}), frozenset()),
    "ckpt": (frozenset({"t", "tp", "pos", "marks", "skips"}), frozenset()),
}
_STAMPS = frozenset({"g", "m", "v"})
_CHECKSUM = b',"x":'
DIGEST_BYTES = 8


def _pack(cells: list[str]) -> str | list[str]:
    """Cell digests (hex) as one base64 text: 10.7 characters a cell instead of 19. Anything that is not
    a list of digests (tests write short names) stays as it is."""
    if not all(len(c) == 2 * DIGEST_BYTES for c in cells):
        return cells
    try:
        return base64.b64encode(bytes.fromhex("".join(cells))).decode()
    except ValueError:
        return cells


def _unpack(text: str) -> list[str]:
    raw = base64.b64decode(text, validate=True)
    if len(raw) % DIGEST_BYTES:
        raise ValueError("packed digests of uneven length")
    hexed = raw.hex()
    step = 2 * DIGEST_BYTES
    return [hexed[i : i + step] for i in range(0, len(hexed), step)]


def encode_entry(entry: Entry) -> bytes:
    """The stored form: the entry's JSON, cell digests packed, and a CRC-32 of the rest as its last key."""
    out: dict[str, Any] = dict(entry)
    cells = out.get("cells")
    if isinstance(cells, list):
        out["cells"] = _pack(cells)
    body = orjson.dumps(out)
    return body[:-1] + _CHECKSUM + str(zlib.crc32(body)).encode() + b"}"


def decode_entry(raw: bytes | str) -> Entry | None:
    """A stored entry; None for a record that is not a journal entry (no known kind, no checksum).

    Raises CorruptEntry when the checksum does not match, the JSON does not parse, or the form is wrong (an
    unknown key, a missing one). Entries written before checksums existed (no `x`) are read on form alone."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CorruptEntry(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CorruptEntry("not an object")
    crc = obj.pop("x", None)
    if crc is not None and (type(crc) is not int or zlib.crc32(orjson.dumps(obj)) != crc):
        raise CorruptEntry("checksum mismatch")
    kind = obj.get("t")
    form = _FORMS.get(kind) if isinstance(kind, str) else None
    if form is None:
        if crc is None:
            return None  # not ours (another writer's record on the topic)
        raise CorruptEntry(f"unknown kind {obj.get('t')!r}")
    required, optional = form
    keys = obj.keys()
    if not required <= keys or not keys <= required | optional | _STAMPS:
        raise CorruptEntry(f"{obj['t']}: keys {sorted(keys)}")
    cells = obj.get("cells")
    if isinstance(cells, str):
        try:
            obj["cells"] = _unpack(cells)
        except ValueError as exc:
            raise CorruptEntry(f"cells: {exc}") from None
    return cast(Entry, obj)


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
            key = (e["c"], int(e["r"]))
            settled.setdefault(key, set()).update(sent.get(key, ()) if e.get("all") else e["cells"])
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


# --- the bounded read ---------------------------------------------------------------------------------
@dataclass(slots=True)
class _Candidate:
    """A checkpoint of a wanted partition, seen on the way back, whose validity is not settled yet."""

    pos: int
    member: str
    verified: int | None  # `v`: the writer had seen every claim up to this position


@dataclass(slots=True)
class TailRead:
    """What a store read for one recovery: the entries recovery needs (oldest first), and the cost."""

    entries: list[Entry]
    scanned: int = 0  # entries examined (this group's)
    bytes: int = 0  # bytes of journal read
    reached_start: bool = False  # the scan went back to the oldest entry the store holds
    corrupt: int = 0  # entries skipped: checksum or form wrong


class TailScan:
    """Reads the journal backwards, newest entry first, and says when recovery of `tps` has all it needs.

    Recovery of a partition needs its latest *valid* checkpoint and every entry after it (see the module
    docstring). A checkpoint without `m` (file and memory stores: one writer) is valid when seen. One with
    `m` and `v` (Kafka: the writer had examined the journal up to `v` and found no newer owner's claim) is
    valid unless another member claimed the partition between `v` and the checkpoint, so the scan goes back
    to `v` — a few entries — and decides. One with `m` but no `v` (written before `v` existed) is valid when
    the latest claim of the partition before it is its writer's: the scan goes back to that claim.

    Entries recovery cannot use are dropped on the way (cycles that name no wanted partition, with their
    requests), so memory holds what is live for `tps`, not history. Feed positions in strictly falling
    order; call `finish()` when the store has nothing older.
    """

    def __init__(self, tps: Iterable[TP]) -> None:
        self._open: set[TP] = set(tps)
        self._candidates: dict[TP, list[_Candidate]] = {tp: [] for tp in self._open}
        self._claims: dict[TP, list[tuple[int, str]]] = {tp: [] for tp in self._open}  # newest first
        self._kept: list[Entry] = []  # newest first
        self._requests: dict[str, list[int]] = {}  # cycle id → indexes in _kept of its sent/ack/fail
        self._cycles: set[str] = set()  # cycles seen that name a wanted partition
        self._dropped: set[int] = set()
        self._last_pos: int | None = None

    @property
    def done(self) -> bool:
        return not self._open

    def feed(self, pos: int, entry: Entry) -> None:
        if self._last_pos is not None and pos >= self._last_pos:
            raise ValueError(f"positions must fall: {pos} after {self._last_pos}")
        self._last_pos = pos
        if entry["t"] == "barrier":
            self._kept.append(entry)
            for tp in claims(entry):
                if tp in self._claims:
                    self._claims[tp].append((pos, entry["member"]))
        elif entry["t"] == "ckpt":
            tp = _tp(entry["tp"])
            if tp not in self._open:
                return  # another partition's, or an older checkpoint of a settled one
            self._kept.append(entry)
            member = entry.get("m")
            if member is None:
                self._open.discard(tp)
            else:
                self._candidates[tp].append(_Candidate(pos, member, entry.get("v")))
        elif entry["t"] == "cycle":
            if any((str(t), int(p)) in self._candidates for t, p, _ in entry["b"]):
                self._cycles.add(entry["c"])
                self._kept.append(entry)
            else:  # its requests were kept on the way: recovery of these partitions never reads them
                self._dropped.update(self._requests.pop(entry["c"], ()))
        else:
            self._requests.setdefault(entry["c"], []).append(len(self._kept))
            self._kept.append(entry)
        for tp in list(self._open):
            self._resolve(tp, pos - 1)

    def finish(self) -> None:
        """Nothing older exists: every pending checkpoint is judged by the claims seen."""
        for tp in list(self._open):
            self._resolve(tp, -1, final=True)

    def entries(self) -> list[Entry]:
        """What recovery needs, oldest first (requests of cycles not seen are of no use to it)."""
        unseen = {i for cid, idx in self._requests.items() if cid not in self._cycles for i in idx}
        keep = [e for i, e in enumerate(self._kept) if i not in self._dropped and i not in unseen]
        keep.reverse()
        return keep

    def _resolve(self, tp: TP, below: int, final: bool = False) -> None:
        """Judge `tp`'s newest pending checkpoints, now that every entry above `below` has been fed."""
        cands, seen = self._candidates[tp], self._claims[tp]
        while tp in self._open and cands:
            head = cands[0]
            if head.verified is not None:
                if below > head.verified and not final:
                    return  # claims between `v` and the checkpoint are not all seen yet
                stale = any(head.verified < at < head.pos and member != head.member for at, member in seen)
            else:
                before = [(at, member) for at, member in seen if at < head.pos]
                if not before and not final:
                    return  # the latest claim before it is further back
                stale = bool(before) and max(before)[1] != head.member
            if stale:
                cands.pop(0)  # a stale owner's: try the one before it
            else:
                self._open.discard(tp)


def scan_list(entries: Sequence[Entry], tps: Iterable[TP]) -> TailRead:
    """The bounded read over entries already in memory (file and memory stores): positions are indexes."""
    scan = TailScan(tps)
    pos = len(entries) - 1
    while pos >= 0 and not scan.done:
        scan.feed(pos, entries[pos])
        pos -= 1
    if pos < 0:
        scan.finish()
    return TailRead(scan.entries(), scanned=len(entries) - 1 - pos, reached_start=pos < 0)


# --- storage ------------------------------------------------------------------------------------------
class JournalStore(Protocol):
    """Durable, ordered storage for journal entries of one consumer group (implementations: allocd.stores)."""

    async def append(self, entries: list[Entry]) -> None:
        """Store the entries durably, in order; raise when that cannot be done."""

    async def read_recent(self, claim: Iterable[TP] = ()) -> TailRead:
        """What recovery of `claim` needs (TailScan), oldest first. For Kafka: read backwards from a barrier
        written first, which also records that this member now owns the partitions in `claim`."""

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

    async def request_settled_whole(self, cid: str, request: int) -> None:
        """Every cell of request `request` settled at once: the ack need not repeat them."""
        await self.store.append([{"t": "ack", "c": cid, "r": request, "all": True}])

    async def request_failed(self, cid: str, request: int) -> None:
        await self.store.append([{"t": "fail", "c": cid, "r": request}])

    async def checkpoint(self, states: dict[TP, PartitionState]) -> None:
        await self.store.append([st.to_entry(tp) for tp, st in states.items()])

    async def recover(self, tps: Iterable[TP]) -> tuple[dict[TP, Recovered], TailRead]:
        """Claim `tps` and recover them; also says what the read cost."""
        tps = list(tps)
        read = await self.store.read_recent(claim=tps)
        return recover(read.entries, tps), read

    async def still_owner(self, tps: Iterable[TP]) -> bool:
        return await self.store.still_owner(tps)
