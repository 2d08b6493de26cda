"""The spool (write-ahead log) and the sidecar's file-backed journal and dead letters, on a temp directory."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from allocd.cloudzero.records import Granularity
from allocd.journal import Journal, PartitionState, position_floor, recover
from allocd.sources.base import Message
from allocd.sources.http import SPOOL_TP
from allocd.sources.spool import (
    FRAME_OVERHEAD,
    Spool,
    SpoolClosed,
    SpoolError,
    SpoolFull,
    frame_size,
)
from allocd.stores.files import FileDeadLetters, FileJournalStore
from allocd.stores.memory import MemoryJournalStore
from allocd.windows import Accumulator

TS = 1_795_774_503_120
FLT = (("custom:feature", ("billing",)),)
MB = 1024 * 1024


def raw(i: int, pad: int = 0) -> bytes:
    return orjson.dumps({"n": i, "pad": "x" * pad})


async def open_spool(path: Path, **kw: object) -> Spool:
    kw.setdefault("max_bytes", 64 * MB)
    return await Spool.open(path, **kw)  # type: ignore[arg-type]


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.wal"))


async def read_all(spool: Spool, start: int = 0) -> list[tuple[int, int, bytes]]:
    return await spool.read(start, 1_000_000, 1 << 40)


class GatedFsync:
    """An fsync that counts calls and, while `gate` is clear, blocks (in the spool's worker thread)."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_next = False

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise OSError(5, "injected fsync failure")
        os.fsync(fd)


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


# --- appending and reading -----------------------------------------------------------------------------
async def test_append_returns_positions_and_read_returns_records_in_order(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    first = await spool.append([(TS, raw(0)), (TS + 1, raw(1))])
    second = await spool.append([(TS + 2, raw(2))])
    assert (list(first), list(second)) == ([0, 1], [2])
    assert spool.durable_end == 3
    assert await read_all(spool) == [(0, TS, raw(0)), (1, TS + 1, raw(1)), (2, TS + 2, raw(2))]
    assert await read_all(spool, 2) == [(2, TS + 2, raw(2))]
    assert spool.bytes_used == sum(frame_size(raw(i)) for i in range(3))
    await spool.close()


async def test_concurrent_appends_share_one_fsync(tmp_path: Path) -> None:
    fsync = GatedFsync()
    spool = await open_spool(tmp_path, fsync=fsync)
    fsync.gate.clear()
    first = asyncio.create_task(spool.append([(TS, raw(0))]))
    await until(fsync.entered.is_set)  # the first group is being synced ...
    rest = [asyncio.create_task(spool.append([(TS, raw(i))])) for i in range(1, 9)]
    await until(lambda: spool.bytes_used >= 9 * frame_size(raw(1)))  # ... while eight more collect
    assert spool.durable_end == 0  # nothing is readable before its fsync
    assert await read_all(spool) == []
    fsync.gate.set()
    positions = [list(r) for r in await asyncio.gather(first, *rest)]
    assert sorted(p for r in positions for p in r) == list(range(9))
    assert fsync.calls == 2  # one for the first append, one for the eight that waited
    assert [r[0] for r in await read_all(spool)] == list(range(9))
    await spool.close()


async def test_read_limits_and_resume_from_any_position(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, segment_bytes=200)
    for i in range(20):
        await spool.append([(TS, raw(i))])
    assert spool.segment_count > 3
    got = []
    pos = 0
    while pos < spool.durable_end:
        batch = await spool.read(pos, 3, 1 << 30)
        assert 0 < len(batch) <= 3
        got += batch
        pos = batch[-1][0] + 1
    assert [r[0] for r in got] == list(range(20))
    assert [r[0] for r in await spool.read(7, 2, 1 << 30)] == [7, 8]  # a seek backwards
    assert [r[0] for r in await spool.read(15, 100, 1 << 30)] == list(range(15, 20))
    assert len(await spool.read(0, 100, 1)) == 1  # at least one record, even past max_bytes
    await spool.close()


async def test_records_survive_reopen_and_positions_continue(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, segment_bytes=100)
    for i in range(5):
        await spool.append([(TS + i, raw(i))])
    await spool.close()
    spool = await open_spool(tmp_path, segment_bytes=100)
    assert spool.recovery.records == 5 and not spool.recovery.issues
    assert list(await spool.append([(TS, raw(5))])) == [5]
    assert [r[0] for r in await read_all(spool)] == list(range(6))
    await spool.close()


async def test_min_next_seq_keeps_new_positions_above_the_journal(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    await spool.append([(TS, raw(0))])
    await spool.close()
    spool = await open_spool(tmp_path, min_next_seq=100)
    assert spool.durable_end == 100
    assert list(await spool.append([(TS, raw(1))])) == [100]
    assert [r[0] for r in await read_all(spool)] == [0, 100]
    await spool.close()


# --- recovery ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"\x07\x00", "torn header"),
        ((1000).to_bytes(4, "little") + b"\x00\x00\x00\x00" + b"partial", "torn frame"),
        (os.urandom(64), None),
        (b"\x00" * 4096, "bad length 0"),  # a file extended with zeros by a crash
    ],
)
async def test_torn_or_garbage_tail_is_truncated_and_reported(
    tmp_path: Path, garbage: bytes, reason: str | None
) -> None:
    spool = await open_spool(tmp_path)
    await spool.append([(TS, raw(i)) for i in range(3)])
    await spool.close()
    [seg] = segments(tmp_path)
    intact = seg.stat().st_size
    with open(seg, "ab") as fh:
        fh.write(garbage)
    spool = await open_spool(tmp_path)
    [issue] = spool.recovery.issues
    assert (issue.segment, issue.offset, issue.dropped_bytes) == (seg.name, intact, len(garbage))
    if reason:
        assert issue.reason == reason
    assert seg.stat().st_size == intact
    assert list(await spool.append([(TS, raw(3))])) == [3]
    assert [r[2] for r in await read_all(spool)] == [raw(i) for i in range(4)]
    await spool.close()


async def test_a_corrupt_record_cuts_its_segment_there_and_recovery_goes_on(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, segment_bytes=150)
    for i in range(12):
        await spool.append([(TS, raw(i))])
    await spool.close()
    segs = segments(tmp_path)
    assert len(segs) >= 3
    middle = segs[1]
    first_pos = int(middle.name.split(".")[0])
    size = middle.stat().st_size
    data = bytearray(middle.read_bytes())
    data[FRAME_OVERHEAD + 2] ^= 0xFF  # inside the first record's raw bytes: its CRC no longer matches
    middle.write_bytes(bytes(data))
    spool = await open_spool(tmp_path, segment_bytes=150)
    [issue] = spool.recovery.issues
    assert (issue.segment, issue.offset, issue.reason, issue.dropped_bytes) == (
        middle.name,
        0,
        "crc mismatch",
        size,
    )
    positions = [r[0] for r in await read_all(spool)]
    lost = set(range(12)) - set(positions)
    assert lost and min(lost) == first_pos  # the corrupt record and the rest of its segment
    assert positions == sorted(positions) and positions[-1] == 11  # later segments intact
    await spool.close()


# --- segments, space, failures ----------------------------------------------------------------------------
async def test_release_deletes_only_whole_segments_below_the_position(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, segment_bytes=100)
    for i in range(10):
        await spool.append([(TS, raw(i))])
    firsts = [int(p.name.split(".")[0]) for p in segments(tmp_path)]
    assert len(firsts) >= 4
    used = spool.bytes_used
    cut = firsts[2] + 1  # inside the third segment: the first two lie wholly below
    assert spool.release_below(cut) == 2
    assert [int(p.name.split(".")[0]) for p in segments(tmp_path)] == firsts[2:]
    assert spool.bytes_used < used
    assert spool.first_position == firsts[2]
    assert (await read_all(spool))[0][0] == firsts[2]  # a read from before starts at the oldest held
    spool.release_below(10**9)
    assert len(segments(tmp_path)) == 1  # the active segment stays
    await spool.close()


async def test_full_spool_refuses_until_segments_are_released(tmp_path: Path) -> None:
    record = raw(0, pad=100)
    spool = await open_spool(
        tmp_path, max_bytes=10 * frame_size(record), segment_bytes=2 * frame_size(record)
    )
    stored = 0
    with pytest.raises(SpoolFull):
        for _ in range(11):
            await spool.append([(TS, record)])
            stored += 1
    assert stored == 10 and spool.durable_end == 10
    reserved = spool.reserve(0)
    spool.release(reserved)
    spool.release_below(spool.durable_end)
    assert list(await spool.append([(TS, record)])) == [10]
    await spool.close()


async def test_failed_fsync_keeps_nothing_of_the_group_and_the_spool_goes_on(tmp_path: Path) -> None:
    fsync = GatedFsync()
    spool = await open_spool(tmp_path, fsync=fsync)
    await spool.append([(TS, raw(0))])
    size = segments(tmp_path)[0].stat().st_size
    fsync.fail_next = True
    with pytest.raises(SpoolError):
        await spool.append([(TS, raw(1)), (TS, raw(2))])
    assert segments(tmp_path)[0].stat().st_size == size  # cut back to the durable size
    assert spool.bytes_used == size
    assert list(await spool.append([(TS, raw(3))])) == [3]  # positions of the failed group are not reused
    assert [r[2] for r in await read_all(spool)] == [raw(0), raw(3)]
    await spool.close()


async def test_closed_spool_refuses_appends_after_finishing_those_under_way(tmp_path: Path) -> None:
    fsync = GatedFsync()
    spool = await open_spool(tmp_path, fsync=fsync)
    fsync.gate.clear()
    under_way = asyncio.create_task(spool.append([(TS, raw(0))]))
    await until(fsync.entered.is_set)
    closing = asyncio.create_task(spool.close())
    await until(lambda: spool._closed)
    with pytest.raises(SpoolClosed):
        spool.reserve(1)
    fsync.gate.set()
    assert list(await under_way) == [0]
    await closing
    spool = await open_spool(tmp_path)
    assert [r[0] for r in await read_all(spool)] == [0]
    await spool.close()


async def test_wait_beyond_wakes_on_a_durable_append(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    assert not await spool.wait_beyond(0, 0.01)
    waiter = asyncio.create_task(spool.wait_beyond(0, 5))
    await asyncio.sleep(0)
    await spool.append([(TS, raw(0))])
    assert await asyncio.wait_for(waiter, 1)
    await spool.close()


# --- the file journal store ----------------------------------------------------------------------------
def ckpt(pos: int, marks: int = 0) -> dict[str, object]:
    state = PartitionState(pos, {("s", w * 1000): pos + 1 for w in range(marks)}, {})
    return state.to_entry(("spool", 0))


async def test_journal_file_round_trips_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal.ndjson"
    store = FileJournalStore(path)
    entries = [{"t": "cycle", "c": "a", "b": [["spool", 0, 5]], "w": []}, ckpt(5)]
    await store.append(entries[:1])
    await store.append(entries[1:])
    store.close()
    assert await FileJournalStore(path).read_all() == entries


async def test_journal_cuts_a_torn_last_line_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "journal.ndjson"
    store = FileJournalStore(path)
    await store.append([ckpt(3)])
    store.close()
    with open(path, "ab") as fh:
        fh.write(b'{"t":"ack","c":"a","r":0,"cel')  # a crash mid-append
    store = FileJournalStore(path)
    await store.append([ckpt(4)])
    assert await store.read_all() == [ckpt(3), ckpt(4)]


async def test_journal_compaction_keeps_what_recovery_reads(tmp_path: Path) -> None:
    path = tmp_path / "journal.ndjson"
    store = FileJournalStore(path, compact_bytes=2_000)
    memory = MemoryJournalStore()
    for journal_store in (store, memory):
        journal = Journal(journal_store)
        acc = Accumulator()
        for n in range(30):
            acc.add("s", Granularity.HOURLY, TS + n, f"e{n}", FLT, 1, ("spool", 0), n)
            snap = acc.take_all({("spool", 0): n + 1}, "closed")
            cid = await journal.cycle_started(snap)
            await journal.request_sent(cid, 0, ["d" * 16])
            await journal.request_settled(cid, 0, ["d" * 16])
            if n < 29:
                await journal.checkpoint({("spool", 0): PartitionState(n + 1, {("s", 0): n + 1}, {})})
    assert store.compactions > 0
    assert path.stat().st_size < 2_000 + 1_000
    entries = await FileJournalStore(path).read_all()
    assert entries[0]["t"] == "ckpt" and len(entries) < len(memory.entries)
    tp = ("spool", 0)
    assert recover(entries, [tp])[tp] == recover(memory.entries, [tp])[tp]


# --- dead letters --------------------------------------------------------------------------------------
async def test_dead_letters_are_ndjson_with_reason_detail_time_and_raw(tmp_path: Path) -> None:
    path = tmp_path / "dlq.ndjson"
    dlq = FileDeadLetters(path, clock=lambda: TS / 1000)
    await dlq.ingest_rejected([(2, b'{"value": -1}', "invalid_value", "must be > 0")], TS)
    await dlq.events([(Message(("spool", 0), 7, TS, b"\xff\xfe"), "not_json", "bad bytes")])
    await dlq.records("billing", [({"element_name": "x", "value": "1"}, "Invalid record")])
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [line["kind"] for line in lines] == ["event", "event", "record"]
    assert lines[0] == {
        "time": "2026-11-27T10:15:03.120Z",
        "kind": "event",
        "reason": "invalid_value",
        "detail": "must be > 0",
        "source": "http",
        "index": 2,
        "arrival_ms": TS,
        "raw": '{"value": -1}',
    }
    assert (lines[1]["position"], lines[1]["raw_base64"]) == (7, "//4=")
    assert lines[2]["record"] == {"element_name": "x", "value": "1"} and lines[2]["stream"] == "billing"


def test_position_floor_is_the_highest_position_the_journal_names_for_the_spool() -> None:
    entries = [
        {"t": "cycle", "c": "a", "b": [["spool", 0, 40], ["other", 0, 99]], "w": []},
        {"t": "ack", "c": "a", "r": 0, "cells": ["x"]},
        PartitionState(30, {("s", 0): 35}, {"d": 38}).to_entry(("spool", 0)),
        PartitionState(500, {}, {}).to_entry(("other", 0)),
    ]
    assert position_floor(entries, SPOOL_TP) == 40
    assert position_floor(entries[2:], SPOOL_TP) == 38
    assert position_floor([], SPOOL_TP) == 0
