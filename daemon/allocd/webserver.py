"""The HTTP edge for metrics and health: /metrics, /healthz, /readyz on one aiohttp app, and starting an
aiohttp app on host:port — shared by that server, the emulator and the sidecar's ingest listener. Port 0
picks a free port, `bound_port` tells which, `write_port_file` hands it on."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from allocd.observability import CONTENT_TYPE, Health, Metrics, Probe

__all__ = [
    "Runner",
    "bound_port",
    "make_app",
    "probe_response",
    "start_app",
    "start_http_server",
    "write_port_file",
]


Runner = web.AppRunner  # a started server; stop it with `await runner.cleanup()`


async def start_app(app: web.Application, host: str, port: int, **runner_options: Any) -> web.AppRunner:
    """Listen on host:port and return the running runner; stop it with `await runner.cleanup()`."""
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a started runner listens on (the answer to port 0)."""
    return int(runner.addresses[0][1])


def write_port_file(path: str, port: int) -> None:
    """Write the port atomically: a reader polling for the file never sees half of it."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(f"{port}\n")
    os.replace(tmp, path)


def probe_response(probe: Probe) -> web.Response:
    """A probe's answer: 200 or 503, the JSON body saying why."""
    return web.Response(
        body=orjson.dumps(probe.body), status=200 if probe.ok else 503, content_type="application/json"
    )


def make_app(
    metrics: Metrics, health: Health, *, extra_routes: Iterable[web.AbstractRouteDef] | None = None
) -> web.Application:
    """The aiohttp application: /metrics, /healthz, /readyz, plus `extra_routes` (e.g. POST /v1/events)."""

    async def serve_metrics(_: web.Request) -> web.Response:
        metrics.set_ready(health.readiness().ok)
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def serve_healthz(_: web.Request) -> web.Response:
        return probe_response(health.liveness())

    async def serve_readyz(_: web.Request) -> web.Response:
        return probe_response(health.readiness())

    app = web.Application()
    app.add_routes(
        [
            web.get("/metrics", serve_metrics),
            web.get("/healthz", serve_healthz),
            web.get("/readyz", serve_readyz),
        ]
    )
    if extra_routes is not None:
        app.add_routes(extra_routes)
    return app


async def start_http_server(
    metrics: Metrics,
    health: Health,
    host: str,
    port: int,
    *,
    extra_routes: Iterable[web.AbstractRouteDef] | None = None,
) -> web.AppRunner:
    """Serve `make_app` on host:port (0 picks a free port, see `bound_port`). Stop with `runner.cleanup()`."""
    return await start_app(make_app(metrics, health, extra_routes=extra_routes), host, port)
