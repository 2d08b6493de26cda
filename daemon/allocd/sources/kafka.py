"""Everything that speaks Kafka: the consumer-group source, the journal store and the dead-letter topic.

aiokafka lives here only (STYLE.md): the pipeline sees `Source`, `JournalStore` and `DeadLetters`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import operator
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    TopicAlreadyExistsError,
)
from aiokafka.helpers import create_ssl_context

from allocd.config import KafkaSettings
from allocd.errors import StartupError
from allocd.sources.base import AssignmentListener, Batch, LostOwnership, Message
from allocd.windows import TP

__all__ = ["KafkaDeadLetters", "KafkaJournalStore", "KafkaSource", "connection_options", "ensure_topics"]

log = logging.getLogger("allocd.kafka")

_TIMESTAMP = operator.attrgetter("timestamp")  # max() over a fetch's records without a Python-level loop


def connection_options(s: KafkaSettings) -> dict[str, Any]:
    """bootstrap, client id and TLS/SASL options shared by consumer, producer and admin client."""
    opts: dict[str, Any] = {
        "bootstrap_servers": s.bootstrap_servers,
        "client_id": s.client_id,
        "security_protocol": s.security_protocol,
    }
    if s.security_protocol in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = create_ssl_context(
            cafile=s.ssl_cafile or None, certfile=s.ssl_certfile or None, keyfile=s.ssl_keyfile or None
        )
    if s.security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = s.sasl_mechanism
        opts["sasl_plain_username"] = s.sasl_username
        opts["sasl_plain_password"] = (
            Path(s.sasl_password_file).read_text().strip() if s.sasl_password_file else ""
        )
    return opts


T = TypeVar("T")
_RETRY_MAX_DELAY = 10.0


async def with_start_retry(what: str, s: KafkaSettings, start: Callable[[], Awaitable[T]]) -> T:
    """Run a start-up step that needs the brokers, retrying with backoff while they cannot be reached (a
    broker restarting, a network blip as the pod starts) for `kafka.connect_timeout_seconds`; then raise
    StartupError. `start` must clean up after itself when it fails."""
    deadline = time.monotonic() + s.connect_timeout_seconds
    delay = 0.5
    while True:
        try:
            return await start()
        except KafkaError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartupError(
                    f"{what}: the Kafka brokers at {s.bootstrap_servers} were not reachable within "
                    f"kafka.connect_timeout_seconds ({s.connect_timeout_seconds:g} s): {exc} — check "
                    "kafka.bootstrap_servers and the network"
                ) from None
            wait = min(delay, left)
            log.warning(
                "Kafka not reachable at start-up; retrying",
                extra={"step": what, "error": repr(exc), "retry_in_s": round(wait, 2)},
            )
            await asyncio.sleep(wait)
            delay = min(delay * 2, _RETRY_MAX_DELAY)


async def ensure_topics(
    s: KafkaSettings, topics: dict[str, int], configs: dict[str, dict[str, str]] | None = None
) -> None:
    """Create the given topics (name → partitions) when missing, with optional topic configs; existing ones
    are left as they are."""
    admin = AIOKafkaAdminClient(**connection_options(s))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        configs = configs or {}
        new = [
            NewTopic(t, n, 1, topic_configs=configs.get(t)) for t, n in topics.items() if t not in existing
        ]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
            log.info("created topics", extra={"topics": [t.name for t in new]})
    finally:
        await admin.close()


class _Listener(ConsumerRebalanceListener):
    def __init__(self, target: AssignmentListener) -> None:
        self.target = target

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.target.on_revoked([(tp.topic, tp.partition) for tp in revoked])

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.target.on_assigned([(tp.topic, tp.partition) for tp in assigned])


class KafkaSource:
    """A consumer-group member. Offsets are never auto-committed: the pipeline commits after delivery."""

    name = "kafka"

    def __init__(self, settings: KafkaSettings) -> None:
        self.s = settings
        self.consumer: AIOKafkaConsumer | None = None
        self._paused = False
        self._next: dict[TP, int] = {}  # next offset per partition, as fetched
        self._seen_ms: dict[TP, int] = {}  # newest record timestamp read per partition

    async def start(self, listener: AssignmentListener) -> None:
        self.consumer = await with_start_retry("start the consumer", self.s, lambda: self._start(listener))

    async def _start(self, listener: AssignmentListener) -> AIOKafkaConsumer:
        s = self.s
        consumer = AIOKafkaConsumer(
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            rebalance_timeout_ms=s.rebalance_timeout_ms,
            max_poll_records=s.max_poll_records,
            fetch_max_bytes=s.fetch_max_bytes,
            **connection_options(s),
        )
        consumer.subscribe(topics=list(s.topics), listener=_Listener(listener))
        try:
            await consumer.start()
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    async def fetch(self, timeout: float) -> list[Batch]:
        assert self.consumer is not None
        try:
            data = await self.consumer.getmany(timeout_ms=int(timeout * 1000))
        except KafkaError as exc:  # fetch errors are retried by polling again; logged, never fatal
            log.warning("fetch failed", extra={"error": repr(exc)})
            await asyncio.sleep(min(timeout, 1.0))
            return []
        out: list[Batch] = []
        for tp, records in data.items():
            key = (tp.topic, tp.partition)
            out.append((key, records))  # aiokafka's records as they are: no object per event
            if records:
                self._next[key] = records[-1].offset + 1
                self._seen_ms[key] = max(self._seen_ms.get(key, 0), max(map(_TIMESTAMP, records)))
        return out

    def wants_flush(self) -> bool:
        return False  # Kafka is the buffer: its retention, not allocd, bounds what is kept

    def frontier_ms(self) -> float:
        """Arrival time below which every assigned partition has been read: +inf for a partition that is
        caught up (next offset at the high watermark), else the newest record timestamp read from it."""
        assert self.consumer is not None
        frontier = math.inf
        for ktp in self.consumer.assignment():
            key = (ktp.topic, ktp.partition)
            hw = self.consumer.highwater(ktp)
            nxt = self._next.get(key)
            if hw is not None and nxt is not None and nxt >= hw:
                continue
            frontier = min(frontier, self._seen_ms.get(key, -math.inf))
        return frontier

    def pause(self) -> None:
        assert self.consumer is not None
        self._paused = True
        self.consumer.pause(*self.consumer.assignment())

    def resume(self) -> None:
        assert self.consumer is not None
        self._paused = False
        self.consumer.resume(*self.consumer.assignment())

    def seek(self, tp: TP, offset: int) -> None:
        assert self.consumer is not None
        self.consumer.seek(TopicPartition(*tp), offset)
        self._next[tp] = offset
        self._seen_ms.pop(tp, None)

    async def committed(self, tp: TP) -> int | None:
        assert self.consumer is not None
        return await self.consumer.committed(TopicPartition(*tp))

    async def reset_position(self, tp: TP) -> int:
        # Asked explicitly rather than through position(): inside the rebalance callback the fetcher may
        # already have advanced the position past records the pipeline has not processed.
        assert self.consumer is not None
        ktp = TopicPartition(*tp)
        if self.s.auto_offset_reset == "earliest":
            return (await self.consumer.beginning_offsets([ktp]))[ktp]
        return (await self.consumer.end_offsets([ktp]))[ktp]

    async def commit(self, positions: dict[TP, int]) -> None:
        assert self.consumer is not None
        owned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        offsets = {TopicPartition(*tp): off for tp, off in positions.items() if tp in owned}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            raise LostOwnership(str(exc)) from exc
        except KafkaError as exc:  # the group commit only feeds lag tools; the checkpoint is the authority
            log.warning("group commit failed", extra={"error": repr(exc)})

    async def end_offsets(self, tps: list[TP]) -> dict[TP, int]:
        """The high watermark from fetch responses where known (some brokers' ListOffsets under-report),
        else ListOffsets."""
        assert self.consumer is not None
        known = {tp: self.consumer.highwater(TopicPartition(*tp)) for tp in tps}
        if all(hw is not None for hw in known.values()):
            return {tp: int(hw) for tp, hw in known.items() if hw is not None}
        try:
            ends = await self.consumer.end_offsets([TopicPartition(*tp) for tp in tps])
        except KafkaError:
            return {}
        return {(tp.topic, tp.partition): off for tp, off in ends.items()}

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()


async def start_producer(s: KafkaSettings) -> AIOKafkaProducer:
    """The journal and DLQ producer, started (retried while the brokers cannot be reached)."""

    async def attempt() -> AIOKafkaProducer:
        producer = make_producer(s)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    return await with_start_retry("start the producer", s, attempt)


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
        self._last_appended = -1
        self._claimed: dict[TP, int] = {}  # partition → offset of this member's latest claim
        self._lost: set[TP] = set()  # claimed by another member since
        self._tail: AIOKafkaConsumer | None = None
        self._tail_next = 0  # first journal offset this member has not yet examined
        self._tail_at = -1  # where the tail consumer is positioned; seek only when it differs

    async def append(self, entries: list[dict[str, Any]]) -> None:
        futures = [
            await self.producer.send(
                self.topic,
                orjson.dumps({**e, "g": self.s.group_id, "m": self.member}),
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
                if rec.key == self.key:
                    self._note_claim(orjson.loads(rec.value), rec.offset)
        self._tail.pause(tp)  # no polling the broker every 10 ms between requests

    def _note_claim(self, entry: dict[str, Any], offset: int) -> None:
        if entry.get("t") != "barrier" or entry.get("g") != self.s.group_id:
            return
        if entry.get("member") == self.member:
            return
        for t, p in entry.get("claim", ()):
            tp = (t, int(p))
            if tp in self._claimed and offset > self._claimed[tp]:
                self._lost.add(tp)

    async def close(self) -> None:
        if self._tail is not None:
            await self._tail.stop()
            self._tail = None

    async def read_all(self, claim: Iterable[TP] = ()) -> list[dict[str, Any]]:
        barrier = uuid.uuid4().hex
        claimed = [[t, p] for t, p in claim]
        meta = await self.producer.send_and_wait(
            self.topic,
            orjson.dumps(
                {"t": "barrier", "id": barrier, "g": self.s.group_id, "member": self.member, "claim": claimed}
            ),
            key=self.key,
            partition=0,
        )
        for t, p in claimed:
            self._claimed[(t, p)] = meta.offset
            self._lost.discard((t, p))
        # Claims before this barrier are superseded by it for every partition this member now owns.
        self._tail_next = max(self._tail_next, meta.offset + 1)
        self._last_appended = max(self._last_appended, meta.offset)
        tp = TopicPartition(self.topic, 0)
        consumer = AIOKafkaConsumer(enable_auto_commit=False, group_id=None, **connection_options(self.s))
        await consumer.start()
        out: list[dict[str, Any]] = []
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            deadline = time.monotonic() + 60
            done = False
            while not done:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"journal read did not reach the barrier at offset {meta.offset}")
                batch = await consumer.getmany(tp, timeout_ms=500)
                for rec in batch.get(tp, []):
                    if rec.offset >= meta.offset:
                        done = True
                        break
                    if rec.key == self.key:
                        entry = orjson.loads(rec.value)
                        if entry.get("g") == self.s.group_id:
                            out.append(entry)  # barriers too: their claims decide whose checkpoint counts
        finally:
            await consumer.stop()
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


def make_producer(settings: KafkaSettings) -> AIOKafkaProducer:
    """The journal and DLQ producer (not started): acks from all replicas, a short linger."""
    return AIOKafkaProducer(
        acks="all", linger_ms=2, max_request_size=4 * 1024 * 1024, **connection_options(settings)
    )
