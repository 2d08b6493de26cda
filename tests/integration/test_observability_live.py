"""Observability of a live daemon: one scripted scenario against a real broker, the emulator and `allocd run`.

Valid events and poison, a burst of 503s longer than the liveness timeout, a key rotation and a second member
joining. Afterwards every declared metric is in the scrape and the ones the scenario exercised have moved;
/healthz answered 200 throughout (probed every 0.2 s); the logs are JSON lines that carry partition and offset
context and never the API key. (`promtool check metrics` on a live scrape lives in tests/deploy.)
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import orjson
import pytest

from allocd import __version__
from allocd.embedded import Message, produce
from allocd.observability import FLUSH_OUTCOMES, FLUSH_TRIGGERS, METRIC_NAMES

from .conftest import EMULATOR_KEYS
from .harness import DaemonProcess, Generator, Stack, metric_value, produce_live, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LIVENESS_TIMEOUT = 5.0
OUTAGE_SECONDS = LIVENESS_TIMEOUT + 2  # longer than the liveness timeout, so a silent loop would show
OPTS = dict(
    window_seconds=2,
    grace_seconds=0.5,
    records_per_request=25,  # several requests per cycle ...
    records_per_second=500,  # ... paced, so the rate limiter waits
    retry_deadline=2,
    liveness_timeout=LIVENESS_TIMEOUT,
)
POISON: list[tuple[bytes, str]] = [
    (b"\x00\xff not json", "not_json"),
    (b'{"element_name": "x", "value": 1', "not_json"),
    (b"[1, 2]", "not_object"),
    (
        b'{"stream": "billing-usage", "value": 5, '
        b'"filter": {"custom:feature": ["a"], "tag:environment": ["p"]}}',
        "missing_element",
    ),
    (b'{"stream": "nope", "element_name": "x", "value": 1}', "undeclared_stream"),
    (
        b'{"stream": "search-usage", "element_name": "x", "value": 0, "filter": {"custom:feature": ["a"]}}',
        "invalid_value",
    ),
]
LOG_KEYS = ("time", "level", "logger", "message")


@dataclass
class HealthWatch:
    """Probes every daemon's /healthz every 0.2 s; each answer is kept with the scenario's current phase."""

    stack: Stack
    daemons: list[DaemonProcess]
    phase: str = "start"
    probes: list[tuple[str, str, int]] = field(default_factory=list)  # (phase, daemon, status)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while not self.stop.is_set():
            for d in list(self.daemons):
                self.probes.append((self.phase, d.name, await self.stack.probe(d, "/healthz")))
            try:
                await asyncio.wait_for(self.stop.wait(), timeout=0.2)
            except TimeoutError:
                pass

    def count(self, phase: str) -> int:
        return sum(1 for p, _, _ in self.probes if p == phase)


def samples(text: str, name: str, **labels: str) -> list[float]:
    """The values of every sample of `name` whose labels include `labels` (empty: the series is absent)."""
    out = []
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            out.append(float(value))
    return out


async def hold(seconds: float) -> None:
    """Keep a fault in place for a while: the duration of an outage is about time itself."""
    await asyncio.sleep(seconds)


async def test_scripted_scenario_moves_every_metric_keeps_liveness_and_logs_clean_json(stack: Stack) -> None:
    a = stack.daemon("a", key="key-a", **OPTS)
    a.start()
    await stack.ready(a)
    started = time.time()
    watch = HealthWatch(stack, [a])
    watching = asyncio.create_task(watch.run())
    gen = Generator(seed=31, elements=30)
    bootstrap = stack.broker.bootstrap

    async def metrics(d: DaemonProcess) -> str:
        return await d.metrics(stack.session)

    try:
        # 1. Valid events with poison among them.
        mixed = [Message(gen.event()) for _ in range(400)]
        for i, (payload, _) in enumerate(POISON):
            mixed.insert(i * 60, Message(payload))
        await produce(bootstrap, stack.topic, mixed)
        await stack.totals_equal(gen.expected(), timeout=30)

        # 2. The API answers 503 to everything for longer than the liveness timeout, then recovers.
        watch.phase = "outage"
        await stack.set_faults(error_503=1.0)
        await produce(bootstrap, stack.topic, gen.batch(300))

        async def failing() -> bool:
            return metric_value(await metrics(a), "allocd_api_requests_total", status="503") > 0

        await wait_for(failing, 15, "503 answers")
        await hold(OUTAGE_SECONDS)
        await stack.set_faults()
        await stack.totals_equal(gen.expected(), timeout=40)

        # 3. The key is rotated: the old one is revoked, then the new one appears in the key file.
        watch.phase = "rotation"
        await stack.set_keys("key-b", "key-c")
        await produce(bootstrap, stack.topic, gen.batch(200))

        async def key_rejected() -> bool:
            async with stack.session.get(f"http://127.0.0.1:{await a.port()}/readyz") as resp:
                return resp.status == 503 and "403" in await resp.text()

        await wait_for(key_rejected, 20, "readiness to report the rejected key")
        (stack.workdir / "a.key").write_text("key-b")
        await stack.totals_equal(gen.expected(), timeout=30)

        # Alone, `a` owns every partition: committed offset and lag for each (the lag loop runs every 15 s).
        async def lag_known() -> bool:
            text = await metrics(a)
            return all(
                samples(text, "allocd_consumer_lag", partition=str(p))
                and samples(text, "allocd_committed_offset", partition=str(p))
                for p in range(4)
            )

        await wait_for(lag_known, 30, "committed offset and lag of every partition", interval=0.5)
        before_join = await metrics(a)

        # 4. A second member joins while events arrive: the group rebalances.
        watch.phase = "rebalance"
        b = stack.daemon("b", key="key-c", **OPTS)
        b.start()
        watch.daemons.append(b)
        await produce_live(bootstrap, stack.topic, gen, total=600, seconds=3)
        await stack.ready(a, b)
        watch.phase = "shared"
        await produce(bootstrap, stack.topic, gen.batch(200))
        await stack.totals_equal(gen.expected(), timeout=60)

        async def all_committed() -> bool:
            texts = [await metrics(d) for d in (a, b)]
            return all(
                any(samples(t, "allocd_committed_offset", partition=str(p)) for t in texts) for p in range(4)
            )

        await wait_for(all_committed, 20, "both members to commit the partitions they own")
    finally:
        watch.stop.set()
        await watching

    text_a, text_b = await metrics(a), await metrics(b)

    # /healthz stayed 200 throughout, including the outage, the rotation and the rebalance.
    assert {status for _, _, status in watch.probes} == {200}, Counter(watch.probes)
    for phase in ("outage", "rotation", "rebalance"):
        assert watch.count(phase) >= 10, (phase, watch.count(phase))

    # Every declared metric is exposed.
    declared = set(re.findall(r"^# TYPE (\S+) ", text_a, re.MULTILINE))
    assert set(METRIC_NAMES) <= declared, sorted(set(METRIC_NAMES) - declared)

    # Events: consumed, accepted, rejected by reason, dead-lettered.
    both = (text_a, text_b)
    assert sum(metric_value(t, "allocd_events_consumed_total", source="kafka") for t in both) >= len(
        mixed
    ) + (gen.produced - 400)
    assert sum(metric_value(t, "allocd_events_accepted_total") for t in both) >= gen.produced
    assert metric_value(text_b, "allocd_events_consumed_total", source="kafka") > 0
    for reason, n in Counter(r for _, r in POISON).items():
        assert metric_value(text_a, "allocd_events_rejected_total", reason=reason) == n, reason
    assert metric_value(text_a, "allocd_dlq_writes_total", kind="event") == len(POISON)
    assert metric_value(text_a, "allocd_dlq_write_errors_total") == 0

    # Flush cycles by trigger and outcome (every pair pre-created), with their histograms.
    assert metric_value(text_a, "allocd_flush_cycles_total", trigger="closed", outcome="completed") > 0
    assert len(samples(text_a, "allocd_flush_cycles_total")) == len(FLUSH_TRIGGERS) * len(FLUSH_OUTCOMES)
    assert metric_value(text_a, "allocd_flush_cycle_seconds_count") > 0
    assert metric_value(text_a, "allocd_flush_cycle_records_sum") > 0

    # The API: answers by status (200, 503, 403), retries, pacing, records accepted today.
    assert metric_value(text_a, "allocd_api_requests_total", op="sum", status="200") > 0
    assert metric_value(text_a, "allocd_api_requests_total", op="sum", status="503") > 0
    assert metric_value(text_a, "allocd_api_requests_total", op="sum", status="403") > 0
    assert metric_value(text_a, "allocd_api_auth_failures_total") >= 1
    assert metric_value(text_a, "allocd_api_retries_total", op="sum", reason="503") > 0
    assert metric_value(text_a, "allocd_api_request_seconds_count", op="sum") > 0
    assert metric_value(text_a, "allocd_rate_limiter_wait_seconds_total") > 0
    assert metric_value(text_a, "allocd_api_in_doubt_requests_total") == 0
    sent_today = sum(metric_value(t, "allocd_api_records_sent_today") for t in both)
    if int(started // 86_400) == int(time.time() // 86_400):  # the count restarts at 00:00 UTC
        assert sent_today == await stack.records_sent()
    assert sent_today > 0
    assert metric_value(text_a, "allocd_api_records_projected_daily") > 0

    # Offsets: committed and lag per partition (seen while `a` owned all four), then split by the join.
    for p in range(4):
        (committed,) = samples(before_join, "allocd_committed_offset", topic=stack.topic, partition=str(p))
        (lag,) = samples(before_join, "allocd_consumer_lag", topic=stack.topic, partition=str(p))
        assert committed > 0 and lag >= 0
    owned = [{p for p in range(4) if samples(t, "allocd_committed_offset", partition=str(p))} for t in both]
    assert owned[0] and owned[1] and owned[0] | owned[1] == set(range(4)), owned

    # Timestamps of the last flush and commit; build info; ready; not paused.
    for name in ("allocd_last_flush_success_timestamp_seconds", "allocd_last_commit_timestamp_seconds"):
        assert started <= metric_value(text_a, name) <= time.time(), name
    assert metric_value(text_a, "allocd_build_info", version=__version__) == 1
    assert metric_value(text_a, "allocd_ready") == 1
    assert metric_value(text_a, "allocd_consumer_paused") == 0

    # Logs: JSON lines with the fixed keys, partition/offset context, and never an API key.
    logs = {}
    for d in (a, b):
        assert await d.terminate() == 0
        raw = d.log_path.read_bytes()
        for secret in EMULATOR_KEYS:
            assert secret.encode() not in raw, f"{secret} in {d.name}'s log"
        logs[d.name] = [orjson.loads(line) for line in raw.splitlines()]  # raises on a line that is not JSON
        assert logs[d.name], d.name
        for entry in logs[d.name]:
            assert all(k in entry for k in LOG_KEYS), entry
        assert any("partition" in e and "offset" in e for e in logs[d.name]), d.name
    assert any(e["level"] == "ERROR" and "403" in e["message"] for e in logs["a"])
