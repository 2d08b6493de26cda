"""A TCP fault proxy (asyncio) between a client and a server on 127.0.0.1: latency, stalls, resets and
black holes, aimed at some clients only.

Every accepted connection is a `Link` to the upstream. A link gets a *tag* — the proxy's name, or for Kafka
the client id read from the first request header (nothing is rewritten) — so a fault can hit one daemon's
links while the producer that writes ground truth through the same proxy is left alone.

Faults:
- latency: every chunk (or, with response framing, every whole response) waits `seconds` before it is
  forwarded, in both directions;
- hold: nothing is forwarded until the fault ends (a stall); a black hole is a hold whose links are killed
  when it ends, so the client sees a dead connection rather than a late answer;
- reset: kill the links now.

A kill is an RST for Kafka links (`rst=True`). For the API link it is a FIN after everything already handed
to the client (`rst=False`), and responses are forwarded whole (`frame_responses`), counted per link as they
are handed over: so "was this request answered?" has an exact answer, `Link.answered(index)`, which the
soak's emulator joins with the requests it applied (see `LinkRegistry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FaultProxy", "HttpFramer", "Link", "LinkRegistry", "kafka_client_id"]

_READ_BYTES = 65536
_TAG_BYTES_MAX = 64 * 1024  # a first request larger than this without a readable header is tagged "?"
_CONNECT_TIMEOUT = 10.0
_BLACK_HOLE_SLACK = 5.0  # seconds a held link waits past a black hole's end for its timer to kill it


def kafka_client_id(buf: bytes) -> str | None:
    """The client id of the first Kafka request in `buf` (None until its header has arrived).

    A request starts: int32 size, int16 api_key, int16 api_version, int32 correlation_id, then the client id
    as an int16-length string — in every header version, flexible ones included.
    """
    if len(buf) < 14:
        return None
    (length,) = struct.unpack_from(">h", buf, 12)
    if length < 0:
        return ""
    if len(buf) < 14 + length:
        return None
    return buf[14 : 14 + length].decode("utf-8", "replace")


class HttpFramer:
    """Splits a stream of HTTP/1.1 messages into whole messages (Content-Length or chunked bodies).

    A response without a length runs to the end of the connection: `unframed` is set and `rest()` holds it.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.unframed = False

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out: list[bytes] = []
        while not self.unframed:
            end = self._message_end()
            if end is None:
                break
            out.append(bytes(self.buf[:end]))
            del self.buf[:end]
        return out

    def rest(self) -> bytes:
        return bytes(self.buf)

    def _message_end(self) -> int | None:
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        lines = bytes(self.buf[:head_end]).decode("latin-1").split("\r\n")
        body = head_end + 4
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "chunked" in fields.get("transfer-encoding", "").lower():
            return self._chunked_end(body)
        if "content-length" in fields:
            end = body + int(fields["content-length"])
            return end if len(self.buf) >= end else None
        parts = lines[0].split(" ")
        status = parts[1] if len(parts) > 1 and lines[0].startswith("HTTP/") else ""
        if not status or status.startswith("1") or status in ("204", "304"):
            return body  # a request without a body, or a response that never has one
        self.unframed = True
        return None

    def _chunked_end(self, pos: int) -> int | None:
        while True:
            eol = self.buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(self.buf[pos:eol]).split(b";")[0].strip() or b"0", 16)
            pos = eol + 2
            if size == 0:
                if self.buf[pos : pos + 2] == b"\r\n":
                    return pos + 2
                end = self.buf.find(b"\r\n\r\n", pos)
                return end + 4 if end >= 0 else None
            pos += size + 2
            if pos > len(self.buf):
                return None


