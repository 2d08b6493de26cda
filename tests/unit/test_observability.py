"""Metrics, health probes and the /metrics /healthz /readyz server."""

from __future__ import annotations

import math
import re

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from allocd.observability import (
    CONTENT_TYPE,
    FLUSH_OUTCOMES,
    FLUSH_TRIGGERS,
    METRIC_NAMES,
    SERIES_NAMES,
    DecayedRate,
    Health,
    Metrics,
)
from allocd.webserver import bound_port, make_app, start_http_server

from .fakes import FakeClock

# 2024-05-01T00:00:00Z
MIDNIGHT = 1_714_521_600.0

# Every metric the brief names, with its type.
EXPECTED = {
    "allocd_events_consumed_total": "counter",
    "allocd_events_accepted_total": "counter",
    "allocd_events_rejected_total": "counter",
    "allocd_events_late_total": "counter",
    "allocd_events_skipped_total": "counter",
    "allocd_dlq_writes_total": "counter",
    "allocd_dlq_write_errors_total": "counter",
    "allocd_open_cells": "gauge",
    "allocd_open_windows": "gauge",
    "allocd_accumulator_bytes": "gauge",
    "allocd_flush_cycles_total": "counter",
    "allocd_flush_cycle_seconds": "histogram",
    "allocd_flush_cycle_records": "histogram",
    "allocd_api_records_total": "counter",
    "allocd_api_requests_total": "counter",
    "allocd_api_request_seconds": "histogram",
    "allocd_api_retries_total": "counter",
    "allocd_api_in_doubt_requests_total": "counter",
    "allocd_api_in_doubt_records_total": "counter",
    "allocd_api_rejected_records_total": "counter",
    "allocd_rate_limiter_wait_seconds_total": "counter",
    "allocd_api_auth_failures_total": "counter",
    "allocd_api_daily_record_budget": "gauge",
    "allocd_api_records_sent_today": "gauge",
    "allocd_api_records_projected_daily": "gauge",
    "allocd_rounded_cells_total": "counter",
    "allocd_snapshots_pending": "gauge",
    "allocd_consumer_paused": "gauge",
    "allocd_paused_seconds_total": "counter",
    "allocd_committed_offset": "gauge",
    "allocd_end_offset": "gauge",
    "allocd_consumer_lag": "gauge",
    "allocd_last_flush_success_timestamp_seconds": "gauge",
    "allocd_last_commit_timestamp_seconds": "gauge",
    "allocd_build_info": "gauge",
    "allocd_ready": "gauge",
}

# Non-base or abbreviated units, which promtool's lint rejects; base units go last (before _total).
NON_BASE_UNITS = {
    "milliseconds",
    "microseconds",
    "minutes",
    "hours",
    "days",
    "kilobytes",
    "megabytes",
    "ms",
    "sec",
}
BASE_UNITS = {"seconds", "bytes"}


def types_and_helps(text: str) -> tuple[dict[str, str], dict[str, str]]:
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", text, re.M))
    return types, helps


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# --- exposition -------------------------------------------------------------------------------------
def test_every_metric_is_exposed_with_its_type_and_a_help_line() -> None:
    types, helps = types_and_helps(Metrics().render().decode())
    for name, kind in EXPECTED.items():
        assert types.get(name) == kind, name
        assert len(helps.get(name, "")) > 15, name
    assert set(types) == set(helps)


def test_metric_names_lists_exactly_what_is_exposed() -> None:
    types, _ = types_and_helps(Metrics().render().decode())
    assert set(METRIC_NAMES) == set(types)
    assert "allocd_flush_cycle_seconds_bucket" in SERIES_NAMES
    assert "allocd_api_request_seconds_count" in SERIES_NAMES
    assert "allocd_events_consumed_total" in SERIES_NAMES


def test_names_follow_prometheus_conventions() -> None:
    types, _ = types_and_helps(Metrics().render().decode())
    for name, kind in types.items():
        assert re.fullmatch(r"allocd_[a-z0-9_]+", name), name
        assert name.endswith("_total") == (kind == "counter"), name
        words = name.removesuffix("_total").split("_")
        assert not NON_BASE_UNITS & set(words), name
        assert not BASE_UNITS & set(words[:-1]), name
        assert not name.endswith(("_count", "_sum", "_bucket", "_created")), name


def test_render_has_no_created_series() -> None:
    metrics = Metrics()
    metrics.events_consumed.labels("kafka").inc()
    assert b"_created" not in metrics.render()


