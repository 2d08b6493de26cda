"""The CloudZero allocation telemetry API client: validate, pack, pace, retry, bisect, and report doubt.

One packed request (`send_request`) goes through these steps; `send` validates, packs and runs them for
each request in turn.

1. Pace: take the request's records from the shared token bucket (every attempt pays, retries included).
2. POST `{"records": [...]}` to `/unit-cost/v1/telemetry/allocation/{stream}/{op}` with the raw key in
   `Authorization` [doc].
3. Classify the answer (see `_classify`):
   - 2xx: delivered.
   - 400 / 413 / 422: never retried. The request is split in halves and each half sent again,
     recursively, so the offending records are isolated; a single record that is still refused is
     rejected with the server's message and everything else is delivered. (One bad record refuses the
     whole request [assume].)
   - 401 / 403: `AuthError`; its message never holds the key.
   - 408, 429, 500, 503, connection refused, connect timeout: a *clean* failure — the server did not apply
     the request [assume for 500 and 503: they say "not accepted"] — retried.
   - 502, 504, other 5xx, a timeout or a reset/disconnect after the body was sent, an unreadable response:
     *in doubt* — the server may have applied it (a gateway can fail after the backend accepted). Counted in
     `RequestOutcome.in_doubt`, reported to the observer and logged, then retried: `sum` is at-least-once
     here (DESIGN.md §2.5); `replace` with absolute totals makes the retry harmless.
   - 404 to a delete: the stream does not exist [doc]; every record of the request is rejected.
   - anything else (a redirect, 404/405 to sum or replace, another 4xx): more likely a wrong base URL than
     bad records, so never a reason to refuse data for good — a clean failure, retried until the deadline.
4. Between retries wait with full jitter, `uniform(0, min(cap, base * 2**retry))`, and at least the
   server's `Retry-After`.

Deadline: `retry_deadline` bounds the time one `send_request` spends on failing attempts and backoff
(time waiting for the rate limiter is not counted). When it would pass, or on 403, the request stops early.

The rule for stopping early (deadline, 403): if the request had *no effect* — nothing delivered, nothing
rejected, no attempt in doubt — the error is raised (`TransientError` with the last status and Retry-After,
or `AuthError`), so an exception always means "nothing happened; send it all again later". Otherwise the
outcome is returned with `interrupted=True`, `error` set and the unsettled indexes in `pending`, so an
acknowledgement is never lost. A set `stop` event never raises: no new attempt or backoff starts (a backoff
wakes at once), the attempt in flight finishes or times out, and the outcome says `interrupted`.

The key is read from `ApiKey` on every attempt (a reloaded key takes effect at once) and is never logged,
formatted into an error, or shown in a repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
import orjson

from allocd import __version__
from allocd.cloudzero.apikey import ApiKey
from allocd.cloudzero.ratelimit import Clock, RateLimiter, Sleep, sleep_or_stop
from allocd.cloudzero.records import (
    MAX_BODY_BYTES,
    MAX_RECORDS_PER_REQUEST,
    Op,
    RecordError,
    encode_body,
    parse_record,
    validate_stream_name,
)
from allocd.config import ApiSettings
from allocd.errors import AuthError, DeliveryError, TransientError

__all__ = [
    "ClientObserver",
    "ClientTuning",
    "CloudZeroClient",
    "RequestOutcome",
    "pack",
    "parse_retry_after",
]

log = logging.getLogger("allocd.client")

CLEAN_RETRY_STATUSES = frozenset({408, 429, 500, 503})
BISECT_STATUSES = frozenset({400, 413, 422})
AUTH_STATUSES = frozenset({401, 403})

# `{"records":[` + `]}`: the bytes of an encoded body around its comma-separated records.
_BODY_FRAME_BYTES = len(encode_body([]))
_MESSAGE_READ_BYTES = 4096


@dataclass(frozen=True)
class ClientTuning:
    """The client's fixed knobs, beside what the user configures (config.ApiSettings: base URL, rate,
    request size, timeouts). Defaults follow CloudZero's documented limits."""

    max_body_bytes: int = MAX_BODY_BYTES  # [doc] 5 MB
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    user_agent: str = f"allocd/{__version__}"
    connect_timeout: float = 10.0  # establishing the connection; a connect timeout is a clean failure


