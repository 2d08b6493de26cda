"""The fault proxy and the emulator's answered/unanswered evidence; the broker advertised behind a proxy."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from allocd.cloudzero.emulator import EmulatorConfig, Faults, get_emulator
from allocd.embedded import EmbeddedBroker, consume_all, create_topics, produce

from .emulator import RecordingEmulator, serve_recording
from .proxy import FaultProxy, HttpFramer, LinkRegistry, kafka_client_id


def kafka_header(client_id: bytes) -> bytes:
    body = struct.pack(">hhih", 18, 3, 7, len(client_id)) + client_id + b"\x00rest"
    return struct.pack(">i", len(body)) + body


def test_kafka_client_id_waits_for_the_whole_header() -> None:
    raw = kafka_header(b"allocd-a")
    assert kafka_client_id(raw[:15]) is None
    assert kafka_client_id(raw) == "allocd-a"
    assert kafka_client_id(struct.pack(">ihhih", 10, 18, 3, 7, -1)) == ""


def test_http_framer_splits_whole_messages() -> None:
    framer = HttpFramer()
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    stream = first + chunked + b"HTTP/1.1 204 No Content\r\n\r\n"
    out = framer.feed(stream[:20]) + framer.feed(stream[20:60]) + framer.feed(stream[60:])
    assert out == [first, chunked, b"HTTP/1.1 204 No Content\r\n\r\n"]
    assert not framer.unframed
    framer.feed(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    assert framer.unframed and framer.rest().endswith(b"until the end")


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def roundtrip(port: int, data: bytes, timeout: float = 2.0) -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(data)
        got = b""
        async with asyncio.timeout(timeout):
            while len(got) < len(data):
                chunk = await reader.read(4096)
                if not chunk:
                    break
                got += chunk
        return got, time.monotonic() - started
    except (ConnectionError, TimeoutError):
        return b"", time.monotonic() - started
    finally:
        writer.close()


async def test_proxy_forwards_and_delays_under_latency_and_stalls(echo: int) -> None:
    proxy = FaultProxy("p", ("127.0.0.1", echo))
    port = await proxy.start()
    try:
        assert (await roundtrip(port, b"ping"))[0] == b"ping"
        proxy.latency("", 0.2, duration=5)
        got, seconds = await roundtrip(port, b"slow")
        assert got == b"slow" and seconds >= 0.4  # both directions
        proxy.clear()
        proxy.hold("", 0.5, kill_at_end=False)
        got, seconds = await roundtrip(port, b"held")
        assert got == b"held" and seconds >= 0.45
    finally:
        await proxy.stop()


async def test_black_hole_forwards_nothing_and_kills_at_its_end(echo: int) -> None:
    proxy = FaultProxy("p", ("127.0.0.1", echo), rst=True)
    port = await proxy.start()
    try:
        proxy.hold("", 0.4, kill_at_end=True)
        got, seconds = await roundtrip(port, b"lost", timeout=3)
        assert got == b"" and 0.35 <= seconds < 3
        assert (await roundtrip(port, b"after"))[0] == b"after"  # the hole is over
    finally:
        await proxy.stop()


async def test_faults_hit_only_their_target_and_never_the_unfaultable(echo: int) -> None:
    proxy = FaultProxy(
        "kafka",
        ("127.0.0.1", echo),
        tagger=kafka_client_id,
        faultable=lambda tag: tag.startswith("allocd-"),
    )
    port = await proxy.start()
    conns = {}
    try:
        for cid in (b"allocd-a", b"allocd-b", b"chaos-producer"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(kafka_header(cid))
            await reader.readexactly(len(kafka_header(cid)))
            conns[cid] = (reader, writer)
        assert sorted(link.tag or "" for link in proxy.links()) == ["allocd-a", "allocd-b", "chaos-producer"]
        assert proxy.reset("allocd-a") == 1
        assert proxy.reset("") == 1  # allocd-b; the producer is not faultable
        assert [link.tag for link in proxy.links()] == ["chaos-producer"]
        with pytest.raises(ConnectionResetError):  # an RST, as a cut network link
            await asyncio.wait_for(conns[b"allocd-a"][0].read(10), 2)
    finally:
        for _, writer in conns.values():
            writer.close()
        await proxy.stop()


@pytest.fixture
async def api() -> AsyncIterator[tuple[RecordingEmulator, FaultProxy]]:
    registry = LinkRegistry()
    runner, port = await serve_recording(EmulatorConfig(keys=("k",), admin=True), registry)
    proxy = FaultProxy("api", ("127.0.0.1", port), frame_responses=True, rst=False, registry=registry)
    await proxy.start()
    emulator = get_emulator(runner.app)
    assert isinstance(emulator, RecordingEmulator)
    try:
        yield emulator, proxy
    finally:
        await proxy.stop()
        await runner.cleanup()


async def poll(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


RECORD = {"timestamp": "2026-01-01T10:00:00Z", "granularity": "HOURLY", "element_name": "e", "value": "2"}


async def post(proxy: FaultProxy, timeout: float = 3.0) -> int | None:
    url = f"http://{proxy.address}/unit-cost/v1/telemetry/allocation/s/sum"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        try:
            async with session.post(url, json={"records": [RECORD]}, headers={"Authorization": "k"}) as r:
                await r.read()
                return r.status
        except (aiohttp.ClientError, TimeoutError):
            return None


async def test_emulator_knows_which_applied_requests_were_answered(
    api: tuple[RecordingEmulator, FaultProxy],
) -> None:
    emulator, proxy = api
    assert await post(proxy) == 200
    emulator.set_faults(Faults(hang=1.0))
    assert await post(proxy, timeout=0.5) is None  # applied, never answered
    emulator.set_faults(Faults())
    proxy.latency("", 0.5, duration=10)  # each way: time to cut the answer after the write was applied
    sending = asyncio.create_task(post(proxy))
    await poll(lambda: len(emulator.requests) == 3 and emulator.requests[-1].applied)
    proxy.hold("", 0.2, kill_at_end=True)  # its answer is held, then the link dies
    assert await sending is None
    await poll(lambda: len(emulator.applied) == 3)
    assert [a.answered for a in emulator.applied] == [True, False, False]
    assert [a.why_unanswered for a in emulator.applied] == ["", "hang", "link black hole"]
    assert all(a.records == [RECORD] and a.key == "k" for a in emulator.applied)


@pytest.mark.integration
async def test_broker_advertises_the_proxy_so_every_client_stays_behind_it() -> None:
    proxy = FaultProxy("kafka", tagger=kafka_client_id)
    port = await proxy.start()
    broker = EmbeddedBroker(advertised_port=port)
    await asyncio.to_thread(broker.start, 30)
    try:
        assert broker.port is not None
        proxy.upstream = ("127.0.0.1", broker.port)
        assert broker.advertised == proxy.address != broker.bootstrap
        # Bootstrapping at the broker itself still ends up at the proxy: metadata names it.
        await create_topics(broker.bootstrap, {"t": 1})
        ends = await produce(broker.bootstrap, "t", [(0, None, b"v%d" % i) for i in range(50)])
        assert ends == {0: 50}
        records = await consume_all(proxy.address, "t", ends)
        assert [r.value for r in records] == [b"v%d" % i for i in range(50)]
        assert proxy.stats["links"] >= 2 and proxy.stats["bytes_down"] > 0
    finally:
        await asyncio.to_thread(broker.stop, 10)
        await proxy.stop()
