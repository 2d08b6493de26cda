"""Scenario 2: `allocd run` as a subprocess, from the topic's first offset until every event is committed.

Default settings (HOURLY windows, grace 5 minutes) except what a benchmark needs: the API rate limit raised on
both sides, short consumer-group timeouts (Tansu joins in about half the session timeout). The clock starts
when the daemon reports itself ready (partitions assigned), so start-up and the group join are not counted;
it stops when the group's committed offsets equal the producer-acknowledged end offsets (polled every
`poll` seconds, so the figure errs low by at most that). CPU seconds and peak RSS are the daemon's own.
With `profile`, py-spy samples the daemon over the same phase (a separate run: sampling slows it down).
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from allocd.embedded import create_topics, read_committed
from tests.bench.measure import Result, proc_cpu_seconds, proc_peak_rss
from tests.bench.profile import Profiler
from tests.bench.workload import Truth, hour_text
from tests.integration.harness import (
    DaemonProcess,
    daemon_config,
    emulator_requests,
    emulator_totals,
    metric_value,
)

__all__ = ["BENCH_KEY", "bench_config", "compare_totals", "records_sent", "run_end_to_end"]

BENCH_KEY = "bench-key"


def bench_config(
    bootstrap: str, topic: str, api_url: str, group: str, workdir: Path, name: str, grace_seconds: float
) -> str:
    """The daemon TOML of scenarios 2 and 4: the streams' own (HOURLY) windows, the given grace, the API
    rate limit raised; the key file `<name>.key` is written in `workdir`."""
    key_file = workdir / f"{name}.key"
    key_file.write_text(BENCH_KEY)
    return daemon_config(
        bootstrap=bootstrap,
        topic=topic,
        api_url=api_url,
        key_file=key_file,
        group=group,
        checkpoint_topic=f"{group}-ckpt",
        dlq_topic=f"{group}-dlq",
        window_seconds=0,  # the streams' own granularity: HOURLY
        grace_seconds=grace_seconds,
        records_per_second=1_000_000,
    )


async def records_sent(session: aiohttp.ClientSession, api_url: str) -> int:
    """Records in the requests the emulator accepted."""
    return sum(r["records"] for r in await emulator_requests(session, api_url) if r["status"] == 200)


async def compare_totals(
    session: aiohttp.ClientSession, api_url: str, truth: Truth
) -> tuple[bool, list[Any]]:
    """(emulator totals == truth exactly, the cells that differ as [key, expected, got])."""
    expected = {(s, hour_text(h), e, f): v for (s, h, e, f), v in truth.items()}
    got = await emulator_totals(session, api_url)
    differ = [
        [k, expected.get(k), got.get(k)]
        for k in expected.keys() | got.keys()
        if expected.get(k) != got.get(k)
    ]
    return not differ, differ


async def _keep_evidence(
    path: Path,
    daemon: DaemonProcess,
    metrics: str,
    differ: list[Any],
    session: aiohttp.ClientSession,
    api_url: str,
) -> None:
    """A mismatch: keep the daemon's log and metrics, the cells that differ and the emulator's request log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(daemon.log_path, path.with_suffix(".log"))
    requests = await emulator_requests(session, api_url)
    evidence = {
        "differ": [[repr(k), str(e), str(g)] for k, e, g in differ[:200]],
        "requests": [{k: v for k, v in r.items() if k != "body"} for r in requests],
        "metrics": metrics.splitlines(),
    }
    path.with_suffix(".json").write_bytes(orjson.dumps(evidence, option=orjson.OPT_INDENT_2))


async def _wait_ready(session: aiohttp.ClientSession, daemon: DaemonProcess, timeout: float) -> None:
    url = f"http://127.0.0.1:{await daemon.port()}/readyz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with session.get(url) as resp:
            if resp.status == 200:
                return
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_tail()
        await asyncio.sleep(0.02)
    raise TimeoutError("the daemon was not assigned its partitions\n" + daemon.log_tail())


async def _wait_read(
    session: aiohttp.ClientSession, daemon: DaemonProcess, events: int, poll: float
) -> float:
    """When the daemon's consumed-events counter reached `events` (monotonic time)."""
    while metric_value(await daemon.metrics(session), "allocd_events_consumed_total") < events:  # noqa: ASYNC110
        await asyncio.sleep(poll)
    return time.monotonic()


async def _wait_committed(
    bootstrap: str,
    group: str,
    topic: str,
    ends: dict[int, int],
    daemon: DaemonProcess,
    timeout: float,
    poll: float,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        committed = await read_committed(bootstrap, group, topic, list(ends))
        if all((committed.get(p) or 0) >= end for p, end in ends.items()):
            return
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_tail()
        await asyncio.sleep(poll)
    raise TimeoutError(f"not everything was committed within {timeout} s\n" + daemon.log_tail())


async def run_end_to_end(
    bootstrap: str,
    topic: str,
    ends: dict[int, int],
    truth: Truth,
    api_url: str,
    workdir: Path,
    *,
    timeout: float = 600,
    poll: float = 0.2,
    profile: Path | None = None,
    keep_log: Path | None = None,
) -> Result:
    group = f"bench-{uuid.uuid4().hex[:8]}"
    await create_topics(bootstrap, {f"{group}-ckpt": 1, f"{group}-dlq": 1})
    config = bench_config(
        bootstrap, topic, api_url, group, workdir, "bench", grace_seconds=300
    )  # the default
    daemon = DaemonProcess(config, workdir, "allocd-e2e")
    events = sum(ends.values())
    async with aiohttp.ClientSession() as session:
        sent_before = await records_sent(session, api_url)
        daemon.start()
        try:
            await _wait_ready(session, daemon, timeout=60)
            profiler = Profiler(daemon.pid, profile) if profile else None
            started, cpu0 = time.monotonic(), proc_cpu_seconds(daemon.pid)
            read = asyncio.create_task(_wait_read(session, daemon, events, poll / 2))
            await _wait_committed(bootstrap, group, topic, ends, daemon, timeout, poll)
            seconds, cpu = time.monotonic() - started, proc_cpu_seconds(daemon.pid) - cpu0
            read_seconds = await read - started
            if profiler:
                await asyncio.to_thread(profiler.stop)
            peak = proc_peak_rss(daemon.pid)
            metrics = await daemon.metrics(session)
            match, differ = await compare_totals(session, api_url, truth)
            sent = await records_sent(session, api_url) - sent_before
            code = await daemon.terminate()
            if not match and keep_log is not None:  # the evidence outlives the temporary directory
                await _keep_evidence(keep_log, daemon, metrics, differ, session, api_url)
        finally:
            await daemon.stop()
    return {
        "scenario": "allocd end to end",
        "events": events,
        "seconds": seconds,
        "events_per_s": events / seconds,
        "read_seconds": read_seconds,  # until the daemon had consumed every event (before the last delivery)
        "cpu_seconds": cpu,
        "cpu_us_per_event": cpu / events * 1e6,
        "peak_rss_mb": peak / 2**20,
        "accepted": int(metric_value(metrics, "allocd_events_accepted_total")),
        "consumed": int(metric_value(metrics, "allocd_events_consumed_total")),  # > events: re-fetched
        "totals_match": match,
        "cells_differ": len(differ),
        "differ_sample": [[repr(k), str(e), str(g)] for k, e, g in differ[:5]],
        "records_sent": sent,
        "key_hours": len(truth),
        "records_per_key_hour": sent / len(truth) if truth else None,
        "exit_code": code,
    }
