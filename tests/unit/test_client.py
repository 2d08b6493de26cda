"""The API client against small hand-written aiohttp servers whose answers each test scripts exactly."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.test_utils import TestServer

from allocd.cloudzero import send as send_command
from allocd.cloudzero.apikey import ApiKey
from allocd.cloudzero.client import (
    ClientObserver,
    CloudZeroClient,
    RequestOutcome,
    _classify,
    _failure,
    pack,
    parse_retry_after,
)
from allocd.cloudzero.ratelimit import RateLimiter
from allocd.cloudzero.records import MESSAGES, Op, RecordError, encode_body
from allocd.config import ApiSettings
from allocd.errors import AuthError, ConfigError, TransientError
from tests.api_client import client_settings

from .fakes import FakeClock

SECRET = "cz-SECRET-0b5e7d"
PATH = "/unit-cost/v1/telemetry/allocation/{stream}/{op}"


def rec(i: int, element: str | None = None, pad: int = 0) -> dict[str, Any]:
    return {
        "timestamp": "2024-03-01T10:00:00Z",
        "granularity": "HOURLY",
        "element_name": element or f"customer-{i}",
        "filter": {"custom:feature": ["billing" + "x" * pad]},
        "value": str(i + 1),
    }


# --- a scriptable server ---------------------------------------------------------------------------------
Respond = Callable[["FakeApi", web.Request, list[dict[str, Any]]], Awaitable[web.StreamResponse]]


@dataclass
class FakeApi:
    respond: Respond
    url: str = ""
    seen: list[list[dict[str, Any]]] = field(default_factory=list)  # the records of every request
    headers: list[dict[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    applied: list[dict[str, Any]] = field(default_factory=list)  # what a 2xx (or a scripted apply) kept
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # set at teardown to free hung handlers

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        records = orjson.loads(body)["records"]
        self.seen.append(records)
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        self.paths.append(request.path)
        self.arrived.set()
        response = await self.respond(self, request, records)
        if 200 <= response.status < 300:
            self.applied.extend(records)
        return response

    async def hang(self) -> None:
        """Hold the answer until the test ends (bounded, so nothing outlives a broken test)."""
        try:
            await asyncio.wait_for(self.release.wait(), 10)
        except TimeoutError:
            pass


@asynccontextmanager
async def serve(respond: Respond) -> AsyncIterator[FakeApi]:
    api = FakeApi(respond)
    app = web.Application()
    app.router.add_post(PATH, api.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    api.url = str(server.make_url("")).rstrip("/")
    try:
        yield api
    finally:
        api.release.set()
        await server.close()


def answer(status: int, message: str = "", headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"message": message or f"status {status}"}, status=status, headers=headers)


def statuses(*codes: int, headers: dict[str, str] | None = None) -> Respond:
    """Answer each request with the next code, then 200 forever."""
    queue = list(codes)

    async def respond(api: FakeApi, request: web.Request, records: list[dict[str, Any]]) -> web.Response:
        if queue:
            return answer(queue.pop(0), headers=headers)
        return answer(200, MESSAGES["accepted"])

    return respond


def reject_if(
    bad: Callable[[dict[str, Any]], bool], status: int = 400, message: str = "bad record"
) -> Respond:
    """Refuse the whole request when any record is bad (the emulator's behaviour), accept it otherwise."""

    async def respond(api: FakeApi, request: web.Request, records: list[dict[str, Any]]) -> web.Response:
        if any(bad(r) for r in records):
            return answer(status, message)
        return answer(200, MESSAGES["accepted"])

    return respond


# --- fakes for time and metrics ----------------------------------------------------------------------
def fake_clock() -> FakeClock:
    return FakeClock(1000.0)


class MaxRandom(random.Random):
    """Full jitter always drawing the top of its range, so the ceiling sequence is visible."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Recorder(ClientObserver):
    def __init__(self) -> None:
        self.requests: list[tuple[str, int | None, int]] = []
        self.retries: list[str] = []
        self.in_doubt: list[int] = []
        self.rejected: list[int] = []
        self.rate_waits: list[float] = []

    def on_request(self, op: str, status: int | None, records: int, seconds: float) -> None:
        self.requests.append((op, status, records))

    def on_retry(self, op: str, reason: str) -> None:
        self.retries.append(reason)

    def on_in_doubt(self, op: str, records: int) -> None:
        self.in_doubt.append(records)

    def on_rejected(self, op: str, records: int) -> None:
        self.rejected.append(records)

    def on_rate_wait(self, seconds: float) -> None:
        self.rate_waits.append(seconds)


def make_client(
    url: str, clock: FakeClock | None = None, *, observer: ClientObserver | None = None, **config: Any
) -> CloudZeroClient:
    clock = clock or fake_clock()
    config.setdefault("records_per_second", 1e9)
    return CloudZeroClient(
        key=ApiKey.from_value(SECRET),
        **client_settings(base_url=url, **config),
        observer=observer,
        rng=random.Random(7),
        sleep=clock.sleep,
        clock=clock,
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- packing -------------------------------------------------------------------------------------------
def test_pack_by_count() -> None:
    records = [rec(i) for i in range(7)]
    batches = pack(records, max_records=3)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [r for b in batches for r in b] == records


def test_pack_by_bytes_measures_the_encoded_body_exactly() -> None:
    rng = random.Random(3)
    records = [rec(i, pad=rng.randrange(0, 300)) for i in range(200)]
    limit = 2000
    batches = pack(records, max_records=3000, max_body_bytes=limit)
    assert [r for b in batches for r in b] == records
    for i, batch in enumerate(batches):
        assert len(encode_body(batch)) <= limit
        if i + 1 < len(batches):  # greedy: the next record would not have fitted
            assert len(encode_body([*batch, batches[i + 1][0]])) > limit


def test_pack_allows_a_body_of_exactly_the_limit() -> None:
    records = [rec(i) for i in range(4)]
    exact = len(encode_body(records[:2]))
    assert [len(b) for b in pack(records, max_body_bytes=exact)] == [2, 2]
    assert [len(b) for b in pack(records, max_body_bytes=exact - 1)] == [1, 1, 1, 1]


def test_pack_refuses_a_record_larger_than_the_body_limit() -> None:
    records = [rec(0), rec(1, pad=500), rec(2)]
    with pytest.raises(RecordError) as err:
        pack(records, max_body_bytes=300)
    assert err.value.index == 1
    assert err.value.rule == "body_too_large"
    assert "record 1" in str(err.value)


def test_pack_nothing() -> None:
    assert pack([]) == []


def test_client_pack_uses_its_config() -> None:
    client = make_client("http://127.0.0.1:1", records_per_request=2)
    assert [len(b) for b in client.pack([rec(i) for i in range(5)])] == [2, 2, 1]


# --- the happy path ------------------------------------------------------------------------------------
async def test_sends_the_documented_request() -> None:
    async with serve(statuses()) as api:
        records = [rec(i) for i in range(3)]
        async with make_client(api.url, user_agent="allocd/test") as client:
            out = await client.send_request("my-stream", Op.SUM, records)
    assert out == RequestOutcome(delivered=[0, 1, 2], rejected=[], in_doubt=0, interrupted=False, attempts=1)
    assert out.settled
    assert api.paths == ["/unit-cost/v1/telemetry/allocation/my-stream/sum"]
    assert api.bodies == [encode_body(records)]
    assert api.headers[0]["Authorization"] == SECRET  # the raw key, no "Bearer " [doc]
    assert api.headers[0]["Content-Type"] == "application/json"
    assert api.headers[0]["User-Agent"] == "allocd/test"


async def test_delete_accepts_201() -> None:
    async def created(api: FakeApi, request: web.Request, records: list[dict[str, Any]]) -> web.Response:
        return answer(201)

    records = [{"timestamp": "2024-03-01T10:00:00Z", "granularity": "HOURLY"}]
    async with serve(created) as api, make_client(api.url) as client:
        out = await client.send("s", Op.DELETE, records)
    assert out.delivered == [0]
    assert api.paths == ["/unit-cost/v1/telemetry/allocation/s/delete"]


# --- retries -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "in_doubt"), [(408, 0), (429, 0), (500, 0), (502, 1), (503, 0), (504, 1)])
async def test_retryable_statuses_are_retried(status: int, in_doubt: int) -> None:
    observer = Recorder()
    async with serve(statuses(status, status)) as api, make_client(api.url, observer=observer) as client:
        out = await client.send_request("s", Op.SUM, [rec(0), rec(1)])
    assert len(api.seen) == 3
    assert out.delivered == [0, 1]
    assert out.attempts == 3
    assert out.in_doubt == 2 * in_doubt
    assert observer.retries == [str(status), str(status)]
    assert observer.in_doubt == [2] * (2 * in_doubt)
    assert [s for _, s, _ in observer.requests] == [status, status, 200]


@pytest.mark.parametrize("status", [400, 413])
async def test_400_and_413_are_not_retried(status: int) -> None:
    async with serve(statuses(status)) as api, make_client(api.url) as client:
        out = await client.send_request("s", Op.SUM, [rec(0)])
    assert len(api.seen) == 1
    assert out.rejected == [(0, f"status {status}")]
    assert out.delivered == []
    assert out.settled


async def test_403_raises_auth_error_without_the_key() -> None:
    async with serve(statuses(403)) as api, make_client(api.url) as client:
        with pytest.raises(AuthError) as err:
            await client.send_request("s", Op.SUM, [rec(0)])
    assert len(api.seen) == 1
    assert err.value.status == 403
    assert "value" in str(err.value)  # names the source ("value"), and the server's message
    assert SECRET not in str(err.value) and SECRET not in repr(err.value)


async def test_404_to_a_delete_rejects_the_request_without_retry() -> None:
    async with serve(statuses(404)) as api, make_client(api.url) as client:
        out = await client.send_request("s", Op.DELETE, [rec(0), rec(1)])
    assert len(api.seen) == 1
    assert out.rejected == [(0, "status 404"), (1, "status 404")]


@pytest.mark.parametrize("status", [301, 404, 405, 409])
async def test_unexpected_statuses_never_refuse_data_for_good(status: int) -> None:
    """A redirect or a 404 to sum means a wrong URL, not bad records: retried as a clean failure."""
    observer = Recorder()
    headers = {"Location": "http://127.0.0.1:1/elsewhere"} if status == 301 else None
    async with serve(statuses(status, headers=headers)) as api:
        async with make_client(api.url, observer=observer) as client:
            out = await client.send_request("s", Op.SUM, [rec(0)])
    assert len(api.seen) == 2  # the redirect was not followed
    assert out.delivered == [0] and out.rejected == [] and out.in_doubt == 0
    assert observer.retries == [str(status)]


async def test_422_bisects_like_400() -> None:
    respond = reject_if(lambda r: r["element_name"] == "bad", status=422)
    async with serve(respond) as api, make_client(api.url) as client:
        out = await client.send_request("s", Op.SUM, [rec(0), rec(1, element="bad")])
    assert out.delivered == [0] and out.rejected == [(1, "bad record")]
    assert len(api.seen) == 3


async def test_connection_refused_is_a_clean_failure_retried_to_the_deadline() -> None:
    observer = Recorder()
    clock = fake_clock()
    url = f"http://127.0.0.1:{closed_port()}"
    async with make_client(url, clock, observer=observer, retry_deadline=20.0) as client:
        with pytest.raises(TransientError) as err:
            await client.send_request("s", Op.SUM, [rec(0)])
    assert err.value.status is None
    assert "connect" in str(err.value)
    assert len(observer.requests) >= 3
    assert observer.in_doubt == []
    assert sum(clock.sleeps) <= 20.0


async def test_retry_after_is_the_minimum_wait() -> None:
    clock = fake_clock()
    async with serve(statuses(429, 503, headers={"Retry-After": "7"})) as api:
        async with make_client(api.url, clock) as client:
            out = await client.send_request("s", Op.SUM, [rec(0)])
    assert out.delivered == [0]
    assert clock.sleeps == [7.0, 7.0]  # jitter (< 1 s here) is below the server's 7 s


def test_parse_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("soon") is None
    now = 784111777.0 - 30  # 30 s before Sun, 06 Nov 1994 08:49:37 GMT
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now=lambda: now) == pytest.approx(30.0)


async def test_full_jitter_ceiling_doubles_up_to_the_cap() -> None:
    clock = fake_clock()
    async with serve(statuses(*([503] * 9))) as api:
        client = CloudZeroClient(
            key=ApiKey.from_value(SECRET),
            **client_settings(base_url=api.url, records_per_second=1e9, backoff_base=0.5, backoff_cap=30.0),
            rng=MaxRandom(),
            sleep=clock.sleep,
            clock=clock,
        )
        async with client:
            out = await client.send_request("s", Op.SUM, [rec(0)])
    assert out.delivered == [0]
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


async def test_full_jitter_stays_within_bounds() -> None:
    clock = fake_clock()
    async with (
        serve(statuses(*([503] * 12))) as api,
        make_client(api.url, clock, retry_deadline=1e6) as client,
    ):
        await client.send_request("s", Op.SUM, [rec(0)])
    ceilings = [min(30.0, 0.5 * 2**k) for k in range(12)]
    assert len(clock.sleeps) == 12
    assert all(0.0 <= wait <= top for wait, top in zip(clock.sleeps, ceilings, strict=True))
    assert len(set(clock.sleeps)) == 12  # random, not a fixed schedule


async def test_deadline_raises_transient_error_with_the_last_status() -> None:
    clock = fake_clock()

    async def always_503(api: FakeApi, request: web.Request, records: list[dict[str, Any]]) -> web.Response:
        return answer(503, headers={"Retry-After": "4"})

    async with serve(always_503) as api, make_client(api.url, clock, retry_deadline=60.0) as client:
        with pytest.raises(TransientError) as err:
            await client.send_request("s", Op.SUM, [rec(0)])
    assert err.value.status == 503
    assert err.value.retry_after == 4.0
    assert sum(clock.sleeps) <= 60.0
    assert len(api.seen) == len(clock.sleeps) + 1
    assert len(api.seen) >= 4


async def test_deadline_after_partial_delivery_returns_the_outcome() -> None:
    """Bisection delivered half; the other half keeps failing: the acknowledgement must not be lost."""

    async def respond(api: FakeApi, request: web.Request, records: list[dict[str, Any]]) -> web.Response:
        if len(records) == 4:
            return answer(400, "bad record")
        if records[0]["element_name"] == "customer-0":
            return answer(200)
        return answer(503)

    clock = fake_clock()
    async with serve(respond) as api, make_client(api.url, clock, retry_deadline=30.0) as client:
        out = await client.send_request("s", Op.SUM, [rec(i) for i in range(4)])
    assert out.delivered == [0, 1]
    assert out.pending == [2, 3]
    assert out.interrupted and not out.settled
    assert isinstance(out.error, TransientError) and out.error.status == 503


# --- bisection -----------------------------------------------------------------------------------------
async def test_bisection_isolates_exactly_the_bad_records() -> None:
    bad = {3, 11, 12}
    records = [rec(i, element=f"bad-{i}" if i in bad else None) for i in range(20)]
    respond = reject_if(lambda r: r["element_name"].startswith("bad"), message="Invalid Schema: bad element")
    observer = Recorder()
    async with serve(respond) as api, make_client(api.url, observer=observer) as client:
        out = await client.send_request("s", Op.SUM, records)
    assert out.rejected == [(i, "Invalid Schema: bad element") for i in sorted(bad)]
    assert sum(observer.rejected) == len(bad)  # not every record of every 400'd attempt
    assert out.delivered == [i for i in range(20) if i not in bad]
    assert out.settled
    # Every good record applied exactly once, no bad one at all.
    assert sorted(r["element_name"] for r in api.applied) == sorted(
        r["element_name"] for i, r in enumerate(records) if i not in bad
    )
    assert out.attempts == len(api.seen)


async def test_413_bisects_and_rejects_a_single_record_still_too_large() -> None:
    records = [rec(i) for i in range(6)]
    records[4] = rec(4, pad=400)

    async def respond(api: FakeApi, request: web.Request, records: list[dict[str, Any]]) -> web.Response:
        if len(encode_body(records)) > 500:
            return answer(413, "Request body too large")
        return answer(200)

    async with serve(respond) as api, make_client(api.url) as client:
        out = await client.send_request("s", Op.SUM, records)
    assert out.rejected == [(4, "Request body too large")]
    assert out.delivered == [0, 1, 2, 3, 5]
    assert len(api.applied) == 5


async def test_send_validates_and_maps_indexes_across_requests() -> None:
    records = [rec(i) for i in range(7)]
    records[5] = rec(5, element="bad")
    respond = reject_if(lambda r: r["element_name"] == "bad")
    async with serve(respond) as api, make_client(api.url, records_per_request=3) as client:
        out = await client.send("s", Op.SUM, records)
    assert out.delivered == [0, 1, 2, 3, 4, 6]
    assert out.rejected == [(5, "bad record")]
    assert out.settled
    assert [len(r) for r in api.seen[:2]] == [3, 3]


async def test_send_refuses_an_invalid_record_naming_its_index_and_rule() -> None:
    records = [rec(0), rec(1), {**rec(2), "value": "-4"}]
    async with serve(statuses()) as api, make_client(api.url) as client:
        with pytest.raises(RecordError) as err:
            await client.send("s", Op.SUM, records)
    assert err.value.index == 2
    assert err.value.rule == "invalid_value"
    assert str(err.value).startswith("record 2: ")
    assert api.seen == []


# --- doubt -------------------------------------------------------------------------------------------
async def test_timeout_after_the_server_applied_is_in_doubt() -> None:
    async def apply_then_hang_once(
        api: FakeApi, request: web.Request, records: list[dict[str, Any]]
    ) -> web.Response:
        if len(api.seen) == 1:
            api.applied.extend(records)  # the server applied it; the answer never comes in time
            await api.hang()
        return answer(200)

    observer = Recorder()
    async with serve(apply_then_hang_once) as api:
        async with make_client(api.url, observer=observer, request_timeout=0.3) as client:
            out = await client.send_request("s", Op.SUM, [rec(0), rec(1)])
    assert out.delivered == [0, 1]
    assert out.in_doubt == 1
    assert observer.in_doubt == [2]
    assert observer.retries == ["timeout"]
    assert len(api.applied) == 4  # sum is at-least-once: the doubt was real, and it was reported


async def test_reset_after_reading_the_body_is_in_doubt() -> None:
    async def apply_then_reset_once(
        api: FakeApi, request: web.Request, records: list[dict[str, Any]]
    ) -> web.Response:
        if len(api.seen) == 1:
            api.applied.extend(records)
            assert request.transport is not None
            request.transport.close()
            await api.hang()
        return answer(200)

    observer = Recorder()
    async with serve(apply_then_reset_once) as api, make_client(api.url, observer=observer) as client:
        out = await client.send_request("s", Op.SUM, [rec(0)])
    assert out.delivered == [0]
    assert out.in_doubt == 1
    assert observer.retries == ["disconnected"]


async def test_refused_then_up_is_a_clean_delivery() -> None:
    """Connection refused sent nothing: once the server is up the request goes through, never in doubt."""
    port = closed_port()
    api = FakeApi(statuses())
    app = web.Application()
    app.router.add_post(PATH, api.handle)
    server = TestServer(app, host="127.0.0.1", port=port)
    clock = fake_clock()

    async def start_server_then_sleep(seconds: float) -> None:
        if server.runner is None:
            await server.start_server()
        await clock.sleep(seconds)

    observer = Recorder()
    client = make_client(f"http://127.0.0.1:{port}", clock, observer=observer)
    client._sleep = start_server_then_sleep
    try:
        async with client:
            out = await client.send_request("s", Op.SUM, [rec(0)])
    finally:
        await server.close()
    assert observer.retries == ["connect"]
    assert observer.in_doubt == [] and out.in_doubt == 0
    assert out.delivered == [0] and out.attempts == 2
    assert len(api.seen) == 1


# --- stop ----------------------------------------------------------------------------------------------
async def test_stop_interrupts_a_backoff_at_once() -> None:
    async def slow_down(api: FakeApi, request: web.Request, records: list[dict[str, Any]]) -> web.Response:
        return answer(429, headers={"Retry-After": "100"})

    stop = asyncio.Event()
    async with serve(slow_down) as api:
        client = CloudZeroClient(
            ApiSettings(base_url=api.url, records_per_second=1e9), ApiKey.from_value(SECRET)
        )  # the real asyncio.sleep: the 100 s backoff must be cut short by the event
        async with client:
            task = asyncio.create_task(client.send_request("s", Op.SUM, [rec(0), rec(1)], stop))
            await asyncio.wait_for(api.arrived.wait(), 5)
            started = time.monotonic()
            stop.set()
            out = await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 2.0
    assert out.interrupted and not out.settled
    assert out.pending == [0, 1] and out.delivered == []
    assert out.attempts == 1 and len(api.seen) == 1


async def test_stop_lets_the_request_in_flight_finish() -> None:
    gate = asyncio.Event()

    async def held(api: FakeApi, request: web.Request, records: list[dict[str, Any]]) -> web.Response:
        await asyncio.wait_for(gate.wait(), 10)
        return answer(200)

    stop = asyncio.Event()
    async with serve(held) as api, make_client(api.url) as client:
        task = asyncio.create_task(client.send_request("s", Op.SUM, [rec(0)], stop))
        await asyncio.wait_for(api.arrived.wait(), 5)
        stop.set()
        await asyncio.sleep(0)
        assert not task.done()
        gate.set()
        out = await asyncio.wait_for(task, 5)
    assert out.delivered == [0]
    assert not out.interrupted and out.settled


async def test_stop_during_bisection_leaves_the_halves_pending() -> None:
    stop = asyncio.Event()

    async def refuse_and_stop(
        api: FakeApi, request: web.Request, records: list[dict[str, Any]]
    ) -> web.Response:
        stop.set()
        return answer(400, "bad record")

    async with serve(refuse_and_stop) as api, make_client(api.url) as client:
        out = await client.send_request("s", Op.SUM, [rec(i) for i in range(4)], stop)
    assert len(api.seen) == 1
    assert out.interrupted and out.pending == [0, 1, 2, 3]


async def test_send_stops_between_requests() -> None:
    stop = asyncio.Event()

    async def ok_then_stop(api: FakeApi, request: web.Request, records: list[dict[str, Any]]) -> web.Response:
        stop.set()
        return answer(200)

    async with serve(ok_then_stop) as api, make_client(api.url, records_per_request=2) as client:
        out = await client.send("s", Op.SUM, [rec(i) for i in range(5)], stop)
    assert out.delivered == [0, 1]
    assert out.pending == [2, 3, 4]
    assert out.interrupted
    assert len(api.seen) == 1


async def test_send_keeps_earlier_deliveries_when_a_later_request_fails_with_403() -> None:
    async def second_forbidden(
        api: FakeApi, request: web.Request, records: list[dict[str, Any]]
    ) -> web.Response:
        return answer(200) if len(api.seen) == 1 else answer(403, MESSAGES["forbidden"])

    async with serve(second_forbidden) as api, make_client(api.url, records_per_request=2) as client:
        out = await client.send("s", Op.SUM, [rec(i) for i in range(5)])
    assert out.delivered == [0, 1]
    assert out.pending == [2, 3, 4]
    assert isinstance(out.error, AuthError)


# --- pacing --------------------------------------------------------------------------------------------
async def test_every_attempt_is_paced_by_the_shared_limiter() -> None:
    clock = fake_clock()
    start = clock.now
    limiter = RateLimiter(10.0, 10.0, clock=clock, sleep=clock.sleep)
    observer = Recorder()
    arrivals: list[tuple[float, int]] = []
    first = statuses(503)

    async def respond(api: FakeApi, request: web.Request, records: list[dict[str, Any]]) -> web.Response:
        arrivals.append((clock.now, len(records)))
        return await first(api, request, records)

    async with serve(respond) as api:
        client = CloudZeroClient(
            ApiSettings(base_url=api.url),
            ApiKey.from_value(SECRET),
            observer=observer,
            limiter=limiter,
            rng=MaxRandom(),
            sleep=clock.sleep,
            clock=clock,
        )
        async with client:
            await asyncio.gather(*(client.send_request("s", Op.SUM, [rec(0)] * 10) for _ in range(3)))
    # Four attempts of 10 records (one retried), each paid for: never more than burst + rate x elapsed.
    assert len(arrivals) == 4
    sent = 0
    for at, records in arrivals:
        sent += records
        assert sent <= 10 + 10.0 * (at - start) + 1e-6
    assert clock.now - start >= 3.0 - 1e-6
    assert len(observer.rate_waits) == 4 and max(observer.rate_waits) > 0


# --- secrets -------------------------------------------------------------------------------------------
async def test_the_key_never_appears_in_logs_reprs_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []

    async def mixed(api: FakeApi, request: web.Request, records: list[dict[str, Any]]) -> web.Response:
        n = len(api.seen)
        if n == 1:
            return answer(503)
        if n == 2:
            await api.hang()
        if n == 3:
            assert request.transport is not None
            request.transport.close()
            await api.hang()
        if n >= 7:  # the second request: the key was revoked
            return answer(403, MESSAGES["forbidden"])
        if any(r["element_name"] == "bad" for r in records):
            return answer(400, "bad record")
        return answer(200)

    async with serve(mixed) as api:
        async with make_client(api.url, request_timeout=0.3) as client:
            out = await client.send_request("s", Op.SUM, [rec(0), rec(1, element="bad")])
            try:
                await client.send_request("s", Op.SUM, [rec(0)] * 7)
            except AuthError as exc:
                errors.append(exc)
            with pytest.raises(TransientError) as refused:
                async with make_client(f"http://127.0.0.1:{closed_port()}", retry_deadline=5) as other:
                    await other.send_request("s", Op.SUM, [rec(0)])
            errors.append(refused.value)
            shown = [repr(client), str(client), repr(out), repr(client.settings), repr(client.tuning)]
    assert out.in_doubt == 2 and out.rejected == [(1, "bad record")]
    assert len(errors) == 2
    assert caplog.records, "the run should have logged"
    texts = [caplog.text, *shown, *(str(e) for e in errors), *(repr(e) for e in errors)]
    texts += [repr(vars(r)) for r in caplog.records]
    assert all(SECRET not in text for text in texts)
    assert any(getattr(r, "stream", None) == "s" and hasattr(r, "attempt") for r in caplog.records)


# --- the classification table ---------------------------------------------------------------------------
_CONN = ConnectionKey("127.0.0.1", 1, False, True, None, None, None, None)


@pytest.mark.parametrize(
    ("exc", "reason", "in_doubt"),
    [
        (aiohttp.ConnectionTimeoutError(), "connect_timeout", False),
        (aiohttp.ClientConnectorError(_CONN, ConnectionRefusedError(111, "refused")), "connect", False),
        (aiohttp.ClientConnectorDNSError(_CONN, OSError(-2, "no name")), "connect", False),
        (aiohttp.SocketTimeoutError(), "timeout", True),
        (TimeoutError(), "timeout", True),
        (aiohttp.ServerDisconnectedError(), "disconnected", True),
        (aiohttp.ClientOSError(104, "reset by peer"), "disconnected", True),
        (aiohttp.ClientPayloadError("truncated"), "disconnected", True),
    ],
)
def test_every_transport_failure_is_mapped(exc: BaseException, reason: str, in_doubt: bool) -> None:
    attempt = _failure(exc)
    assert attempt.reason == reason
    assert attempt.in_doubt is in_doubt
    assert attempt.status is None


@pytest.mark.parametrize(
    ("op", "status", "verdict", "in_doubt"),
    [
        (Op.SUM, 200, "ok", False),
        (Op.DELETE, 201, "ok", False),
        (Op.SUM, 400, "bisect", False),
        (Op.SUM, 413, "bisect", False),
        (Op.SUM, 401, "auth", False),
        (Op.SUM, 403, "auth", False),
        (Op.DELETE, 404, "reject", False),
        (Op.SUM, 404, "retry", False),
        (Op.SUM, 408, "retry", False),
        (Op.SUM, 429, "retry", False),
        (Op.SUM, 500, "retry", False),
        (Op.SUM, 503, "retry", False),
        (Op.SUM, 502, "retry", True),
        (Op.SUM, 504, "retry", True),
        (Op.SUM, 507, "retry", True),
    ],
)
def test_every_status_is_mapped(op: Op, status: int, verdict: str, in_doubt: bool) -> None:
    attempt = _classify(op, status, "m", None)
    assert attempt.verdict.value == verdict
    assert attempt.in_doubt is in_doubt


# --- the send command's pieces ---------------------------------------------------------------------
def test_load_records_forms() -> None:
    records = [rec(0), rec(1)]
    assert send_command.load_records(orjson.dumps(records)) == records
    assert send_command.load_records(orjson.dumps({"records": records})) == records
    assert send_command.load_records(b"\n".join(orjson.dumps(r) for r in records) + b"\n\n") == records
    assert send_command.load_records(orjson.dumps(records[0])) == records[:1]


@pytest.mark.parametrize(("text", "problem"), [(b'{"a": 1}\nnot json', "line 2"), (b"[1, 2]", "expected")])
def test_load_records_errors_name_the_place(text: bytes, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        send_command.load_records(text)


def test_summary_line() -> None:
    out = RequestOutcome(delivered=[0, 2], rejected=[(1, "bad"), (3, "bad")], in_doubt=1)
    assert send_command.summarize(4, out) == (
        "2/4 delivered, 2 rejected (records 1, 3: bad), "
        "1 in doubt (attempts the API may have applied; a sum may count twice)"
    )
    stopped = RequestOutcome(delivered=[0], interrupted=True, pending=[1, 2])
    assert send_command.summarize(3, stopped) == "1/3 delivered, 2 not sent (interrupted)"


# --- config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("base_url", "api.cloudzero.com"),
        ("base_url", "http://"),
        ("records_per_request", 0),
        ("request_timeout", -1),
        ("burst", 0.5),
    ],
)
def test_config_errors_name_the_field(field_name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        ApiSettings(**{field_name: value}).validate("api.")
    assert err.value.key == f"api.{field_name}"


def test_default_burst_is_one_full_request() -> None:
    assert ApiSettings().effective_burst == 3000.0
    assert ApiSettings(burst=50).effective_burst == 50.0
