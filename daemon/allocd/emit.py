"""A tiny client for the sidecar: post events to its POST /v1/events.

    from allocd.emit import emit
    result = emit({"stream": "billing-usage", "element_name": "hooli", "value": 250})
    result["accepted"], result["rejected"]      # the 202 body: rejected = [{"index", "reason", ...}]

`events` is one event (a mapping), a list of them, or bytes already encoded (JSON or NDJSON). Decimal
values are sent as strings, which the decoder reads exactly. A 503 (spool full, shutting down) and a refused
connection are retried for `retry_for` seconds — nothing was stored; after that the error says what to do:

    TransientError   still 503 / not reachable: retry later (`retry_after` when the sidecar said)
    PermanentError   400 or 413: the body itself is wrong, do not resend it
    AuthError        401: missing or wrong shared secret
    InDoubtError     no answer after sending (timeout, reset): the events may or may not be stored
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

import aiohttp
import orjson

from allocd.errors import AuthError, DeliveryError, InDoubtError, PermanentError, TransientError

__all__ = ["DEFAULT_URL", "aemit", "emit", "encode_events"]

DEFAULT_URL = "http://127.0.0.1:8125/v1/events"
SECRET_HEADER = "X-Allocd-Secret"
_BACKOFF = 0.2  # seconds before the first retry when the sidecar gave no Retry-After
_BACKOFF_CAP = 5.0


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return str(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode_events(events: Mapping[str, Any] | Iterable[Mapping[str, Any]] | bytes) -> bytes:
    """The request body: one event as a JSON object, several as a JSON array, bytes as they are."""
    if isinstance(events, bytes | bytearray):
        return bytes(events)
    if isinstance(events, Mapping):
        return orjson.dumps(events, default=_default)
    return orjson.dumps(list(events), default=_default)


def _headers(secret: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if secret:
        headers[SECRET_HEADER] = secret
    return headers


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _verdict(status: int, data: bytes, retry_after: str | None) -> dict[str, Any] | DeliveryError:
    """The 202 body, or the error that says what the caller must do."""
    try:
        body = orjson.loads(data) if data else {}
    except orjson.JSONDecodeError:
        body = {}
    message = body.get("message", "") if isinstance(body, dict) else ""
    if status == 202 and isinstance(body, dict):
        return body
    if status == 503:
        return TransientError(f"sidecar busy: {message}", status, _retry_after(retry_after))
    if status == 401:
        return AuthError(f"sidecar refused the shared secret: {message}", status)
    if status in (400, 413):
        return PermanentError(f"sidecar refused the body: {message}", status)
    return TransientError(f"unexpected answer {status}: {message}", status)


def _delay(exc: DeliveryError, attempt: int) -> float:
    hinted = exc.retry_after if isinstance(exc, TransientError) else None
    return hinted if hinted is not None else min(_BACKOFF * 2**attempt, _BACKOFF_CAP)


def emit(
    events: Mapping[str, Any] | Iterable[Mapping[str, Any]] | bytes,
    url: str = DEFAULT_URL,
    secret: str | None = None,
    *,
    timeout: float = 10.0,
    retry_for: float = 30.0,
) -> dict[str, Any]:
    """Post `events` and return the 202 body (blocking; see the module docstring for errors)."""
    body = encode_events(events)
    deadline = time.monotonic() + retry_for
    attempt = 0
    while True:
        outcome = _post_sync(url, body, _headers(secret), timeout)
        if isinstance(outcome, dict):
            return outcome
        if not _retryable(outcome) or time.monotonic() + _delay(outcome, attempt) > deadline:
            raise outcome
        time.sleep(_delay(outcome, attempt))
        attempt += 1


async def aemit(
    events: Mapping[str, Any] | Iterable[Mapping[str, Any]] | bytes,
    url: str = DEFAULT_URL,
    secret: str | None = None,
    *,
    session: aiohttp.ClientSession | None = None,
    timeout: float = 10.0,
    retry_for: float = 30.0,
) -> dict[str, Any]:
    """`emit` for asyncio; pass a `session` to reuse connections across calls."""
    body = encode_events(events)
    deadline = time.monotonic() + retry_for
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        attempt = 0
        while True:
            outcome = await _post_async(session, url, body, _headers(secret), timeout)
            if isinstance(outcome, dict):
                return outcome
            if not _retryable(outcome) or time.monotonic() + _delay(outcome, attempt) > deadline:
                raise outcome
            await asyncio.sleep(_delay(outcome, attempt))
            attempt += 1
    finally:
        if own:
            await session.close()


def _retryable(exc: DeliveryError) -> bool:
    """Only when nothing can have been stored: a 503, or a connection that was never made."""
    return type(exc) is TransientError and (exc.status == 503 or exc.status is None)


def _post_sync(
    url: str, body: bytes, headers: dict[str, str], timeout: float
) -> dict[str, Any] | DeliveryError:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return _verdict(resp.status, resp.read(), resp.headers.get("Retry-After"))
    except urllib.error.HTTPError as exc:
        with exc:
            return _verdict(exc.code, exc.read(), exc.headers.get("Retry-After"))
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return TransientError(f"sidecar not reachable at {url}")
        return InDoubtError(f"no answer from the sidecar: {exc.reason}")
    except (TimeoutError, ConnectionError) as exc:
        return InDoubtError(f"no answer from the sidecar: {exc!r}")


async def _post_async(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], timeout: float
) -> dict[str, Any] | DeliveryError:
    try:
        async with session.post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            return _verdict(resp.status, await resp.read(), resp.headers.get("Retry-After"))
    except aiohttp.ClientConnectorError as exc:
        return TransientError(f"sidecar not reachable at {url}: {exc.os_error!r}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return InDoubtError(f"no answer from the sidecar: {exc!r}")
