"""Fixtures for the deployment-artifact tests: a real broker and one real scrape of a running daemon.

`live_scrape` runs `allocd run` (tests/integration/harness.py) against the session's embedded broker and the
CloudZero emulator in-process, feeds it events until every series the dashboard and the alert rules read
has samples (or a deadline passes: the tests then name what is missing), scrapes /metrics, and stops the
daemon with SIGTERM, keeping its exit status.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import orjson
import pytest

from allocd.cloudzero.emulator import EmulatorConfig, bound_port, serve
from allocd.embedded import EmbeddedBroker, Message, create_topics, produce
from tests.deploy.deploytools import LiveScrape, sample_names, wanted_series
from tests.integration.harness import DaemonProcess, Generator, daemon_config

__all__ = ["live_scrape"]

SCRAPE_DEADLINE = 60.0  # seconds; the daemon's lag loop reports end offsets every 15 s
STOP_DEADLINE = 20.0
API_KEY = "deploy-test-key"


def _event(stream: str, ts_ms: int) -> bytes:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts_ms / 1000)) + f".{ts_ms % 1000:03d}Z"
    return orjson.dumps(
        {
            "id": uuid.uuid4().hex,
            "timestamp": ts,
            "stream": stream,
            "element_name": "cust-late",
            "filter": {"custom:feature": ["billing"], "tag:environment": ["prod"]},
            "value": 3,
        }
    )


async def _stop(daemon: DaemonProcess) -> int | None:
    """SIGTERM by PID, wait without blocking the loop (the emulator answers the drain), then SIGKILL."""
    proc = daemon.proc
    assert proc is not None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    for _ in range(int(STOP_DEADLINE / 0.05)):
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
        return None
    return proc.returncode


async def _collect(broker: EmbeddedBroker, workdir: Path, wanted: frozenset[str]) -> LiveScrape:
    emulator = await serve(EmulatorConfig(keys=(API_KEY,), admin=True), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{bound_port(emulator)}"
    tag = uuid.uuid4().hex[:10]
    topic = f"deploy-{tag}"
    await create_topics(broker.bootstrap, {topic: 2})
    key_file = workdir / "api-key"
    key_file.write_text(API_KEY)
    daemon = DaemonProcess(
        daemon_config(
            bootstrap=broker.bootstrap,
            topic=topic,
            api_url=url,
            key_file=key_file,
            group=f"deploy-{tag}",
            checkpoint_topic=f"deploy-{tag}-checkpoints",
            dlq_topic=f"deploy-{tag}-dlq",
        ),
        workdir,
    )
    text = ""
    try:
        async with aiohttp.ClientSession() as session:
            # The first write is answered 503 (and applied): a retry and an in-doubt request happen for real.
            hook = {"after_request": 1, "action": "fail503"}
            async with session.post(f"{url}/_admin/hooks", json=hook) as resp:
                assert resp.status == 200, await resp.text()
            daemon.start()
            await daemon.port()
            gen = Generator(seed=11)
            now_ms = int(time.time() * 1000)
            odd = [Message(_event("undeclared-stream", now_ms), key=None)]  # rejected: to the DLQ
            odd.append(Message(_event("billing-usage", now_ms - 120_000), key=None))  # late: window delivered
            await produce(broker.bootstrap, topic, odd)
            deadline = time.monotonic() + SCRAPE_DEADLINE
            while time.monotonic() < deadline:
                await produce(broker.bootstrap, topic, gen.batch(5))
                text = await daemon.metrics(session)
                if wanted <= sample_names(text):
                    break
                await asyncio.sleep(0.5)
            exit_code = await _stop(daemon)
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(timeout=10)
        await emulator.cleanup()
    return LiveScrape(text, wanted, exit_code, daemon.log_tail())


@pytest.fixture(scope="session")
def live_scrape(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> LiveScrape:
    workdir = tmp_path_factory.mktemp("live-scrape")
    return asyncio.run(_collect(broker, workdir, frozenset(wanted_series())))
