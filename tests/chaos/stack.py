"""The soak's moving parts: a dedicated broker whose advertised address is a fault proxy, the recording
emulator behind one API proxy per daemon slot, and daemon slots that are started, killed and restarted.

Everything listens on 127.0.0.1; every process is stopped by its PID in `Stack.close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from allocd.cloudzero.emulator import EmulatorConfig, get_emulator
from allocd.embedded import EmbeddedBroker, create_topics

from .. import configs
from ..integration.harness import DaemonProcess
from .emulator import RecordingEmulator, serve_recording
from .inputs import stream_tables
from .proxy import FaultProxy, LinkRegistry, kafka_client_id

__all__ = ["ADMIN_KEY", "Slot", "Stack", "daemon_toml"]

ADMIN_KEY = "chaos-probe"  # accepted by the emulator; used by no daemon
CLIENT_PREFIX = "allocd-"  # daemons' Kafka client ids: the Kafka proxy faults only these


def daemon_toml(
    *,
    slot: str,
    bootstrap: str,
    topic: str,
    group: str,
    api_url: str,
    key_file: Path,
    window_seconds: int,
    grace_seconds: float,
    shutdown_timeout: float,
    pipeline_extra: dict[str, Any],
) -> str:
    """A soak daemon's TOML: its own Kafka client id (the Kafka proxy faults only these), topics made by the
    stack, a slow API rate, and `pipeline_extra` (the slot's variant) added to `[pipeline]`."""
    return configs.daemon_toml(
        bootstrap=bootstrap,
        topics=[topic],
        group=group,
        kafka={
            "client_id": f"{CLIENT_PREFIX}{slot}",
            "create_topics": False,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1500,
            "rebalance_timeout_ms": 15000,
        },
        api_url=api_url,
        key_file=key_file,
        records_per_request=100,
        records_per_second=600,
        api={"request_timeout": 10, "retry_deadline": 30},
        window_seconds=window_seconds,
        grace_seconds=grace_seconds,
        shutdown_timeout=shutdown_timeout,
        pipeline={"tick_seconds": 0.2, **pipeline_extra},
        log_level="INFO",
        server={"assignment_grace_seconds": 0},
        streams=stream_tables(),
    )


@dataclass(eq=False)
class Slot:
    """A member of the group that may be started many times; each start is an incarnation with its own key."""

    name: str
    process: DaemonProcess
    proxy: FaultProxy  # this slot's link to the API
    key_file: Path
    incarnation: int = 0
    expect_exit: bool = False  # set before the soak signals it, so the watchdog can tell a crash
    killed: bool = False  # SIGKILLed by the schedule (perhaps while a SIGTERM was being handled)
    keys: dict[str, str] = field(default_factory=dict)  # key → "a#3"
    last_metrics: dict[str, str] = field(default_factory=dict)  # "a#3" → last /metrics text
    stopped_at: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.name}#{self.incarnation}"

    def running(self) -> bool:
        proc = self.process.proc
        return proc is not None and proc.poll() is None

    def port(self) -> int | None:
        try:
            return int(self.process.port_file.read_text())
        except (FileNotFoundError, ValueError):
            return None


