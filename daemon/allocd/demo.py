"""`allocd demo` (what `make run` runs): the daemon's main job end to end on an embedded stack.

It starts a Tansu broker on a free loopback port and the CloudZero emulator, runs `allocd run` as a child
process against them, produces live usage events for a while, waits until the emulator's totals equal what
was produced, prints both, and stops everything by PID. Windows are shortened (`--window-seconds`) so the
run takes a minute instead of an hour; the logic is the same because `sum` is additive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from allocd.cloudzero.emulator import EmulatorConfig, bound_port, serve
from allocd.embedded import EmbeddedBroker, create_topics, produce

__all__ = ["add_arguments", "demo_config", "run_command"]

CUSTOMERS = ("hooli", "pied-piper", "initech", "globex", "umbrella", "soylent")
FEATURES = ("billing", "search", "export")
KEY = "demo-key"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to produce events")
    parser.add_argument("--rate", type=int, default=200, help="events per second produced")
    parser.add_argument("--window-seconds", type=int, default=5, help="window size (shortened for the demo)")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="give up waiting for delivery after this"
    )


def demo_config(bootstrap: str, api_url: str, topic: str, key_file: str, window_seconds: int) -> str:
    """A complete TOML config for the embedded stack (also a readable example of the format)."""
    return f"""
[kafka]
bootstrap_servers = "{bootstrap}"
topics = ["{topic}"]
group_id = "allocd-demo"
session_timeout_ms = 6000
heartbeat_interval_ms = 1000

[api]
base_url = "{api_url}"
api_key_file = "{key_file}"
records_per_second = 1000

[pipeline]
grace_seconds = 1
window_seconds = {window_seconds}
tick_seconds = 0.2
shutdown_timeout_seconds = 10

[server]
host = "127.0.0.1"
port = 0

[events]
default_stream = "billing-usage"

[events.streams.billing-usage]
granularity = "HOURLY"
dimensions = ["custom:feature", "tag:environment"]
"""


def _event(rng: random.Random) -> tuple[dict[str, Any], tuple[str, str, str]]:
    customer, feature = rng.choice(CUSTOMERS), rng.choice(FEATURES)
    value = rng.randint(1, 500)
    now = time.time()
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    event = {
        "timestamp": ts,
        "element_name": customer,
        "filter": {"custom:feature": [feature], "tag:environment": ["prod"]},
        "value": value,
    }
    return event, (time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(now)), customer, feature)


async def _totals(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, str, str], Decimal]:
    async with session.get(f"{url}/_admin/totals", params={"stream": "billing-usage"}) as resp:
        body = await resp.json()
    out: dict[tuple[str, str, str], Decimal] = {}
    for cell in body.get("streams", {}).get("billing-usage", {}).get("cells", []):
        if not cell.get("deleted"):
            key = (cell["timestamp"], cell["element_name"], cell["filter"]["custom:feature"][0])
            out[key] = Decimal(cell["value"])
    return out


async def run_command(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="allocd-demo-"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"allocd demo: working directory {workdir}")
    with EmbeddedBroker() as broker:
        print(f"  broker    Tansu on {broker.bootstrap} (pid {broker.pid})")
        emulator = await serve(
            EmulatorConfig(keys=(KEY,), admin=True, rate=1000, burst=100_000), "127.0.0.1", 0
        )
        api_url = f"http://127.0.0.1:{bound_port(emulator)}"
        print(f"  emulator  {api_url}")
        topic = "usage-events"
        await create_topics(broker.bootstrap, {topic: 4})
        key_file = workdir / "api-key"
        key_file.write_text(KEY)
        config = workdir / "allocd.toml"
        port_file = workdir / "allocd.port"
        config.write_text(demo_config(broker.bootstrap, api_url, topic, str(key_file), args.window_seconds))
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "allocd.cli",
                "run",
                "--config",
                str(config),
                "--port-file",
                str(port_file),
            ],
            stdout=open(workdir / "allocd.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        print(f"  daemon    allocd run (pid {daemon.pid}), log {workdir / 'allocd.log'}")
        try:
            return await _drive(args, broker.bootstrap, topic, api_url, stop, daemon, port_file)
        finally:
            _stop(daemon)
            await emulator.cleanup()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _drive(
    args: argparse.Namespace,
    bootstrap: str,
    topic: str,
    api_url: str,
    stop: asyncio.Event,
    daemon: subprocess.Popen[bytes],
    port_file: Path,
) -> int:
    rng = random.Random(7)
    truth: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    produced = 0
    end = time.monotonic() + args.seconds
    print(f"producing ~{args.rate} events/s for {args.seconds:.0f} s ...")
    while time.monotonic() < end and not stop.is_set():
        batch = []
        for _ in range(max(1, args.rate // 5)):
            event, key = _event(rng)
            truth[key] += event["value"]
            batch.append((None, event["element_name"].encode(), orjson.dumps(event)))
        await produce(bootstrap, topic, batch)
        produced += len(batch)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.2)
    print(f"produced {produced} events; waiting for delivery (windows close {args.window_seconds} s + grace)")
    deadline = time.monotonic() + args.timeout
    async with aiohttp.ClientSession() as session:
        got: dict[tuple[str, str, str], Decimal] = {}
        while time.monotonic() < deadline and not stop.is_set():
            if daemon.poll() is not None:
                print(f"allocd exited early with {daemon.returncode}; see its log")
                return 1
            got = await _totals(session, api_url)
            if got == truth:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
        _print_table(truth, got)
        await _print_daemon_summary(session, port_file)
    ok = got == truth
    print("RESULT: totals match exactly" if ok else "RESULT: totals differ (or the demo was interrupted)")
    return 0 if ok or stop.is_set() else 1


async def _print_daemon_summary(session: aiohttp.ClientSession, port_file: Path) -> None:
    """What the daemon says it did, from its own /metrics."""
    if not port_file.exists():
        return
    url = f"http://127.0.0.1:{port_file.read_text().strip()}/metrics"
    async with session.get(url) as resp:
        text = await resp.text()
    wanted = {
        "allocd_events_consumed_total": "events consumed",
        "allocd_events_accepted_total": "events accepted",
        "allocd_events_rejected_total": "events dead-lettered",
        "allocd_flush_cycles_total": "flush cycles",
        "allocd_api_records_total": "records sent to the API",
    }
    totals = dict.fromkeys(wanted, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals and not line.startswith("#"):
            totals[name] += float(line.rsplit(" ", 1)[1])
    print("allocd says: " + ", ".join(f"{label} {int(totals[name])}" for name, label in wanted.items()))


def _print_table(
    truth: dict[tuple[str, str, str], Decimal], got: dict[tuple[str, str, str], Decimal]
) -> None:
    print(f"{'hour':22} {'customer':12} {'feature':8} {'produced':>10} {'in CloudZero':>13}")
    for key in sorted(set(truth) | set(got)):
        hour, customer, feature = key
        print(f"{hour:22} {customer:12} {feature:8} {truth.get(key, 0):>10} {got.get(key, 0):>13}")
