"""The journal fence on the real broker: a member whose partition another member claimed stops sending.

The unit tests cover recovery's reading of claims; these cover `KafkaJournalStore.still_owner`, which reads
the checkpoint topic's tail with a consumer kept in position between calls."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaProducer

from allocd.config import KafkaSettings
from allocd.embedded import EmbeddedBroker, create_topics
from allocd.journal import Journal, PartitionState, recover
from allocd.stores.kafka import KafkaJournalStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

P0 = ("usage", 0)
P1 = ("usage", 1)


async def _stores(broker: EmbeddedBroker, n: int) -> tuple[AIOKafkaProducer, list[KafkaJournalStore]]:
    topic = f"ckpt-{uuid.uuid4().hex[:8]}"
    await create_topics(broker.bootstrap, {topic: 1})
    settings = KafkaSettings(
        bootstrap_servers=broker.bootstrap, group_id=f"g-{uuid.uuid4().hex[:8]}", checkpoint_topic=topic
    )
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    return producer, [KafkaJournalStore(settings, producer) for _ in range(n)]


async def _close(producer: AIOKafkaProducer, stores: list[KafkaJournalStore]) -> None:
    for store in stores:
        await store.close()
    await producer.stop()


async def test_a_member_sees_a_later_claim_on_its_partition_and_only_that_partition(
    broker: EmbeddedBroker,
) -> None:
    producer, (a, b) = await _stores(broker, 2)
    try:
        await a.read_recent(claim=[P0, P1])
        await a.append([{"t": "sent", "cid": "c1", "r": 0}])
        assert await a.still_owner([P0, P1])

        await b.read_recent(claim=[P0])  # b takes partition 0 over
        await a.append([{"t": "sent", "cid": "c2", "r": 0}])
        assert not await a.still_owner([P0])
        assert await a.still_owner([P1])
        assert await b.still_owner([P0])
    finally:
        await _close(producer, [a, b])


async def test_a_member_that_reclaims_a_partition_owns_it_again(broker: EmbeddedBroker) -> None:
    producer, (a, b) = await _stores(broker, 2)
    try:
        await a.read_recent(claim=[P0])
        await b.read_recent(claim=[P0])
        await a.append([{"t": "sent", "cid": "c1", "r": 0}])
        assert not await a.still_owner([P0])

        await a.read_recent(claim=[P0])  # the next rebalance gives it back; the claim moves the tail past b's
        await a.append([{"t": "sent", "cid": "c2", "r": 0}])
        assert await a.still_owner([P0])
        await b.append([{"t": "sent", "cid": "c3", "r": 0}])
        assert not await b.still_owner([P0])
    finally:
        await _close(producer, [a, b])


async def test_many_checks_in_a_row_each_see_the_entry_just_appended(broker: EmbeddedBroker) -> None:
    """The tail consumer stays in position across calls: each call must still read up to the new entry,
    and a claim made between two calls must be seen by the next one."""
    producer, (a, b) = await _stores(broker, 2)
    try:
        await a.read_recent(claim=[P0])
        for i in range(30):
            await a.append([{"t": "sent", "cid": f"c{i}", "r": 0}])
            assert await a.still_owner([P0])
        await b.read_recent(claim=[P0])
        await a.append([{"t": "sent", "cid": "last", "r": 0}])
        assert not await a.still_owner([P0])
    finally:
        await _close(producer, [a, b])


# --- the bounded read --------------------------------------------------------------------------------------
def _ckpt(pos: int) -> PartitionState:
    return PartitionState(pos, {("s", pos * 1000): pos + 1}, {})


async def test_an_assignment_reads_back_only_as_far_as_recovery_needs(broker: EmbeddedBroker) -> None:
    producer, (a, b) = await _stores(broker, 2)
    try:
        await a.read_recent(claim=[P0, P1])
        journal = Journal(a)
        for n in range(150):  # history: cycles, each followed by a checkpoint of both partitions
            await a.append([{"t": "cycle", "c": f"c{n}", "b": [["usage", 0, n], ["usage", 1, n]], "w": []}])
            await a.append([{"t": "sent", "c": f"c{n}", "r": 0, "cells": ["d"]}])
            await a.append([{"t": "ack", "c": f"c{n}", "r": 0, "cells": ["d"]}])
            assert await a.still_owner([P0, P1])  # as the flush cycle does before each checkpoint
            await journal.checkpoint({P0: _ckpt(n), P1: _ckpt(n)})
        # An interrupted cycle after the last checkpoint: recovery needs it too.
        await a.append([{"t": "cycle", "c": "last", "b": [["usage", 0, 200]], "w": []}])
        await a.append([{"t": "sent", "c": "last", "r": 0, "cells": ["x", "y"]}])
        await a.append([{"t": "ack", "c": "last", "r": 0, "cells": ["x"]}])

        read = await b.read_recent(claim=[P0, P1])
        assert not read.reached_start and read.scanned < 20  # of ~600 entries
        recovered = recover(read.entries, [P0, P1])
        assert recovered[P0].state == PartitionState(149, {("s", 149_000): 150}, {"x": 200})
        assert recovered[P0].in_doubt == {("last", 0): 1}
        assert recovered[P1].state == _ckpt(149) and not recovered[P1].in_doubt
    finally:
        await _close(producer, [a, b])


async def test_the_bounded_read_ignores_a_stale_owners_checkpoint(broker: EmbeddedBroker) -> None:
    producer, (a, b, c, d) = await _stores(broker, 4)
    try:
        await a.read_recent(claim=[P0])
        await Journal(a).checkpoint({P0: PartitionState(10)})
        await b.read_recent(claim=[P0])  # b takes P0 over; a has not noticed
        await Journal(a).checkpoint({P0: PartitionState(50)})  # stale: written after b's claim
        read = await c.read_recent(claim=[P0])
        assert recover(read.entries, [P0])[P0].state.position == 10
        await Journal(c).checkpoint({P0: PartitionState(30)})
        read = await d.read_recent(claim=[P0])
        assert recover(read.entries, [P0])[P0].state.position == 30
    finally:
        await _close(producer, [a, b, c, d])


async def test_a_partition_without_a_checkpoint_reads_to_the_start(broker: EmbeddedBroker) -> None:
    producer, (a, b) = await _stores(broker, 2)
    try:
        await a.read_recent(claim=[P0])
        await Journal(a).checkpoint({P0: PartitionState(7)})
        read = await b.read_recent(claim=[P0, P1])  # P1 was never checkpointed
        assert read.reached_start
        recovered = recover(read.entries, [P0, P1])
        assert recovered[P0].state.position == 7 and recovered[P1].state.position is None
    finally:
        await _close(producer, [a, b])
