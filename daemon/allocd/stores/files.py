"""The sidecar's journal and dead letters: NDJSON files on local disk, each append fsynced.

`FileJournalStore` implements journal.JournalStore; `FileDeadLetters` implements stores.base.DeadLetters
(plus `ingest_rejected` for events refused before they reach the spool). A crash mid-append can leave a
torn last line: it is cut off when the file is opened (nothing after it was ever acknowledged).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from allocd.journal import (
    CorruptEntry,
    Entry,
    TailRead,
    compaction_start,
    decode_entry,
    encode_entry,
    scan_list,
)
from allocd.sources.base import Message
from allocd.windows import TP

__all__ = ["FileDeadLetters", "FileJournalStore"]

log = logging.getLogger("allocd.files")

_DETAIL_CHARS = 500
_TAIL_CHUNK = 64 * 1024


class _AppendFile:
    """An append-only file of lines. Blocking: call its methods from a worker thread, one at a time."""

    def __init__(self, path: Path, fsync: Callable[[int], None]) -> None:
        self.path = path
        self.size = 0
        self._fsync = fsync
        self._fd: int | None = None
        self._dirty = False  # a failed append may have left bytes past `size`

    def open(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            self.size = _cut_torn_line(fd, self.path, self._fsync)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def append(self, data: bytes) -> None:
        self.open()
        assert self._fd is not None
        if self._dirty:
            os.ftruncate(self._fd, self.size)
            self._dirty = False
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
            self._fsync(self._fd)
        except OSError:
            # Cut back what may have been written (now or, failing that, before the next append), so no
            # half line ends up glued to the next entry.
            self._dirty = True
            os.ftruncate(self._fd, self.size)
            self._dirty = False
            raise
        self.size += len(data)

    def read(self) -> bytes:
        self.open()
        return self.path.read_bytes()

    def replace(self, data: bytes) -> None:
        """Atomically make `data` the whole file (write a temporary file, fsync, rename, fsync the dir)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            self._fsync(fh.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.close()
        self.open()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _cut_torn_line(fd: int, path: Path, fsync: Callable[[int], None]) -> int:
    """Truncate after the last newline (a crash mid-append leaves a partial line); return the size."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    keep = 0
    pos = size
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        nl = os.pread(fd, pos - start, start).rfind(b"\n")
        if nl >= 0:
            keep = start + nl + 1
            break
        pos = start
    os.ftruncate(fd, keep)
    fsync(fd)
    log.warning("torn last line cut off", extra={"file": str(path), "dropped_bytes": size - keep})
    return keep


def _lines(data: bytes, path: Path) -> tuple[list[Entry], int]:
    """The journal file's entries, and how many lines were corrupt (skipped, never applied)."""
    out = []
    corrupt = 0
    for n, line in enumerate(data.split(b"\n")):
        if not line:
            continue
        try:
            entry = decode_entry(line)
        except CorruptEntry as exc:
            corrupt += 1
            log.error(
                "corrupt journal line skipped", extra={"file": str(path), "line": n + 1, "error": str(exc)}
            )
            continue
        if entry is not None:
            out.append(entry)
    return out, corrupt


class FileJournalStore:
    """The journal (journal.py) in one NDJSON file. Every append is fsynced before it returns. When the
    file passes `compact_bytes`, the append that writes a checkpoint rewrites it keeping only what recovery
    reads — from the oldest of the partitions' latest `ckpt` entries onward — atomically via rename."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        compact_bytes: int = 4 * 1024 * 1024,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        self.path = Path(path)
        self.compact_bytes = compact_bytes
        self.compactions = 0
        self._file = _AppendFile(self.path, fsync)
        self._lock = asyncio.Lock()

    async def append(self, entries: list[Entry]) -> None:
        if not entries:
            return
        data = b"".join(encode_entry(e) + b"\n" for e in entries)
        checkpoint = any(e["t"] == "ckpt" for e in entries)
        async with self._lock:
            await asyncio.to_thread(self._append_sync, data, checkpoint)

    async def read_all(self) -> list[Entry]:
        return _lines(await self._read(), self.path)[0]

    async def read_recent(self, claim: Iterable[TP] = ()) -> TailRead:
        """The file is compacted (it holds little more than what recovery reads): read whole, scan back."""
        data = await self._read()
        entries, corrupt = _lines(data, self.path)
        read = scan_list(entries, claim)
        read.bytes, read.corrupt = len(data), corrupt
        return read

    async def still_owner(self, tps: Iterable[TP]) -> bool:
        return True  # the spool directory's lock file makes this process its only owner

    async def _read(self) -> bytes:
        async with self._lock:
            return await asyncio.to_thread(self._file.read)

    def close(self) -> None:
        self._file.close()

    def _append_sync(self, data: bytes, checkpoint: bool) -> None:
        self._file.append(data)
        if checkpoint and self._file.size > self.compact_bytes:
            self._compact_sync()

    def _compact_sync(self) -> None:
        entries, _ = _lines(self._file.read(), self.path)
        start = compaction_start(entries)
        if start is None:
            return
        before = self._file.size
        self._file.replace(b"".join(encode_entry(e) + b"\n" for e in entries[start:]))
        self.compactions += 1
        log.info(
            "journal compacted",
            extra={"file": str(self.path), "bytes_before": before, "bytes_after": self._file.size},
        )


def _now_text(clock: Callable[[], float]) -> str:
    t = clock()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _raw_fields(raw: bytes) -> dict[str, str]:
    """The raw event as text when it is UTF-8 (it usually is JSON), else base64."""
    try:
        return {"raw": raw.decode()}
    except UnicodeDecodeError:
        return {"raw_base64": base64.b64encode(raw).decode()}


def _event_line(now: str, reason: str, detail: str, raw: bytes, **where: Any) -> dict[str, Any]:
    """A dead-lettered event: why, where it came from (`where`), and the raw event itself."""
    return {
        "time": now,
        "kind": "event",
        "reason": reason,
        "detail": detail[:_DETAIL_CHARS],
        **where,
        **_raw_fields(raw),
    }


class FileDeadLetters:
    """Dead letters as NDJSON lines (`kind`, `reason`, `detail`, `time`, the raw event or refused record),
    appended and fsynced before each call returns. Shared by the ingest and the pipeline."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._file = _AppendFile(self.path, fsync)
        self._lock = asyncio.Lock()

    async def events(self, items: list[tuple[Message, str, str]]) -> None:
        """Events the pipeline refused; the spool position lets a replayed rejection be recognised."""
        now = _now_text(self._clock)
        await self._write(
            _event_line(
                now,
                reason,
                detail,
                msg.value,
                source=msg.tp[0],
                partition=msg.tp[1],
                position=msg.offset,
                arrival_ms=msg.timestamp,
            )
            for msg, reason, detail in items
        )

    async def records(self, stream: str, items: list[tuple[dict[str, Any], str]]) -> None:
        now = _now_text(self._clock)
        await self._write(
            {
                "time": now,
                "kind": "record",
                "reason": "api_rejected",
                "detail": message[:_DETAIL_CHARS],
                "stream": stream,
                "record": record,
            }
            for record, message in items
        )

    async def ingest_rejected(self, items: list[tuple[int, bytes, str, str]], arrival_ms: int) -> None:
        """Events refused at ingest (never spooled): (index in the request, raw, reason, detail)."""
        now = _now_text(self._clock)
        await self._write(
            _event_line(now, reason, detail, raw, source="http", index=index, arrival_ms=arrival_ms)
            for index, raw, reason, detail in items
        )

    def close(self) -> None:
        self._file.close()

    async def _write(self, entries: Any) -> None:
        data = b"".join(orjson.dumps(e) + b"\n" for e in entries)
        if not data:
            return
        async with self._lock:
            await asyncio.to_thread(self._file.append, data)