@dataclass
class RequestOutcome:
    """What became of the records of one `send_request` (or all of a `send`); indexes into its records."""

    delivered: list[int] = field(default_factory=list)  # the API accepted them
    rejected: list[tuple[int, str]] = field(default_factory=list)  # refused for good, with its message
    in_doubt: int = 0  # attempts whose outcome was unknown (0 = clean)
    interrupted: bool = False  # stopped (stop event, deadline, 403) before every record was settled
    attempts: int = 0
    pending: list[int] = field(default_factory=list)  # neither delivered nor rejected: send again later
    error: DeliveryError | None = None  # why it stopped early, when that was not the stop event

    @property
    def settled(self) -> bool:
        """Every index is delivered or rejected."""
        return not self.interrupted and not self.pending


class ClientObserver(Protocol):
    """Hooks for metrics; the client calls them and knows nothing about Prometheus
    (observability.Metrics and BeatingObserver implement them)."""

    def on_request(self, op: str, status: int | None, records: int, seconds: float) -> None:
        """One attempt finished: `status` is None when no HTTP status came back."""
        return None

    def on_retry(self, op: str, reason: str) -> None:
        """An attempt is about to be retried; `reason` is a status ("429") or "timeout", "connect", ..."""
        return None

    def on_in_doubt(self, op: str, records: int) -> None:
        """An attempt carrying `records` records may or may not have been applied."""
        return None

    def on_rejected(self, op: str, records: int) -> None:
        """`records` records were refused for good (after bisection narrowed a 400/413 down to them)."""
        return None

    def on_rate_wait(self, seconds: float) -> None:
        """The rate limiter held a request back for `seconds` (0 when it went at once)."""
        return None


class _NoObserver(ClientObserver):
    """The default: every hook a no-op."""


# --- packing -------------------------------------------------------------------------------------------
def pack(
    records: list[dict[str, Any]],
    max_records: int = MAX_RECORDS_PER_REQUEST,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> list[list[dict[str, Any]]]:
    """Split `records`, in order, into requests of at most `max_records` records whose encoded body
    (`encode_body`, byte for byte) is at most `max_body_bytes`. A record that alone exceeds the body limit
    raises RecordError naming its index."""
    batches: list[list[dict[str, Any]]] = []
    batch: list[dict[str, Any]] = []
    size = _BODY_FRAME_BYTES
    for index, record in enumerate(records):
        encoded = len(orjson.dumps(record))
        if _BODY_FRAME_BYTES + encoded > max_body_bytes:
            detail = f"alone it encodes to {_BODY_FRAME_BYTES + encoded} bytes > {max_body_bytes}"
            raise RecordError("body_too_large", detail, index=index)
        added = encoded + (1 if batch else 0)  # the comma before it
        if batch and (len(batch) >= max_records or size + added > max_body_bytes):
            batches.append(batch)
            batch, size, added = [], _BODY_FRAME_BYTES, encoded
        batch.append(record)
        size += added
    if batch:
        batches.append(batch)
    return batches


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP-date; None if absent/invalid."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now()
    if seconds != seconds or seconds == float("inf"):
        return None
    return max(0.0, seconds)


# --- one attempt -----------------------------------------------------------------------------------------
class _Verdict(enum.Enum):
    OK = "ok"
    BISECT = "bisect"  # 400/413: split and retry the halves
    REJECT = "reject"  # the whole part is refused (404 to a delete)
    AUTH = "auth"
    RETRY = "retry"


@dataclass(frozen=True)
class _Attempt:
    verdict: _Verdict
    status: int | None
    reason: str  # a short, bounded label for logs and metrics
    message: str = ""
    retry_after: float | None = None
    in_doubt: bool = False


def _classify(op: Op, status: int, message: str, retry_after: float | None) -> _Attempt:
    reason = str(status)
    if 200 <= status < 300:
        return _Attempt(_Verdict.OK, status, reason)
    if status in BISECT_STATUSES:
        return _Attempt(_Verdict.BISECT, status, reason, message)
    if status in AUTH_STATUSES:
        return _Attempt(_Verdict.AUTH, status, reason, message)
    if status == 404 and op is Op.DELETE:
        return _Attempt(_Verdict.REJECT, status, reason, message)
    if status >= 500 and status not in CLEAN_RETRY_STATUSES:
        # 502/504 and unknown 5xx: a gateway may fail after the backend accepted the body.
        return _Attempt(_Verdict.RETRY, status, reason, message, retry_after, in_doubt=True)
    # 408/429/500/503, and statuses no API answer should have (redirects, 404/405 to sum): not applied.
    return _Attempt(_Verdict.RETRY, status, reason, message, retry_after)


def _failure(exc: BaseException) -> _Attempt:
    """An attempt that got no HTTP status: clean if nothing can have reached the server, else in doubt."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return _Attempt(_Verdict.RETRY, None, "connect_timeout", "timed out connecting")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _Attempt(_Verdict.RETRY, None, "connect", str(exc))  # host, port and OS error only
    if isinstance(exc, asyncio.TimeoutError):
        return _Attempt(_Verdict.RETRY, None, "timeout", "timed out after sending", in_doubt=True)
    # A reset, a disconnect or a garbled response once the connection was up: the body may have been read.
    message = f"{type(exc).__name__} after sending"
    return _Attempt(_Verdict.RETRY, None, "disconnected", message, in_doubt=True)


async def _read_message(response: aiohttp.ClientResponse) -> str:
    """The server's `{"message": ...}` (or the start of its body); never fails."""
    raw = b""
    try:
        while len(raw) < _MESSAGE_READ_BYTES:  # bounded: an error page can be large
            chunk = await response.content.read(_MESSAGE_READ_BYTES - len(raw))
            if not chunk:
                break
            raw += chunk
    except (TimeoutError, aiohttp.ClientError):
        pass
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace").strip()[:300]
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:300]
    return raw.decode("utf-8", "replace").strip()[:300]


