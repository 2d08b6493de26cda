"""Start-up while the brokers cannot be reached: retried (a broker restarting as the pod starts), and a
clear exit when they stay away for `kafka.connect_timeout_seconds` (found by the chaos soak, seed 202: a
daemon started during a broker-link fault exited with a traceback)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from allocd.embedded import produce
from tests.chaos.proxy import FaultProxy

from .harness import DaemonProcess, Generator, Stack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RETRYING = "Kafka not reachable at start-up; retrying"


def _retries(d: DaemonProcess) -> int:
    return sum(1 for line in d.log_lines() if line.get("message") == RETRYING)


async def test_start_up_waits_for_unreachable_brokers_then_runs(stack: Stack) -> None:
    port = _free_port()
    d = stack.daemon("a", bootstrap=f"127.0.0.1:{port}", connect_timeout=60)
    d.start()

    async def retried() -> bool:
        return _retries(d) >= 1

    await wait_for(retried, 30, "a start-up retry logged")
    await asyncio.sleep(1.5)  # a few more attempts (0.5 s, then 1 s apart): it must still be waiting
    assert d.proc is not None and d.proc.poll() is None
    # The bootstrap address opens: a plain forwarder to the broker (only the bootstrap goes through it; the
    # broker's metadata points the client at the broker itself).
    host, broker_port = stack.broker.bootstrap.rsplit(":", 1)
    forwarder = FaultProxy("bootstrap", (host, int(broker_port)), port=port)
    await forwarder.start()
    try:
        await stack.ready(d)
        gen = Generator(seed=7, elements=5)
        await produce(stack.broker.bootstrap, stack.topic, gen.batch(500))
        await stack.totals_equal(gen.expected())
        assert await d.terminate() == 0
    finally:
        await forwarder.stop()


async def test_start_up_gives_up_with_a_message_naming_the_setting(stack: Stack) -> None:
    port = _free_port()
    d = stack.daemon("a", bootstrap=f"127.0.0.1:{port}", connect_timeout=2)
    started = time.monotonic()
    d.start()
    assert await d.wait(60) == 1
    assert time.monotonic() - started >= 2  # it retried for the configured time
    tail = d.log_tail()
    assert "kafka.connect_timeout_seconds" in tail
    assert f"127.0.0.1:{port}" in tail
    assert "Traceback" not in tail
    assert _retries(d) >= 1  # (repeats of one warning are rate-limited in the log)
