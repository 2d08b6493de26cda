"""The sidecar's durable write-ahead log: accepted events on local disk, read back by the pipeline.

A record is one raw event with its arrival time and a sequence number — the spool *position*, which plays
the role of a Kafka offset (tp = ("spool", 0)). On disk, records are framed so a torn or corrupt tail is
detected:

    frame = length u32 | crc32(body) u32 | body        (little-endian)
    body  = seq u64 | arrival_ms i64 | raw event bytes (length = 16 + len(raw))

Records live in segment files named by the first position they may hold (`00000000000000000042.wal`);
positions only grow, across segments too. Contracts:

- `append` returns once its records are durable. Concurrent appends share one write + fsync (group
  commit): while one group is being synced, the next one collects.
- `read` hands out durable records only, in position order: a record the pipeline delivers can never be
  lost by a crash, so a producer's retry of an unacknowledged request cannot be counted twice.
- `open` scans every segment; the first invalid frame of a segment (torn write, garbage, CRC mismatch) and
  everything after it in that segment is truncated and reported in `recovery` — recovery never aborts.
- `release_below(position)` deletes whole segments below the committed position only; the active segment
  is never deleted. Space (`max_bytes`) is what the segments hold plus what is being appended; `append`
  raises SpoolFull rather than exceeding it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "FRAME_OVERHEAD",
    "RecoveryIssue",
    "RecoveryReport",
    "Spool",
    "SpoolClosed",
    "SpoolCorrupt",
    "SpoolError",
    "SpoolFull",
    "SpoolRecord",
    "frame_size",
]

log = logging.getLogger("allocd.spool")

_HEADER = struct.Struct("<II")  # length of the body, crc32 of the body
_META = struct.Struct("<Qq")  # seq, arrival ms
FRAME_OVERHEAD = _HEADER.size + _META.size
_MAX_BODY = 64 * 1024 * 1024  # a length beyond this is garbage, not a record
_READ_CHUNK = 1024 * 1024
_SUFFIX = ".wal"
_NAME_DIGITS = 20

SpoolRecord = tuple[int, int, bytes]  # (position, arrival ms, raw event)


class SpoolError(Exception):
    """The spool cannot store records right now (a disk error); nothing of the failed append is kept."""


class SpoolFull(SpoolError):
    """No room under `max_bytes` until committed segments are deleted: answer 503 and let the caller retry."""


class SpoolClosed(SpoolError):
    """The spool is closing or closed."""


class SpoolCorrupt(SpoolError):
    """A durable record failed its check while being read (disk corruption); a restart truncates there."""


def frame_size(raw: bytes) -> int:
    """Bytes one record takes on disk."""
    return FRAME_OVERHEAD + len(raw)


def _encode(seq: int, arrival_ms: int, raw: bytes) -> bytes:
    body = _META.pack(seq, arrival_ms) + raw
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


@dataclass(frozen=True, slots=True)
class RecoveryIssue:
    """One segment truncated at open: where, how much, and why."""

    segment: str
    offset: int
    dropped_bytes: int
    reason: str


@dataclass(slots=True)
class RecoveryReport:
    segments: int = 0
    records: int = 0
    issues: list[RecoveryIssue] = field(default_factory=list)


@dataclass(slots=True)
class _Segment:
    first: int  # the lowest position it may hold (its name)
    path: Path
    size: int = 0  # bytes written
    durable: int = 0  # bytes fsynced (== size once sealed)


class _BadFrame(Exception):
    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason


def _frames(fh: BinaryIO, pos: int, end: int) -> Iterator[tuple[int, int, int, memoryview]]:
    """(frame end offset, seq, arrival ms, raw) for each frame in [pos, end) of `fh`; raise _BadFrame at the
    first invalid one. Reads are chunked and never go past `end`, so memory stays bounded."""
    fh.seek(pos)
    buf = b""
    base = pos  # file offset of buf[0]
    while pos < end:
        off = pos - base
        if len(buf) - off < _HEADER.size:
            buf, base, off = buf[off:], pos, 0
            buf += fh.read(min(_READ_CHUNK, end - base - len(buf)))
            if len(buf) < _HEADER.size:
                raise _BadFrame(pos, "torn header")
        length, crc = _HEADER.unpack_from(buf, off)
        if not _META.size <= length <= _MAX_BODY:
            raise _BadFrame(pos, f"bad length {length}")
        total = _HEADER.size + length
        if pos + total > end:
            raise _BadFrame(pos, "torn frame")
        if len(buf) - off < total:
            buf, base, off = buf[off:], pos, 0
            buf += fh.read(min(max(_READ_CHUNK, total - len(buf)), end - base - len(buf)))
            if len(buf) < total:
                raise _BadFrame(pos, "torn frame")
        body = memoryview(buf)[off + _HEADER.size : off + total]
        if zlib.crc32(body) != crc:
            raise _BadFrame(pos, "crc mismatch")
        seq, arrival = _META.unpack_from(body)
        pos += total
        yield pos, seq, arrival, body[_META.size :]


def _segment_name(first: int) -> str:
    return f"{first:0{_NAME_DIGITS}d}{_SUFFIX}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _recover_segment(seg: _Segment, floor: int) -> tuple[int, int, RecoveryIssue | None]:
    """Validate one segment; truncate it at its first invalid frame. (records, last seq or -1, issue)."""
    size = seg.path.stat().st_size
    count, last, good = 0, -1, 0
    issue = None
    with open(seg.path, "rb") as fh:
        try:
            for end, seq, _arrival, _raw in _frames(fh, 0, size):
                if seq < max(floor, seg.first, last + 1):
                    raise _BadFrame(good, f"position {seq} out of order")
                count, last, good = count + 1, seq, end
        except _BadFrame as bad:
            issue = RecoveryIssue(seg.path.name, bad.offset, size - bad.offset, bad.reason)
    if issue is not None:
        with open(seg.path, "r+b") as fh:
            fh.truncate(good)
            os.fsync(fh.fileno())
    seg.size = seg.durable = good
    return count, last, issue


class Spool:
    """A write-ahead log in one directory. Create with `await Spool.open(...)`; one process at a time."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        segment_bytes: int,
        *,
        fsync: Callable[[int], None] = os.fsync,
        on_sync: Callable[[float, int, int], None] | None = None,
    ) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.recovery = RecoveryReport()
        self._fsync = fsync
        self._on_sync = on_sync or (lambda seconds, records, nbytes: None)
        self._segments: list[_Segment] = []
        self._firsts: list[int] = []  # the segments' `first`, for bisect
        self._next_seq = 0
        self._durable_end = 0  # positions below are durable and readable
        self._on_disk = 0  # bytes in all segments
        self._reserved = 0  # bytes promised to appends not yet written
        self._buf: list[bytes] = []
        self._buf_records = 0
        self._group: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._grew = asyncio.Event()
        self._fd: int | None = None
        self._closed = False
        self._broken: str | None = None  # a failed group could not be cut back: refuse every append
        self._flusher: asyncio.Task[None] | None = None
        # Where the last read stopped: (segment first, file offset, every record before it is below this).
        self._cursor: tuple[int, int, int] | None = None

    # --- lifecycle -------------------------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int,
        segment_bytes: int | None = None,
        min_next_seq: int = 0,
        fsync: Callable[[int], None] = os.fsync,
        on_sync: Callable[[float, int, int], None] | None = None,
    ) -> Spool:
        """Open (or create) the spool in `directory`, recovering every segment. `min_next_seq` keeps new
        positions above any the journal has seen, even if corruption removed the records that had them.
        `segment_bytes` defaults to an eighth of `max_bytes` (4 KiB to 64 MiB), so deleting committed
        segments can always free most of the space."""
        path = Path(directory)
        if segment_bytes is None:
            segment_bytes = max(4096, min(64 * 1024 * 1024, max_bytes // 8))
        spool = cls(path, max_bytes, segment_bytes, fsync=fsync, on_sync=on_sync)
        await asyncio.to_thread(spool._recover, min_next_seq)
        spool._flusher = asyncio.create_task(spool._flush_loop(), name="allocd-spool-flush")
        for issue in spool.recovery.issues:
            log.warning(
                "spool segment had a torn or corrupt tail; truncated",
                extra={
                    "segment": issue.segment,
                    "offset": issue.offset,
                    "dropped_bytes": issue.dropped_bytes,
                    "reason": issue.reason,
                },
            )
        log.info(
            "spool opened",
            extra={
                "dir": str(path),
                "segments": spool.recovery.segments,
                "records": spool.recovery.records,
                "first": spool.first_position,
                "end": spool.durable_end,
                "bytes": spool._on_disk,
            },
        )
        return spool

    def _recover(self, min_next_seq: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        segs = []
        for p in self.dir.iterdir():
            stem = p.name[: -len(_SUFFIX)]
            if p.name.endswith(_SUFFIX) and len(stem) == _NAME_DIGITS and stem.isdigit():
                segs.append(_Segment(int(stem), p))
        segs.sort(key=lambda s: s.first)
        last = -1
        for i, seg in enumerate(segs):
            count, seg_last, issue = _recover_segment(seg, last + 1)
            self.recovery.records += count
            if issue is not None:
                self.recovery.issues.append(issue)
            if seg.size == 0 and i < len(segs) - 1:
                seg.path.unlink()  # an empty sealed segment holds nothing to replay
                continue
            last = max(last, seg_last)
            self._segments.append(seg)
        self.recovery.segments = len(self._segments)
        self._firsts = [s.first for s in self._segments]
        self._on_disk = sum(s.size for s in self._segments)
        top = self._segments[-1].first if self._segments else 0
        self._next_seq = max(last + 1, top, min_next_seq)
        self._durable_end = self._next_seq
        if self._segments:
            self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)

    async def close(self) -> None:
        """Refuse new appends, finish the ones under way (they become durable), and close the files."""
        self._closed = True
        self._wake.set()
        if self._flusher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # --- state -----------------------------------------------------------------------------------------
    @property
    def durable_end(self) -> int:
        """The position after the last durable record: `read` returns records below it."""
        return self._durable_end

    @property
    def first_position(self) -> int:
        """The oldest position still held (where a partition with no checkpoint starts)."""
        return self._segments[0].first if self._segments else self._durable_end

    @property
    def bytes_used(self) -> int:
        """Segments on disk plus appends in progress: what counts against `max_bytes`."""
        return self._on_disk + self._reserved

    @property
    def pending(self) -> bool:
        """True while some append has not become durable yet."""
        return self._reserved > 0

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def broken(self) -> str | None:
        """Why every append is refused (a disk error that could not be cleaned up), or None."""
        return self._broken

    # --- appending -------------------------------------------------------------------------------------
    def reserve(self, nbytes: int) -> int:
        """Promise `nbytes` (see `frame_size`) to a coming `append`, or raise SpoolFull / SpoolClosed.
        Lets a caller check for room before doing anything it could not undo."""
        if self._closed:
            raise SpoolClosed("the spool is closed")
        if self._broken is not None:
            raise SpoolError(self._broken)
        if self._on_disk + self._reserved + nbytes > self.max_bytes:
            raise SpoolFull(f"{self.bytes_used} of {self.max_bytes} bytes used")
        self._reserved += nbytes
        return nbytes

    def release(self, reserved: int) -> None:
        """Give back a reservation that will not be appended."""
        self._reserved -= reserved

    async def append(self, records: Sequence[tuple[int, bytes]], reserved: int | None = None) -> range:
        """Store (arrival ms, raw) records durably, in order; return their positions. `reserved` is what
        `reserve` returned for exactly these records (else room is reserved here). On failure nothing of
        these records is kept and the reservation is released."""
        nbytes = sum(FRAME_OVERHEAD + len(raw) for _, raw in records)
        if reserved is None:
            reserved = self.reserve(nbytes)
        elif reserved != nbytes:
            self.release(reserved)
            raise ValueError(f"reserved {reserved} bytes for records of {nbytes}")
        if not records:
            self.release(reserved)
            return range(self._next_seq, self._next_seq)
        if self._flusher is None or self._flusher.done():
            self._broken = self._broken or "the spool's writer stopped"
        if self._closed or self._broken is not None:
            self.release(reserved)
            raise SpoolClosed("the spool is closed") if self._closed else SpoolError(str(self._broken))
        first = self._next_seq
        for arrival, raw in records:
            self._buf.append(_encode(self._next_seq, arrival, raw))
            self._next_seq += 1
        self._buf_records += len(records)
        if self._group is None:
            self._group = asyncio.get_running_loop().create_future()
        group = self._group
        self._wake.set()
        await asyncio.shield(group)  # a cancelled caller must not cancel everyone's group
        return range(first, first + len(records))

    async def _flush_loop(self) -> None:
        while True:
            if not self._buf:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            buf, count, group = b"".join(self._buf), self._buf_records, self._group
            last_seq = self._next_seq - 1
            first_seq = last_seq - count + 1
            self._buf, self._buf_records, self._group = [], 0, None
            assert group is not None
            started = time.monotonic()
            try:
                await self._write_group(buf, first_seq)
            except Exception as exc:  # OSError mostly; whatever it is, this group is refused, not lost
                self._reserved -= len(buf)
                log.error("spool write failed; the append is refused", extra={"error": repr(exc)})
                group.set_exception(SpoolError(f"spool write failed: {exc!r}"))
                group.exception()  # retrieved here: callers that were cancelled never look at it
                continue
            self._reserved -= len(buf)
            self._on_disk += len(buf)
            self._durable_end = last_seq + 1
            group.set_result(None)
            grew, self._grew = self._grew, asyncio.Event()
            grew.set()
            self._on_sync(time.monotonic() - started, count, len(buf))

    async def _write_group(self, buf: bytes, first_seq: int) -> None:
        """Write and fsync one group; roll to a new segment first when the active one is full. On error the
        active segment is cut back to its durable size, so a failed group leaves nothing behind."""
        active = self._segments[-1] if self._segments else None
        if active is None or active.size >= self.segment_bytes:
            seg = _Segment(first_seq, self.dir / _segment_name(first_seq))
            new_fd = await asyncio.to_thread(self._create_segment, seg.path)
            if self._fd is not None:
                os.close(self._fd)
            self._fd = new_fd
            self._segments.append(seg)
            self._firsts.append(seg.first)
            active = seg
        fd = self._fd
        assert fd is not None
        try:
            await asyncio.to_thread(self._write_sync, fd, buf)
        except OSError as exc:
            try:
                await asyncio.to_thread(os.ftruncate, fd, active.durable)
            except OSError:
                # What is on disk past the durable size is unknown now; writing on would bury it.
                self._broken = f"spool segment {active.path.name} could not be cut back after {exc!r}"
            raise
        active.size += len(buf)
        active.durable = active.size

    def _create_segment(self, path: Path) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        _fsync_dir(self.dir)  # the new name must survive a crash as well as its contents
        return fd

    def _write_sync(self, fd: int, buf: bytes) -> None:
        view = memoryview(buf)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        self._fsync(fd)

    # --- reading ---------------------------------------------------------------------------------------
    async def wait_beyond(self, position: int, timeout: float) -> bool:
        """Wait until a durable record at or after `position` exists; False after `timeout` seconds."""
        if self._durable_end > position:
            return True
        grew = self._grew
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(grew.wait(), timeout)
        return self._durable_end > position

    async def read(self, position: int, max_records: int, max_bytes: int) -> list[SpoolRecord]:
        """Durable records from `position` on (the oldest held when it is older), in position order, at
        most `max_records` and about `max_bytes` of raw data. Raises SpoolCorrupt on a record that fails
        its check."""
        out: list[SpoolRecord] = []
        taken = 0
        pos = position
        while len(out) < max_records and taken < max_bytes and pos < self._durable_end:
            seg, offset = self._start(pos)
            if seg is None:
                break
            end = seg.durable
            if offset < end:
                recs, offset, n = await asyncio.to_thread(
                    self._read_sync, seg, offset, end, pos, max_records - len(out), max_bytes - taken
                )
                out.extend(recs)
                taken += n
                if recs:
                    pos = recs[-1][0] + 1
                self._cursor = (seg.first, offset, pos)
                if offset < end:
                    continue  # stopped at a limit: the loop condition ends the read
            nxt = self._after(seg) if offset >= seg.durable else None
            if nxt is None:
                break  # the end of the active segment
            pos = max(pos, nxt.first)
            self._cursor = (nxt.first, 0, pos)
        return out

    def _last(self) -> _Segment | None:
        return self._segments[-1] if self._segments else None

    def _after(self, seg: _Segment) -> _Segment | None:
        i = bisect.bisect_right(self._firsts, seg.first)
        return self._segments[i] if i < len(self._segments) else None

    def _start(self, position: int) -> tuple[_Segment | None, int]:
        """The segment holding `position` and the file offset to scan from."""
        if not self._segments:
            return None, 0
        i = max(0, bisect.bisect_right(self._firsts, position) - 1)
        seg = self._segments[i]
        cur = self._cursor
        if cur is not None and cur[0] == seg.first and cur[2] <= position:
            return seg, cur[1]
        return seg, 0

    def _read_sync(
        self, seg: _Segment, offset: int, end: int, position: int, max_records: int, max_bytes: int
    ) -> tuple[list[SpoolRecord], int, int]:
        out: list[SpoolRecord] = []
        taken = 0
        try:
            with open(seg.path, "rb") as fh:
                for frame_end, seq, arrival, raw in _frames(fh, offset, end):
                    if seq >= position:
                        out.append((seq, arrival, bytes(raw)))
                        taken += len(raw)
                    offset = frame_end
                    if len(out) >= max_records or taken >= max_bytes:
                        break
        except _BadFrame as bad:
            raise SpoolCorrupt(f"{seg.path.name} at {bad.offset}: {bad.reason}") from None
        return out, offset, taken

    # --- releasing -------------------------------------------------------------------------------------
    def release_below(self, position: int) -> int:
        """Delete the segments that lie wholly below `position` (never the active one); return how many."""
        deleted = 0
        while len(self._segments) > 1 and self._segments[1].first <= position:
            seg = self._segments.pop(0)
            self._firsts.pop(0)
            try:
                seg.path.unlink()
            except FileNotFoundError:
                pass
            self._on_disk -= seg.size
            deleted += 1
        if deleted:
            log.debug("spool segments released", extra={"segments": deleted, "below": position})
        return deleted
