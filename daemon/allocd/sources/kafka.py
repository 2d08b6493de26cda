"""The consumer-group source: a Kafka consumer whose offsets the pipeline commits after delivery."""

from __future__ import annotations

import asyncio
import logging
import math
import operator
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from allocd.config import KafkaSettings
from allocd.kafka_conn import connection_options, with_start_retry
from allocd.sources.base import AssignmentListener, Batch, LostOwnership
from allocd.windows import TP

__all__ = ["KafkaSource"]

log = logging.getLogger("allocd.kafka")

_TIMESTAMP = operator.attrgetter("timestamp")  # max() over a fetch's records without a Python-level loop


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
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
        committed = await self.consumer.committed(TopicPartition(*tp))
        return None if committed is None else int(committed)

    async def reset_position(self, tp: TP) -> int:
        # Asked explicitly rather than through position(): inside the rebalance callback the fetcher may
        # already have advanced the position past records the pipeline has not processed.
        assert self.consumer is not None
        ktp = TopicPartition(*tp)
        if self.s.auto_offset_reset == "earliest":
            return int((await self.consumer.beginning_offsets([ktp]))[ktp])
        return int((await self.consumer.end_offsets([ktp]))[ktp])

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
