"""Signals → a stop event, for every long-running command: SIGTERM or SIGINT sets `stop`; for the daemon a
second one exits at once (the operator insists)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator

__all__ = ["stop_on_signals"]

log = logging.getLogger("allocd.shutdown")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event, *, second_exits: bool = False) -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT set `stop`; with `second_exits`, a signal arriving once `stop` is
    set ends the process at once (exit code 128 + signal). Where the loop cannot handle signals (not the
    main thread), nothing is installed. Handlers are removed on exit."""
    loop = asyncio.get_running_loop()

    def handle(signum: int) -> None:
        if stop.is_set() and second_exits:
            log.warning("second signal: exiting at once", extra={"signal": signum})
            os._exit(128 + signum)
        if second_exits:
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    installed = []
    for sig in _SIGNALS:
        try:
            loop.add_signal_handler(sig, handle, sig)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
