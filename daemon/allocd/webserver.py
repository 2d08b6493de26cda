"""Starting an aiohttp app on host:port, shared by the metrics server, the emulator and the sidecar's
ingest listener: port 0 picks a free port, `bound_port` tells which, `write_port_file` hands it on."""

from __future__ import annotations

import os
from typing import Any

from aiohttp import web

__all__ = ["bound_port", "start_app", "write_port_file"]


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
