"""The journal in the checkpoint topic and the dead-letter topic (the Kafka edge, with sources/kafka.py)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from allocd.config import KafkaSettings
from allocd.journal import (
    CorruptEntry,
    Entry,
    TailRead,
    TailScan,
    barrier_entry,
    claims,
    decode_entry,
    encode_entry,
)
from allocd.kafka_conn import connection_options
from allocd.sources.base import Message
from allocd.windows import TP

log = logging.getLogger("allocd.journal")

__all__ = ["READ_CHUNK", "READ_FETCH_WAIT_MS", "READ_FIRST_STEP", "KafkaDeadLetters", "KafkaJournalStore"]

READ_FIRST_STEP = 16  # journal records of the first backward step; each next step doubles, up to
READ_CHUNK = 256  # records, so that a step's raw entries stay a few MB at most
READ_TIMEOUT_SECONDS = 60.0
# Long enough for a broker without an offset index to find a record deep in a large log (Tansu answers a
# 10 ms fetch for an old offset of a 600 MB topic with nothing, every time); paid at the log's end only.
READ_FETCH_WAIT_MS = 100


class KafkaJournalStore:
    """The journal in the checkpoint topic (one partition), keyed by group. Reading produces a barrier
    first and reads up to its acknowledged offset, because the broker's end offset can under-report.

    The barrier is also a *claim*: it names the partitions this member now owns. The API has no fencing,
    so a member that lost its partitions without noticing (its session expired behind a network fault)
    would keep delivering what the new owner re-derives. Before each request the pipeline asks
    `still_owner`: this member reads the journal up to its own latest entry (the `sent` of that request)
    and refuses to send if another member claimed one of its partitions after it did. Because the log is
    one ordered partition, either the new owner's recovery read sees that `sent` (and counts the request
    in doubt) or this member sees the claim (and does not send)."""

    def __init__(self, settings: KafkaSettings, producer: AIOKafkaProducer) -> None:
        self.s = settings
        self.producer = producer
        self.topic = settings.checkpoint_topic
        self.key = settings.group_id.encode()
        self.member = uuid.uuid4().hex[:12]
        self.corrupt = 0  # corrupt entries seen by any read of this store
        self._last_appended = -1
        self._claimed: dict[TP, int] = {}  # partition → offset of this member's latest claim
        self._lost: set[TP] = set()  # claimed by another member since
        self._tail: AIOKafkaConsumer | None = None
        self._tail_next = 0  # first journal offset this member has not yet examined
        self._tail_at = -1  # where the tail consumer is positioned; seek only when it differs

    async def append(self, entries: list[Entry]) -> None:
        futures = [
            await self.producer.send(
                self.topic,
                encode_entry(self._stamped(e)),
                key=self.key,
                partition=0,
            )
            for e in entries
        ]
        for meta in await asyncio.gather(*futures):
            self._last_appended = max(self._last_appended, meta.offset)

    async def still_owner(self, tps: Iterable[TP]) -> bool:
        upto = self._last_appended
        if upto >= self._tail_next:
            await self._read_tail(upto)
        return not (set(tps) & self._lost)

    async def _read_tail(self, upto: int) -> None:
        tp = TopicPartition(self.topic, 0)
        if self._tail is None:
            # A short fetch wait: the tail is read before every request, and the record it waits for was
            # just appended, so a long poll would only add latency to each send.
            self._tail = AIOKafkaConsumer(
                enable_auto_commit=False, group_id=None, fetch_max_wait_ms=10, **connection_options(self.s)
            )
            await self._tail.start()
            self._tail.assign([tp])
        if self._tail_at != self._tail_next:
            # Only after a claim moved `_tail_next` past what was read: a seek discards the prefetch.
            self._tail.seek(tp, self._tail_next)
            self._tail_at = self._tail_next
        self._tail.resume(tp)
        deadline = time.monotonic() + 30
        while self._tail_next <= upto:
            if time.monotonic() > deadline:
                raise TimeoutError(f"journal tail did not reach offset {upto}")
            batch = await self._tail.getmany(tp, timeout_ms=200)
            for rec in batch.get(tp, []):
                self._tail_at = rec.offset + 1
                if rec.offset < self._tail_next:
                    continue
                self._tail_next = rec.offset + 1
                entry = self._ours(rec)
                if entry is not None:
                    self._note_claim(entry, rec.offset)
        self._tail.pause(tp)  # no polling the broker every 10 ms between requests

    def _stamped(self, entry: Entry) -> Entry:
        stamped = entry.copy()
        stamped["g"] = self.s.group_id
        stamped["m"] = self.member
        if stamped["t"] == "ckpt":
            # `v`: this member has examined the journal up to here and seen no newer claim of the
            # partition, so a reader need only check the claims between `v` and the checkpoint. A partition
            # already known lost gets its claim's offset: the reader then sees the newer claim.
            tp = (str(stamped["tp"][0]), int(stamped["tp"][1]))
            stamped["v"] = self._claimed.get(tp, -1) if tp in self._lost else self._tail_next - 1
        return stamped

    def _ours(self, rec: Any) -> Entry | None:
        """A record of the checkpoint topic as an entry of this group's journal, else None (a corrupt one
        is logged and counted in `corrupt`, never handed out)."""
        if rec.key != self.key:
            return None
        try:
            entry = decode_entry(rec.value)
        except CorruptEntry as exc:
            self.corrupt += 1
            log.error("corrupt journal entry skipped", extra={"offset": rec.offset, "error": str(exc)})
            return None
        return entry if entry is not None and entry.get("g") == self.s.group_id else None

    def _note_claim(self, entry: Entry, offset: int) -> None:
        if entry["t"] != "barrier" or entry["member"] == self.member:
            return
        for tp in claims(entry):
            if tp in self._claimed and offset > self._claimed[tp]:
                self._lost.add(tp)

    async def close(self) -> None:
        if self._tail is not None:
            await self._tail.stop()
            self._tail = None

    async def read_recent(self, claim: Iterable[TP] = ()) -> TailRead:
        """Claim `claim` (a barrier), then read the journal backwards from the barrier in chunks until
        recovery of `claim` has what it needs (journal.TailScan): the cost is what is live, not history."""
        claimed = list(claim)
        barrier = barrier_entry(self.member, claimed)
        barrier["g"] = self.s.group_id
        meta = await self.producer.send_and_wait(self.topic, encode_entry(barrier), key=self.key, partition=0)
        for tp in claimed:
            self._claimed[tp] = meta.offset
            self._lost.discard(tp)
        # Claims before this barrier are superseded by it for every partition this member now owns.
        self._tail_next = max(self._tail_next, meta.offset + 1)
        self._last_appended = max(self._last_appended, meta.offset)
        scan = TailScan(claimed)
        read = TailRead([])
        corrupt_before = self.corrupt
        ktp = TopicPartition(self.topic, 0)
        consumer = AIOKafkaConsumer(
            enable_auto_commit=False,
            group_id=None,
            fetch_max_wait_ms=READ_FETCH_WAIT_MS,
            max_poll_records=READ_CHUNK,
            **connection_options(self.s),
        )
        await consumer.start()
        try:
            end = meta.offset  # exclusive: the barrier itself is ours
            consumer.assign([ktp])
            # At once, before any await: a first fetch from the log's end would wait out the fetch wait.
            positioned = max(0, end - READ_FIRST_STEP)
            consumer.seek(ktp, positioned)
            low = int((await consumer.beginning_offsets([ktp]))[ktp])
            deadline = time.monotonic() + READ_TIMEOUT_SECONDS
            step = READ_FIRST_STEP  # recovery usually needs a handful of entries: ask for few, then more
            while end > low and not scan.done:
                start = max(low, end - step)
                step = min(2 * step, READ_CHUNK)
                if start != positioned:  # a seek discards what the fetcher has under way
                    consumer.seek(ktp, start)
                positioned = -1
                chunk = await self._read_range(consumer, ktp, end, deadline, read)
                for offset, entry in reversed(chunk):
                    if scan.done:
                        break
                    scan.feed(offset, entry)
                    read.scanned += 1
                end = start
            if end <= low:
                scan.finish()
                read.reached_start = True
        finally:
            await consumer.stop()
        read.entries = scan.entries()
        read.corrupt = self.corrupt - corrupt_before
        return read

    async def _read_range(
        self, consumer: AIOKafkaConsumer, ktp: TopicPartition, end: int, deadline: float, read: TailRead
    ) -> list[tuple[int, Entry]]:
        """This group's entries from the consumer's position up to `end` (exclusive), in order; counts the
        bytes read into `read`."""
        out: list[tuple[int, Entry]] = []
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"journal read did not reach offset {end - 1}")
            batch = await consumer.getmany(ktp, timeout_ms=200)
            for rec in batch.get(ktp, []):
                if rec.offset >= end:
                    return out
                read.bytes += len(rec.value or b"")
                entry = self._ours(rec)  # barriers too: their claims decide whose checkpoint counts
                if entry is not None:
                    out.append((rec.offset, entry))
                if rec.offset == end - 1:
                    return out
            if await consumer.position(ktp) >= end:
                return out


class KafkaDeadLetters:
    """Invalid events and refused records, with the reason and the source position in headers."""

    def __init__(self, topic: str, producer: AIOKafkaProducer) -> None:
        self.topic = topic
        self.producer = producer

    async def events(self, items: list[tuple[Message, str, str]]) -> None:
        futures = []
        for msg, reason, detail in items:
            headers = [
                ("allocd-kind", b"event"),
                ("allocd-reason", reason.encode()),
                ("allocd-detail", detail[:500].encode("utf-8", "replace")),
                ("allocd-source-topic", msg.tp[0].encode()),
                ("allocd-source-partition", str(msg.tp[1]).encode()),
                ("allocd-source-offset", str(msg.offset).encode()),
            ]
            futures.append(await self.producer.send(self.topic, msg.value, headers=headers))
        await asyncio.gather(*futures)

    async def records(self, stream: str, items: list[tuple[dict[str, Any], str]]) -> None:
        futures = []
        for record, message in items:
            headers = [
                ("allocd-kind", b"record"),
                ("allocd-reason", b"api_rejected"),
                ("allocd-detail", message[:500].encode("utf-8", "replace")),
                ("allocd-stream", stream.encode()),
            ]
            futures.append(await self.producer.send(self.topic, orjson.dumps(record), headers=headers))
        await asyncio.gather(*futures)