@dataclass(eq=False)
class Link:
    """One proxied connection. `responses` counts whole responses handed to the client (framing only)."""

    id: int
    proxy: str
    tag: str | None = None
    upstream_port: int | None = None  # our local port toward the server: the peer port the server sees
    opened: float = field(default_factory=time.monotonic)
    responses: int = 0
    requests_seen: int = 0  # counted by the server side (the soak's emulator), in arrival order
    client_eof: bool = False
    killed: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _client: asyncio.StreamWriter | None = None
    _upstream: asyncio.StreamWriter | None = None

    def next_request_index(self) -> int:
        index = self.requests_seen
        self.requests_seen += 1
        return index

    def answered(self, index: int) -> bool:
        """Was the `index`-th request on this link answered, that is, its response handed to the client?"""
        return index < self.responses

    def kill(self, reason: str, rst: bool) -> None:
        if self.done.is_set():
            return
        self.killed = reason
        for writer, abrupt in ((self._client, rst), (self._upstream, True)):
            if writer is None:
                continue
            if abrupt:
                _abort_with_rst(writer)
            else:
                writer.close()  # FIN after what was handed over: a counted response does reach the client
        self.done.set()


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class LinkRegistry:
    """Links by the local port of their upstream socket: the server looks up the link a request came on.

    Entries are never removed (a request can be handled just after its link closed); a reused port
    replaces the old entry, which cannot still be in use by then.
    """

    def __init__(self) -> None:
        self._by_port: dict[int, Link] = {}

    def add(self, link: Link) -> None:
        assert link.upstream_port is not None
        self._by_port[link.upstream_port] = link

    def get(self, port: int) -> Link | None:
        return self._by_port.get(port)


@dataclass(eq=False)
class _Fault:
    kind: str  # "latency" | "hold"
    target: str  # tag prefix; "" hits every faultable link
    until: float
    seconds: float = 0.0
    kill_at_end: bool = False  # a black hole: it lasts until its links are killed, never "lifts"
    over: bool = False

    def live(self, now: float) -> bool:
        return not self.over and (self.until > now or self.kill_at_end)