def test_two_instances_do_not_share_a_registry() -> None:
    first, second = Metrics(), Metrics()
    first.events_skipped.inc(3)
    assert value(first, "allocd_events_skipped_total") == 3
    assert value(second, "allocd_events_skipped_total") == 0


def test_closed_label_sets_are_pre_created_at_zero() -> None:
    metrics = Metrics()
    for trigger in FLUSH_TRIGGERS:
        for outcome in FLUSH_OUTCOMES:
            assert value(metrics, "allocd_flush_cycles_total", trigger=trigger, outcome=outcome) == 0
    assert value(metrics, "allocd_dlq_writes_total", kind="record") == 0
    assert value(metrics, "allocd_api_in_doubt_requests_total", op="sum") == 0


def test_build_info_and_constant_budget() -> None:
    text = Metrics().render().decode()
    assert re.search(r'^allocd_build_info\{python="[0-9.]+",version="[^"]+"\} 1\.0$', text, re.M)
    assert re.search(r"^allocd_api_daily_record_budget 8\.64e\+06$", text, re.M)


# --- the client observer interface -------------------------------------------------------------------
def test_on_request_success_counts_request_records_latency_and_budget() -> None:
    metrics = Metrics(clock=FakeClock(MIDNIGHT + 100))
    metrics.on_request("sum", 200, 3000, 0.25)
    assert value(metrics, "allocd_api_requests_total", op="sum", status="200") == 1
    assert value(metrics, "allocd_api_records_total", op="sum", status="200") == 3000
    assert value(metrics, "allocd_api_request_seconds_count", op="sum") == 1
    assert value(metrics, "allocd_api_request_seconds_sum", op="sum") == 0.25
    assert value(metrics, "allocd_api_records_sent_today") == 3000


def test_on_request_without_answer_is_labelled_error_and_not_budgeted() -> None:
    metrics = Metrics()
    metrics.on_request("replace", None, 10, 30.0)
    assert value(metrics, "allocd_api_requests_total", op="replace", status="error") == 1
    assert value(metrics, "allocd_api_records_sent_today") == 0


@pytest.mark.parametrize(("status", "auth"), [(403, 1), (400, 0), (413, 0), (429, 0), (503, 0)])
def test_on_request_failures_move_the_auth_counter_only(status: int, auth: int) -> None:
    metrics = Metrics()
    metrics.on_request("sum", status, 7, 0.1)
    assert value(metrics, "allocd_api_requests_total", op="sum", status=str(status)) == 1
    assert value(metrics, "allocd_api_auth_failures_total") == auth
    # A 400 is bisected: only the records the client settles as refused count (on_rejected).
    assert value(metrics, "allocd_api_rejected_records_total", op="sum") == 0
    assert value(metrics, "allocd_api_records_sent_today") == 0


def test_on_rejected_counts_records_refused_for_good() -> None:
    metrics = Metrics()
    metrics.on_rejected("sum", 3)
    metrics.on_rejected("sum", 1)
    assert value(metrics, "allocd_api_rejected_records_total", op="sum") == 4


def test_on_retry_on_in_doubt_and_on_rate_wait() -> None:
    metrics = Metrics()
    metrics.on_retry("sum", "429")
    metrics.on_retry("sum", "429")
    metrics.on_in_doubt("sum", 3000)
    metrics.on_rate_wait(1.5)
    metrics.on_rate_wait(0.5)
    assert value(metrics, "allocd_api_retries_total", op="sum", reason="429") == 2
    assert value(metrics, "allocd_api_in_doubt_requests_total", op="sum") == 1
    assert value(metrics, "allocd_api_in_doubt_records_total", op="sum") == 3000
    assert value(metrics, "allocd_rate_limiter_wait_seconds_total") == 2.0


# --- budget and projection ----------------------------------------------------------------------------
def test_records_sent_today_resets_at_utc_midnight_even_without_new_sends() -> None:
    clock = FakeClock(MIDNIGHT + 86_400 - 10)  # 23:59:50
    metrics = Metrics(clock=clock)
    metrics.on_request("sum", 200, 500, 0.1)
    assert value(metrics, "allocd_api_records_sent_today") == 500
    clock.now = MIDNIGHT + 86_400 + 5  # 00:00:05 the next day
    assert value(metrics, "allocd_api_records_sent_today") == 0
    metrics.on_request("sum", 200, 40, 0.1)
    assert value(metrics, "allocd_api_records_sent_today") == 40
    assert (
        value(metrics, "allocd_api_records_total", op="sum", status="200") == 540
    )  # the counter never resets


