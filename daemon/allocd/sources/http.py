"""The sidecar's source: producers POST events over local HTTP; accepted ones go to the durable spool, and
the pipeline reads them back from it as one partition, tp = ("spool", 0), the position as its offset.

POST /v1/events takes one event (a JSON value), many (a JSON array), or NDJSON (one event per non-blank
line). Every event is decoded as the Kafka path would decode it; the invalid ones go to the dead-letter file
and are listed by index in the answer, the valid ones are appended to the spool. Answers:

    202 {"accepted": n, "rejected": [{"index": i, "reason": "...", "detail": "..."}]}   once durable
    400 the body as a whole is unreadable (nothing stored)     401 missing or wrong X-Allocd-Secret
    413 the body is over sidecar.max_body_bytes                503 + Retry-After: spool full, or shutting down
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from allocd.config import SidecarSettings
from allocd.errors import InvalidEvent
from allocd.events import Decoder
from allocd.observability import Metrics, SidecarMetrics
from allocd.sources.base import AssignmentListener, Batch, Message
from allocd.sources.spool import FRAME_OVERHEAD, Spool, SpoolClosed, SpoolError, SpoolFull
from allocd.stores.files import FileDeadLetters
from allocd.webserver import bound_port, start_app
from allocd.windows import TP

__all__ = ["SPOOL_TP", "HttpSource", "split_events"]

log = logging.getLogger("allocd.http")

SPOOL_TP: TP = ("spool", 0)
SECRET_HEADER = "X-Allocd-Secret"
_RETRY_AFTER_FULL = "1"  # seconds; space frees as soon as a cycle completes and segments are deleted
_RETRY_AFTER_CLOSING = "2"

_WS = re.compile(r"[ \t\n\r]*")
_JSON = json.JSONDecoder()


# --- splitting a body into events -----------------------------------------------------------------------
def split_events(body: bytes) -> list[bytes] | None:
    """The raw bytes of each event in a POST body, in order: the body itself when it is one JSON value, the
    elements of a JSON array, or the non-blank lines of NDJSON. None when the body is none of these.

    Array elements are cut out of the body as written (not re-encoded), so every digit of a value reaches
    the decoder exactly as it would from Kafka."""
    body = body.strip()
    if not body:
        return None
    if body[:1] == b"[":
        elements = _array_elements(body)
        if elements is not None:
            return elements
    else:
        with contextlib.suppress(orjson.JSONDecodeError):
            orjson.loads(body)
            return [body]
    lines = [line.strip() for line in body.split(b"\n")]
    lines = [line for line in lines if line]
    for line in lines:  # NDJSON if any line is JSON; its bad lines are then rejected one by one
        with contextlib.suppress(orjson.JSONDecodeError):
            orjson.loads(line)
            return lines
    return None


def _skip_ws(text: str, i: int) -> int:
    """The index of the first non-whitespace character at or after `i` (`_WS` matches the empty string)."""
    m = _WS.match(text, i)
    assert m is not None
    return m.end()


def _array_elements(body: bytes) -> list[bytes] | None:
    # surrogateescape keeps invalid UTF-8 byte for byte: such an element is rejected alone, by the decoder.
    text = body.decode("utf-8", "surrogateescape")
    n = len(text)
    i = _skip_ws(text, 1)
    out: list[bytes] = []
    if i < n and text[i] == "]":
        return out if _skip_ws(text, i + 1) == n else None
    while True:
        try:
            _, j = _JSON.raw_decode(text, i)
        except (ValueError, RecursionError):
            return None
        out.append(text[i:j].encode("utf-8", "surrogateescape"))
        i = _skip_ws(text, j)
        if i >= n:
            return None
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
        elif text[i] == "]":
            return out if _skip_ws(text, i + 1) == n else None
        else:
            return None


# --- the source -----------------------------------------------------------------------------------------
def _answer(status: int, body: dict[str, Any], retry_after: str | None = None) -> web.Response:
    headers = {"Retry-After": retry_after} if retry_after else None
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


SPOOL_FLUSH_FRACTION = 0.7  # of max_spool_bytes: beyond it a forced cycle frees committed segments


class HttpSource:
    """The ingest listener plus the `Source` the pipeline reads: one partition, SPOOL_TP.

    `fetch` hands out durable records in position order from the position last set by `seek`; `pause`
    stops that without touching the ingest (the spool is the buffer). `close_ingest` turns POSTs into
    503 for a shutdown; `caught_up` waits until the pipeline has read everything durable.
    """

    name = "http"

    def __init__(
        self,
        settings: SidecarSettings,
        spool: Spool,
        decoder: Decoder,
        dead_letters: FileDeadLetters,
        metrics: Metrics,
        sidecar_metrics: SidecarMetrics,
        *,
        secret: str | None = None,
        clock: Callable[[], float] = time.time,
        max_fetch_records: int = 5_000,
        max_fetch_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.s = settings
        self.spool = spool
        self.decoder = decoder
        self.dlq = dead_letters
        self.metrics = metrics
        self.sm = sidecar_metrics
        self._secret = secret.encode() if secret else None
        self._clock = clock
        self._max_records = max_fetch_records
        self._max_bytes = max_fetch_bytes
        self._position: int | None = None  # None until the pipeline seeks (assignment)
        self._committed: int | None = None
        self._seen_ms = -math.inf  # newest arrival time handed out since the last seek
        self._inflight: dict[int, int] = {}  # arrival ms → requests being stored (not durable yet)
        self._paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._caught_up = asyncio.Event()
        self._closing = False
        self._runner: web.AppRunner | None = None

    # --- the ingest listener ---------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.s.max_body_bytes)
        app.add_routes([web.post("/v1/events", self.handle_post)])
        return app

    async def listen(self) -> int:
        """Serve POST /v1/events on sidecar.host:sidecar.port; return the bound port (0 picks a free one)."""
        runner = await start_app(self.make_app(), self.s.host, self.s.port, shutdown_timeout=2.0)
        self._runner = runner
        port = bound_port(runner)
        log.info("ingest listening", extra={"host": self.s.host, "port": port})
        return port

    def close_ingest(self) -> None:
        """From now on POST /v1/events answers 503 (a shutdown is under way)."""
        self._closing = True

    async def caught_up(self, timeout: float) -> bool:
        """Wait until a fetch found nothing left: every durable record handed out and processed, no append
        under way. False after `timeout` seconds (e.g. paused by backpressure)."""
        self._caught_up.clear()
        try:
            await asyncio.wait_for(self._caught_up.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def handle_post(self, request: web.Request) -> web.Response:
        response = await self._post(request)
        self.sm.ingest_requests.labels(str(response.status)).inc()
        return response

    async def _post(self, request: web.Request) -> web.Response:
        if self._closing:
            return _answer(503, {"message": "shutting down"}, _RETRY_AFTER_CLOSING)
        if self._secret is not None:
            given = request.headers.get(SECRET_HEADER, "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, self._secret):
                return _answer(401, {"message": f"missing or wrong {SECRET_HEADER} header"})
        too_large = _answer(413, {"message": f"body over {self.s.max_body_bytes} bytes"})
        if request.content_length is not None and request.content_length > self.s.max_body_bytes:
            return too_large
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return too_large
        arrival_ms = int(self._clock() * 1000)
        raws = split_events(body)
        if raws is None:
            return _answer(400, {"message": "the body is not a JSON value, a JSON array or NDJSON"})
        valid, rejected = self._decode_all(raws, arrival_ms)
        self._inflight[arrival_ms] = self._inflight.get(arrival_ms, 0) + 1
        try:
            return await self._store(valid, rejected, arrival_ms)
        finally:
            left = self._inflight.pop(arrival_ms) - 1
            if left:
                self._inflight[arrival_ms] = left

    def _decode_all(
        self, raws: list[bytes], arrival_ms: int
    ) -> tuple[list[bytes], list[tuple[int, bytes, str, str]]]:
        decode = self.decoder.decode
        valid: list[bytes] = []
        rejected: list[tuple[int, bytes, str, str]] = []
        for i, raw in enumerate(raws):
            try:
                decode(raw, arrival_ms)
            except InvalidEvent as exc:
                rejected.append((i, raw, exc.reason, exc.detail))
                continue
            valid.append(raw)
        return valid, rejected

    async def _store(
        self, valid: list[bytes], rejected: list[tuple[int, bytes, str, str]], arrival_ms: int
    ) -> web.Response:
        """Room first (so a 503 leaves nothing behind), then the dead letters, then the durable append."""
        nbytes = sum(FRAME_OVERHEAD + len(raw) for raw in valid)
        if nbytes > self.spool.max_bytes:
            return _answer(413, {"message": "the events are larger than the whole spool"})
        try:
            reserved = self.spool.reserve(nbytes)
        except SpoolFull:
            return _answer(503, {"message": "spool full"}, _RETRY_AFTER_FULL)
        except SpoolClosed:
            return _answer(503, {"message": "shutting down"}, _RETRY_AFTER_CLOSING)
        except SpoolError as exc:
            log.error("spool refused an append", extra={"error": str(exc)})
            return _answer(503, {"message": "spool unavailable"}, _RETRY_AFTER_FULL)
        try:
            if rejected:
                await self.dlq.ingest_rejected(rejected, arrival_ms)
        except Exception as exc:  # the file's error, whatever it is: store nothing, let the caller retry
            self.spool.release(reserved)
            self.metrics.dlq_write_failed()
            log.error("dead-letter write failed; request refused", extra={"error": repr(exc)})
            return _answer(503, {"message": "dead-letter file unavailable"}, _RETRY_AFTER_FULL)
        if rejected:
            self.metrics.dlq_written("event", len(rejected))
            self.metrics.record_batch(self.name, len(rejected), {}, {}, 0, [r[2] for r in rejected])
        try:
            await self.spool.append([(arrival_ms, raw) for raw in valid], reserved)
        except SpoolClosed:
            return _answer(503, {"message": "shutting down"}, _RETRY_AFTER_CLOSING)
        except SpoolError as exc:
            log.error("spool append failed; request refused", extra={"error": str(exc)})
            return _answer(503, {"message": "spool unavailable"}, _RETRY_AFTER_FULL)
        self.sm.ingest_events.labels("accepted").inc(len(valid))
        self.sm.ingest_events.labels("rejected").inc(len(rejected))
        body = {
            "accepted": len(valid),
            "rejected": [
                {"index": i, "reason": reason, "detail": detail} for i, _, reason, detail in rejected
            ],
        }
        return _answer(202, body)

    # --- Source ----------------------------------------------------------------------------------------
    async def start(self, listener: AssignmentListener) -> None:
        """The spool is one partition, always ours: assign it at once (recover + seek)."""
        await listener.on_assigned([SPOOL_TP])

    async def fetch(self, timeout: float) -> list[Batch]:
        if self._position is None:  # not assigned yet: nothing to hand out
            await asyncio.sleep(timeout)
            return []
        if self._paused:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resumed.wait(), timeout)
            return []
        end = self.spool.durable_end
        if self._position >= end:
            if not self.spool.pending:
                self._caught_up.set()  # the previous batch was processed: this call proves it
            await self.spool.wait_beyond(self._position, timeout)
            if self._position is None or self._paused:
                return []
            end = self.spool.durable_end
            if self._position >= end:
                return []
        records = await self.spool.read(self._position, self._max_records, self._max_bytes)
        if not records:
            self._position = max(self._position, end)  # a gap in positions: nothing exists below `end`
            return []
        self._position = records[-1][0] + 1
        self._seen_ms = max(self._seen_ms, max(arrival for _, arrival, _ in records))
        return [(SPOOL_TP, [Message(SPOOL_TP, seq, arrival, raw) for seq, arrival, raw in records])]

    def wants_flush(self) -> bool:
        """The spool is nearly full of data that open windows still hold: deliver early, so committed
        segments can be deleted before producers see 503s (a window need not fit in the spool)."""
        return self.spool.bytes_used >= SPOOL_FLUSH_FRACTION * self.spool.max_bytes

    def frontier_ms(self) -> float:
        """Arrival time below which everything has been read: the newest arrival handed out while a backlog
        remains, +inf once caught up — but never past a request still being stored, whose events are not
        readable yet (so its window does not close under it)."""
        if self._position is None:
            return math.inf
        storing = min(self._inflight) if self._inflight else math.inf
        if self._position >= self.spool.durable_end:
            return storing
        return min(self._seen_ms, storing)

    def pause(self) -> None:
        self._paused = True
        self._resumed.clear()

    def resume(self) -> None:
        self._paused = False
        self._resumed.set()

    def seek(self, tp: TP, offset: int) -> None:
        if tp == SPOOL_TP:
            self._position = offset
            self._seen_ms = -math.inf

    async def committed(self, tp: TP) -> int | None:
        """The last position committed by this process (the journal's checkpoint is the authority)."""
        return self._committed if tp == SPOOL_TP else None

    async def reset_position(self, tp: TP) -> int:
        """No checkpoint: start at the oldest record the spool holds."""
        return self.spool.first_position

    async def commit(self, positions: dict[TP, int]) -> None:
        """Everything below the position is delivered (and checkpointed): its whole segments can go."""
        position = positions.get(SPOOL_TP)
        if position is None:
            return
        self._committed = position
        self.spool.release_below(position)

    async def end_offsets(self, tps: list[TP]) -> dict[TP, int]:
        return {tp: self.spool.durable_end for tp in tps if tp == SPOOL_TP}

    async def stop(self) -> None:
        """Refuse new POSTs, stop the listener, then close the spool (appends under way finish first)."""
        self.close_ingest()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.spool.close()