# --- the state of one send_request -------------------------------------------------------------------
class _DeadlinePassed(Exception):
    def __init__(self, attempt: _Attempt) -> None:
        self.attempt = attempt


@dataclass
class _Run:
    stream: str
    op: Op
    url: str
    records: list[dict[str, Any]]
    stop: asyncio.Event | None
    started: float
    outcome: RequestOutcome = field(default_factory=RequestOutcome)
    paced: float = 0.0  # seconds spent waiting for the rate limiter, not charged to the deadline
    stopped: bool = False

    def extra(self, **more: Any) -> dict[str, Any]:
        return {"stream": self.stream, "op": self.op.value, **more}


class CloudZeroClient:
    """Sends allocation records to CloudZero. See the module docstring for the retry and doubt rules.

    One client (and one `RateLimiter`) per process: the limiter paces every request it makes.
    """

    def __init__(
        self,
        settings: ApiSettings,
        key: ApiKey,
        *,
        tuning: ClientTuning = ClientTuning(),
        observer: ClientObserver | None = None,
        limiter: RateLimiter | None = None,
        session: aiohttp.ClientSession | None = None,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
    ) -> None:
        self.settings = settings
        self.tuning = tuning
        self._key = key
        self._observer = observer or _NoObserver()
        self._limiter = limiter or RateLimiter(
            settings.records_per_second, settings.effective_burst, clock=clock, sleep=sleep
        )
        self._session = session
        self._owns_session = session is None
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(
            total=settings.request_timeout, connect=min(tuning.connect_timeout, settings.request_timeout)
        )

    def __repr__(self) -> str:
        return f"CloudZeroClient(base_url={self.settings.base_url!r}, key={self._key!r})"

    @property
    def limiter(self) -> RateLimiter:
        return self._limiter

    async def __aenter__(self) -> CloudZeroClient:
        self._ensure_session()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session if the client created it (a session passed in belongs to the caller)."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(raise_for_status=False)
        return self._session

    def pack(self, records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        return pack(records, self.settings.records_per_request, self.tuning.max_body_bytes)

    def url(self, stream: str, op: Op) -> str:
        return f"{self.settings.base_url.rstrip('/')}/unit-cost/v1/telemetry/allocation/{stream}/{op.value}"

    # --- public sending ---------------------------------------------------------------------------------
    async def send(
        self, stream: str, op: Op, records: list[dict[str, Any]], stop: asyncio.Event | None = None
    ) -> RequestOutcome:
        """Validate every record (RecordError names the index and the rule), pack, and send the requests
        in order. Indexes in the outcome point into `records`. Stops at the first interrupted request; the
        rest are `pending`. Raises only when nothing at all happened (see the module docstring)."""
        op = Op(op)
        validate_stream_name(stream)
        for index, record in enumerate(records):
            parse_record(record, op, index=index)
        total = RequestOutcome()
        offset = 0
        for batch in self.pack(records):
            try:
                part = await self.send_request(stream, op, batch, stop)
            except DeliveryError as exc:
                if _had_effect(total):
                    part = RequestOutcome(interrupted=True, pending=list(range(len(batch))), error=exc)
                else:
                    raise
            _merge(total, part, offset)
            offset += len(batch)
            if part.interrupted:
                total.pending.extend(range(offset, len(records)))
                break
        return total

    async def send_request(
        self, stream: str, op: Op, records: list[dict[str, Any]], stop: asyncio.Event | None = None
    ) -> RequestOutcome:
        """Send one packed request (records already in API form and within the limits); see the module
        docstring for retries, bisection, doubt, the deadline and `stop`."""
        op = Op(op)
        validate_stream_name(stream)
        run = _Run(stream, op, self.url(stream, op), records, stop, self._clock())
        error: DeliveryError | None = None
        try:
            await self._deliver(run, list(range(len(records))))
        except _DeadlinePassed as exc:
            error = self._deadline_error(run, exc.attempt)
        except AuthError as exc:
            error = exc
        return _conclude(run, error)

    # --- the steps ----------------------------------------------------------------------------------------
    async def _deliver(self, run: _Run, indexes: list[int]) -> None:
        """Send the records at `indexes` until they are settled, bisecting on 400/413."""
        if not indexes:
            return
        retry = 0
        while True:
            if run.stopped or (run.stop is not None and run.stop.is_set()):
                run.stopped = True
                return
            waited = await self._limiter.acquire(len(indexes), run.stop)
            run.paced += waited
            self._notify("on_rate_wait", waited)
            if run.stop is not None and run.stop.is_set():
                run.stopped = True
                return
            attempt = await self._attempt(run, indexes)
            if attempt.verdict is _Verdict.OK:
                run.outcome.delivered.extend(indexes)
                return
            if attempt.verdict is _Verdict.AUTH:
                raise self._auth_error(run, attempt)
            single = len(indexes) == 1
            if attempt.verdict is _Verdict.REJECT or (attempt.verdict is _Verdict.BISECT and single):
                self._reject(run, indexes, attempt)
                return
            if attempt.verdict is _Verdict.BISECT:
                half = len(indexes) // 2
                await self._deliver(run, indexes[:half])
                await self._deliver(run, indexes[half:])
                return
            if not await self._back_off(run, attempt, retry, len(indexes)):
                run.stopped = True
                return
            retry += 1

    async def _attempt(self, run: _Run, indexes: list[int]) -> _Attempt:
        """One POST, classified. Not interrupted by `stop`: once started it finishes or times out."""
        session = self._ensure_session()
        body = encode_body([run.records[i] for i in indexes])
        headers = {
            "Authorization": self._key.get(),  # the raw key, no "Bearer " [doc]
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": self.tuning.user_agent,
        }
        run.outcome.attempts += 1
        number = run.outcome.attempts
        started = self._clock()
        try:
            post = session.post(
                run.url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
            )
            async with post as response:
                status = response.status
                if 200 <= status < 300:
                    attempt = _classify(run.op, status, "", None)
                    # Read the small acknowledgement so the connection can be reused; it is delivered
                    # whatever happens to these bytes.
                    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                        await response.read()
                else:
                    message = await _read_message(response)
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
                    attempt = _classify(run.op, status, message, retry_after)
        except (TimeoutError, aiohttp.ClientError) as exc:
            attempt = _failure(exc)
        seconds = self._clock() - started
        self._notify("on_request", run.op.value, attempt.status, len(indexes), seconds)
        extra = run.extra(status=attempt.status, records=len(indexes), attempt=number)
        log.debug(
            "attempt %d: %s (%d records, %.3fs)", number, attempt.reason, len(indexes), seconds, extra=extra
        )
        if attempt.in_doubt:
            run.outcome.in_doubt += 1
            self._notify("on_in_doubt", run.op.value, len(indexes))
            log.warning(
                "attempt %d in doubt (%s): %d records may have been applied",
                number,
                attempt.message or attempt.reason,
                len(indexes),
                extra=extra,
            )
        return attempt

    async def _back_off(self, run: _Run, attempt: _Attempt, retry: int, records: int) -> bool:
        """Wait before the next try. False if `stop` cut the wait; raises _DeadlinePassed if it would pass."""
        ceiling = min(self.tuning.backoff_cap, self.tuning.backoff_base * 2.0 ** min(retry, 60))
        delay = self._rng.uniform(0.0, ceiling)  # full jitter
        if attempt.retry_after is not None:
            delay = max(delay, attempt.retry_after)
        spent = self._clock() - run.started - run.paced
        if spent + delay > self.settings.retry_deadline:
            raise _DeadlinePassed(attempt)
        self._notify("on_retry", run.op.value, attempt.reason)
        log.info(
            "retrying in %.2fs after %s%s",
            delay,
            attempt.reason,
            f": {attempt.message}" if attempt.message else "",
            extra=run.extra(status=attempt.status, records=records, attempt=run.outcome.attempts),
        )
        return await sleep_or_stop(self._sleep, delay, run.stop)

    def _reject(self, run: _Run, indexes: list[int], attempt: _Attempt) -> None:
        message = attempt.message or f"HTTP {attempt.status}"
        run.outcome.rejected.extend((i, message) for i in indexes)
        self._notify("on_rejected", run.op.value, len(indexes))
        log.warning(
            "%d records rejected (%s): %s",
            len(indexes),
            attempt.status,
            message,
            extra=run.extra(status=attempt.status, records=len(indexes), attempt=run.outcome.attempts),
        )

    def _auth_error(self, run: _Run, attempt: _Attempt) -> AuthError:
        text = f"the API refused the key from {self._key.source} (HTTP {attempt.status})"
        if attempt.message:
            text += f": {attempt.message}"
        log.error("%s", text, extra=run.extra(status=attempt.status, attempt=run.outcome.attempts))
        return AuthError(text, attempt.status)

    def _deadline_error(self, run: _Run, attempt: _Attempt) -> TransientError:
        text = f"retry deadline of {self.settings.retry_deadline:g}s passed; last failure: {attempt.reason}"
        if attempt.message:
            text += f" ({attempt.message})"
        log.warning("%s", text, extra=run.extra(status=attempt.status, attempt=run.outcome.attempts))
        return TransientError(text, attempt.status, attempt.retry_after)

    def _notify(self, hook: str, *args: Any) -> None:
        # A broken metrics hook must not stop delivery.
        try:
            getattr(self._observer, hook)(*args)
        except Exception:
            log.exception("observer hook %s failed", hook)


# --- outcomes ------------------------------------------------------------------------------------------
def _had_effect(outcome: RequestOutcome) -> bool:
    return bool(outcome.delivered or outcome.rejected or outcome.in_doubt)


def _conclude(run: _Run, error: DeliveryError | None) -> RequestOutcome:
    """Fill in `pending` and `interrupted`; raise `error` only if the request had no effect at all."""
    outcome = run.outcome
    if error is not None and not _had_effect(outcome):
        raise error
    settled = set(outcome.delivered) | {i for i, _ in outcome.rejected}
    outcome.pending = [i for i in range(len(run.records)) if i not in settled]
    outcome.delivered.sort()
    outcome.rejected.sort()
    outcome.error = error
    outcome.interrupted = bool(outcome.pending)
    return outcome


def _merge(total: RequestOutcome, part: RequestOutcome, offset: int) -> None:
    total.delivered.extend(i + offset for i in part.delivered)
    total.rejected.extend((i + offset, message) for i, message in part.rejected)
    total.pending.extend(i + offset for i in part.pending)
    total.in_doubt += part.in_doubt
    total.attempts += part.attempts
    total.interrupted = total.interrupted or part.interrupted
    total.error = total.error or part.error