def test_projection_of_a_steady_rate_is_that_rate_times_a_day() -> None:
    clock = FakeClock(MIDNIGHT)
    metrics = Metrics(clock=clock)
    for _ in range(600):  # 10 hours of 100 records/s, one request a minute
        clock.now += 60
        metrics.on_request("sum", 200, 6000, 0.1)
    assert value(metrics, "allocd_api_records_projected_daily") == pytest.approx(8_640_000, rel=0.01)


def test_projection_is_right_within_the_first_hour() -> None:
    clock = FakeClock(MIDNIGHT)
    metrics = Metrics(clock=clock)
    for _ in range(10):  # ten minutes at 10 records/s
        clock.now += 60
        metrics.on_request("sum", 200, 600, 0.1)
    # The bias correction keeps the estimate near the true rate instead of climbing from zero.
    assert value(metrics, "allocd_api_records_projected_daily") == pytest.approx(864_000, rel=0.1)


def test_decayed_rate_math() -> None:
    rate = DecayedRate(now=0.0, tau=3600.0, min_span=60.0)
    assert rate.rate(0.0) == 0.0
    rate.add(600, now=0.0)
    # Less than min_span of history: averaged over a minute.
    assert rate.rate(0.0) == pytest.approx(600 / 3600 / -math.expm1(-60 / 3600))
    assert rate.rate(0.0) == pytest.approx(10.0, rel=0.01)
    # Long after the start the correction vanishes and a burst fades by e per tau.
    late = 100 * 3600.0
    assert rate.rate(late + 3600) / rate.rate(late) == pytest.approx(math.exp(-1))
    # A clock that steps back does not inflate the rate.
    rate.add(0, now=late)
    assert rate.rate(late - 100) == pytest.approx(rate.rate(late))


# --- pipeline methods -------------------------------------------------------------------------------
def test_partition_series_and_forget() -> None:
    metrics = Metrics()
    metrics.set_partition("usage", 3, committed=100)
    assert value(metrics, "allocd_consumer_lag", topic="usage", partition="3") is None  # end not known yet
    metrics.set_partition("usage", 3, end=250)
    metrics.set_partition("usage", 4, committed=7, end=7)
    assert value(metrics, "allocd_committed_offset", topic="usage", partition="3") == 100
    assert value(metrics, "allocd_end_offset", topic="usage", partition="3") == 250
    assert value(metrics, "allocd_consumer_lag", topic="usage", partition="3") == 150
    metrics.forget_partition("usage", 3)
    metrics.forget_partition("usage", 99)  # never seen: no error
    text = metrics.render().decode()
    assert 'partition="3"' not in text
    assert 'allocd_consumer_lag{partition="4",topic="usage"} 0.0' in text


def test_flush_cycle_counts_and_stamps_success_only_when_completed() -> None:
    clock = FakeClock(MIDNIGHT)
    metrics = Metrics(clock=clock)
    metrics.flush_cycle("closed", "abandoned", 12.0, 100)
    assert value(metrics, "allocd_last_flush_success_timestamp_seconds") == 0
    clock.now += 30
    metrics.flush_cycle("max_interval", "completed", 3.0, 3000)
    assert value(metrics, "allocd_flush_cycles_total", trigger="closed", outcome="abandoned") == 1
    assert value(metrics, "allocd_flush_cycles_total", trigger="max_interval", outcome="completed") == 1
    assert value(metrics, "allocd_flush_cycle_records_sum") == 3100
    assert value(metrics, "allocd_flush_cycle_seconds_count") == 2
    assert value(metrics, "allocd_last_flush_success_timestamp_seconds") == MIDNIGHT + 30


def test_unknown_closed_label_values_are_refused() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="trigger"):
        metrics.flush_cycle("closd", "completed", 1.0, 1)
    with pytest.raises(ValueError, match="kind"):
        metrics.dlq_written("events")


def test_paused_seconds_accrue_while_paused_including_at_scrape() -> None:
    clock = FakeClock(MIDNIGHT)
    metrics = Metrics(clock=clock)
    metrics.set_paused(True)
    clock.now += 10
    metrics.render()  # a scrape mid-pause reports the time so far
    assert value(metrics, "allocd_paused_seconds_total") == 10
    assert value(metrics, "allocd_consumer_paused") == 1
    clock.now += 5
    metrics.set_paused(False)
    clock.now += 100
    metrics.render()
    assert value(metrics, "allocd_paused_seconds_total") == 15
    assert value(metrics, "allocd_consumer_paused") == 0


