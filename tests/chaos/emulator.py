"""The soak's CloudZero emulator: the real one (`allocd.cloudzero.emulator`), in-process, remembering every
write it applied with the records it carried and whether its answer reached the client.

"Reached the client" comes from the API link's fault proxy: the emulator looks up the proxy link a request
arrived on (by the peer port it sees) and its place on that link; the proxy counts the whole responses it
handed to the client. An applied request whose answer was never handed over — the emulator's hang fault, a
link cut or black hole, a client that had left — is *unanswered*: the only kind of request the daemon may
legitimately send again (DESIGN.md §2.5).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from allocd.cloudzero.emulator import Emulator, EmulatorConfig, bound_port
from allocd.cloudzero.records import Op

from .proxy import Link, LinkRegistry

__all__ = ["Applied", "RecordingEmulator", "serve_recording"]

_LINK_KEY = web.RequestKey("chaos_link", object)


@dataclass(eq=False)
class Applied:
    """One write the emulator applied."""

    seq: int
    key: str  # the API key it came with: one per daemon incarnation
    stream: str
    records: list[dict[str, Any]]
    entry: Any  # the emulator's request-log entry (status is filled in when the answer is written)
    link: Link | None
    index: int  # its place among the requests on `link`
    wall: float

    @property
    def answered(self) -> bool:
        """The response was handed to the client (a request not seen through a proxy: a status was sent)."""
        if self.link is None:
            return self.entry.status is not None
        return self.link.answered(self.index)

    @property
    def why_unanswered(self) -> str:
        if self.answered:
            return ""
        if self.entry.hook:
            return "hook"
        if self.entry.fault == "hang":
            return "hang"
        if self.link is not None and self.link.killed:
            return f"link {self.link.killed}"
        return "client left"


class RecordingEmulator(Emulator):
    """`Emulator` plus `applied`: every applied write, in order (test code: it overrides `_write`)."""

    def __init__(self, config: EmulatorConfig, registry: LinkRegistry) -> None:
        super().__init__(config)
        self.registry = registry
        self.applied: list[Applied] = []

    def make_app(self) -> web.Application:
        app = super().make_app()
        registry = self.registry

        @web.middleware
        async def link_of_request(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            # Counted for every request in arrival order, as the proxy counts the responses on the link.
            peer = request.transport.get_extra_info("peername") if request.transport is not None else None
            link = registry.get(peer[1]) if peer else None
            request[_LINK_KEY] = (link, link.next_request_index() if link is not None else -1)
            return await handler(request)

        app.middlewares.append(link_of_request)
        return app

    async def _write(self, request: web.Request, entry: Any, op: Op) -> web.StreamResponse | None:
        try:
            return await super()._write(request, entry, op)
        finally:
            if entry.applied:
                await self._remember(request, entry)

    async def _remember(self, request: web.Request, entry: Any) -> None:
        link, index = request.get(_LINK_KEY, (None, -1))
        body = orjson.loads(await request.read())  # read (and cached) before it was applied
        key = request.headers.get("Authorization", "")
        self.applied.append(
            Applied(entry.seq, key, entry.stream, body["records"], entry, link, index, time.time())
        )


async def serve_recording(config: EmulatorConfig, registry: LinkRegistry) -> tuple[web.AppRunner, int]:
    """Start a RecordingEmulator on a free 127.0.0.1 port; stop it with `await runner.cleanup()`."""
    emulator = RecordingEmulator(config, registry)
    runner = web.AppRunner(emulator.make_app(), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound_port(runner)
