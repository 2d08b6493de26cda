"""The sidecar's HTTP ingest and its Source side, against a real listener on 127.0.0.1 (port 0)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from allocd.config import EventsSettings, SidecarSettings
from allocd.emit import aemit, emit
from allocd.errors import AuthError, PermanentError, TransientError
from allocd.events import Decoder
from allocd.observability import Metrics, SidecarMetrics
from allocd.sources.base import Batch
from allocd.sources.http import SPOOL_TP, HttpSource, split_events
from allocd.sources.spool import Spool, frame_size
from allocd.stores.files import FileDeadLetters

NOW = 1_795_774_503.120  # 2026-11-27T10:15:03.120Z
NOW_MS = int(NOW * 1000)
SECRET = "s3cret-value-for-tests"


def flat(batches: list[Batch]) -> list[Any]:
    """A fetch's records, whatever batches they came in."""
    return [rec for _, records in batches for rec in records]


def event(element: str = "hooli", value: Any = 250, **over: Any) -> dict[str, Any]:
    ev = {"stream": "billing-usage", "element_name": element, "filter": {"custom:feature": ["billing"]}}
    ev["value"] = value
    return {**ev, **over}


@dataclass
class Sidecar:
    source: HttpSource
    spool: Spool
    url: str
    dlq_path: Path
    session: aiohttp.ClientSession
    metrics: Metrics

    async def post(self, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        async with self.session.post(self.url, data=body, headers=headers) as resp:
            return resp.status, await resp.json(), resp.headers

    def dead_letters(self) -> list[dict[str, Any]]:
        if not self.dlq_path.exists():
            return []
        return [orjson.loads(line) for line in self.dlq_path.read_bytes().splitlines()]


async def make_sidecar(
    tmp_path: Path,
    *,
    secret: str | None = None,
    max_spool_bytes: int = 1 << 30,
    max_body_bytes: int = 65536,
    segment_bytes: int = 256,
    fsync: Callable[[int], None] = os.fsync,
) -> Sidecar:
    settings = SidecarSettings(
        enabled=True,
        host="127.0.0.1",
        port=0,
        spool_dir=str(tmp_path),
        max_spool_bytes=max_spool_bytes,
        max_body_bytes=max_body_bytes,
    )
    decoder = Decoder(
        EventsSettings.from_dict({"streams": {"billing-usage": {"dimensions": ["custom:feature"]}}})
    )
    metrics = Metrics()
    sm = SidecarMetrics(metrics.registry)
    spool = await Spool.open(
        tmp_path, max_bytes=max_spool_bytes, segment_bytes=segment_bytes, on_sync=sm.on_sync, fsync=fsync
    )
    sm.watch(spool)
    dlq_path = tmp_path / "dead-letters.ndjson"
    source = HttpSource(
        settings, spool, decoder, FileDeadLetters(dlq_path), metrics, sm, secret=secret, clock=lambda: NOW
    )
    port = await source.listen()
    session = aiohttp.ClientSession()
    return Sidecar(source, spool, f"http://127.0.0.1:{port}/v1/events", dlq_path, session, metrics)


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[Sidecar]:
    sc = await make_sidecar(tmp_path)
    try:
        yield sc
    finally:
        await sc.session.close()
        await sc.source.stop()


class Listener:
    def __init__(self, source: HttpSource, position: int = 0) -> None:
        self.source = source
        self.position = position
        self.assigned: list[Any] = []

    async def on_assigned(self, tps: list[Any]) -> None:
        self.assigned.append(tps)
        for tp in tps:
            self.source.seek(tp, self.position)

    async def on_revoked(self, tps: list[Any]) -> None:
        raise AssertionError("the spool is never revoked")


# --- splitting bodies ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"a": 1}', [b'{"a": 1}']),
        (b'  {\n  "a": 1\n}\n', [b'{\n  "a": 1\n}']),  # one pretty-printed value
        (b"5", [b"5"]),  # a JSON value that is not an object: one (invalid) event
        (b"[]", []),
        (b' [ {"a": 1} , {"b": [1, 2]},3 ] ', [b'{"a": 1}', b'{"b": [1, 2]}', b"3"]),
        (b'[{"v": 0.10000000000000000001}]', [b'{"v": 0.10000000000000000001}']),  # digits as written
        (b'{"a": 1}\n\n{"b": 2}\r\n', [b'{"a": 1}', b'{"b": 2}']),  # NDJSON; blank lines do not count
        (b'{"a": 1}\nnot json\n', [b'{"a": 1}', b"not json"]),  # NDJSON with a bad line
        (b"[1]\n[2]", [b"[1]", b"[2]"]),  # NDJSON of arrays
        (b'[{"a": "\xff"}, {"b": 1}]', [b'{"a": "\xff"}', b'{"b": 1}']),  # invalid UTF-8 kept byte for byte
    ],
)
def test_split_events(body: bytes, expected: list[bytes]) -> None:
    assert split_events(body) == expected


@pytest.mark.parametrize("body", [b"", b"  \n ", b"garbage", b"not\njson\nat all", b'[{"a": 1},', b"[1 2]"])
def test_unreadable_bodies(body: bytes) -> None:
    assert split_events(body) is None


