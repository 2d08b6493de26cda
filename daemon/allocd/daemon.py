"""`allocd run`: the consumer-group daemon — or, with `[sidecar] enabled`, the sidecar (sidecar.py).

Both are assembled from the shared parts (wiring.py) plus their own source, journal store and dead letters,
serve metrics and health, run the pipeline, and exit 0 within `shutdown_timeout` on SIGTERM/SIGINT (a
second signal exits at once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import time

from allocd.config import Settings, load_settings
from allocd.journal import Journal
from allocd.kafka_conn import ensure_topics, start_producer, with_start_retry
from allocd.logs import configure_logging
from allocd.observability import Metrics
from allocd.pipeline import Pipeline
from allocd.shutdown import stop_on_signals
from allocd.sidecar import run_sidecar
from allocd.sources.kafka import KafkaSource
from allocd.stores.kafka import KafkaDeadLetters, KafkaJournalStore
from allocd.webserver import write_port_file
from allocd.wiring import Parts, shared_parts

__all__ = ["add_arguments", "checkpoint_topic_configs", "run", "run_command"]

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


async def run(settings: Settings, *, port_file: str | None = None, stop: asyncio.Event | None = None) -> int:
    """Run until `stop` is set (or SIGTERM/SIGINT); return 0 after a clean shutdown."""
    stop = stop or asyncio.Event()
    with stop_on_signals(stop, second_exits=True):
        if settings.sidecar.enabled:
            return await run_sidecar(settings, stop, port_file=port_file)
        return await _run_kafka(settings, stop, port_file)


def checkpoint_topic_configs(settings: Settings) -> dict[str, str]:
    """Every completed cycle rewrites the checkpoint of each owned partition, and a cycle happens at least
    every max_flush_interval while data flows, so a week — or three intervals — keeps the latest one of
    every partition; an idle partition falls back to its group commit, which equals its checkpoint."""
    week_ms = 7 * 86_400_000
    retention = max(week_ms, int(3 * settings.pipeline.max_flush_interval_seconds * 1000))
    return {"retention.ms": str(retention), "cleanup.policy": "delete"}


async def _lag_loop(source: KafkaSource, pipeline: Pipeline, metrics: Metrics, every: float = 15.0) -> None:
    """End offsets for the lag gauges, best effort (the broker may under-report; metrics only)."""
    while True:
        tps = list(pipeline.parts)
        if tps:
            for (topic, part), end in (await source.end_offsets(tps)).items():
                metrics.set_partition(topic, part, end=end)
        await asyncio.sleep(every)


async def _run_kafka(settings: Settings, stop: asyncio.Event, port_file: str | None) -> int:
    started = time.monotonic()
    try:
        await _run_kafka_parts(settings, stop, port_file)
    finally:
        log.info("allocd stopped", extra={"seconds": round(time.monotonic() - started, 3)})
    return 0


async def _run_kafka_parts(settings: Settings, stop: asyncio.Event, port_file: str | None) -> None:
    k = settings.kafka
    async with contextlib.AsyncExitStack() as stack:
        parts: Parts = await stack.enter_async_context(shared_parts(settings))
        if port_file:
            write_port_file(port_file, parts.server_port)
        if k.create_topics:
            topics = {k.checkpoint_topic: 1, k.dlq_topic: 1}
            configs = {k.checkpoint_topic: checkpoint_topic_configs(settings)}
            await with_start_retry("create topics", k, lambda: ensure_topics(k, topics, configs))
        producer = await start_producer(k)
        stack.push_async_callback(producer.stop)
        store = KafkaJournalStore(k, producer)
        stack.push_async_callback(store.close)
        source = KafkaSource(k)
        pipeline = Pipeline(
            settings.pipeline,
            source,
            parts.decoder,
            parts.client,
            Journal(store),
            KafkaDeadLetters(k.dlq_topic, producer),
            parts.metrics,
            parts.health,
            on_auth_failure=parts.reload_key,
        )
        lag = asyncio.create_task(_lag_loop(source, pipeline, parts.metrics))
        try:
            log.info("allocd running", extra={"topics": list(k.topics), "group": k.group_id})
            await pipeline.run(stop)
        finally:
            lag.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await lag
