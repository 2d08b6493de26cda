"""Pins the facts about the embedded broker (Tansu) that the pipeline's design relies on."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition

from allocd.embedded import (
    BrokerError,
    EmbeddedBroker,
    Message,
    consume_all,
    create_topics,
    produce,
    read_committed,
)

pytestmark = pytest.mark.integration

SESSION_MS = 2000  # Tansu joins a group in about session_timeout / 2


class Rebalances(ConsumerRebalanceListener):
    """Records every assignment and revocation a member sees."""

    def __init__(self) -> None:
        self.assigned: list[set[TopicPartition]] = []
        self.revoked: list[set[TopicPartition]] = []

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.revoked.append(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.assigned.append(set(assigned))


def member(broker: EmbeddedBroker, topic: str, group: str, listener: Rebalances) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_MS,
        heartbeat_interval_ms=500,
    )
    consumer.subscribe([topic], listener=listener)
    return consumer


async def poll_until(
    consumers: list[AIOKafkaConsumer], done: Callable[[list[ConsumerRecord]], bool], within: float
) -> list[ConsumerRecord]:
    """Keep every consumer polling until `done(fetched so far)` holds; return the fetched records.

    Fails at the deadline.
    """
    fetched: list[ConsumerRecord] = []
    deadline = time.monotonic() + within
    while not done(fetched):
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        for consumer in consumers:
            batch = await consumer.getmany(timeout_ms=50)
            fetched += [r for records in batch.values() for r in records]
    return fetched


def partitions(consumer: AIOKafkaConsumer) -> list[int]:
    return sorted(tp.partition for tp in consumer.assignment())


def test_stop_ends_the_process_by_pid() -> None:
    broker = EmbeddedBroker()
    broker.start(timeout=30)
    pid = broker.pid
    assert pid is not None and broker.running()
    assert broker.bootstrap.startswith("127.0.0.1:")
    broker.stop(timeout=10)
    assert not broker.running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_fixed_port_in_use_is_refused(broker: EmbeddedBroker) -> None:
    with pytest.raises(BrokerError, match="already in use"):
        EmbeddedBroker(port=broker.port).start(timeout=10)


async def test_async_context_manager_starts_and_stops() -> None:
    async with EmbeddedBroker() as embedded:
        pid = embedded.pid
        topic = f"ctx-{uuid.uuid4().hex[:8]}"
        await create_topics(embedded.bootstrap, {topic: 1})
        assert await produce(embedded.bootstrap, topic, [(0, None, b"x")]) == {0: 1}
    assert pid is not None and not embedded.running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'boom: cannot start'\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(BrokerError, match=r"(?s)code 3.*boom: cannot start"):
        EmbeddedBroker(binary=str(fake)).start(timeout=10)


async def test_round_trip_keeps_keys_headers_and_timestamps(broker: EmbeddedBroker, topic_factory) -> None:
    topic = await topic_factory(partitions=2)
    sent = [
        Message(b"v0", key=b"k0", partition=0, headers=[("reason", b"too_late"), ("source", b"t:0:5")]),
        Message(b"v1", key=None, partition=1, timestamp_ms=1_600_000_000_123),
        Message(b"v2", key=b"k2", partition=1, headers=[("reason", b"")], timestamp_ms=1_700_000_000_000),
    ]
    ends = await produce(broker.bootstrap, topic, sent)
    assert ends == {0: 1, 1: 2}

    got = await consume_all(broker.bootstrap, topic, ends, timeout=10)

    assert [(r.partition, r.key, r.value, tuple(r.headers)) for r in got] == [
        (0, b"k0", b"v0", (("reason", b"too_late"), ("source", b"t:0:5"))),
        (1, None, b"v1", ()),
        (1, b"k2", b"v2", (("reason", b""),)),
    ]
    assert [r.timestamp for r in got[1:]] == [1_600_000_000_123, 1_700_000_000_000]
    assert all(r.timestamp_type == 0 for r in got)  # CreateTime: the producer's time, as sent
    assert abs(got[0].timestamp - time.time() * 1000) < 60_000  # unset → the producer's clock


async def test_acknowledged_end_offsets_count_every_record(broker: EmbeddedBroker, topic_factory) -> None:
    topic = await topic_factory(partitions=4)
    counts = {0: 1000, 1: 1500, 3: 7}  # batched by linger; partition 2 left empty
    values = [(p, None, f"{p}-{i}".encode()) for p, n in counts.items() for i in range(n)]

    ends = await produce(broker.bootstrap, topic, values)

    assert ends == counts
    got = await consume_all(broker.bootstrap, topic, ends, timeout=15)
    by_partition: dict[int, list[int]] = {}
    for r in got:
        by_partition.setdefault(r.partition, []).append(r.offset)
    assert {p: offsets == list(range(counts[p])) for p, offsets in by_partition.items()} == dict.fromkeys(
        counts, True
    )
    assert [r.value for r in got] == [v for _, _, v in values]


async def test_large_values_are_accepted(broker: EmbeddedBroker, topic_factory) -> None:
    topic = await topic_factory(partitions=1)
    sizes = [1_000_000, 2_000_000]

    ends = await produce(broker.bootstrap, topic, [(0, None, b"x" * n) for n in sizes])

    got = await consume_all(broker.bootstrap, topic, ends, timeout=10)
    assert [len(r.value) for r in got] == sizes


async def test_getmany_respects_max_records(broker: EmbeddedBroker, topic_factory) -> None:
    topic = await topic_factory(partitions=1)
    await produce(broker.bootstrap, topic, [(0, None, b"%d" % i) for i in range(50)])
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    async with consumer:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        batch = await consumer.getmany(timeout_ms=5000, max_records=7)
        assert [r.offset for r in batch[tp]] == list(range(7))


async def test_create_topics_is_idempotent_and_checks_partitions(broker: EmbeddedBroker) -> None:
    name = f"idem-{uuid.uuid4().hex[:12]}"
    await create_topics(broker.bootstrap, {name: 3})
    await create_topics(broker.bootstrap, {name: 3})  # exists: no error

    with pytest.raises(BrokerError, match="other partition counts"):
        await create_topics(broker.bootstrap, {name: 5})


async def test_committed_offsets_read_back_without_joining(broker: EmbeddedBroker, topic_factory) -> None:
    topic = await topic_factory(partitions=4)
    group = f"g-{uuid.uuid4().hex[:8]}"
    seen = Rebalances()
    consumer = member(broker, topic, group, seen)
    async with consumer:
        await poll_until([consumer], lambda _: len(consumer.assignment()) == 4, within=15)
        await consumer.commit({TopicPartition(topic, 0): 5, TopicPartition(topic, 1): 7})

        committed = await read_committed(broker.bootstrap, group, topic, range(4))
        assert committed == {0: 5, 1: 7, 2: None, 3: None}

        await consumer.commit({TopicPartition(topic, 0): 9})
        assert (await read_committed(broker.bootstrap, group, topic, [0]))[0] == 9  # fresh, not cached
        await consumer.getmany(timeout_ms=100)
        assert len(seen.assigned) == 1 and not any(seen.revoked)  # reading caused no rebalance
        assert partitions(consumer) == [0, 1, 2, 3]


async def test_paused_member_stays_in_group_then_resumes(broker: EmbeddedBroker, topic_factory) -> None:
    topic = await topic_factory(partitions=2)
    seen = Rebalances()
    consumer = member(broker, topic, f"g-{uuid.uuid4().hex[:8]}", seen)
    async with consumer:
        await poll_until([consumer], lambda _: len(consumer.assignment()) == 2, within=15)
        consumer.pause(*consumer.assignment())
        await produce(broker.bootstrap, topic, [(i % 2, None, b"%d" % i) for i in range(10)])

        # Polled while paused for longer than the session timeout: nothing fetched, membership kept.
        stop_at = time.monotonic() + SESSION_MS / 1000 * 1.25
        fetched = await poll_until([consumer], lambda _: time.monotonic() > stop_at, within=10)
        assert fetched == []
        assert len(seen.assigned) == 1 and not any(seen.revoked)  # aiokafka reports one empty revoke at join

        consumer.resume(*consumer.assignment())
        got = await poll_until([consumer], lambda fetched: len(fetched) >= 10, within=10)
        assert sorted(int(r.value) for r in got) == list(range(10))


async def test_two_members_split_partitions_and_rebalance_on_leave(
    broker: EmbeddedBroker, topic_factory
) -> None:
    topic = await topic_factory(partitions=4)
    group = f"g-{uuid.uuid4().hex[:8]}"
    first, second = member(broker, topic, group, Rebalances()), member(broker, topic, group, Rebalances())
    async with first:
        await poll_until([first], lambda _: len(first.assignment()) == 4, within=15)
        async with second:
            await poll_until(
                [first, second], lambda _: len(first.assignment()) == len(second.assignment()) == 2, within=15
            )
            assert sorted(partitions(first) + partitions(second)) == [0, 1, 2, 3]
        # `second` left the group on stop: its partitions come back to `first`.
        await poll_until([first], lambda _: len(first.assignment()) == 4, within=15)