# --- POST /v1/events -----------------------------------------------------------------------------------
async def test_one_event_is_spooled_with_its_arrival_time(sidecar: Sidecar) -> None:
    body = orjson.dumps(event())
    status, answer, _ = await sidecar.post(body)
    assert (status, answer) == (202, {"accepted": 1, "rejected": []})
    assert await sidecar.spool.read(0, 10, 1 << 20) == [(0, NOW_MS, body)]


async def test_batch_accepts_the_valid_and_dead_letters_the_invalid_by_index(sidecar: Sidecar) -> None:
    events = [
        orjson.dumps(event("a", 1)),
        orjson.dumps(event("b", -5)),
        b'{"stream": "billing-usage", "element_name": "c", "filter": {"custom:feature": ["x"]},'
        b' "value": 0.1}',
        orjson.dumps(event("d", 1, stream="nope")),
        b"[1, 2]",
    ]
    status, answer, _ = await sidecar.post(b"[" + b",\n".join(events) + b"]")
    assert status == 202
    assert answer["accepted"] == 2
    assert [(r["index"], r["reason"]) for r in answer["rejected"]] == [
        (1, "invalid_value"),
        (3, "undeclared_stream"),
        (4, "not_object"),
    ]
    stored = await sidecar.spool.read(0, 10, 1 << 20)
    assert [r[2] for r in stored] == [events[0], events[2]]  # exactly as written (0.1 stays 0.1)
    letters = sidecar.dead_letters()
    assert [(d["index"], d["reason"], d["raw"]) for d in letters] == [
        (1, "invalid_value", events[1].decode()),
        (3, "undeclared_stream", events[3].decode()),
        (4, "not_object", "[1, 2]"),
    ]
    assert all(d["time"] and d["kind"] == "event" and "detail" in d for d in letters)
    text = sidecar.metrics.render().decode()
    assert 'allocd_dlq_writes_total{kind="event"} 3.0' in text
    assert 'allocd_events_rejected_total{reason="invalid_value"} 1.0' in text
    assert 'allocd_ingest_events_total{outcome="accepted"} 2.0' in text


async def test_ndjson_bad_lines_are_rejected_one_by_one(sidecar: Sidecar) -> None:
    body = orjson.dumps(event("a")) + b"\n\n{oops\n" + orjson.dumps(event("b")) + b"\n"
    status, answer, _ = await sidecar.post(body)
    assert status == 202
    assert answer["accepted"] == 2
    assert [(r["index"], r["reason"]) for r in answer["rejected"]] == [(1, "not_json")]
    assert [d["raw"] for d in sidecar.dead_letters()] == ["{oops"]


@pytest.mark.parametrize("body", [b"", b"garbage", b"\x00\x01\x02"])
async def test_unreadable_body_is_400_and_stores_nothing(sidecar: Sidecar, body: bytes) -> None:
    status, answer, _ = await sidecar.post(body)
    assert status == 400 and "message" in answer
    assert sidecar.spool.durable_end == 0 and sidecar.dead_letters() == []


async def test_body_over_the_limit_is_413(sidecar: Sidecar) -> None:
    body = orjson.dumps([event(f"e{i}") for i in range(2000)])
    assert len(body) > 65536
    status, _, _ = await sidecar.post(body)
    assert status == 413
    assert sidecar.spool.durable_end == 0


async def test_full_spool_answers_503_with_retry_after_and_stores_nothing(tmp_path: Path) -> None:
    one = orjson.dumps(event())
    sc = await make_sidecar(tmp_path, max_spool_bytes=3 * frame_size(one), segment_bytes=1)
    try:
        for _ in range(3):
            assert (await sc.post(one))[0] == 202
        batch = b"[" + one + b', {"value": -1}]'
        status, answer, headers = await sc.post(batch)
        assert (status, answer["message"]) == (503, "spool full")
        assert float(headers["Retry-After"]) > 0
        assert sc.spool.durable_end == 3 and sc.dead_letters() == []  # not even the invalid one
        sc.spool.release_below(sc.spool.durable_end)  # a commit frees whole segments
        assert (await sc.post(batch))[0] == 202
    finally:
        await sc.session.close()
        await sc.source.stop()


async def test_events_larger_than_the_whole_spool_are_413(tmp_path: Path) -> None:
    sc = await make_sidecar(tmp_path, max_spool_bytes=1000)
    try:
        status, answer, _ = await sc.post(orjson.dumps([event(f"e{i}") for i in range(20)]))
        assert status == 413 and "spool" in answer["message"]
        assert sc.spool.durable_end == 0
    finally:
        await sc.session.close()
        await sc.source.stop()


