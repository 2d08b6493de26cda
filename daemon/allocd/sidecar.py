"""`allocd run` in sidecar mode: the same pipeline, fed by local HTTP ingest through a durable spool.

Everything lives in `sidecar.spool_dir`: the spool segments (`*.wal`), the journal (`journal.ndjson`, the
checkpoint is the authority for where replay starts), the dead letters (`dead-letters.ndjson`) and a lock
file that keeps a second process out. Shutdown (SIGTERM/SIGINT, or `stop` set):

1. POSTs are answered 503 from now on;
2. the pipeline reads what the spool holds (at most a fifth of `pipeline.shutdown_timeout_seconds`);
3. the pipeline stops: open windows are delivered (`flush_on_shutdown` defaults to on for the sidecar),
   journaled and checkpointed, within the rest of the timeout; what is left stays spooled for the next start.

`allocd run` comes here when `[sidecar] enabled = true` (daemon.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import time
from pathlib import Path

from allocd.config import Settings
from allocd.errors import ConfigError
from allocd.journal import Journal, position_floor
from allocd.logs import register_secret
from allocd.observability import Health, Metrics, SidecarMetrics
from allocd.pipeline import Pipeline
from allocd.sources.http import SPOOL_TP, HttpSource
from allocd.sources.spool import Spool
from allocd.stores.files import FileDeadLetters, FileJournalStore
from allocd.webserver import write_port_file
from allocd.wiring import shared_parts

__all__ = ["DEAD_LETTERS_FILE", "INGEST_PORT_SUFFIX", "JOURNAL_FILE", "run_sidecar"]

log = logging.getLogger("allocd.sidecar")

JOURNAL_FILE = "journal.ndjson"
DEAD_LETTERS_FILE = "dead-letters.ndjson"
LOCK_FILE = "lock"
INGEST_PORT_SUFFIX = ".ingest"  # the ingest port is written to <port_file>.ingest
_DRAIN_SHARE = 0.2  # of shutdown_timeout, for the pipeline to read what the spool holds
_GAUGE_SECONDS = 1.0


def _lock(spool_dir: Path) -> int:
    """An exclusive lock on the spool directory for this process's life (released by the kernel on exit)."""
    try:
        spool_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(spool_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o640)
    except OSError as exc:
        raise ConfigError("sidecar.spool_dir", f"cannot use {spool_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError("sidecar.spool_dir", f"{spool_dir} is in use by another allocd process") from None
    return fd


def _read_secret(path: str) -> str | None:
    if not path:
        return None
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError("sidecar.shared_secret_file", f"cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError("sidecar.shared_secret_file", f"{path} is empty")
    register_secret(secret)
    return secret


async def _stop_sequence(
    stop: asyncio.Event, source: HttpSource, pipeline_stop: asyncio.Event, drain_budget: float
) -> None:
    """Steps 1–2 of the shutdown, then step 3 is the pipeline's own."""
    await stop.wait()
    source.close_ingest()
    log.info("ingest closed; reading what the spool holds", extra={"budget": round(drain_budget, 3)})
    if not await source.caught_up(drain_budget):
        log.warning("the pipeline did not catch up with the spool in time; the rest stays spooled")
    pipeline_stop.set()


async def _gauges(spool: Spool, metrics: Metrics, health: Health) -> None:
    while True:
        metrics.set_partition(SPOOL_TP[0], SPOOL_TP[1], end=spool.durable_end)
        health.set_condition("spool", spool.broken is None, spool.broken or "")
        await asyncio.sleep(_GAUGE_SECONDS)


async def run_sidecar(settings: Settings, stop: asyncio.Event, *, port_file: str | None = None) -> int:
    """Run until `stop` is set; return 0 after a clean shutdown. `port_file` receives the metrics/health
    port, and `<port_file>.ingest` the ingest port (written first)."""
    sc = settings.sidecar
    spool_dir = Path(sc.spool_dir)
    lock_fd = _lock(spool_dir)
    try:
        async with contextlib.AsyncExitStack() as stack:
            parts = await stack.enter_async_context(shared_parts(settings))
            secret = _read_secret(sc.shared_secret_file)
            sidecar_metrics = SidecarMetrics(parts.metrics.registry)
            journal_store = FileJournalStore(spool_dir / JOURNAL_FILE)
            stack.callback(journal_store.close)
            dead_letters = FileDeadLetters(spool_dir / DEAD_LETTERS_FILE)
            stack.callback(dead_letters.close)
            floor = position_floor(await journal_store.read_all(), SPOOL_TP)
            spool = await Spool.open(
                spool_dir, max_bytes=sc.max_spool_bytes, min_next_seq=floor, on_sync=sidecar_metrics.on_sync
            )
            sidecar_metrics.watch(spool)
            source = HttpSource(
                sc, spool, parts.decoder, dead_letters, parts.metrics, sidecar_metrics, secret=secret
            )
            stack.push_async_callback(source.stop)
            ingest_port = await source.listen()
            if port_file:
                write_port_file(port_file + INGEST_PORT_SUFFIX, ingest_port)
                write_port_file(port_file, parts.server_port)
            timeout = settings.pipeline.shutdown_timeout_seconds
            pipeline = Pipeline(
                dataclasses.replace(settings.pipeline, shutdown_timeout_seconds=timeout * (1 - _DRAIN_SHARE)),
                source,
                parts.decoder,
                parts.client,
                Journal(journal_store),
                dead_letters,
                parts.metrics,
                parts.health,
                on_auth_failure=parts.reload_key,
            )
            pipeline_stop = asyncio.Event()
            tasks = [
                asyncio.create_task(_stop_sequence(stop, source, pipeline_stop, timeout * _DRAIN_SHARE)),
                asyncio.create_task(_gauges(spool, parts.metrics, parts.health)),
            ]
            started = time.monotonic()
            try:
                log.info(
                    "allocd sidecar running",
                    extra={"ingest": f"{sc.host}:{ingest_port}", "spool_dir": str(spool_dir), "from": floor},
                )
                await pipeline.run(pipeline_stop)
            finally:
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                log.info("allocd sidecar stopped", extra={"seconds": round(time.monotonic() - started, 3)})
    finally:
        os.close(lock_fd)
    return 0