class FaultProxy:
    """Listens on 127.0.0.1 (port 0 unless given) and forwards to `upstream` (settable after start)."""

    def __init__(
        self,
        name: str,
        upstream: tuple[str, int] | None = None,
        *,
        tagger: Callable[[bytes], str | None] | None = None,
        faultable: Callable[[str], bool] = lambda tag: True,
        frame_responses: bool = False,
        rst: bool = True,
        registry: LinkRegistry | None = None,
        port: int = 0,
    ) -> None:
        self.name = name
        self.upstream = upstream
        self.tagger = tagger
        self.faultable = faultable
        self.frame_responses = frame_responses
        self.rst = rst
        self.registry = registry
        self._port = port
        self._server: asyncio.Server | None = None
        self._links: dict[int, Link] = {}
        self._ids = itertools.count(1)
        self._faults: list[_Fault] = []
        self._timers: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.stats: dict[str, int] = {"links": 0, "killed": 0, "unframed": 0, "bytes_up": 0, "bytes_down": 0}

    # --- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self._port)
        self._port = self._server.sockets[0].getsockname()[1]
        return self._port

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._timers):
            task.cancel()
        for link in list(self._links.values()):
            link.kill("proxy stopped", rst=True)
        for task in list(self._handlers):
            task.cancel()
        for task in [*self._timers, *self._handlers]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    # --- faults ----------------------------------------------------------------------------------------
    def latency(self, target: str, seconds: float, duration: float) -> None:
        self._faults.append(_Fault("latency", target, time.monotonic() + duration, seconds))

    def hold(self, target: str, duration: float, *, kill_at_end: bool) -> None:
        """Forward nothing for `duration` seconds (a stall); with `kill_at_end`, a black hole."""
        fault = _Fault("hold", target, time.monotonic() + duration, kill_at_end=kill_at_end)
        self._faults.append(fault)
        if kill_at_end:
            task = asyncio.create_task(self._end_black_hole(fault, duration))
            self._timers.add(task)
            task.add_done_callback(self._timers.discard)

    def reset(self, target: str, reason: str = "reset") -> int:
        """Kill the matching links now; returns how many."""
        victims = [link for link in self.links() if self._hits(link, target)]
        for link in victims:
            link.kill(reason, self.rst)
        self.stats["killed"] += len(victims)
        return len(victims)

    def clear(self) -> None:
        """End every fault now (black holes kill their links as they would at their end)."""
        for fault in self._faults:
            self._end(fault)
        self._faults.clear()

    def links(self) -> list[Link]:
        """The links alive now."""
        return [link for link in self._links.values() if not link.done.is_set()]

    def _end(self, fault: _Fault) -> None:
        if not fault.over and fault.kill_at_end:
            self.reset(fault.target, "black hole")
        fault.over = True

    async def _end_black_hole(self, fault: _Fault, duration: float) -> None:
        await asyncio.sleep(duration)
        self._end(fault)

    def _hits(self, link: Link, target: str) -> bool:
        return link.tag is not None and self.faultable(link.tag) and link.tag.startswith(target)

    def _active(self, link: Link, kind: str) -> list[_Fault]:
        now = time.monotonic()
        self._faults = [f for f in self._faults if f.live(now)]
        return [f for f in self._faults if f.kind == kind and self._hits(link, f.target)]

    async def _pass(self, link: Link) -> None:
        """Wait out holds, then latency, before one forward; raise _Gone when the link dies meanwhile.

        Under a black hole nothing passes until its end kills the link, so a held answer is never handed
        over late (a late answer could race the client's own timeout and blur "answered")."""
        while True:
            holds = self._active(link, "hold")
            if holds:
                # a black hole waits for its kill (bounded: its timer fires at `until`)
                until = max(f.until + (_BLACK_HOLE_SLACK if f.kill_at_end else 0.0) for f in holds)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(link.done.wait(), max(0.0, until - time.monotonic()))
                if not link.done.is_set() and any(f.kill_at_end and not f.over for f in holds):
                    link.kill("black hole (late timer)", self.rst)
            elif delays := self._active(link, "latency"):
                await asyncio.sleep(max(f.seconds for f in delays))
                if not self._active(link, "hold"):
                    break
            else:
                break
            if link.done.is_set():
                raise _Gone
        if link.done.is_set():
            raise _Gone

    # --- forwarding --------------------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(next(self._ids), self.name, _client=writer)
        self._links[link.id] = link
        self.stats["links"] += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._run(link, reader, writer)
        except (_Gone, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            self._links.pop(link.id, None)
            if not link.done.is_set():
                link.kill(link.killed or "closed", rst=False)
            with contextlib.suppress(Exception):
                writer.close()

    async def _run(self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = b""
        if self.tagger is None:
            link.tag = self.name
        while link.tag is None:
            data = await reader.read(_READ_BYTES)
            if not data:
                return
            first += data
            link.tag = self.tagger(first) if self.tagger else self.name
            if link.tag is None and len(first) > _TAG_BYTES_MAX:
                link.tag = "?"
        if self.upstream is None:
            return
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(*self.upstream), _CONNECT_TIMEOUT
        )
        link._upstream = up_writer
        link.upstream_port = up_writer.get_extra_info("sockname")[1]
        if self.registry is not None:
            self.registry.add(link)
        if first:
            await self._pass(link)
            up_writer.write(first)
            self.stats["bytes_up"] += len(first)
        pumps = [
            asyncio.create_task(self._pump_up(link, reader, up_writer)),
            asyncio.create_task(self._pump_down(link, up_reader, writer)),
            asyncio.create_task(link.done.wait()),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            for task in pumps:
                with contextlib.suppress(asyncio.CancelledError, _Gone, OSError, Exception):
                    await task
            if not link.done.is_set():
                link.kill(link.killed or "closed", rst=False)

    async def _pump_up(self, link: Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while True:
            data = await src.read(_READ_BYTES)
            if not data:
                link.client_eof = True  # nothing sent to this client from now on counts as an answer
                return
            await self._pass(link)
            dst.write(data)
            self.stats["bytes_up"] += len(data)
            await dst.drain()

    async def _pump_down(self, link: Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        framer = HttpFramer() if self.frame_responses else None
        while True:
            data = await src.read(_READ_BYTES)
            if not data:
                if framer is not None and framer.unframed and framer.rest():
                    self.stats["unframed"] += 1
                    await self._hand_over(link, dst, framer.rest(), whole=True)
                return
            if framer is None:
                await self._hand_over(link, dst, data, whole=False)
                continue
            for message in framer.feed(data):
                await self._hand_over(link, dst, message, whole=True)

    async def _hand_over(self, link: Link, dst: asyncio.StreamWriter, data: bytes, whole: bool) -> None:
        await self._pass(link)
        if link.client_eof:
            raise _Gone  # the client left: whatever comes now is not an answer it read
        dst.write(data)  # counted at once: a kill closes with FIN after flushing what was written
        self.stats["bytes_down"] += len(data)
        if whole:
            link.responses += 1
        await dst.drain()


class _Gone(Exception):
    """The link was killed or its client left while a forward waited."""
