"""Structured logs: one JSON object per line, repeated warnings rate-limited, registered secrets scrubbed.

A line carries `time` (RFC 3339, UTC), `level`, `logger`, `message`, every field passed with `extra=`
(stream, partition, offset, request_id, …) and `exc` for an exception. Scrubbing is defence in depth:
callers must still never log the API key.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TextIO

import orjson

__all__ = [
    "REDACTED",
    "JsonFormatter",
    "RateLimitFilter",
    "SecretFilter",
    "configure_logging",
    "register_secret",
    "scrub",
]

REDACTED = "[REDACTED]"

# Longest first, so a secret containing another is replaced whole. Replaced (never mutated) under the lock,
# so readers on any thread see a consistent tuple without locking.
_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()

# The attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def register_secret(secret: str) -> None:
    """Never let `secret` (or its JSON-escaped form) reach a log line handled here."""
    global _secrets
    if not secret:
        raise ValueError("an empty secret cannot be registered")
    forms = {secret, orjson.dumps(secret).decode()[1:-1]}
    with _secrets_lock:
        _secrets = tuple(sorted(set(_secrets) | forms, key=len, reverse=True))


def scrub(text: str) -> str:
    """`text` with every registered secret replaced by REDACTED."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class SecretFilter(logging.Filter):
    """Scrubs registered secrets from a record's message, exception text and string extras, in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # bad format args: leave it to the handler, which reports it without raising
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        for name, value in list(record.__dict__.items()):
            if name not in _RECORD_ATTRS and isinstance(value, str):
                setattr(record, name, scrub(value))
        return True


class RateLimitFilter(logging.Filter):
    """Lets one record per (logger, message template) through each `interval` seconds, from `min_level` up.

    The first record after a quiet interval carries `suppressed` (how many were dropped since the last one
    passed) and says so in its message. Records below `min_level` (lifecycle INFO lines, which legitimately
    repeat a template, e.g. one per partition) always pass. At most `max_keys` templates are tracked.
    """

    def __init__(
        self,
        interval: float = 60.0,
        *,
        min_level: int = logging.WARNING,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._interval = interval
        self._min_level = min_level
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, str], list[float]] = OrderedDict()  # key -> [passed at, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self._min_level:
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self._interval:
                seen[1] += 1
                return False
            self._seen[key] = [now, 0]
            self._seen.move_to_end(key)
            if len(self._seen) > self._max_keys:
                self._seen.popitem(last=False)
        dropped = int(seen[1]) if seen is not None else 0
        if dropped:
            record.suppressed = dropped
            if isinstance(record.msg, str):
                record.msg = f"{record.msg} (suppressed {dropped} similar messages)"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record; `extra=` fields become top-level keys (the fixed keys win a clash)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            name: value for name, value in record.__dict__.items() if name not in _RECORD_ATTRS
        }
        entry.update(
            time=_rfc3339(record.created, record.msecs),
            level=record.levelname,
            logger=record.name,
            message=record.getMessage(),
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            line = orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:  # e.g. an int beyond 64 bits: fall back to text for every value
            line = orjson.dumps({name: str(value) for name, value in entry.items()})
        return scrub(line.decode())


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]  # generic only in typeshed
    """The handler configure_logging installs (its type lets a second call replace it)."""


def configure_logging(
    level: str = "INFO", stream: TextIO | None = None, *, rate_limit_seconds: float = 60.0
) -> None:
    """Send every log record, as JSON lines, to `stream` (default: sys.stdout at call time).

    Calling again replaces the handler installed before; handlers added by others are kept.
    """
    levels = logging.getLevelNamesMapping()
    numeric = levels.get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _JsonHandler)]:
        root.removeHandler(handler)
    handler = _JsonHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RateLimitFilter(rate_limit_seconds))
    handler.addFilter(SecretFilter())
    root.addHandler(handler)
    root.setLevel(numeric)


def _rfc3339(created: float, msecs: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(msecs):03d}Z"
