"""The journal fence on the real broker: a member whose partition another member claimed stops sending.

The unit tests cover recovery's reading of claims; these cover `KafkaJournalStore.still_owner`, which reads
the checkpoint topic's tail with a consumer kept in position between calls."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaProducer

from allocd.config import KafkaSettings
from allocd.embedded import EmbeddedBroker, create_topics
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
        await a.read_all(claim=[P0, P1])
        await a.append([{"t": "sent", "cid": "c1", "r": 0}])
        assert await a.still_owner([P0, P1])

        await b.read_all(claim=[P0])  # b takes partition 0 over
        await a.append([{"t": "sent", "cid": "c2", "r": 0}])
        assert not await a.still_owner([P0])
        assert await a.still_owner([P1])
        assert await b.still_owner([P0])
    finally:
        await _close(producer, [a, b])


async def test_a_member_that_reclaims_a_partition_owns_it_again(broker: EmbeddedBroker) -> None:
    producer, (a, b) = await _stores(broker, 2)
    try:
        await a.read_all(claim=[P0])
        await b.read_all(claim=[P0])
        await a.append([{"t": "sent", "cid": "c1", "r": 0}])
        assert not await a.still_owner([P0])

        await a.read_all(claim=[P0])  # the next rebalance gives it back; the claim moves the tail past b's
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
        await a.read_all(claim=[P0])
        for i in range(30):
            await a.append([{"t": "sent", "cid": f"c{i}", "r": 0}])
            assert await a.still_owner([P0])
        await b.read_all(claim=[P0])
        await a.append([{"t": "sent", "cid": "last", "r": 0}])
        assert not await a.still_owner([P0])
    finally:
        await _close(producer, [a, b])
