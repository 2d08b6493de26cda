"""`allocd run`: build the parts from the settings, serve metrics and health, run the pipeline, and exit 0
within `shutdown_timeout` on SIGTERM/SIGINT (a second signal exits at once)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from typing import Any

from allocd.cloudzero.apikey import ApiKey
from allocd.cloudzero.client import ClientConfig, CloudZeroClient
from allocd.config import Settings, load_settings
from allocd.events import Decoder, DecoderConfig
from allocd.journal import Journal
from allocd.logs import configure_logging, register_secret
from allocd.observability import Health, Metrics, bound_port, start_http_server
from allocd.pipeline import Pipeline
from allocd.sources.base import Source
from allocd.sources.kafka import (
    KafkaDeadLetters,
    KafkaJournalStore,
    KafkaSource,
    ensure_topics,
    start_producer,
    with_start_retry,
)
from allocd.webserver import write_port_file

__all__ = ["add_arguments", "run", "run_command"]

log = logging.getLogger("allocd.daemon")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="TOML config file (else $ALLOCD_CONFIG; env ALLOCD_* wins)")
    parser.add_argument("--port-file", help="write the metrics/health port here once listening (tests)")


# Per-event objects (decoded JSON, records) die young and form no cycles, yet each batch keeps thousands alive
# for a moment: at the default gen-0 threshold (700) the collector runs every few hundred events and walks
# them (~0.2-0.4 µs per event, measured by tests/bench). Larger thresholds leave memory bounded as before.
GC_THRESHOLDS = (10_000, 20, 20)


async def run_command(args: argparse.Namespace) -> int:
    gc.set_threshold(*GC_THRESHOLDS)  # the process entry, not run(): tests call run() inside pytest
    settings = load_settings(args.config)
    configure_logging(settings.server.log_level)
    return await run(settings, port_file=args.port_file)


def make_key(settings: Settings) -> ApiKey:
    api = settings.api
    return ApiKey.from_file(api.api_key_file) if api.api_key_file else ApiKey.from_env(api.api_key_env)


def reload_key(key: ApiKey) -> bool:
    """Re-read a rotated key (after a 403) and keep it out of the logs like the first one."""
    changed = key.reload()
    register_secret(key.get())
    return changed


def make_client(settings: Settings, key: ApiKey, observer: Any) -> CloudZeroClient:
    api = settings.api
    config = ClientConfig(
        base_url=api.base_url,
        records_per_request=api.records_per_request,
        records_per_second=api.records_per_second,
        burst=api.burst or None,
        request_timeout=api.request_timeout,
        retry_deadline=api.retry_deadline,
    )
    return CloudZeroClient(config, key, observer=observer)


def checkpoint_topic_configs(settings: Settings) -> dict[str, str]:
    """Every completed cycle rewrites the checkpoint of each owned partition, and a cycle happens at least
    every max_flush_interval while data flows, so a week — or three intervals — keeps the latest one of
    every partition; an idle partition falls back to its group commit, which equals its checkpoint."""
    week_ms = 7 * 86_400_000
    retention = max(week_ms, int(3 * settings.pipeline.max_flush_interval_seconds * 1000))
    return {"retention.ms": str(retention), "cleanup.policy": "delete"}


class BeatingObserver:
    """The client's observer: metrics, plus a liveness beat per request or retry — a request that retries
    through an API outage is progress, not a stuck loop (/healthz must not fail on an outage)."""

    def __init__(self, metrics: Metrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health

    def on_request(self, op: str, status: int | None, records: int, seconds: float) -> None:
        self.health.beat("flush")
        self.metrics.on_request(op, status, records, seconds)

    def on_retry(self, op: str, reason: str) -> None:
        self.health.beat("flush")
        self.metrics.on_retry(op, reason)

    def on_in_doubt(self, op: str, records: int) -> None:
        self.metrics.on_in_doubt(op, records)

    def on_rejected(self, op: str, records: int) -> None:
        self.metrics.on_rejected(op, records)

    def on_rate_wait(self, seconds: float) -> None:
        self.health.beat("flush")
        self.metrics.on_rate_wait(seconds)


def install_signal_handlers(stop: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: a clean shutdown. Second: exit at once (the operator insists)."""
    loop = asyncio.get_running_loop()

    def handle(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: exiting at once", extra={"signal": signum})
            os._exit(128 + signum)
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)


async def _lag_loop(source: Source, pipeline: Pipeline, metrics: Metrics, every: float = 15.0) -> None:
    """End offsets for the lag gauges, best effort (the broker may under-report; metrics only)."""
    while True:
        tps = list(pipeline.parts)
        if tps:
            for (topic, part), end in (await source.end_offsets(tps)).items():
                metrics.set_partition(topic, part, end=end)
        await asyncio.sleep(every)


async def run(settings: Settings, *, port_file: str | None = None, stop: asyncio.Event | None = None) -> int:
    if settings.sidecar.enabled:
        from allocd.sidecar import run_sidecar  # imports this module's helpers

        return await run_sidecar(settings, port_file=port_file, stop=stop)
    stop = stop or asyncio.Event()
    install_signal_handlers(stop)
    key = make_key(settings)
    register_secret(key.get())
    decoder = Decoder(DecoderConfig.from_dict(settings.events, prefix="events."))
    metrics = Metrics()
    health = Health(
        liveness_timeout=settings.server.liveness_timeout_seconds,
        startup_grace=settings.server.assignment_grace_seconds,
        conditions=("assigned",),
    )
    health.set_condition("api_key", True, "")
    runner = await start_http_server(metrics, health, settings.server.host, settings.server.port)
    if port_file:
        write_port_file(port_file, bound_port(runner))
    k = settings.kafka
    try:
        if k.create_topics:
            topics = {k.checkpoint_topic: 1, k.dlq_topic: 1}
            configs = {k.checkpoint_topic: checkpoint_topic_configs(settings)}
            await with_start_retry("create topics", k, lambda: ensure_topics(k, topics, configs))
        producer = await start_producer(k)
    except BaseException:
        await runner.cleanup()
        raise
    client = make_client(settings, key, BeatingObserver(metrics, health))
    source = KafkaSource(k)
    store = KafkaJournalStore(k, producer)
    pipeline = Pipeline(
        settings.pipeline,
        source,
        decoder,
        client,
        Journal(store),
        KafkaDeadLetters(k.dlq_topic, producer),
        metrics,
        health,
        on_auth_failure=lambda: reload_key(key),
    )
    lag = asyncio.create_task(_lag_loop(source, pipeline, metrics))
    started = time.monotonic()
    try:
        log.info("allocd running", extra={"topics": list(k.topics), "group": k.group_id})
        await pipeline.run(stop)
    finally:
        lag.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await lag
        await client.close()
        await store.close()
        await producer.stop()
        await runner.cleanup()
        log.info("allocd stopped", extra={"seconds": round(time.monotonic() - started, 3)})
    return 0