async def test_shared_secret_is_required_and_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sc = await make_sidecar(tmp_path, secret=SECRET)
    try:
        body = orjson.dumps(event())
        assert (await sc.post(body))[0] == 401
        assert (await sc.post(body, {"X-Allocd-Secret": SECRET[:-1]}))[0] == 401
        assert (await sc.post(body, {"X-Allocd-Secret": SECRET + "x"}))[0] == 401
        assert sc.spool.durable_end == 0
        assert (await sc.post(body, {"X-Allocd-Secret": SECRET}))[0] == 202
        with pytest.raises(AuthError):
            await aemit(event(), sc.url, secret="wrong", session=sc.session)
        assert (await aemit(event(), sc.url, secret=SECRET, session=sc.session))["accepted"] == 1
    finally:
        await sc.session.close()
        await sc.source.stop()
    assert SECRET not in caplog.text
    assert SECRET not in sc.metrics.render().decode()


async def test_closing_ingest_answers_503(sidecar: Sidecar) -> None:
    sidecar.source.close_ingest()
    status, answer, headers = await sidecar.post(orjson.dumps(event()))
    assert (status, answer["message"]) == (503, "shutting down")
    assert "Retry-After" in headers


# --- the Source side -----------------------------------------------------------------------------------
async def test_fetch_hands_out_durable_records_in_order_from_the_seek_position(sidecar: Sidecar) -> None:
    src = sidecar.source
    for i in range(5):
        await sidecar.post(orjson.dumps(event(f"e{i}")))
    listener = Listener(src, position=2)
    await src.start(listener)
    assert listener.assigned == [[SPOOL_TP]]
    msgs = flat(await src.fetch(1.0))
    assert [(m.tp, m.offset, m.timestamp) for m in msgs] == [(SPOOL_TP, i, NOW_MS) for i in (2, 3, 4)]
    assert orjson.loads(msgs[0].value)["element_name"] == "e2"
    assert await src.end_offsets([SPOOL_TP]) == {SPOOL_TP: 5}
    assert src.frontier_ms() == math.inf  # caught up
    src.seek(SPOOL_TP, 0)
    assert src.frontier_ms() == -math.inf  # a backlog, nothing read from it yet
    assert [m.offset for m in flat(await src.fetch(1.0))] == [0, 1, 2, 3, 4]


async def test_fetch_waits_for_new_records_and_pause_holds_them(sidecar: Sidecar) -> None:
    src = sidecar.source
    await src.start(Listener(src))
    waiting = asyncio.create_task(src.fetch(10.0))
    await asyncio.sleep(0)
    await sidecar.post(orjson.dumps(event()))
    assert [m.offset for m in flat(await asyncio.wait_for(waiting, 5))] == [0]
    src.pause()
    await sidecar.post(orjson.dumps(event()))  # ingest goes on while paused: the spool is the buffer
    assert await src.fetch(0.05) == []
    assert not await src.caught_up(0.05)
    src.resume()
    assert [m.offset for m in flat(await src.fetch(1.0))] == [1]
    catching = asyncio.create_task(src.caught_up(5))
    await asyncio.sleep(0)  # let it start: it waits for a fetch *after* the call
    assert await src.fetch(0.01) == []
    assert await catching


async def test_frontier_stays_below_a_request_still_being_stored(tmp_path: Path) -> None:
    gate = threading.Event()

    def slow_fsync(fd: int) -> None:
        assert gate.wait(10)
        os.fsync(fd)

    sc = await make_sidecar(tmp_path, fsync=slow_fsync)
    try:
        src = sc.source
        await src.start(Listener(src))
        assert src.frontier_ms() == math.inf
        posting = asyncio.create_task(sc.post(orjson.dumps(event())))
        deadline = asyncio.get_running_loop().time() + 5
        while not sc.spool.pending:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.005)
        assert src.frontier_ms() == NOW_MS  # its window must not close before its events are readable
        gate.set()
        assert (await posting)[0] == 202
        assert src.frontier_ms() == -math.inf  # a backlog of one, not read yet
        assert [m.offset for m in flat(await src.fetch(1.0))] == [0]
        assert src.frontier_ms() == math.inf
    finally:
        gate.set()
        await sc.session.close()
        await sc.source.stop()


async def test_commit_releases_whole_segments_and_reset_starts_at_the_oldest(sidecar: Sidecar) -> None:
    src = sidecar.source
    for i in range(20):
        await sidecar.post(orjson.dumps(event(f"e{i}")))
    assert sidecar.spool.segment_count > 3
    assert await src.committed(SPOOL_TP) is None
    assert await src.reset_position(SPOOL_TP) == 0
    await src.commit({SPOOL_TP: 12})
    assert await src.committed(SPOOL_TP) == 12
    oldest = await src.reset_position(SPOOL_TP)
    assert 0 < oldest <= 12
    src.seek(SPOOL_TP, oldest)
    assert [m.offset for m in flat(await src.fetch(1.0))] == list(range(oldest, 20))


async def test_emit_sync_and_async_helpers(sidecar: Sidecar) -> None:
    answer = await asyncio.to_thread(emit, [event("a"), event("b", -1)], sidecar.url)
    assert answer["accepted"] == 1 and answer["rejected"][0]["index"] == 1
    with pytest.raises(PermanentError):
        await aemit(b"garbage", sidecar.url, session=sidecar.session)
    sidecar.source.close_ingest()
    with pytest.raises(TransientError) as info:
        await aemit(event(), sidecar.url, session=sidecar.session, retry_for=0.0)
    assert info.value.status == 503 and info.value.retry_after is not None
