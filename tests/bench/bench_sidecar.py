"""Sidecar ingest throughput: accepted events/s for batched and single-event POSTs, fsync on.

    python -m tests.bench.bench_sidecar [--seconds 5] [--batch 500] [--batch-clients 8] [--single-clients 64]

A sidecar subprocess (hourly windows, so nothing is delivered while measuring; its pipeline still reads the
spool) with the emulator in this process behind it. Each phase posts for `--seconds` from concurrent
clients over loopback and counts the events answered 202 — each one durable (group-committed fsync)
before its answer. The spool's group-commit histogram shows how many records shared an fsync.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from allocd.cloudzero.emulator import EmulatorConfig, bound_port, serve
from allocd.sidecar import INGEST_PORT_SUFFIX
from tests.configs import daemon_toml, stream_tables

__all__ = ["main"]


def sidecar_toml(api_url: str, key_file: Path, spool_dir: Path) -> str:
    """The sidecar's TOML: defaults (hourly windows) but for the API rate limit, a long shutdown and one
    stream; nothing else declared, the daemon's default for undeclared streams."""
    return daemon_toml(
        api_url=api_url,
        key_file=key_file,
        records_per_second=100000,
        shutdown_timeout=30,
        log_level="WARNING",
        sidecar={"spool_dir": spool_dir},
        undeclared=None,
        streams=stream_tables({"billing-usage": (None, ["custom:feature"])}),
    )


def bodies(n: int, size: int, seed: int) -> list[bytes]:
    """`n` pre-encoded bodies of `size` canonical events (a JSON object when size is 1)."""
    rng = random.Random(seed)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = []
    for _ in range(n):
        events = [
            {
                "timestamp": now,
                "stream": "billing-usage",
                "element_name": f"cust-{rng.randrange(1000)}",
                "filter": {"custom:feature": [rng.choice(["billing", "export", "search"])]},
                "value": rng.randint(1, 1000),
            }
            for _ in range(size)
        ]
        out.append(orjson.dumps(events[0] if size == 1 else events))
    return out


async def phase(url: str, clients: int, size: int, seconds: float) -> tuple[int, int, float]:
    """(events accepted, requests answered 202, seconds) for `clients` posting bodies of `size` events."""
    pool = bodies(64, size, seed=size)
    accepted = requests = 0
    end = time.monotonic() + seconds

    async def client(n: int, session: aiohttp.ClientSession) -> None:
        nonlocal accepted, requests
        i = n
        while time.monotonic() < end:
            async with session.post(url, data=pool[i % len(pool)]) as resp:
                body = await resp.read()
                if resp.status != 202:
                    raise SystemExit(f"unexpected answer {resp.status}: {body[:200]!r}")
            accepted += orjson.loads(body)["accepted"]
            requests += 1
            i += clients

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(n, session) for n in range(clients)))
        return accepted, requests, time.monotonic() - started


async def scrape(session: aiohttp.ClientSession, port: int, name: str) -> float:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def read_port(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


async def wait_for_ports(
    port_file: Path, proc: subprocess.Popen[bytes], timeout: float = 30
) -> tuple[int, int]:
    """(metrics port, ingest port) once the sidecar wrote them (the ingest port first)."""
    deadline = time.monotonic() + timeout
    while (port := read_port(port_file)) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the sidecar did not start")
        await asyncio.sleep(0.05)
    ingest = read_port(Path(str(port_file) + INGEST_PORT_SUFFIX))
    assert ingest is not None
    return port, ingest


async def stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> float:
    """SIGTERM and wait without blocking the loop (the emulator in this process must keep answering)."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    while proc.poll() is None:
        if time.monotonic() - started > timeout:
            proc.kill()
            break
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def run(args: argparse.Namespace) -> None:
    emulator = await serve(EmulatorConfig(keys=("bench-key",), rate=1e9, burst=1e12), "127.0.0.1", 0)
    with tempfile.TemporaryDirectory(prefix="allocd-bench-") as tmp:
        work = Path(tmp)
        (work / "key").write_text("bench-key")
        config = sidecar_toml(
            api_url=f"http://127.0.0.1:{bound_port(emulator)}",
            key_file=work / "key",
            spool_dir=work / "spool",
        )
        (work / "sidecar.toml").write_text(config)
        port_file = work / "port"
        command = [
            "-m",
            "allocd.cli",
            "run",
            "--config",
            str(work / "sidecar.toml"),
            "--port-file",
            str(port_file),
        ]
        proc = subprocess.Popen([sys.executable, *command])
        try:
            metrics_port, ingest_port = await wait_for_ports(port_file, proc)
            url = f"http://127.0.0.1:{ingest_port}/v1/events"
            print(f"sidecar pid {proc.pid}, spool on {work / 'spool'} (fsync on), {os.cpu_count()} CPUs")
            results = []
            for label, clients, size in (
                (f"batched ({args.batch} events/POST)", args.batch_clients, args.batch),
                ("single event/POST", args.single_clients, 1),
            ):
                async with aiohttp.ClientSession() as session:
                    syncs_before = await scrape(session, metrics_port, "allocd_spool_group_records_count")
                    accepted, requests, secs = await phase(url, clients, size, args.seconds)
                    syncs = (
                        await scrape(session, metrics_port, "allocd_spool_group_records_count") - syncs_before
                    )
                results.append((label, clients, accepted, requests, secs, syncs))
            print(f"{'mode':32} {'clients':>7} {'events/s':>10} {'requests/s':>10} {'events/fsync':>12}")
            for label, clients, accepted, requests, secs, syncs in results:
                per_sync = accepted / syncs if syncs else float("nan")
                print(
                    f"{label:32} {clients:>7} {accepted / secs:>10,.0f} {requests / secs:>10,.0f}"
                    f" {per_sync:>12,.1f}"
                )
            print(f"SIGTERM → exit {await stop(proc):.1f} s later (the spool's backlog read and delivered)")
        finally:
            if proc.poll() is None:
                await stop(proc)
            await emulator.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per phase (default 5)")
    parser.add_argument("--batch", type=int, default=500, help="events per batched POST (default 500)")
    parser.add_argument("--batch-clients", type=int, default=8, help="concurrent batched clients (default 8)")
    parser.add_argument("--single-clients", type=int, default=64, help="concurrent single-event clients")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
