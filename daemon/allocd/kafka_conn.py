"""The Kafka connection shared by the source and the stores: client options (TLS, SASL), start-up retry,
topic creation and the producer. With sources/kafka.py and stores/kafka.py, the only modules that import
aiokafka (the Kafka edge)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from allocd.config import KafkaSettings
from allocd.errors import StartupError

__all__ = ["connection_options", "ensure_topics", "make_producer", "start_producer", "with_start_retry"]

log = logging.getLogger("allocd.kafka")


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


def make_producer(settings: KafkaSettings) -> AIOKafkaProducer:
    """The journal and DLQ producer (not started): acks from all replicas, a short linger."""
    return AIOKafkaProducer(
        acks="all", linger_ms=2, max_request_size=4 * 1024 * 1024, **connection_options(settings)
    )
