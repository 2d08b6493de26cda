"""The CloudZero API emulator, in process: every documented status and message, the semantics of sum,
replace and delete, rate limiting on an injected clock, fault injection, crash-point hooks, the admin API,
persistence, and the `allocd emulator` command in a subprocess."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from allocd.cli import main
from allocd.cloudzero.emulator import (
    KEYS_ENV,
    Emulator,
    EmulatorConfig,
    Faults,
    add_arguments,
    bound_port,
    config_from_args,
    create_app,
    get_emulator,
    serve,
)
from allocd.cloudzero.records import MAX_BODY_BYTES, MESSAGES, canonical_filter
from allocd.errors import ConfigError
from tests.golden import (
    DELETE_EXAMPLE,
    EXAMPLE_ELEMENT,
    EXAMPLE_FILTER,
    EXAMPLE_STREAM,
    EXAMPLE_TIMESTAMP,
    REPLACE_EXAMPLE,
    SUM_EXAMPLE,
)

from .fakes import FakeClock

KEY = "test-key-4f1d9a"
OTHER_KEY = "other-key-77c2e0"
STREAM = "billing-stream"
API = "/unit-cost/v1/telemetry"
NOTHING: Any = object()
HANG_TIMEOUT = 0.3  # how long a client waits on a request that is meant never to be answered


# --- harness -------------------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    body: Any
    headers: Mapping[str, str]


@dataclass
class Emu:
    server: TestServer
    emulator: Emulator
    session: aiohttp.ClientSession

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = NOTHING,
        data: Any = None,
        key: str | None = KEY,
        timeout: float = 5.0,
    ) -> Reply:
        headers = {} if key is None else {"Authorization": key}
        if body is not NOTHING:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        if isinstance(data, bytes) and len(data) > 1024 * 1024:
            data = io.BytesIO(
                data
            )  # aiohttp warns on large raw bytes; the size is still sent as Content-Length
        url = self.server.make_url(path)
        async with self.session.request(
            method, url, data=data, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            raw = await resp.read()
            parsed = orjson.loads(raw) if resp.content_type == "application/json" else raw
            return Reply(resp.status, parsed, resp.headers)

    async def write(self, op: str, records: Any, *, stream: str = STREAM, **kw: Any) -> Reply:
        path = f"{API}/allocation/{stream}" + ("" if op == "post" else f"/{op}")
        return await self.request("POST", path, body={"records": records}, **kw)

    async def admin(self, method: str, path: str, body: Any = NOTHING) -> Reply:
        return await self.request(method, f"/_admin/{path}", body=body, key=None)

    def totals(self, stream: str = STREAM) -> dict[tuple[str, str, Any], Decimal]:
        return self.emulator.totals(stream)


MakeEmu = Callable[..., Awaitable[Emu]]


@pytest.fixture
async def make_emu() -> AsyncIterator[MakeEmu]:
    servers: list[TestServer] = []
    async with aiohttp.ClientSession() as session:

        async def make(config: EmulatorConfig | None = None, **kw: Any) -> Emu:
            app = create_app(config or EmulatorConfig(keys=(KEY,), admin=True), **kw)
            server = TestServer(app, host="127.0.0.1", port=0)
            await server.start_server()
            servers.append(server)
            return Emu(server, get_emulator(app), session)

        try:
            yield make
        finally:
            for server in servers:
                await server.close()


@pytest.fixture
async def emu(make_emu: MakeEmu) -> Emu:
    return await make_emu()


def rec(
    ts: str = "2024-05-01T10:15:00Z",
    element: str = "hooli",
    value: Any = 1,
    granularity: str = "HOURLY",
    flt: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "timestamp": ts,
        "granularity": granularity,
        "element_name": element,
        "value": value,
    }
    if flt is not None:
        out["filter"] = flt
    return out


def drec(ts: str = "2024-05-01T10:00:00Z", granularity: str = "HOURLY", **extra: Any) -> dict[str, Any]:
    return {"timestamp": ts, "granularity": granularity, **extra}


def cell(ts: str, element: str = "hooli", flt: dict[str, list[str]] | None = None) -> tuple[str, str, Any]:
    return (ts, element, canonical_filter(flt))


def assert_message(reply: Reply, status: int, rule: str) -> None:
    assert reply.status == status, reply.body
    assert reply.body["message"] == MESSAGES[rule]


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


# --- auth ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key", [None, "wrong-key", f"Bearer {KEY}", ""], ids=["none", "wrong", "bearer", "empty"]
)
async def test_bad_or_missing_key_is_403_and_writes_nothing(emu: Emu, key: str | None) -> None:
    reply = await emu.write("sum", [rec()], key=key)
    assert_message(reply, 403, "forbidden")
    assert emu.totals() == {}


async def test_read_back_needs_the_key(emu: Emu) -> None:
    assert (await emu.write("sum", [rec()])).status == 200
    assert_message(await emu.request("GET", f"{API}/{STREAM}/records", key="nope"), 403, "forbidden")


# --- validation: every rule, one bad record rejects the whole request -----------------------------------
def _future() -> str:
    return (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")


BAD_RECORDS: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("no-value", lambda: {k: v for k, v in rec().items() if k != "value"}, "missing_fields"),
    ("no-element", lambda: {k: v for k, v in rec().items() if k != "element_name"}, "missing_fields"),
    ("no-timestamp", lambda: {k: v for k, v in rec().items() if k != "timestamp"}, "missing_fields"),
    ("not-an-object", lambda: "record", "missing_fields"),  # type: ignore[return-value,arg-type]
    ("zero", lambda: rec(value=0), "invalid_value"),
    ("negative", lambda: rec(value="-3"), "invalid_value"),
    ("not-a-number", lambda: rec(value="lots"), "invalid_value"),
    ("boolean", lambda: rec(value=True), "invalid_value"),
    ("six-dimensions", lambda: rec(flt={f"custom:d{i}": ["x"] for i in range(6)}), "too_many_dimensions"),
    ("21-values", lambda: rec(flt={"custom:d": [str(i) for i in range(21)]}), "too_many_values"),
    ("unknown-key", lambda: rec(flt={"colour": ["red"]}), "unrecognized_filter_keys"),
    ("filter-not-lists", lambda: rec(flt={"custom:d": "x"}), "invalid_filter"),  # type: ignore[dict-item]
    ("bad-timestamp", lambda: rec(ts="yesterday"), "invalid_timestamp"),
    ("bad-granularity", lambda: rec(granularity="WEEKLY"), "invalid_granularity"),
    ("empty-element", lambda: rec(element=""), "invalid_element_name"),
    ("too-large", lambda: rec(flt={"custom:d": ["x" * 11_000]}), "record_too_large"),
    ("future", lambda: rec(ts=_future()), "future_timestamp"),
]


@pytest.mark.parametrize(
    ("bad", "rule"), [(b, r) for _, b, r in BAD_RECORDS], ids=[i for i, _, _ in BAD_RECORDS]
)
async def test_a_bad_record_rejects_the_request_with_its_rule_and_index(
    emu: Emu, bad: Callable[[], dict[str, Any]], rule: str
) -> None:
    reply = await emu.write("sum", [rec(), bad()])
    assert_message(reply, 400, rule)
    assert reply.body["record_index"] == 1
    assert emu.totals() == {}
    assert (await emu.admin("GET", "totals")).body == {"streams": {}}  # not even the stream was created


async def test_value_on_delete_is_400_and_deletes_nothing(emu: Emu) -> None:
    assert (await emu.write("sum", [rec()])).status == 200
    reply = await emu.write("delete", [drec(), drec(value=1)])
    assert_message(reply, 400, "value_on_delete")
    assert reply.body["record_index"] == 1
    assert emu.totals() == {cell("2024-05-01T10:00:00Z"): Decimal(1)}


async def test_invalid_json_is_400(emu: Emu) -> None:
    reply = await emu.request("POST", f"{API}/allocation/{STREAM}/sum", data=b'{"records": [')
    assert_message(reply, 400, "invalid_json")
    assert "record_index" not in reply.body


@pytest.mark.parametrize("body", [{}, {"records": []}, {"records": {}}, [rec()], {"record": [rec()]}])
async def test_missing_or_empty_records_is_400(emu: Emu, body: Any) -> None:
    reply = await emu.request("POST", f"{API}/allocation/{STREAM}/sum", body=body)
    assert_message(reply, 400, "invalid_records")


@pytest.mark.parametrize("name", ["bad%20name", "semi;colon", "x" * 257])
async def test_bad_stream_name_is_400(emu: Emu, name: str) -> None:
    assert_message(await emu.write("sum", [rec()], stream=name), 400, "invalid_stream_name")


async def test_filter_key_set_is_fixed_by_the_first_write(emu: Emu) -> None:
    first = {"custom:feature": ["billing"], "tag:env": ["prod"]}
    assert (await emu.write("sum", [rec(flt=first)])).status == 200
    # Same dimension set, other values and order: fine.
    assert (await emu.write("sum", [rec(flt={"tag:env": ["dev"], "custom:feature": ["x"]})])).status == 200
    for other in ({"custom:feature": ["billing"]}, {"tag:env": ["prod"], "tag:owner": ["a"]}, None):
        reply = await emu.write("sum", [rec(flt=first), rec(flt=other)])
        assert_message(reply, 400, "filter_keys_differ")
        assert reply.body["record_index"] == 1


async def test_an_empty_filter_is_a_key_set_too(emu: Emu) -> None:
    assert (await emu.write("sum", [rec()])).status == 200
    assert_message(await emu.write("sum", [rec(flt={"tag:env": ["prod"]})]), 400, "filter_keys_differ")


async def test_a_new_stream_takes_its_keys_from_the_first_record_of_the_request(emu: Emu) -> None:
    reply = await emu.write("sum", [rec(flt={"tag:a": ["1"]}), rec(flt={"tag:b": ["1"]})])
    assert_message(reply, 400, "filter_keys_differ")
    assert reply.body["record_index"] == 1


async def test_granularity_is_fixed_by_the_first_write(emu: Emu) -> None:
    assert (await emu.write("sum", [rec(granularity="DAILY")])).status == 200
    reply = await emu.write("sum", [rec(granularity="DAILY"), rec(granularity="HOURLY")])
    assert_message(reply, 400, "granularity_differs")
    assert reply.body["record_index"] == 1
    assert_message(await emu.write("delete", [drec(granularity="MONTHLY")]), 400, "granularity_differs")


async def test_max_future_is_configurable(make_emu: MakeEmu) -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    config = EmulatorConfig(keys=(KEY,), max_future=timedelta(hours=1))
    emu = await make_emu(config, wall_clock=lambda: now)
    assert_message(await emu.write("sum", [rec(ts="2025-03-01T13:30:00Z")]), 400, "future_timestamp")
    assert (await emu.write("sum", [rec(ts="2025-03-01T12:45:00Z")])).status == 200


async def test_body_over_5mb_is_413_by_content_length(emu: Emu) -> None:
    reply = await emu.request("POST", f"{API}/allocation/{STREAM}/sum", data=b" " * (MAX_BODY_BYTES + 1))
    assert_message(reply, 413, "body_too_large")


async def test_body_over_5mb_is_413_when_chunked(emu: Emu) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(6):
            yield b" " * (1024 * 1024)

    reply = await emu.request("POST", f"{API}/allocation/{STREAM}/sum", data=chunks())
    assert_message(reply, 413, "body_too_large")


async def test_bodies_above_aiohttps_1mb_default_are_accepted(emu: Emu) -> None:
    records = [rec(element=f"e{i}", flt={"custom:pad": ["p" * 8000]}) for i in range(300)]
    assert len(orjson.dumps({"records": records})) > 2 * 1024 * 1024
    assert (await emu.write("sum", records)).status == 200
    assert len(emu.totals()) == 300


async def test_delete_on_a_missing_stream_is_404(emu: Emu) -> None:
    assert_message(await emu.write("delete", [drec()]), 404, "stream_not_found")


# --- semantics -----------------------------------------------------------------------------------------
async def test_sum_adds_exactly_into_hourly_buckets(emu: Emu) -> None:
    records = [rec(ts="2024-05-01T10:15:00Z", value="0.1"), rec(ts="2024-05-01T10:45:59Z", value=0.2)]
    reply = await emu.write("sum", records)
    assert reply.status == 200
    assert reply.body == {"message": MESSAGES["accepted"]}
    assert (await emu.write("sum", [rec(ts="2024-05-01T11:05:00+00:00", value=7)])).status == 200
    assert emu.totals() == {
        cell("2024-05-01T10:00:00Z"): Decimal("0.3"),
        cell("2024-05-01T11:00:00Z"): Decimal(7),
    }


async def test_sum_treats_filters_as_sets(emu: Emu) -> None:
    a = {"tag:owner": ["frank", "sandy"], "custom:feature": ["billing"]}
    b = {"custom:feature": ["billing", "billing"], "tag:owner": ["sandy", "frank", "frank"]}
    assert (await emu.write("sum", [rec(flt=a, value=2), rec(flt=b, value=3)])).status == 200
    assert (
        await emu.write("sum", [rec(flt={"custom:feature": ["x"], "tag:owner": ["frank"]})])
    ).status == 200
    totals = emu.totals()
    assert totals[cell("2024-05-01T10:00:00Z", flt=a)] == 5
    assert len(totals) == 2


async def test_sum_keeps_elements_apart_and_rounds_values_to_15_digits(emu: Emu) -> None:
    records = [rec(element="a", value="1234567890123456"), rec(element="b", value="2")]
    assert (await emu.write("sum", records)).status == 200
    totals = emu.totals()
    assert totals[cell("2024-05-01T10:00:00Z", "a")] == Decimal("1234567890123460")  # [doc] 15 digits
    assert totals[cell("2024-05-01T10:00:00Z", "b")] == 2


async def test_replace_sets_the_value_and_sums_same_key_records_first(emu: Emu) -> None:
    assert (await emu.write("sum", [rec(value=100), rec(element="other", value=9)])).status == 200
    reply = await emu.write("replace", [rec(ts="2024-05-01T10:10:00Z", value=4), rec(value=6)])
    assert reply.status == 200
    assert reply.body["message"] == MESSAGES["accepted"]
    assert emu.totals() == {cell("2024-05-01T10:00:00Z"): 10, cell("2024-05-01T10:00:00Z", "other"): 9}
    assert (await emu.write("replace", [rec(ts="2024-05-01T12:00:00Z", value=3)])).status == 200  # none: adds
    assert emu.totals()[cell("2024-05-01T12:00:00Z")] == 3


async def test_replace_creates_the_stream(emu: Emu) -> None:
    assert (await emu.write("replace", [rec(value=5)], stream="fresh")).status == 200
    assert emu.totals("fresh") == {cell("2024-05-01T10:00:00Z"): 5}


async def test_delete_is_a_soft_delete_and_a_later_sum_starts_from_zero(emu: Emu) -> None:
    assert (await emu.write("sum", [rec(value=5), rec(element="keep", value=1)])).status == 200
    reply = await emu.write("delete", [drec(ts="2024-05-01T10:30:00Z", element_name="hooli")])
    assert reply.status == 201
    assert reply.body == {"message": MESSAGES["accepted"]}
    assert emu.totals() == {cell("2024-05-01T10:00:00Z", "keep"): 1}
    read = await emu.request("GET", f"{API}/{STREAM}/records")
    assert [r["element_name"] for r in read.body["records"]] == ["keep"]
    cells = (await emu.admin("GET", "totals")).body["streams"][STREAM]["cells"]
    assert {(c["element_name"], c["value"], c["deleted"]) for c in cells} == {
        ("hooli", "5", True),
        ("keep", "1", False),
    }
    assert (await emu.write("sum", [rec(value=2)])).status == 200
    assert emu.totals()[cell("2024-05-01T10:00:00Z")] == 2


async def test_delete_wildcards_match_within_the_bucket_only(emu: Emu) -> None:
    flt = {"tag:env": ["prod"]}
    records = [
        rec(element="a", flt=flt),
        rec(element="b", flt=flt),
        rec(element="a", flt={"tag:env": ["dev"]}),
        rec(ts="2024-05-01T11:00:00Z", element="a", flt=flt),
    ]
    assert (await emu.write("sum", records)).status == 200
    # A filter given must match exactly (as a set); element omitted matches every element.
    assert (await emu.write("delete", [drec(filter={"tag:env": ["prod", "prod"]})])).status == 201
    assert set(emu.totals()) == {
        cell("2024-05-01T10:00:00Z", "a", {"tag:env": ["dev"]}),
        cell("2024-05-01T11:00:00Z", "a", flt),
    }
    assert (await emu.write("delete", [drec()])).status == 201  # timestamp + granularity only: whole bucket
    assert set(emu.totals()) == {cell("2024-05-01T11:00:00Z", "a", flt)}
    assert_message(await emu.write("delete", [drec(filter={"tag:other": ["x"]})]), 400, "filter_keys_differ")


async def test_bare_post_is_sum(emu: Emu) -> None:
    assert (await emu.write("post", [rec(value=2)])).status == 200
    reply = await emu.write("post", [rec(value=3)])
    assert reply.status == 200
    assert reply.body["message"] == MESSAGES["accepted"]
    assert emu.totals() == {cell("2024-05-01T10:00:00Z"): 5}
    assert [e["op"] for e in (await emu.admin("GET", "requests")).body["requests"]] == ["post", "post"]


async def test_delete_stream_hides_it_and_a_later_write_recreates_it_fresh(emu: Emu) -> None:
    assert (await emu.write("sum", [rec(value=5, flt={"tag:env": ["prod"]})])).status == 200
    reply = await emu.request("DELETE", f"{API}/{STREAM}", body={"force": True})
    assert reply.status == 200
    assert emu.totals() == {}
    assert_message(await emu.request("GET", f"{API}/{STREAM}/records"), 404, "stream_not_found")
    assert_message(await emu.write("delete", [drec()]), 404, "stream_not_found")
    assert_message(await emu.request("DELETE", f"{API}/{STREAM}"), 404, "stream_not_found")
    # Recreated with another granularity and dimension set; the old cells are gone.
    assert (await emu.write("sum", [rec(value=1, granularity="DAILY")])).status == 200
    assert emu.totals() == {cell("2024-05-01T00:00:00Z"): 1}
    assert (await emu.request("DELETE", f"{API}/{STREAM}")).status == 200  # body optional


async def test_read_back_returns_live_cells_as_api_records(emu: Emu) -> None:
    flt = {"tag:owner": ["sandy", "frank"]}
    assert (await emu.write("sum", [rec(value="1.50", flt=flt), rec(value="1.5", flt=flt)])).status == 200
    reply = await emu.request("GET", f"{API}/{STREAM}/records")
    assert reply.status == 200
    assert reply.body == {
        "records": [
            {
                "timestamp": "2024-05-01T10:00:00Z",
                "granularity": "HOURLY",
                "element_name": "hooli",
                "filter": {"tag:owner": ["frank", "sandy"]},
                "value": "3",
            }
        ]
    }
    assert_message(await emu.request("GET", f"{API}/unknown/records"), 404, "stream_not_found")


# --- rate limit ----------------------------------------------------------------------------------------
async def test_rate_limit_is_a_token_bucket_per_key_counted_in_records(make_emu: MakeEmu) -> None:
    clock = FakeClock(1000.0)
    emu = await make_emu(EmulatorConfig(keys=(KEY, OTHER_KEY), rate=10, burst=20), clock=clock)
    assert (await emu.write("sum", [rec(value=1)] * 15)).status == 200
    reply = await emu.write("sum", [rec(value=1)] * 10)  # 5 tokens left
    assert_message(reply, 429, "rate_limited")
    assert "Retry-After" not in reply.headers
    assert emu.totals()[cell("2024-05-01T10:00:00Z")] == 15  # nothing of the refused request applied
    assert (await emu.write("sum", [rec(value=1)] * 10, key=OTHER_KEY)).status == 200  # its own bucket
    clock.now += 0.5  # +5 tokens: 10 now
    assert (await emu.write("sum", [rec(value=1)] * 10)).status == 200
    assert (await emu.write("sum", [rec(value=1)])).status == 429
    clock.now += 1000  # refills to the burst, never beyond it
    assert (await emu.write("sum", [rec(value=1)] * 21)).status == 429
    assert (await emu.write("sum", [rec(value=1)] * 20)).status == 200


async def test_rejected_requests_cost_no_tokens(make_emu: MakeEmu) -> None:
    emu = await make_emu(EmulatorConfig(keys=(KEY,), rate=1, burst=2), clock=FakeClock(1000.0))
    assert (await emu.write("sum", [rec(), rec(value=0)])).status == 400
    assert (await emu.write("sum", [rec(), rec()])).status == 200


# --- faults --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "status", "rule"), [("error_503", 503, "unavailable"), ("error_429", 429, "rate_limited")]
)
@pytest.mark.parametrize(("retry_after", "header"), [(None, None), (2, "2"), (0.5, "0.5")])
async def test_injected_errors_with_and_without_retry_after(
    emu: Emu, field: str, status: int, rule: str, retry_after: float | None, header: str | None
) -> None:
    set_reply = await emu.admin("POST", "faults", {field: 1.0, "retry_after": retry_after})
    assert set_reply.status == 200
    assert set_reply.body[field] == 1.0
    reply = await emu.write("sum", [rec()])
    assert_message(reply, status, rule)
    assert reply.headers.get("Retry-After") == header
    assert emu.totals() == {}
    log = (await emu.admin("GET", "requests")).body["requests"]
    assert (log[-1]["status"], log[-1]["fault"]) == (status, field)


async def test_retry_after_also_comes_with_the_real_rate_limit(make_emu: MakeEmu) -> None:
    config = EmulatorConfig(keys=(KEY,), rate=1, burst=1, faults=Faults(retry_after=3))
    emu = await make_emu(config, clock=FakeClock(1000.0))
    reply = await emu.write("sum", [rec(), rec()])
    assert reply.status == 429
    assert reply.headers["Retry-After"] == "3"


async def test_faults_from_the_config_apply_from_the_start(make_emu: MakeEmu) -> None:
    emu = await make_emu(EmulatorConfig(keys=(KEY,), admin=True, faults=Faults(error_503=1.0)))
    assert (await emu.write("sum", [rec()])).status == 503
    assert (await emu.admin("GET", "faults")).body["error_503"] == 1.0
    assert (await emu.admin("POST", "faults", {})).body == Faults().to_json()  # missing fields = off
    assert (await emu.write("sum", [rec()])).status == 200


async def test_latency_delays_writes(emu: Emu) -> None:
    await emu.admin("POST", "faults", {"latency": 0.2})
    started = time.monotonic()
    assert (await emu.write("sum", [rec()])).status == 200
    assert time.monotonic() - started >= 0.2


async def test_reset_drops_the_connection_before_applying(emu: Emu) -> None:
    await emu.admin("POST", "faults", {"reset": 1.0})
    with pytest.raises(aiohttp.ClientConnectionError):
        await emu.write("sum", [rec()])
    assert emu.totals() == {}
    entry = (await emu.admin("GET", "requests")).body["requests"][-1]
    assert (entry["fault"], entry["status"]) == ("reset", None)


async def test_hang_applies_the_write_and_never_answers(emu: Emu) -> None:
    await emu.admin("POST", "faults", {"hang": 1.0})
    with pytest.raises(TimeoutError):
        await emu.write("sum", [rec(value=4)], timeout=HANG_TIMEOUT)
    assert emu.totals() == {cell("2024-05-01T10:00:00Z"): 4}


async def test_fault_sequences_are_reproducible_from_the_seed(make_emu: MakeEmu) -> None:
    async def statuses(seed: int) -> list[int]:
        emu = await make_emu(EmulatorConfig(keys=(KEY,), seed=seed, faults=Faults(error_503=0.5)))
        return [(await emu.write("sum", [rec()])).status for _ in range(20)]

    first = await statuses(7)
    assert first == await statuses(7)
    assert {200, 503} == set(first)


@pytest.mark.parametrize(
    "body", [{"error_503": 2}, {"latency": -1}, {"retry_after": "soon"}, {"nope": 1}, [1], "x"]
)
async def test_bad_fault_config_is_refused(emu: Emu, body: Any) -> None:
    reply = await emu.admin("POST", "faults", body)
    assert reply.status == 400
    assert (await emu.admin("GET", "faults")).body == Faults().to_json()


# --- hooks ---------------------------------------------------------------------------------------------
async def test_hang_hook_applies_request_n_then_hangs_once(emu: Emu) -> None:
    await emu.write("sum", [rec()])  # before the hook: not counted
    assert (await emu.admin("POST", "hooks", {"after_request": 2, "action": "hang"})).status == 200
    assert (await emu.write("sum", [rec(value=10)])).status == 200
    assert (
        await emu.write("sum", [rec(value=1)], stream="x", key=None)
    ).status == 403  # not applied: not counted
    with pytest.raises(TimeoutError):
        await emu.write("sum", [rec(value=100)], timeout=HANG_TIMEOUT)
    assert emu.totals() == {cell("2024-05-01T10:00:00Z"): 111}
    assert (await emu.write("sum", [rec(value=1000)])).status == 200  # fired once
    log = (await emu.admin("GET", "requests")).body["requests"]
    assert [(e["seq"], e["hook"]) for e in log if e["hook"]] == [(4, True)]
    assert (await emu.admin("GET", "hooks")).body["hooks"][0]["fired_on"] == 4


async def test_hook_counts_only_its_op(emu: Emu) -> None:
    await emu.admin("POST", "hooks", [{"after_request": 1, "action": "fail503", "op": "replace"}])
    assert (await emu.write("sum", [rec(value=2)])).status == 200
    reply = await emu.write("replace", [rec(value=5)])
    assert_message(reply, 503, "unavailable")
    assert emu.totals() == {cell("2024-05-01T10:00:00Z"): 5}  # applied although answered 503


async def test_signal_hook_signals_the_pid_after_applying(emu: Emu) -> None:
    proc = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        hook = {"after_request": 1, "action": "signal", "pid": proc.pid, "signal": "SIGKILL", "op": "sum"}
        assert (await emu.admin("POST", "hooks", {"hooks": [hook]})).status == 200
        with pytest.raises(TimeoutError):
            await emu.write("sum", [rec(value=3)], timeout=HANG_TIMEOUT)
        assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGKILL
        assert emu.totals() == {cell("2024-05-01T10:00:00Z"): 3}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    "hook",
    [
        {"after_request": 0, "action": "hang"},
        {"after_request": 1, "action": "explode"},
        {"after_request": 1, "action": "signal"},
        {"after_request": 1, "action": "signal", "pid": 1, "signal": "SIGNOPE"},
        {"after_request": 1, "action": "hang", "op": "merge"},
        {"after_request": 1, "action": "hang", "extra": 1},
    ],
)
async def test_bad_hooks_are_refused(emu: Emu, hook: dict[str, Any]) -> None:
    assert (await emu.admin("POST", "hooks", hook)).status == 400


# --- admin ---------------------------------------------------------------------------------------------
async def test_admin_routes_are_off_by_default(make_emu: MakeEmu) -> None:
    emu = await make_emu(EmulatorConfig(keys=(KEY,)))
    assert (await emu.admin("GET", "totals")).status == 404


async def test_admin_totals_and_request_log(emu: Emu) -> None:
    await emu.write("sum", [rec(value="2.5", flt={"tag:env": ["prod"]})])
    await emu.write("sum", [rec(value=1)], stream="other")
    totals = (await emu.admin("GET", f"totals?stream={STREAM}")).body
    assert totals == {
        "streams": {
            STREAM: {
                "granularity": "HOURLY",
                "filter_keys": ["tag:env"],
                "deleted": False,
                "cells": [
                    {
                        "timestamp": "2024-05-01T10:00:00Z",
                        "element_name": "hooli",
                        "filter": {"tag:env": ["prod"]},
                        "value": "2.5",
                        "deleted": False,
                    }
                ],
            }
        }
    }
    assert set((await emu.admin("GET", "totals")).body["streams"]) == {STREAM, "other"}
    log = (await emu.admin("GET", "requests")).body["requests"]
    assert [(e["seq"], e["op"], e["stream"], e["records"], e["status"], e["hook"]) for e in log] == [
        (1, "sum", STREAM, 1, 200, False),
        (2, "sum", "other", 1, 200, False),
    ]
    assert log[0]["time"].endswith("Z")


async def test_admin_reset_clears_data_log_faults_hooks_and_buckets(make_emu: MakeEmu) -> None:
    emu = await make_emu(EmulatorConfig(keys=(KEY,), admin=True, rate=1, burst=1), clock=FakeClock(1000.0))
    await emu.write("sum", [rec()])
    await emu.admin("POST", "faults", {"error_429": 0.5})
    await emu.admin("POST", "hooks", {"after_request": 5, "action": "hang"})
    assert (await emu.admin("POST", "reset")).status == 200
    assert emu.totals() == {}
    assert (await emu.admin("GET", "requests")).body == {"requests": []}
    assert (await emu.admin("GET", "faults")).body == Faults().to_json()
    assert (await emu.admin("GET", "hooks")).body == {"hooks": []}
    assert (await emu.write("sum", [rec()])).status == 200  # a full bucket again


async def test_admin_keys_rotation(emu: Emu) -> None:
    reply = await emu.admin("POST", "keys", {"keys": [OTHER_KEY]})
    assert reply.body == {"keys": 1}  # a count, never the keys themselves
    assert_message(await emu.write("sum", [rec()]), 403, "forbidden")
    assert (await emu.write("sum", [rec()], key=OTHER_KEY)).status == 200
    assert (await emu.admin("POST", "keys", {"keys": "k"})).status == 400


async def test_keys_never_reach_logs_or_reprs(emu: Emu, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="allocd.emulator")
    await emu.write("sum", [rec()])
    await emu.write("sum", [rec()], key="leaked-wrong-key")
    assert "sum billing-stream records=1 status=200" in caplog.text
    assert KEY not in caplog.text
    assert "leaked-wrong-key" not in caplog.text
    assert KEY not in repr(emu.emulator.config)


# --- persistence and serving ---------------------------------------------------------------------------
async def test_totals_survive_a_restart_with_persistence(make_emu: MakeEmu, tmp_path: Path) -> None:
    config = EmulatorConfig(keys=(KEY,), persist_path=str(tmp_path / "emu.sqlite"))
    first = await make_emu(config)
    flt = {"tag:env": ["prod"]}
    await first.write("sum", [rec(value="1.25", flt=flt), rec(element="gone", flt=flt)])
    await first.write("delete", [drec(element_name="gone")])
    await first.write("sum", [rec(value=1)], stream="dropped")
    await first.request("DELETE", f"{API}/dropped")
    await first.server.close()

    second = await make_emu(config)
    assert second.totals() == {cell("2024-05-01T10:00:00Z", flt=flt): Decimal("1.25")}
    assert_message(await second.write("sum", [rec()]), 400, "filter_keys_differ")  # metadata survived
    assert (await second.write("sum", [rec(value="0.75", flt=flt)])).status == 200
    assert second.totals("dropped") == {}
    assert (await second.write("sum", [rec(element="gone", value=2, flt=flt)])).status == 200
    assert second.totals()[cell("2024-05-01T10:00:00Z", "gone", flt)] == 2  # deleted cell restarted at 0
    assert second.totals()[cell("2024-05-01T10:00:00Z", flt=flt)] == 2


async def test_serve_binds_port_0_and_stops_despite_a_hanging_request() -> None:
    runner = await serve(EmulatorConfig(keys=(KEY,), faults=Faults(hang=1.0)), "127.0.0.1", 0)
    try:
        port = bound_port(runner)
        assert port > 0
        url = f"http://127.0.0.1:{port}{API}/allocation/{STREAM}/sum"
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(
                session.post(url, data=orjson.dumps({"records": [rec()]}), headers={"Authorization": KEY})
            )
            emulator = get_emulator(runner.app)
            await wait_for(lambda: bool(emulator.totals(STREAM)))
            started = time.monotonic()
            await runner.cleanup()
            assert time.monotonic() - started < 2
            with pytest.raises(aiohttp.ClientConnectionError):
                await task
    finally:
        await runner.cleanup()


# --- command line --------------------------------------------------------------------------------------
def _args(*argv: str) -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_config_from_args_merges_env_keys_and_names_bad_options() -> None:
    config = config_from_args(_args("--key", "a", "--fault-503", "0.25", "--admin"), {KEYS_ENV: "b, c,"})
    assert config.keys == ("a", "b", "c")
    assert config.faults.error_503 == 0.25
    assert config.admin
    with pytest.raises(ConfigError, match="--fault-503"):
        config_from_args(_args("--key", "a", "--fault-503", "1.5"), {})
    with pytest.raises(ConfigError, match="--key"):
        config_from_args(_args(), {})


def test_main_without_a_key_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEYS_ENV, raising=False)
    assert main(["emulator", "--port", "0"]) == 2


async def test_cli_serves_until_sigterm_and_exits_0(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    env = {**os.environ, KEYS_ENV: f"{OTHER_KEY},{KEY}"}
    argv = ["-m", "allocd.cli", "emulator", "--port", "0", "--port-file", str(port_file), "--admin"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_for(lambda: port_file.exists() or proc.returncode is not None, timeout=20)
        assert proc.returncode is None
        base = f"http://127.0.0.1:{int(port_file.read_text())}"
        async with aiohttp.ClientSession() as session:
            body = orjson.dumps({"records": [rec(value=7)]})
            url = f"{base}{API}/allocation/{STREAM}/sum"
            async with session.post(url, data=body, headers={"Authorization": KEY}) as resp:
                assert resp.status == 200
            async with session.get(f"{base}/_admin/totals") as resp:
                assert (await resp.json())["streams"][STREAM]["cells"][0]["value"] == "7"
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0
        text = stderr.decode()
        assert f"sum {STREAM} records=1 status=200" in text
        assert KEY not in text
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- golden: CloudZero's own examples (tests/golden.py, from shared/reference/), byte for byte -----------
GOLDEN_CELL = cell(EXAMPLE_TIMESTAMP, EXAMPLE_ELEMENT, EXAMPLE_FILTER)


async def _golden(emu: Emu, op: str, body: str) -> Reply:
    path = f"{API}/allocation/{EXAMPLE_STREAM}/{op}"
    return await emu.request("POST", path, data=body.encode(), key=KEY)


async def test_golden_sum_example_is_accepted_and_reads_back(emu: Emu) -> None:
    reply = await _golden(emu, "sum", SUM_EXAMPLE)
    assert (reply.status, reply.body) == (200, {"message": "Telemetry accepted"})
    assert emu.totals(EXAMPLE_STREAM) == {GOLDEN_CELL: Decimal(250000000)}
    read = await emu.request("GET", f"{API}/{EXAMPLE_STREAM}/records")
    assert read.body["records"][0]["value"] == "250000000"


async def test_golden_replace_example_sets_the_value(emu: Emu) -> None:
    assert (await _golden(emu, "sum", SUM_EXAMPLE)).status == 200
    assert (await _golden(emu, "replace", REPLACE_EXAMPLE)).status == 200
    assert emu.totals(EXAMPLE_STREAM) == {GOLDEN_CELL: Decimal(150000000)}


async def test_golden_delete_example_hides_the_record(emu: Emu) -> None:
    assert (await _golden(emu, "sum", SUM_EXAMPLE)).status == 200
    assert (await _golden(emu, "delete", DELETE_EXAMPLE)).status == 201
    assert emu.totals(EXAMPLE_STREAM) == {}
    read = await emu.request("GET", f"{API}/{EXAMPLE_STREAM}/records")
    assert read.body == {"records": []}
