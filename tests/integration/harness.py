"""Test-side helpers for the daemon's integration tests: a daemon subprocess, a live event generator with
its own ground truth, and read-back from the emulator. Everything talks to 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from allocd.cloudzero.records import canonical_filter
from allocd.embedded import EmbeddedBroker, Message, produce

from ..configs import Table, daemon_toml, stream_tables

if TYPE_CHECKING:
    from .conftest import EmulatorHandle

TruthKey = tuple[str, str, str, tuple[Any, ...]]  # (stream, hour "…Z", element, canonical filter)

STREAMS = {
    "billing-usage": ("custom:feature", "tag:environment"),
    "search-usage": ("custom:feature",),
}


def hour_of(ts_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(ts_ms // 1000))


@dataclass
class Generator:
    """Live canonical events (timestamp = now) and the totals the API must end up with."""

    seed: int = 1
    elements: int = 5
    truth: dict[TruthKey, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    produced: int = 0
    seen: list[tuple[int, str, str, tuple[Any, ...]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def event(self, now_ms: int | None = None) -> bytes:
        now_ms = now_ms or int(time.time() * 1000)
        stream = self.rng.choice(sorted(STREAMS))
        element = f"cust-{self.rng.randrange(self.elements)}"
        flt: dict[str, list[str]] = {"custom:feature": [self.rng.choice(["billing", "export"])]}
        if "tag:environment" in STREAMS[stream]:
            flt["tag:environment"] = ["prod"]
        value: int | str = self.rng.randint(1, 1000)
        if self.rng.random() < 0.2:
            value = f"{self.rng.randint(1, 99)}.{self.rng.randint(0, 99):02d}"
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now_ms / 1000)) + f".{now_ms % 1000:03d}Z"
        ev = {
            "id": uuid.uuid4().hex,
            "timestamp": ts,
            "stream": stream,
            "element_name": element,
            "filter": flt,
        }
        ev["value"] = value
        self.truth[(stream, hour_of(now_ms), element, canonical_filter(flt))] += Decimal(str(value))
        self.seen.append((now_ms, stream, element, canonical_filter(flt)))
        self.produced += 1
        return orjson.dumps(ev)

    def batch(self, n: int) -> list[Message]:
        return [Message(self.event(), key=None) for _ in range(n)]

    def cell_windows(self, window_seconds: int) -> int:
        """Distinct (stream, window, element, filter): the records an ideal run sends."""
        w = window_seconds * 1000
        return len({(s, ts - ts % w, e, f) for ts, s, e, f in self.seen})

    def expected(self) -> dict[TruthKey, Decimal]:
        return {k: v for k, v in self.truth.items() if v}


async def produce_live(bootstrap: str, topic: str, gen: Generator, total: int, seconds: float) -> None:
    """Spread `total` events over about `seconds`, in small batches, so windows open and close live."""
    steps = max(1, int(seconds / 0.25))
    per = max(1, total // steps)
    sent = 0
    while sent < total:
        n = min(per, total - sent)
        await produce(bootstrap, topic, gen.batch(n))
        sent += n
        await asyncio.sleep(0.25)


async def emulator_totals(session: aiohttp.ClientSession, url: str) -> dict[TruthKey, Decimal]:
    async with session.get(f"{url}/_admin/totals") as resp:
        body = await resp.json()
    out: dict[TruthKey, Decimal] = {}
    for stream, info in body["streams"].items():
        for cell in info["cells"]:
            if cell.get("deleted"):
                continue
            key = (
                stream,
                cell["timestamp"],
                cell["element_name"],
                canonical_filter(cell.get("filter") or {}),
            )
            out[key] = out.get(key, Decimal(0)) + Decimal(cell["value"])
    return out


async def emulator_requests(session: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with session.get(f"{url}/_admin/requests") as resp:
        return (await resp.json())["requests"]


async def totals_become(
    session: aiohttp.ClientSession,
    url: str,
    expected: dict[TruthKey, Decimal],
    procs: list[DaemonProcess],
    timeout: float,
) -> None:
    """Wait until the emulator's totals equal `expected` exactly; on failure show the differing cells
    and the processes' log tails."""
    last: dict[TruthKey, Decimal] = {}

    async def check() -> bool:
        nonlocal last
        last = await emulator_totals(session, url)
        return last == expected

    try:
        await wait_for(check, timeout, "emulator totals to equal ground truth")
    except AssertionError:
        diff = {k: (expected.get(k), last.get(k)) for k in set(expected) | set(last)}
        diff = {k: v for k, v in diff.items() if v[0] != v[1]}
        logs = "\n".join(p.log_tail(3000) for p in procs)
        raise AssertionError(f"{len(diff)} cells differ, e.g. {list(diff.items())[:5]}\n{logs}") from None


