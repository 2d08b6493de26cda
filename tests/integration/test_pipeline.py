"""The correctness contract (DESIGN.md §2) against a real broker, the emulator and `allocd run` processes.

Every test compares the emulator's totals with ground truth its own generator computed: exact equality.
Windows are shortened to seconds and events are live, so open windows, closing, forced cycles and late
deltas really happen; crash points are deterministic (emulator hooks), not random kills.
"""

from __future__ import annotations

import asyncio
import signal
import time
from decimal import Decimal

import pytest

from allocd.cloudzero.records import canonical_filter
from allocd.embedded import Message, consume_all, produce

from .harness import (
    Generator,
    Stack,
    emulator_requests,
    emulator_totals,
    metric_value,
    produce_live,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _window_aligned_wait(window: int, slack: float = 0.3) -> float:
    """Seconds until the next window starts (plus slack), so a test can begin at a window's start."""
    now = time.time()
    return window - now % window + slack


async def test_steady_run_is_exact_with_one_record_per_cell_window(stack: Stack) -> None:
    d = stack.daemon("a", window_seconds=2, grace_seconds=1.0)
    d.start()
    await stack.ready(d)
    gen = Generator(seed=1, elements=6)
    await produce_live(stack.broker.bootstrap, stack.topic, gen, total=3000, seconds=6)
    # The last windows close with no further events: a quiet key must still be delivered on time.
    await stack.totals_equal(gen.expected())
    records, ideal = await stack.records_sent(), gen.cell_windows(2)
    assert ideal <= records <= 1.1 * ideal, (records, ideal)
    text = await d.metrics(stack.session)
    assert metric_value(text, "allocd_events_accepted_total") == 3000
    assert metric_value(text, "allocd_flush_cycles_total", trigger="closed", outcome="completed") >= 3
    assert await d.terminate() == 0


async def test_crash_mid_cycle_after_acknowledged_requests(stack: Stack) -> None:
    """SIGKILL at the 6th request of a cycle, before the API applies it: requests 1–5 were acknowledged
    (and journaled); the restart must not send their cells again, and must deliver the rest."""
    opts = dict(window_seconds=3, grace_seconds=0.5, records_per_request=5, records_per_second=200)
    d = stack.daemon("a", **opts)
    d.start()
    await stack.ready(d)
    gen = Generator(seed=2, elements=40)
    await produce(stack.broker.bootstrap, stack.topic, gen.batch(800))
    await stack.set_hook(after_request=6, action="signal", signal="SIGKILL", pid=d.pid, apply=False)
    await d.wait(60)  # killed by the hook
    assert d.proc is not None and d.proc.returncode == -9
    applied = await stack.records_sent()
    assert applied == 25  # five requests of five records, then the kill
    d2 = stack.daemon("a2", **opts)
    d2.start()
    await stack.totals_equal(gen.expected())
    # Exactly one record per cell: the 25 acknowledged cells were skipped on replay, not resent.
    assert await stack.records_sent() == gen.cell_windows(3)
    text = await d2.metrics(stack.session)
    # The killed request was journaled as sent without an answer: the recovering daemon reports it.
    assert metric_value(text, "allocd_api_in_doubt_requests_total") >= 1
    assert metric_value(text, "allocd_events_skipped_total") > 0


async def test_crash_with_request_in_doubt_duplicates_only_that_request(stack: Stack) -> None:
    """The API applies request 4 and the daemon dies before the answer: that request is in doubt. sum is
    at-least-once, so exactly its records are counted twice — and the recovering daemon reports it."""
    opts = dict(window_seconds=3, grace_seconds=0.5, records_per_request=5, records_per_second=200)
    d = stack.daemon("a", **opts)
    d.start()
    await stack.ready(d)
    gen = Generator(seed=3, elements=30)
    await produce(stack.broker.bootstrap, stack.topic, gen.batch(600))
    await stack.set_hook(after_request=4, action="signal", signal="SIGKILL", pid=d.pid, apply=True)
    await d.wait(60)
    reqs = await emulator_requests(stack.session, stack.emulator.url)
    hooked = [r for r in reqs if r.get("hook")]
    assert len(hooked) == 1 and hooked[0]["applied"]
    expected = dict(gen.expected())
    stream = hooked[0]["stream"]
    for rec in hooked[0]["body"]:
        key = (
            stream,
            rec["timestamp"][:13] + ":00:00Z",
            rec["element_name"],
            canonical_filter(rec["filter"]),
        )
        expected[key] += Decimal(rec["value"])
    d2 = stack.daemon("a2", **opts)
    d2.start()
    await stack.totals_equal(expected)
    text = await d2.metrics(stack.session)
    assert metric_value(text, "allocd_api_in_doubt_requests_total") >= 1
    assert metric_value(text, "allocd_api_in_doubt_records_total") >= len(hooked[0]["body"])


async def test_crash_mid_batch_before_any_cycle(stack: Stack) -> None:
    """Killed while consuming, windows still open: nothing was delivered, the restart re-derives all."""
    d = stack.daemon("a", window_seconds=30, grace_seconds=0.5)
    d.start()
    await stack.ready(d)
    gen = Generator(seed=4)
    await produce(stack.broker.bootstrap, stack.topic, gen.batch(2000))

    async def consumed() -> bool:
        return metric_value(await d.metrics(stack.session), "allocd_events_consumed_total") >= 1000

    await wait_for(consumed, 30, "the daemon to consume")
    await d.kill()
    assert await stack.records_sent() == 0
    d2 = stack.daemon("a2", window_seconds=2, grace_seconds=0.5)
    d2.start()
    await stack.totals_equal(gen.expected())


async def test_crash_after_window_delivered_while_next_window_open(stack: Stack) -> None:
    window = 6
    opts = dict(window_seconds=window, grace_seconds=0.5)
    d = stack.daemon("a", **opts)
    d.start()
    await stack.ready(d)
    gen = Generator(seed=5)
    await wait_for_seconds(_window_aligned_wait(window))
    await produce(stack.broker.bootstrap, stack.topic, gen.batch(300))
    first = gen.expected()
    await stack.totals_equal(first, timeout=30)  # window 1 closed and delivered
    first_records = await stack.records_sent()
    await produce(stack.broker.bootstrap, stack.topic, gen.batch(300))  # window 2 (or later), open

    async def consumed() -> bool:
        return metric_value(await d.metrics(stack.session), "allocd_events_accepted_total") >= 600

    await wait_for(consumed, 20, "window 2 consumed")
    await d.kill()
    d2 = stack.daemon("a2", **opts)
    d2.start()
    await stack.totals_equal(gen.expected())
    # Window 1 was not sent again: records are those of window 1 plus one per cell of the rest.
    assert await stack.records_sent() == first_records + (gen.cell_windows(window) - first_records)
    assert await stack.records_sent() == gen.cell_windows(window)


async def wait_for_seconds(seconds: float) -> None:
    """The one place a test waits on the clock: aligning to a window boundary is about time itself."""
    await asyncio.sleep(seconds)


async def test_sigterm_mid_window_exits_zero_and_restart_is_exact(stack: Stack) -> None:
    window = 8
    opts = dict(window_seconds=window, grace_seconds=0.5, shutdown_timeout=5)
    d = stack.daemon("a", **opts)
    d.start()
    await stack.ready(d)
    gen = Generator(seed=6)
    await wait_for_seconds(_window_aligned_wait(window))
    await produce(stack.broker.bootstrap, stack.topic, gen.batch(500))

    async def consumed() -> bool:
        return metric_value(await d.metrics(stack.session), "allocd_events_accepted_total") >= 500

    await wait_for(consumed, 20, "events consumed")
    started = time.monotonic()
    assert await d.terminate(timeout=15) == 0
    assert time.monotonic() - started < 5 + 2
    assert await stack.records_sent() == 0  # the open window was not delivered early (default)
    d2 = stack.daemon("a2", **opts)
    d2.start()
    await stack.totals_equal(gen.expected())
    assert await stack.records_sent() == gen.cell_windows(window)  # no extra records for that window


async def test_flush_on_shutdown_delivers_the_open_window_before_exit(stack: Stack) -> None:
    window = 30
    d = stack.daemon("a", window_seconds=window, grace_seconds=0.5, flush_on_shutdown=True)
    d.start()
    await stack.ready(d)
    gen = Generator(seed=7)
    await produce(stack.broker.bootstrap, stack.topic, gen.batch(400))

    async def consumed() -> bool:
        return metric_value(await d.metrics(stack.session), "allocd_events_accepted_total") >= 400

    await wait_for(consumed, 20, "events consumed")
    assert await d.terminate(timeout=20) == 0
    assert await emulator_totals(stack.session, stack.emulator.url) == gen.expected()


async def test_rebalance_second_member_joins_while_sending_then_first_leaves(stack: Stack) -> None:
    opts = dict(window_seconds=2, grace_seconds=0.5, records_per_request=10, records_per_second=150)
    a = stack.daemon("a", key="key-a", **opts)
    a.start()
    await stack.ready(a)
    gen = Generator(seed=8, elements=40)
    await produce_live(stack.broker.bootstrap, stack.topic, gen, total=1500, seconds=3)

    async def sending() -> bool:
        return await stack.records_sent() > 0

    await wait_for(sending, 30, "a cycle in progress")
    b = stack.daemon("b", key="key-b", **opts)
    b.start()  # joins while a's cycles are being sent (150 records/s: each cycle spans many requests)
    await produce_live(stack.broker.bootstrap, stack.topic, gen, total=1000, seconds=3)
    await stack.ready(a, b)
    assert await a.terminate() == 0  # a leaves: b takes everything over
    await produce_live(stack.broker.bootstrap, stack.topic, gen, total=500, seconds=2)
    await stack.totals_equal(gen.expected(), timeout=120)
    text = await b.metrics(stack.session)
    assert metric_value(text, "allocd_api_in_doubt_requests_total") == 0


async def test_member_killed_mid_cycle_survivor_takes_over(stack: Stack) -> None:
    opts = dict(window_seconds=2, grace_seconds=0.5, records_per_request=5, records_per_second=300)
    a = stack.daemon("a", key="key-a", **opts)
    b = stack.daemon("b", key="key-b", **opts)
    a.start()
    b.start()
    await stack.ready(a, b)
    gen = Generator(seed=9, elements=40)
    # a dies at its 5th request, before the API applies it (a crash point, not a random kill).
    await stack.set_hook(
        after_request=5, action="signal", signal="SIGKILL", pid=a.pid, apply=False, key="key-a"
    )
    await produce_live(stack.broker.bootstrap, stack.topic, gen, total=1500, seconds=3)
    await a.wait(60)
    assert a.proc is not None and a.proc.returncode == -9
    await produce_live(stack.broker.bootstrap, stack.topic, gen, total=500, seconds=2)
    await stack.totals_equal(gen.expected(), timeout=120)


POISON: list[tuple[bytes, str]] = [
    (b"\x00\xff not json", "not_json"),
    (b'{"element_name": "x", "value": 1', "not_json"),
    (b"[1, 2]", "not_object"),
    (
        b'{"stream": "billing-usage", "value": 5, '
        b'"filter": {"custom:feature": ["a"], "tag:environment": ["p"]}}',
        "missing_element",
    ),
    (
        b'{"stream": "billing-usage", "element_name": "x", "filter": {"custom:feature": ["a"], '
        b'"tag:environment": ["p"]}}',
        "missing_value",
    ),
    (
        b'{"stream": "search-usage", "element_name": "x", "value": 0, "filter": {"custom:feature": ["a"]}}',
        "invalid_value",
    ),
    (
        b'{"stream": "search-usage", "element_name": "x", "value": -3, "filter": {"custom:feature": ["a"]}}',
        "invalid_value",
    ),
    (
        b'{"stream": "search-usage", "element_name": "x", "value": NaN, "filter": {"custom:feature": ["a"]}}',
        "not_json",
    ),
    (
        b'{"stream": "search-usage", "element_name": "x", "value": "NaN", '
        b'"filter": {"custom:feature": ["a"]}}',
        "invalid_value",
    ),
    (
        b'{"stream": "search-usage", "element_name": "x", "value": 1, "filter": {"custom:feature": ['
        + b", ".join(b'"v%d"' % i for i in range(21))
        + b"]}}",
        "too_many_values",
    ),
    (
        b'{"stream": "search-usage", "element_name": "x", "value": 1, "filter": {"custom:feature": ["a"], '
        b'"custom:a": ["1"], "custom:b": ["1"], "custom:c": ["1"], "custom:d": ["1"], "custom:e": ["1"]}}',
        "too_many_dimensions",
    ),
    (
        b'{"stream": "search-usage", "element_name": "x", "value": 1, "filter": {"tag:environment": ["a"]}}',
        "dimension_mismatch",
    ),
    (b'{"stream": "nope", "element_name": "x", "value": 1}', "undeclared_stream"),
    (
        b'{"stream": "search-usage", "element_name": "' + b"x" * 300 + b'", "value": 1, '
        b'"filter": {"custom:feature": ["a"]}}',
        "invalid_element",
    ),
    (
        b'{"stream": "search-usage", "element_name": "x", "value": 1, "filter": {"custom:feature": ["a"]}, '
        b'"timestamp": "2001-01-01T00:00:00Z"}',
        "too_late",
    ),
    (
        b'{"stream": "search-usage", "element_name": "x", "value": 1, "filter": {"custom:feature": ["a"]}, '
        b'"timestamp": "2099-01-01T00:00:00Z"}',
        "future",
    ),
]


async def test_poison_goes_to_the_dlq_with_reasons_and_valid_totals_stay_exact(stack: Stack) -> None:
    d = stack.daemon("a", window_seconds=2, grace_seconds=0.5)
    d.start()
    await stack.ready(d)
    gen = Generator(seed=10)
    mixed: list[Message] = []
    for i in range(600):
        mixed.append(Message(gen.event()))
        if i % 37 == 0:
            mixed.append(Message(POISON[(i // 37) % len(POISON)][0]))
    mixed.extend(Message(p) for p, _ in POISON)
    poison_count = len(mixed) - 600
    await produce(stack.broker.bootstrap, stack.topic, mixed)
    await stack.totals_equal(gen.expected())
    dlq = f"{stack.group}-dlq"

    async def dlq_full() -> bool:
        got = await consume_all(stack.broker.bootstrap, dlq, {0: poison_count}, timeout=2)
        return len(got) >= poison_count

    await wait_for(dlq_full, 30, "every poison message in the DLQ")
    records = await consume_all(stack.broker.bootstrap, dlq, {0: poison_count})
    reasons = {}
    for rec in records:
        headers = dict(rec.headers)
        assert headers["allocd-source-topic"].decode() == stack.topic
        assert int(headers["allocd-source-offset"]) >= 0
        reasons[rec.value] = headers["allocd-reason"].decode()
    for payload, reason in POISON:
        assert reasons[payload] == reason, (payload[:60], reasons[payload], reason)
    assert d.proc is not None and d.proc.poll() is None  # still running
    text = await d.metrics(stack.session)
    assert metric_value(text, "allocd_events_rejected_total") == poison_count
    assert metric_value(text, "allocd_dlq_writes_total", kind="event") == poison_count


async def test_revoked_key_pauses_delivery_and_resumes_without_loss(stack: Stack) -> None:
    d = stack.daemon("a", key="key-c", window_seconds=2, grace_seconds=0.5)
    d.start()
    await stack.ready(d)
    async with stack.session.post(
        f"{stack.emulator.url}/_admin/keys", json={"keys": ["key-a", "key-b"]}
    ) as r:
        assert r.status == 200
    gen = Generator(seed=11)
    await produce(stack.broker.bootstrap, stack.topic, gen.batch(500))

    async def not_ready() -> bool:
        async with stack.session.get(f"http://127.0.0.1:{await d.port()}/readyz") as resp:
            return resp.status == 503 and "403" in await resp.text()

    await wait_for(not_ready, 30, "readiness to report the rejected key")
    assert await emulator_totals(stack.session, stack.emulator.url) == {}
    (stack.workdir / "a.key").write_text("key-b")  # the rotated key appears in the mounted secret
    await stack.totals_equal(gen.expected())
    text = await d.metrics(stack.session)
    assert metric_value(text, "allocd_api_auth_failures_total") >= 1
    assert metric_value(text, "allocd_dlq_writes_total") == 0
    assert "key-c" not in d.log_tail(10**7) and "key-b" not in d.log_tail(10**7)


async def test_records_the_api_refuses_go_to_the_dlq_and_the_rest_is_delivered(stack: Stack) -> None:
    """The stream already exists with another dimension set (fixed at its first write): the API refuses
    that stream's records for good; they are dead-lettered with the API's message, the rest delivered."""
    url = f"{stack.emulator.url}/unit-cost/v1/telemetry/allocation/search-usage/sum"
    first = {
        "timestamp": "2020-01-25T00:00:00Z",
        "granularity": "HOURLY",
        "element_name": "setup",
        "filter": {"tag:owner": ["x"]},
        "value": "1",
    }
    async with stack.session.post(url, json={"records": [first]}, headers={"Authorization": "key-a"}) as r:
        assert r.status == 200
    d = stack.daemon("a", window_seconds=2, grace_seconds=0.5)
    d.start()
    await stack.ready(d)
    gen = Generator(seed=12)
    await produce(stack.broker.bootstrap, stack.topic, gen.batch(300))
    billing = {k: v for k, v in gen.expected().items() if k[0] == "billing-usage"}
    refused = len({k for k in gen.expected() if k[0] == "search-usage"})

    async def delivered() -> bool:
        got = await emulator_totals(stack.session, stack.emulator.url)
        return {k: v for k, v in got.items() if k[0] == "billing-usage"} == billing

    await wait_for(delivered, 60, "billing-usage delivered")
    dlq = f"{stack.group}-dlq"

    async def dead_lettered() -> bool:
        return len(await consume_all(stack.broker.bootstrap, dlq, {0: 1}, timeout=2)) >= 1

    await wait_for(dead_lettered, 30, "refused records in the DLQ")
    text = await d.metrics(stack.session)
    assert metric_value(text, "allocd_dlq_writes_total", kind="record") >= refused
    records = await consume_all(
        stack.broker.bootstrap, dlq, {0: int(metric_value(text, "allocd_dlq_writes_total"))}
    )
    headers = dict(records[0].headers)
    assert headers["allocd-reason"] == b"api_rejected"
    assert headers["allocd-stream"] == b"search-usage"
    assert b"same filter keys" in headers["allocd-detail"]


async def test_a_second_signal_exits_at_once(stack: Stack) -> None:
    """SIGTERM while a request hangs: the daemon waits for it (within its deadline); a second SIGTERM
    means the operator insists — exit at once, with 128 + SIGTERM."""
    d = stack.daemon("a", window_seconds=2, grace_seconds=0.5, shutdown_timeout=30)
    d.start()
    await stack.ready(d)
    await stack.set_faults(hang=1.0)  # applied, never answered: the request stays in flight
    gen = Generator(seed=13)
    await produce(stack.broker.bootstrap, stack.topic, gen.batch(50))

    async def in_flight() -> bool:
        return any(r["fault"] == "hang" for r in await emulator_requests(stack.session, stack.emulator.url))

    await wait_for(in_flight, 30, "a request hanging in the emulator")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)

    async def shutting_down() -> bool:
        return any(line.get("message") == "shutting down" for line in d.log_lines())

    await wait_for(shutting_down, 10, "the first signal's shutdown to start")
    assert d.proc.poll() is None  # still waiting for the hanging request, within its deadline
    started = time.monotonic()
    assert await d.terminate(timeout=5) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 2