def test_small_setters() -> None:
    clock = FakeClock(MIDNIGHT)
    metrics = Metrics(clock=clock)
    metrics.set_accumulator(open_cells=10, open_windows=2, bytes_estimate=4096)
    metrics.dlq_written("event", 2)
    metrics.commit_succeeded()
    assert value(metrics, "allocd_open_cells") == 10
    assert value(metrics, "allocd_open_windows") == 2
    assert value(metrics, "allocd_accumulator_bytes") == 4096
    assert value(metrics, "allocd_dlq_writes_total", kind="event") == 2
    assert value(metrics, "allocd_last_commit_timestamp_seconds") == MIDNIGHT


# --- health -----------------------------------------------------------------------------------------
def test_liveness_stays_up_while_loops_beat_and_fails_when_one_stalls() -> None:
    clock = FakeClock(0.0)
    health = Health(liveness_timeout=30.0, clock=clock)
    health.register("poll")
    health.register("flush")
    for _ in range(10):  # five minutes of beats every 29 s
        clock.now += 29
        health.beat("poll")
        health.beat("flush")
        assert health.liveness().ok
    clock.now += 29
    health.beat("poll")  # flush is stuck
    assert health.liveness().ok
    clock.now += 1
    health.beat("poll")
    probe = health.liveness()
    assert not probe.ok
    assert probe.body["stalled"] == ["flush"]
    health.unregister("flush")  # ended on purpose
    assert health.liveness().ok


def test_a_registered_loop_that_never_beats_stalls() -> None:
    clock = FakeClock(0.0)
    health = Health(liveness_timeout=5.0, clock=clock)
    assert health.liveness().ok  # nothing registered
    health.register("poll")
    clock.now = 5.0
    assert not health.liveness().ok


def test_readiness_grace_then_conditions() -> None:
    clock = FakeClock(0.0)
    health = Health(startup_grace=20.0, conditions=["config", "assigned"], clock=clock)
    probe = health.readiness()
    assert probe.ok and probe.body["starting"]
    clock.now = 20.0
    probe = health.readiness()
    assert not probe.ok
    assert probe.body["reasons"] == ["assigned: not reported yet", "config: not reported yet"]
    health.set_condition("config", True)
    health.set_condition("assigned", True)
    assert health.readiness().ok
    health.set_condition("api_key", False, "api key rejected (403)")
    probe = health.readiness()
    assert not probe.ok
    assert probe.body == {"ready": False, "starting": False, "reasons": ["api_key: api key rejected (403)"]}
    health.set_condition("api_key", True)
    assert health.readiness().ok


# --- HTTP -------------------------------------------------------------------------------------------
async def test_endpoints_with_the_aiohttp_test_client() -> None:
    clock = FakeClock(0.0)
    health = Health(liveness_timeout=10.0, startup_grace=0.0, conditions=["assigned"], clock=clock)
    health.register("poll")
    metrics = Metrics()
    async with TestClient(TestServer(make_app(metrics, health))) as client:
        response = await client.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = await response.text()
        assert "# TYPE allocd_flush_cycles_total counter" in body
        assert "\nallocd_ready 0.0\n" in body

        response = await client.get("/readyz")
        assert response.status == 503
        assert orjson.loads(await response.read())["reasons"] == ["assigned: not reported yet"]

        health.set_condition("assigned", True)
        assert (await client.get("/readyz")).status == 200
        assert "\nallocd_ready 1.0\n" in await (await client.get("/metrics")).text()

        assert (await client.get("/healthz")).status == 200
        clock.now = 11.0
        response = await client.get("/healthz")
        assert response.status == 503
        assert orjson.loads(await response.read())["stalled"] == ["poll"]


async def test_start_http_server_on_port_zero_with_an_extra_route() -> None:
    async def ingest(request: web.Request) -> web.Response:
        return web.json_response({"got": len(await request.read())}, status=202)

    runner = await start_http_server(
        Metrics(), Health(), "127.0.0.1", 0, extra_routes=[web.post("/v1/events", ingest)]
    )
    try:
        port = bound_port(runner)
        assert port > 0
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/metrics") as response:
                assert response.status == 200
                assert b"allocd_build_info" in await response.read()
            async with session.get(f"{base}/healthz") as response:
                assert response.status == 200
            async with session.post(f"{base}/v1/events", data=b"abc") as response:
                assert response.status == 202
                assert await response.json() == {"got": 3}
    finally:
        await runner.cleanup()
