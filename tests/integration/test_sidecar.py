"""Sidecar mode end to end: producers POST over loopback to a sidecar subprocess, the emulator behind it.

Ground truth is what the tests themselves sent and saw answered 202; the emulator's totals must equal it
exactly — across concurrent producers, SIGKILL during ingest and during a flush cycle, a corrupted spool
tail, a full spool, invalid events and SIGTERM. Windows are shortened to 2 s (grace 0.5 s) where they
must close live; crash points are deterministic where a test needs them to be (an emulator hook).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from allocd.cloudzero.records import canonical_filter
from allocd.sidecar import DEAD_LETTERS_FILE, INGEST_PORT_SUFFIX, JOURNAL_FILE

from ..configs import daemon_toml
from .conftest import EmulatorHandle
from .harness import (
    STREAMS,
    DaemonProcess,
    TruthKey,
    emulator_requests,
    emulator_totals,
    hourly_stream_tables,
    metric_value,
    records_applied,
    totals_become,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# How the tests start the sidecar. Once `allocd run` dispatches on `[sidecar] enabled`, this can become
# ["-m", "allocd.cli", "run"] (the arguments are the same).
SIDECAR_COMMAND = ["-m", "allocd.cli", "run"]


def sidecar_config(
    *,
    api_url: str,
    key_file: Path,
    spool_dir: Path,
    window_seconds: int = 2,
    grace_seconds: float = 0.5,
    records_per_request: int = 3000,
    max_spool_bytes: int = 64 * 1024 * 1024,
    shutdown_timeout: float = 10,
) -> str:
    return daemon_toml(
        api_url=api_url,
        key_file=key_file,
        records_per_request=records_per_request,
        records_per_second=100000,
        api={"request_timeout": 5, "retry_deadline": 20},
        window_seconds=window_seconds,
        grace_seconds=grace_seconds,
        shutdown_timeout=shutdown_timeout,
        pipeline={"tick_seconds": 0.1},
        server={"assignment_grace_seconds": 0},
        sidecar={"spool_dir": spool_dir, "max_spool_bytes": max_spool_bytes},
        streams=hourly_stream_tables(),
    )


class SidecarProcess(DaemonProcess):
    """The sidecar as a child process (see SIDECAR_COMMAND); the ingest port is in `<port file>.ingest`."""

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOCD_")}
        command = [*SIDECAR_COMMAND, "--config", str(self.config_path), "--port-file", str(self.port_file)]
        self.proc = subprocess.Popen(
            [sys.executable, *command], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        log.close()

    async def ingest_url(self) -> str:
        await self.port()  # written after the ingest port
        port = int(self.ingest_port_file.read_text())
        return f"http://127.0.0.1:{port}/v1/events"

    @property
    def ingest_port_file(self) -> Path:
        return Path(str(self.port_file) + INGEST_PORT_SUFFIX)


# --- events and ground truth ---------------------------------------------------------------------------
def make_event(rng: random.Random, element: str, stream: str | None = None) -> dict[str, Any]:
    now_ms = int(time.time() * 1000)
    stream = stream or rng.choice(sorted(STREAMS))
    flt: dict[str, list[str]] = {"custom:feature": [rng.choice(["billing", "export"])]}
    if "tag:environment" in STREAMS[stream]:
        flt["tag:environment"] = ["prod"]
    value: int | str = rng.randint(1, 1000)
    if rng.random() < 0.2:
        value = f"{rng.randint(1, 99)}.{rng.randint(0, 99):02d}"
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now_ms / 1000)) + f".{now_ms % 1000:03d}Z"
    return {"timestamp": ts, "stream": stream, "element_name": element, "filter": flt, "value": value}


def cell_of(ev: dict[str, Any]) -> TruthKey:
    ts = ev["timestamp"]
    return (ev["stream"], ts[:13] + ":00:00Z", ev["element_name"], canonical_filter(ev["filter"]))


def encode(events: list[dict[str, Any]], rng: random.Random) -> bytes:
    """One object, a JSON array or NDJSON, at random: every shape the ingest accepts."""
    if len(events) == 1 and rng.random() < 0.5:
        return orjson.dumps(events[0])
    if rng.random() < 0.5:
        return orjson.dumps(events)
    return b"\n".join(orjson.dumps(e) for e in events) + b"\n"


@dataclass
class Truth:
    cells: dict[TruthKey, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    events: int = 0

    def add(self, events: Iterable[dict[str, Any]]) -> None:
        for ev in events:
            self.cells[cell_of(ev)] += Decimal(str(ev["value"]))
            self.events += 1

    def expected(self) -> dict[TruthKey, Decimal]:
        return {k: v for k, v in self.cells.items() if v}


@dataclass
class Env:
    emulator: EmulatorHandle
    workdir: Path
    session: aiohttp.ClientSession
    procs: list[SidecarProcess] = field(default_factory=list)

    @property
    def spool_dir(self) -> Path:
        return self.workdir / "spool"

    def sidecar(self, name: str, **options: Any) -> SidecarProcess:
        key_file = self.workdir / "api.key"
        key_file.write_text("key-a")
        config = sidecar_config(
            api_url=self.emulator.url, key_file=key_file, spool_dir=self.spool_dir, **options
        )
        proc = SidecarProcess(config, self.workdir, name)
        self.procs.append(proc)
        proc.start()
        return proc

    async def post(self, url: str, body: bytes) -> tuple[int, Any, Any]:
        async with self.session.post(url, data=body) as resp:
            return resp.status, await resp.json(), resp.headers

    async def totals(self) -> dict[TruthKey, Decimal]:
        return await emulator_totals(self.session, self.emulator.url)

    async def totals_equal(self, expected: dict[TruthKey, Decimal], timeout: float = 60) -> None:
        await totals_become(self.session, self.emulator.url, expected, list(self.procs), timeout)

    async def records_applied(self) -> int:
        return await records_applied(self.session, self.emulator.url)


@pytest.fixture
async def env(emulator: EmulatorHandle, tmp_path: Path):
    async with aiohttp.ClientSession() as session:
        e = Env(emulator, tmp_path, session)
        try:
            yield e
        finally:
            for proc in e.procs:
                await proc.stop()


async def stop_cleanly(proc: SidecarProcess, within: float = 10) -> None:
    """SIGTERM, then exit 0 within the shutdown timeout."""
    started = time.monotonic()
    code = await proc.terminate(timeout=within + 5)
    assert code == 0, proc.log_tail()
    assert time.monotonic() - started < within, "did not exit within shutdown_timeout_seconds"


# --- tests ---------------------------------------------------------------------------------------------
async def test_concurrent_producers_are_counted_exactly(env: Env) -> None:
    """16 producers post one-event, array and NDJSON bodies concurrently while windows close live."""
    sidecar = env.sidecar("a")
    url = await sidecar.ingest_url()
    truth = Truth()

    async def producer(n: int) -> None:
        rng = random.Random(n)
        for _ in range(20):
            events = [make_event(rng, f"cust-{rng.randrange(8)}") for _ in range(rng.randint(1, 40))]
            status, answer, _ = await env.post(url, encode(events, rng))
            assert (status, answer) == (202, {"accepted": len(events), "rejected": []})
            truth.add(events)
            await asyncio.sleep(rng.random() * 0.2)  # spread over a few windows

    await asyncio.gather(*(producer(n) for n in range(16)))
    await env.totals_equal(truth.expected())  # the last windows close with no further events
    text = await sidecar.metrics(env.session)
    assert metric_value(text, "allocd_events_accepted_total") == truth.events
    assert metric_value(text, "allocd_ingest_events_total", outcome="accepted") == truth.events
    assert metric_value(text, "allocd_flush_cycles_total", trigger="closed", outcome="completed") >= 2
    assert metric_value(text, "allocd_spool_group_records_count") > 0
    await stop_cleanly(sidecar)


async def test_sigterm_delivers_open_windows_and_exits_zero(env: Env) -> None:
    """Hourly windows stay open; SIGTERM stops ingest (503), delivers them all, and exits 0 in time."""
    sidecar = env.sidecar("a", window_seconds=0, grace_seconds=300)
    url = await sidecar.ingest_url()
    rng = random.Random(7)
    truth = Truth()
    for _ in range(30):
        events = [make_event(rng, f"cust-{rng.randrange(5)}") for _ in range(20)]
        assert (await env.post(url, encode(events, rng)))[0] == 202
        truth.add(events)
    assert await emulator_requests(env.session, env.emulator.url) == []  # nothing closed, nothing sent
    await stop_cleanly(sidecar)
    assert await env.totals() == truth.expected()


async def test_sigkill_during_ingest_then_restart_counts_every_accepted_event_once(env: Env) -> None:
    """Producers post concurrently; SIGKILL lands mid-requests. Every request has its own element, so the
    emulator's total per element shows what happened to it: a 202 request is counted exactly once; one
    that got no answer was either not stored, or stored (a torn tail keeps a prefix of its events)."""
    opts: dict[str, Any] = {"window_seconds": 2, "grace_seconds": 0.5}
    sidecar = env.sidecar("a", **opts)
    url = await sidecar.ingest_url()
    accepted: dict[str, Decimal] = {}
    in_doubt: dict[str, list[Decimal]] = {}
    killed = asyncio.Event()

    async def producer(n: int, url: str, requests: int | None) -> None:
        rng = random.Random(n)
        sent = 0
        while requests is None or sent < requests:
            element = f"p{n}-r{sent}"
            events = [make_event(rng, element, "search-usage") for _ in range(rng.randint(1, 30))]
            values = [Decimal(str(e["value"])) for e in events]
            sent += 1
            try:
                status, _, _ = await env.post(url, encode(events, rng))
            except (TimeoutError, aiohttp.ClientError):
                assert killed.is_set()
                in_doubt[element] = [sum(values[:i], Decimal(0)) for i in range(len(values) + 1)]
                return
            assert status == 202
            accepted[element] = sum(values, Decimal(0))

    async def enough() -> bool:
        return len(accepted) >= 200

    producers = [asyncio.create_task(producer(n, url, None)) for n in range(16)]
    await wait_for(enough, 60, "200 requests accepted", interval=0.01)
    killed.set()
    await sidecar.kill()
    await asyncio.gather(*producers)
    assert sidecar.proc is not None and sidecar.proc.returncode == -9

    restarted = env.sidecar("b", **opts)
    url = await restarted.ingest_url()
    await asyncio.gather(*(producer(100 + n, url, 5) for n in range(8)))  # and ingest goes on after
    await stop_cleanly(restarted)

    per_element: dict[str, Decimal] = defaultdict(Decimal)
    for (_stream, _hour, element, _flt), value in (await env.totals()).items():
        per_element[element] += value
    assert {e: per_element.get(e) for e in accepted} == accepted
    for element, prefixes in in_doubt.items():
        assert per_element.get(element, Decimal(0)) in prefixes, element
    assert set(per_element) <= set(accepted) | set(in_doubt)


async def test_sigkill_during_a_flush_cycle_then_restart_is_exact(env: Env) -> None:
    """The emulator kills the sidecar at the 4th request of a cycle, before applying it: requests 1–3 were
    acknowledged and journaled. The restart replays the spool from the checkpoint, skips their cells and
    delivers the rest: every cell exactly once."""
    opts: dict[str, Any] = {"window_seconds": 2, "grace_seconds": 0.5, "records_per_request": 5}
    sidecar = env.sidecar("a", **opts)
    url = await sidecar.ingest_url()
    rng = random.Random(11)
    truth = Truth()
    events = [make_event(rng, f"cust-{i}", "search-usage") for i in range(40) for _ in range(3)]
    hook = {"after_request": 4, "action": "signal", "signal": "SIGKILL", "pid": sidecar.pid, "apply": False}
    async with env.session.post(f"{env.emulator.url}/_admin/hooks", json={"hooks": [hook]}) as resp:
        assert resp.status == 200, await resp.text()
    assert (await env.post(url, orjson.dumps(events)))[0] == 202
    truth.add(events)
    assert await sidecar.wait(60) == -9  # killed by the hook once the window closed and the cycle ran
    assert await env.records_applied() == 15  # three requests of five records

    restarted = env.sidecar("b", **opts)
    await env.totals_equal(truth.expected())
    cells = len(truth.expected())
    assert await env.records_applied() == cells  # the 15 acknowledged cells were not sent again
    text = await restarted.metrics(env.session)
    assert metric_value(text, "allocd_events_skipped_total") > 0
    assert metric_value(text, "allocd_api_in_doubt_requests_total") >= 1  # request 4: sent, no answer
    await stop_cleanly(restarted)
    assert await env.totals() == truth.expected()


async def test_corrupt_spool_tail_is_truncated_reported_and_the_rest_is_exact(env: Env) -> None:
    sidecar = env.sidecar("a", window_seconds=0, grace_seconds=300)
    url = await sidecar.ingest_url()
    rng = random.Random(5)
    truth = Truth()
    for _ in range(20):
        events = [make_event(rng, f"cust-{rng.randrange(5)}") for _ in range(10)]
        assert (await env.post(url, encode(events, rng)))[0] == 202
        truth.add(events)
    await sidecar.kill()  # nothing delivered yet: the spool is the only copy
    last = sorted(env.spool_dir.glob("*.wal"))[-1]
    with open(last, "ab") as fh:
        fh.write((40).to_bytes(4, "little") + os.urandom(30))  # a torn frame: header, half a body

    restarted = env.sidecar("b", window_seconds=0, grace_seconds=300)
    text = await restarted.metrics(env.session)
    assert metric_value(text, "allocd_spool_corrupt_tails_total") == 1
    assert metric_value(text, "allocd_spool_truncated_bytes_total") == 34
    assert any("corrupt tail" in line.get("message", "") for line in restarted.log_lines())
    await stop_cleanly(restarted)
    assert await env.totals() == truth.expected()


async def test_full_spool_answers_503_then_recovers_as_windows_are_delivered(env: Env) -> None:
    sidecar = env.sidecar("a", max_spool_bytes=16 * 1024)
    url = await sidecar.ingest_url()
    rng = random.Random(3)
    truth = Truth()
    refused = 0
    for n in range(60):
        events = [make_event(rng, f"cust-{rng.randrange(5)}") for _ in range(8)]
        body = encode(events, rng)
        deadline = time.monotonic() + 30
        while True:
            status, answer, headers = await env.post(url, body)
            if status == 202:
                break
            assert (status, answer["message"]) == (503, "spool full"), (n, status, answer)
            refused += 1
            assert time.monotonic() < deadline, "the spool never freed up"
            await asyncio.sleep(min(float(headers["Retry-After"]), 0.2))  # back off as told (capped)
        truth.add(events)
    assert refused > 0
    text = await sidecar.metrics(env.session)
    assert metric_value(text, "allocd_ingest_requests_total", status="503") == refused
    assert metric_value(text, "allocd_spool_bytes") <= 16 * 1024
    await stop_cleanly(sidecar)
    assert await env.totals() == truth.expected()


async def test_invalid_events_are_reported_by_index_and_dead_lettered(env: Env) -> None:
    sidecar = env.sidecar("a")
    url = await sidecar.ingest_url()
    rng = random.Random(9)
    good = make_event(rng, "ok", "search-usage")
    tenth = orjson.dumps({**good, "element_name": "tenths", "value": 0})[:-2] + b"0.1}"  # literal 0.1
    lines = [
        orjson.dumps(good),
        orjson.dumps({**good, "value": -3}),  # 1: invalid_value
        b"{not json",  # 2: not_json
        orjson.dumps({**good, "stream": "unknown-stream"}),  # 3: undeclared_stream
        orjson.dumps({k: v for k, v in good.items() if k != "element_name"}),  # 4: missing_element
        orjson.dumps({**good, "filter": {"custom:feature": ["x"], "tag:environment": ["y"]}}),  # 5
        *[tenth] * 10,
    ]
    status, answer, _ = await env.post(url, b"\n".join(lines))
    assert status == 202
    assert answer["accepted"] == 11
    assert [(r["index"], r["reason"]) for r in answer["rejected"]] == [
        (1, "invalid_value"),
        (2, "not_json"),
        (3, "undeclared_stream"),
        (4, "missing_element"),
        (5, "dimension_mismatch"),
    ]
    assert (await env.post(url, b"not json at all"))[0] == 400
    letters = [orjson.loads(x) for x in (env.spool_dir / DEAD_LETTERS_FILE).read_bytes().splitlines()]
    assert [(d["reason"], d["raw"].encode()) for d in letters] == [
        (r["reason"], lines[r["index"]]) for r in answer["rejected"]
    ]
    assert all(d["detail"] is not None and d["time"].endswith("Z") for d in letters)
    expected = {cell_of(good): Decimal(str(good["value"]))}
    expected[cell_of({**good, "element_name": "tenths"})] = Decimal("1.0")  # ten exact tenths
    await env.totals_equal(expected)
    text = await sidecar.metrics(env.session)
    assert metric_value(text, "allocd_dlq_writes_total", kind="event") == 5
    assert metric_value(text, "allocd_events_rejected_total", reason="not_json") == 1
    await stop_cleanly(sidecar)
    assert (env.spool_dir / JOURNAL_FILE).exists()


async def test_spool_near_full_forces_delivery_of_open_windows(env: Env) -> None:
    """Hourly windows never close during the test, yet producers write several spools' worth: a nearly
    full spool forces a cycle, committed segments are deleted, and nothing is refused for long."""
    sidecar = env.sidecar("a", window_seconds=0, grace_seconds=300, max_spool_bytes=64 * 1024)
    url = await sidecar.ingest_url()
    rng = random.Random(11)
    truth = Truth()
    for _ in range(80):
        events = [make_event(rng, f"cust-{rng.randrange(5)}") for _ in range(10)]
        body = encode(events, rng)
        deadline = time.monotonic() + 30
        while True:
            status, _, headers = await env.post(url, body)
            if status == 202:
                break
            assert status == 503, status
            assert time.monotonic() < deadline, "the spool never freed up"
            await asyncio.sleep(min(float(headers["Retry-After"]), 0.2))
        truth.add(events)
    sent = sum(len(encode([e], rng)) for e in [make_event(rng, "x")]) * truth.events
    assert sent > 2 * 64 * 1024  # more than the spool could ever hold at once
    text = await sidecar.metrics(env.session)
    assert metric_value(text, "allocd_flush_cycles_total", trigger="source_cap", outcome="completed") >= 1
    await stop_cleanly(sidecar)
    assert await env.totals() == truth.expected()