class Stack:
    """Build with `await Stack.start(...)`; always `await stack.close()` (a finally block)."""

    def __init__(self, workdir: Path, seed: int, partitions: int) -> None:
        self.workdir = workdir
        self.seed = seed
        self.partitions = partitions
        self.topic = f"usage-{seed}"
        self.group = f"chaos-{seed}"
        self.registry = LinkRegistry()
        self.kafka = FaultProxy(
            "kafka", tagger=kafka_client_id, faultable=lambda tag: tag.startswith(CLIENT_PREFIX)
        )
        self.broker: EmbeddedBroker | None = None
        self.emulator_runner: Any = None
        self.emulator_url = ""
        self.slots: dict[str, Slot] = {}
        self.session: aiohttp.ClientSession | None = None
        self._keys: list[str] = [ADMIN_KEY]

    @property
    def emulator(self) -> RecordingEmulator:
        emulator = get_emulator(self.emulator_runner.app)
        assert isinstance(emulator, RecordingEmulator)
        return emulator

    async def start(self, slot_options: dict[str, dict[str, Any]], daemon_options: dict[str, Any]) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        port = await self.kafka.start()
        # The broker advertises the proxy: after bootstrap, every client's connection goes through it.
        self.broker = EmbeddedBroker(advertised_port=port)
        await asyncio.to_thread(self.broker.start, 30)
        assert self.broker.port is not None
        self.kafka.upstream = ("127.0.0.1", self.broker.port)
        await create_topics(
            self.kafka.address,
            {self.topic: self.partitions, f"{self.group}-ckpt": 1, f"{self.group}-dlq": 1},
        )
        config = EmulatorConfig(keys=(ADMIN_KEY,), admin=True, rate=1e6, burst=1e7, seed=self.seed)
        self.emulator_runner, emulator_port = await serve_recording(config, self.registry)
        self.emulator_url = f"http://127.0.0.1:{emulator_port}"
        for name, extra in slot_options.items():
            proxy = FaultProxy(
                f"api-{name}",
                ("127.0.0.1", emulator_port),
                frame_responses=True,
                rst=False,
                registry=self.registry,
            )
            await proxy.start()
            key_file = self.workdir / f"{name}.key"
            toml = daemon_toml(
                slot=name,
                bootstrap=self.kafka.address,
                topic=self.topic,
                group=self.group,
                api_url=f"http://{proxy.address}",
                key_file=key_file,
                pipeline_extra=extra,
                **daemon_options,
            )
            self.slots[name] = Slot(name, DaemonProcess(toml, self.workdir, name), proxy, key_file)

    # --- daemons ---------------------------------------------------------------------------------------
    async def start_slot(self, slot: Slot) -> None:
        slot.incarnation += 1
        key = f"chaos-{slot.name}-{slot.incarnation}-{self.seed}"
        slot.keys[key] = slot.label
        self._keys.append(key)
        await self.admin("keys", {"keys": self._keys})
        slot.key_file.write_text(key)
        with open(slot.process.log_path, "a") as log:
            log.write(json.dumps({"chaos": f"start {slot.label}", "time": time.time()}) + "\n")
        slot.expect_exit = False
        slot.killed = False
        slot.process.start()

    async def kill_slot(self, slot: Slot) -> None:
        slot.expect_exit = True
        slot.killed = True
        await slot.process.kill()
        slot.stopped_at = time.monotonic()

    async def term_slot(self, slot: Slot, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; returns (exit code or None if it had to be killed, seconds to exit)."""
        slot.expect_exit = True
        started = time.monotonic()
        try:
            code: int | None = await slot.process.terminate(timeout=timeout)
        except TimeoutError:
            code = None
            await slot.process.kill()
        slot.stopped_at = time.monotonic()
        return code, time.monotonic() - started

    async def scrape(self, slot: Slot) -> None:
        port = slot.port()
        if port is None or not slot.running() or self.session is None:
            return
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with self.session.get(
                f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                slot.last_metrics[slot.label] = await resp.text()

    async def ready(self, slot: Slot) -> bool:
        port = slot.port()
        if port is None or self.session is None:
            return False
        try:
            async with self.session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    # --- the emulator's admin routes -----------------------------------------------------------------
    async def admin(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.session is not None
        async with self.session.post(f"{self.emulator_url}/_admin/{route}", json=body) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"/_admin/{route} answered {resp.status}: {text}")
            return dict(json.loads(text))

    async def admin_get(self, route: str) -> Any:
        assert self.session is not None
        async with self.session.get(f"{self.emulator_url}/_admin/{route}") as resp:
            return await resp.json()

    # --- teardown --------------------------------------------------------------------------------------
    async def close(self) -> None:
        for slot in self.slots.values():
            with contextlib.suppress(Exception):
                slot.expect_exit = True
                await slot.process.stop()
        for proxy in [s.proxy for s in self.slots.values()] + [self.kafka]:
            with contextlib.suppress(Exception):
                await proxy.stop()
        if self.emulator_runner is not None:
            with contextlib.suppress(Exception):
                await self.emulator_runner.cleanup()
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop, 10)
        if self.session is not None:
            await self.session.close()