async def records_applied(session: aiohttp.ClientSession, url: str) -> int:
    """Records in requests the emulator answered 200."""
    reqs = await emulator_requests(session, url)
    return sum(r["records"] for r in reqs if r["status"] == 200)


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.25
) -> None:
    """Poll `check` until true; fail with `what` after `timeout` seconds (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def hourly_stream_tables() -> dict[str, Table]:
    """STREAMS as `[events.streams.*]` tables, all HOURLY (the daemons' and sidecars' declared streams)."""
    return stream_tables({name: ("HOURLY", dims) for name, dims in STREAMS.items()})


def daemon_config(
    *,
    bootstrap: str,
    topic: str,
    api_url: str,
    key_file: Path,
    group: str,
    checkpoint_topic: str,
    dlq_topic: str,
    window_seconds: int = 2,
    grace_seconds: float = 0.5,
    records_per_request: int = 3000,
    records_per_second: float = 10_000,
    flush_on_shutdown: bool = False,
    shutdown_timeout: float = 10,
    session_timeout_ms: int = 2000,
    retry_deadline: float = 20,
    max_pending_snapshots: int | None = None,
    max_open_keys: int | None = None,
    liveness_timeout: float | None = None,
    connect_timeout: float | None = None,
    extra: Mapping[str, Table] | None = None,
) -> str:
    """A daemon's TOML. Optional settings left as None are not written (the daemon's defaults apply);
    `extra` adds whole tables (see tests/configs.py)."""
    return daemon_toml(
        bootstrap=bootstrap,
        topics=[topic],
        group=group,
        checkpoint_topic=checkpoint_topic,
        dlq_topic=dlq_topic,
        kafka={
            "session_timeout_ms": session_timeout_ms,
            "heartbeat_interval_ms": session_timeout_ms // 4,
            "rebalance_timeout_ms": 10000,
            "connect_timeout_seconds": connect_timeout,
        },
        api_url=api_url,
        key_file=key_file,
        records_per_request=records_per_request,
        records_per_second=records_per_second,
        api={"request_timeout": 5, "retry_deadline": retry_deadline},
        window_seconds=window_seconds,
        grace_seconds=grace_seconds,
        shutdown_timeout=shutdown_timeout,
        pipeline={
            "tick_seconds": 0.1,
            "flush_on_shutdown": flush_on_shutdown,
            "max_pending_snapshots": max_pending_snapshots,
            "max_open_keys": max_open_keys,
        },
        log_level="INFO",
        server={"assignment_grace_seconds": 0, "liveness_timeout_seconds": liveness_timeout},
        extra=extra,
        streams=hourly_stream_tables(),
    )


class DaemonProcess:
    """`allocd run` as a child process; stopped by PID (SIGTERM, or SIGKILL for crash tests)."""

    def __init__(self, config: str, workdir: Path, name: str = "allocd") -> None:
        self.workdir = workdir
        self.name = name
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config)
        self.log_path = workdir / f"{name}.log"
        self.port_file = workdir / f"{name}.port"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOCD_")}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "allocd.cli",
                "run",
                "--config",
                str(self.config_path),
                "--port-file",
                str(self.port_file),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def port(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_file.exists():
                return int(self.port_file.read_text())
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            await asyncio.sleep(0.05)
        raise AssertionError("daemon did not start its server\n" + self.log_tail())

    async def metrics(self, session: aiohttp.ClientSession) -> str:
        async with session.get(f"http://127.0.0.1:{await self.port()}/metrics") as resp:
            return await resp.text()

    async def wait(self, timeout: float) -> int:
        """Wait for exit without blocking the event loop (the in-process emulator must keep answering)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} (pid {self.pid}) still running after {timeout} s")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    async def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.wait(10)

    async def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def stop(self) -> None:
        """Cleanup for finally-blocks: SIGTERM, then SIGKILL; never leaves the child running."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await self.wait(15)
            except TimeoutError:
                self.proc.kill()
                await self.wait(10)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except FileNotFoundError:
            return "(no log)"

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_bytes().splitlines():
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                out.append({"raw": line.decode("utf-8", "replace")})
        return out


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


@dataclass
class Stack:
    """One test's world: the session broker, the emulator, a fresh 4-partition topic and consumer group (with
    its checkpoint and DLQ topics), and the daemons the test starts (stopped by the `stack` fixture)."""

    broker: EmbeddedBroker
    emulator: EmulatorHandle
    topic: str
    workdir: Path
    session: aiohttp.ClientSession
    group: str
    daemons: list[DaemonProcess]

    def daemon(
        self, name: str, key: str = "key-a", bootstrap: str | None = None, **options: Any
    ) -> DaemonProcess:
        """A daemon of this test's group (not started); `bootstrap` overrides the broker's address."""
        key_file = self.workdir / f"{name}.key"
        key_file.write_text(key)
        config = daemon_config(
            bootstrap=bootstrap or self.broker.bootstrap,
            topic=self.topic,
            api_url=self.emulator.url,
            key_file=key_file,
            group=self.group,
            checkpoint_topic=f"{self.group}-ckpt",
            dlq_topic=f"{self.group}-dlq",
            **options,
        )
        d = DaemonProcess(config, self.workdir, name)
        self.daemons.append(d)
        return d

    async def ready(self, *daemons: DaemonProcess, partitions: int = 4) -> None:
        """Wait until the group's members hold all partitions between them (readiness = assigned)."""

        async def check() -> bool:
            for d in daemons:
                async with self.session.get(f"http://127.0.0.1:{await d.port()}/readyz") as resp:
                    if resp.status != 200:
                        return False
            return True

        await wait_for(check, 60, "daemons ready with partitions assigned")

    async def totals_equal(self, expected: dict[TruthKey, Decimal], timeout: float = 90) -> None:
        await totals_become(self.session, self.emulator.url, expected, self.daemons, timeout)

    async def records_sent(self) -> int:
        return await records_applied(self.session, self.emulator.url)

    async def set_hook(self, **hook: object) -> None:
        async with self.session.post(f"{self.emulator.url}/_admin/hooks", json={"hooks": [hook]}) as resp:
            assert resp.status == 200, await resp.text()

    async def set_faults(self, **faults: object) -> None:
        """Replace the emulator's injected faults (none given: clear them)."""
        async with self.session.post(f"{self.emulator.url}/_admin/faults", json=faults) as resp:
            assert resp.status == 200, await resp.text()

    async def set_keys(self, *keys: str) -> None:
        async with self.session.post(f"{self.emulator.url}/_admin/keys", json={"keys": list(keys)}) as resp:
            assert resp.status == 200, await resp.text()

    async def probe(self, d: DaemonProcess, path: str) -> int:
        """The HTTP status of /healthz or /readyz."""
        async with self.session.get(f"http://127.0.0.1:{await d.port()}{path}") as resp:
            return resp.status
