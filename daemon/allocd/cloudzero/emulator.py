"""A local stand-in for CloudZero's allocation telemetry API: for tests, the demo and `allocd emulator`.

It follows shared/cloudzero-api.md and validates with the same rules as the client (records.py). On top of
the API it offers fault injection (latency, 503, 429, connection resets, accept-then-hang), deterministic
crash-point hooks and an admin API under `/_admin/` (only when enabled) to inspect and steer it.
A write goes through: latency → reset → auth (403) → injected 503/429 → stream name → body size (413) →
JSON → every record (400) → the stream's granularity and dimension set (400/404) → rate limit (429) →
apply → hook or hang → 200/201.

Assumptions (CloudZero documents none of these; each is marked [assume] where it is implemented):
- Response bodies are `{"message": "..."}`; a rejected record adds `"record_index"` (its place in the
  request) and `"detail"`. One bad record rejects the whole request and nothing of it is applied.
- A cell is keyed by (stream, granularity bucket of the timestamp, element_name, filter as a set of
  dimension → set of values). Incoming values are rounded to 15 significant digits [doc], then summed exactly.
- replace: records with the same key in one request are summed first; replace matches that exact key.
- delete: timestamp + granularity required, element_name and filter are wildcards when omitted; a given filter
  must have the stream's dimension set. The stream must exist (404 "Stream not found"). Deleted cells are kept
  but hidden; a later sum on a deleted key starts from 0. Answers 201 "Telemetry accepted".
- Stream delete (`DELETE /unit-cost/v1/telemetry/{stream}`): body `{"force": true}` optional and ignored;
  200, or 404 for no live stream. A later write recreates the stream fresh (new dimension set, no old cells).
- Read-back (`GET /unit-cost/v1/telemetry/{stream}/records`): `{"records": [...]}`, the live cells as API
  records with exact decimal-string values; 404 for no live stream.
- A timestamp more than `max_future` (default 1 day) ahead of now → 400 "Timestamp too far into the future".
- Body over 5 MB → 413, checked before parsing. gzip request bodies are not supported.
- Rate limit: one token bucket per API key, counted in records (100/s, burst 8,640,000 [doc numbers]); a
  request needing more tokens than are left → 429 and nothing applied; rejected requests cost no tokens.
- 429 and 503 carry `Retry-After` only when configured (`retry_after`; fractional seconds allowed).
- Injected faults apply to the write routes (sum, replace, delete, legacy post, stream delete), never to
  read-back or admin routes. Unit-cost metric streams are not emulated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import random
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from allocd.cloudzero.emulator_state import (
    ArmedHook,
    EmulatorState,
    Faults,
    Hook,
    RateLimiter,
    SqliteStore,
    StreamNotFound,
    is_number,
)
from allocd.cloudzero.records import (
    MAX_BODY_BYTES,
    MESSAGES,
    RATE_BURST_RECORDS,
    RATE_RECORDS_PER_SECOND,
    CanonicalFilter,
    Op,
    Record,
    RecordError,
    parse_record,
    validate_stream_name,
)
from allocd.errors import ConfigError
from allocd.shutdown import stop_on_signals
from allocd.webserver import bound_port, start_app, write_port_file

__all__ = [
    "EMULATOR_KEY",
    "KEYS_ENV",
    "Emulator",
    "EmulatorConfig",
    "Faults",
    "Hook",
    "add_arguments",
    "bound_port",
    "config_from_args",
    "create_app",
    "get_emulator",
    "run_command",
    "serve",
]

log = logging.getLogger("allocd.emulator")

API = "/unit-cost/v1/telemetry"
KEYS_ENV = "ALLOCD_EMULATOR_KEYS"
REQUEST_LOG_LIMIT = 100_000  # the admin request log keeps the newest entries only, so memory stays bounded
_HANG_POLL_SECONDS = 0.05


def _utc_now() -> datetime:
    return datetime.now(UTC)


# --- configuration -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """How the emulator starts. `keys` are the accepted API keys (never shown in reprs or logs)."""

    keys: tuple[str, ...] = field(default=(), repr=False)
    rate: float = RATE_RECORDS_PER_SECOND
    burst: float = RATE_BURST_RECORDS
    max_future: timedelta = timedelta(days=1)  # [assume] the documented limit's value is not public
    admin: bool = False
    persist_path: str | None = None
    faults: Faults = field(default_factory=Faults)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        if not all(isinstance(k, str) and k for k in self.keys):
            raise ConfigError("keys", "every API key must be a non-empty string")
        if not is_number(self.rate) or self.rate <= 0:
            raise ConfigError("rate", "must be records per second > 0")
        if not is_number(self.burst) or self.burst <= 0:
            raise ConfigError("burst", "must be a number of records > 0")


# --- request handling ----------------------------------------------------------------------------------
class _Reply(Exception):
    """Answer now with the message of `rule` (a key of records.MESSAGES)."""

    def __init__(self, status: int, rule: str, *, index: int | None = None, detail: str = "") -> None:
        super().__init__(rule)
        self.status = status
        self.rule = rule
        self.index = index
        self.detail = detail

    @classmethod
    def from_error(cls, exc: RecordError) -> _Reply:
        return cls(400, exc.rule, index=exc.index, detail=exc.detail)


@dataclass(slots=True)
class _Entry:
    """One line of the admin request log. `status` None: no answer was sent (reset, hang)."""

    seq: int
    op: str
    stream: str
    time: str
    records: int = 0
    status: int | None = None
    hook: bool = False
    fault: str | None = None
    applied: bool = False
    body: list[Any] | None = None  # the records, kept only for a request a hook fired on


class Emulator:
    """The emulator's state and handlers. `clock` (monotonic seconds) drives the rate limit, `wall_clock` the
    future-timestamp check; both are injectable so tests never sleep."""

    def __init__(
        self,
        config: EmulatorConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.config = config
        self.wall_clock = wall_clock
        self.keys = config.keys
        self.faults = config.faults
        self.hooks: list[ArmedHook] = []
        self.requests: deque[_Entry] = deque(maxlen=REQUEST_LOG_LIMIT)
        self.state = EmulatorState(SqliteStore(config.persist_path) if config.persist_path else None)
        self.limiter = RateLimiter(config.rate, config.burst, clock)
        self.rng = random.Random(config.seed)
        self._seq = 0
        self._closing = asyncio.Event()

    # --- Python API ------------------------------------------------------------------------------------
    def totals(self, stream: str) -> dict[tuple[str, str, CanonicalFilter], Decimal]:
        """Live cells of `stream`: (bucket timestamp `...Z`, element_name, canonical filter) → value."""
        return self.state.totals(stream)

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults

    def set_hooks(self, hooks: Sequence[Hook]) -> None:
        """Replace the hooks; each counts applied writes from now on."""
        self.hooks = [ArmedHook(h) for h in hooks]

    def set_keys(self, keys: Sequence[str]) -> None:
        self.keys = EmulatorConfig(keys=tuple(keys)).keys

    def reset(self) -> None:
        """Forget data, request log, faults, hooks and rate buckets; the RNG starts again from the seed."""
        self.state.clear()
        self.requests.clear()
        self.faults = Faults()
        self.hooks = []
        self.limiter.clear()
        self.rng = random.Random(self.config.seed)
        self._seq = 0

    def make_app(self) -> web.Application:
        # The default client_max_size (1 MB) is below the API's 5 MB limit; exactly 5 MB must pass.
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app[EMULATOR_KEY] = self
        allocation = f"{API}/allocation/{{stream}}"
        for op in Op:
            app.router.add_post(f"{allocation}/{op.value}", self._write_handler(op, op.value))
        app.router.add_post(allocation, self._write_handler(Op.SUM, "post"))  # deprecated, = sum [doc]
        app.router.add_delete(f"{API}/{{stream}}", self._delete_stream)
        app.router.add_get(f"{API}/{{stream}}/records", self._read_back)
        if self.config.admin:
            self._add_admin_routes(app)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        self._closing.set()  # releases hanging requests so the server can stop

    async def _on_cleanup(self, _app: web.Application) -> None:
        if self.state.store:
            self.state.store.close()

    # --- the frame every API request runs in -----------------------------------------------------------
    async def _handle(
        self,
        request: web.Request,
        label: str,
        body: Callable[[web.Request, _Entry], Awaitable[web.StreamResponse | None]],
    ) -> web.StreamResponse:
        self._seq += 1
        stamp = self.wall_clock().isoformat(timespec="milliseconds").replace("+00:00", "Z")
        entry = _Entry(self._seq, label, request.match_info.get("stream", "")[:300], stamp)
        self.requests.append(entry)
        try:
            response = await body(request, entry)
        except _Reply as reply:
            response = self._message(reply.status, reply.rule, index=reply.index, detail=reply.detail)
        entry.status = response.status if response is not None else None
        fault = f" fault={entry.fault}" if entry.fault else ""
        hook = " hook=fired" if entry.hook else ""
        status = entry.status if entry.status is not None else "none"
        log.info("%s %s records=%d status=%s%s%s", label, entry.stream, entry.records, status, fault, hook)
        # None: the connection is already closed, so nothing of this response reaches anyone.
        return response if response is not None else web.Response(status=500)

    def _message(self, status: int, rule: str, *, index: int | None = None, detail: str = "") -> web.Response:
        body: dict[str, Any] = {"message": MESSAGES[rule]}
        if index is not None:
            body["record_index"] = index
        if detail:
            body["detail"] = detail
        headers = {}
        if status in (429, 503) and self.faults.retry_after is not None:
            headers["Retry-After"] = _seconds_text(self.faults.retry_after)
        return _json(status, body, headers)

    def _draw(self, fraction: float) -> bool:
        # Draw only for enabled faults, so a fault sequence depends on the seed and the config alone.
        return fraction > 0 and self.rng.random() < fraction

    async def _network_faults(self, request: web.Request, entry: _Entry) -> bool:
        """Latency, then maybe a reset before the body is read. False: the connection was dropped."""
        if self.faults.latency > 0:
            await asyncio.sleep(self.faults.latency)
        if self._draw(self.faults.reset):
            entry.fault = "reset"
            _drop(request)
            return False
        return True

    def _error_faults(self, entry: _Entry) -> None:
        if self._draw(self.faults.error_503):
            entry.fault = "error_503"
            raise _Reply(503, "unavailable")
        if self._draw(self.faults.error_429):
            entry.fault = "error_429"
            raise _Reply(429, "rate_limited")

    def _authorize(self, request: web.Request) -> str:
        """The raw key in `Authorization`, no `Bearer ` [doc]; compared in constant time."""
        given = request.headers.get("Authorization", "").encode()
        for key in self.keys:
            if hmac.compare_digest(given, key.encode()):
                return key
        raise _Reply(403, "forbidden")

    # --- writes ----------------------------------------------------------------------------------------
    def _write_handler(self, op: Op, label: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._handle(request, label, lambda req, entry: self._write(req, entry, op))

        return handler

    async def _write(self, request: web.Request, entry: _Entry, op: Op) -> web.StreamResponse | None:
        if not await self._network_faults(request, entry):
            return None
        key = self._authorize(request)
        self._error_faults(entry)
        name = _stream_name(request)
        raws = _records_of(await _read_json(request))
        entry.records = len(raws)
        records, filter_given = self._parse(raws, op)
        try:
            self.state.check(name, op, records, filter_given)
        except StreamNotFound:
            raise _Reply(404, "stream_not_found") from None
        except RecordError as exc:
            raise _Reply.from_error(exc) from None
        if not self.limiter.take(key, len(records)):
            raise _Reply(429, "rate_limited")
        hook = self._count_hooks(op, entry, key)
        if hook is None or hook.apply:
            self.state.apply(name, op, records, filter_given)
            entry.applied = True
        if hook is not None:
            entry.body = raws
            return await self._run_hook(request, hook)
        if self._draw(self.faults.hang):
            entry.fault = "hang"
            await self._hang(request)
            return None
        # 201 for delete, 200 for sum/replace/post [doc]; delete's message is [assume] the same.
        return self._message(201 if op is Op.DELETE else 200, "accepted")

    def _parse(self, raws: list[Any], op: Op) -> tuple[list[Record], list[bool]]:
        now = self.wall_clock()
        records: list[Record] = []
        filter_given: list[bool] = []
        for i, raw in enumerate(raws):
            try:
                records.append(parse_record(raw, op, now=now, max_future=self.config.max_future, index=i))
            except RecordError as exc:
                raise _Reply.from_error(exc) from None
            # [assume] an omitted delete filter is a wildcard; sum/replace always have a filter set.
            filter_given.append(op is not Op.DELETE or raw.get("filter") is not None)
        return records, filter_given

    def _count_hooks(self, op: Op, entry: _Entry, key: str) -> Hook | None:
        """Count this applied write for every armed hook; return the one that fires now (one per request)."""
        fired: Hook | None = None
        for armed in self.hooks:
            if armed.fired_on is not None or (armed.hook.op is not None and armed.hook.op is not op):
                continue
            if armed.hook.key is not None and not hmac.compare_digest(armed.hook.key, key):
                continue
            armed.seen += 1
            if fired is None and armed.seen >= armed.hook.after_request:
                armed.fired_on = entry.seq
                fired = armed.hook
        if fired is not None:
            entry.hook = True
            log.info("hook fired on request %d: %s", entry.seq, fired.action)
        return fired

    async def _run_hook(self, request: web.Request, hook: Hook) -> web.StreamResponse | None:
        if hook.action == "fail503":
            return self._message(503, "unavailable")
        if hook.action == "signal":
            assert hook.pid is not None
            try:
                os.kill(hook.pid, hook.signum())
            except OSError as exc:
                log.warning("hook could not signal pid %d: %s", hook.pid, exc)
        await self._hang(request)
        return None

    async def _hang(self, request: web.Request) -> None:
        """Never answer: wait until the client leaves or the server shuts down, then drop the connection."""
        while not self._closing.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), _HANG_POLL_SECONDS)
        _drop(request)

    # --- stream delete and read-back -------------------------------------------------------------------
    async def _delete_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "delete_stream", self._delete_stream_body)

    async def _delete_stream_body(self, request: web.Request, entry: _Entry) -> web.StreamResponse | None:
        if not await self._network_faults(request, entry):
            return None
        self._authorize(request)
        self._error_faults(entry)
        name = _stream_name(request)
        if request.can_read_body:
            await _read_json(
                request, optional=True
            )  # [assume] `{"force": true}` may come; it changes nothing
        if not self.state.delete_stream(name):
            raise _Reply(404, "stream_not_found")
        return _json(200, {"message": "Stream marked for deletion"})  # [assume] status and message

    async def _read_back(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "read", self._read_back_body)

    async def _read_back_body(self, request: web.Request, _entry: _Entry) -> web.StreamResponse:
        self._authorize(request)
        records = self.state.live_records(_stream_name(request))
        if records is None:
            raise _Reply(404, "stream_not_found")
        return _json(200, {"records": records})

    # --- admin -----------------------------------------------------------------------------------------
    def _add_admin_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/_admin/totals", self._admin_totals)
        r.add_get("/_admin/requests", self._admin_requests)
        r.add_get("/_admin/faults", self._admin_get_faults)
        r.add_post("/_admin/faults", self._admin_set_faults)
        r.add_get("/_admin/hooks", self._admin_get_hooks)
        r.add_post("/_admin/hooks", self._admin_set_hooks)
        r.add_post("/_admin/reset", self._admin_reset)
        r.add_post("/_admin/keys", self._admin_set_keys)

    async def _admin_totals(self, request: web.Request) -> web.Response:
        return _json(200, self.state.snapshot(request.query.get("stream")))

    async def _admin_requests(self, _request: web.Request) -> web.Response:
        return _json(200, {"requests": [asdict(e) for e in self.requests]})

    async def _admin_get_faults(self, _request: web.Request) -> web.Response:
        return _json(200, self.faults.to_json())

    async def _admin_set_faults(self, request: web.Request) -> web.Response:
        return await _admin_update(
            request, lambda doc: self.set_faults(Faults.from_json(doc)), self.faults_json
        )

    def faults_json(self) -> dict[str, Any]:
        return self.faults.to_json()

    async def _admin_get_hooks(self, _request: web.Request) -> web.Response:
        return _json(200, self.hooks_json())

    def hooks_json(self) -> dict[str, Any]:
        return {
            "hooks": [{**a.hook.to_json(), "seen": a.seen, "fired_on": a.fired_on} for a in self.hooks],
        }

    async def _admin_set_hooks(self, request: web.Request) -> web.Response:
        def apply(doc: Any) -> None:
            # One hook object, a list of them, or {"hooks": [...]}; replaces every hook ([] clears).
            items = doc.get("hooks") if isinstance(doc, dict) and "hooks" in doc else doc
            items = [items] if isinstance(items, dict) else items
            if not isinstance(items, list):
                raise ConfigError("hooks", "must be a hook object or a list of them")
            self.set_hooks([Hook.from_json(item) for item in items])

        return await _admin_update(request, apply, self.hooks_json)

    async def _admin_reset(self, _request: web.Request) -> web.Response:
        self.reset()
        return _json(200, {"message": "reset"})

    async def _admin_set_keys(self, request: web.Request) -> web.Response:
        def apply(doc: Any) -> None:
            keys = doc.get("keys") if isinstance(doc, dict) else None
            if not isinstance(keys, list):
                raise ConfigError("keys", 'expected {"keys": ["...", ...]}')
            self.set_keys(keys)

        return await _admin_update(request, apply, lambda: {"keys": len(self.keys)})  # a count, never keys


EMULATOR_KEY = web.AppKey("allocd_emulator", Emulator)


def get_emulator(app: web.Application) -> Emulator:
    """The Emulator behind an app made by `create_app` (for in-process tests)."""
    return app[EMULATOR_KEY]


def _json(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _seconds_text(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _drop(request: web.Request) -> None:
    """Close the connection without an answer: the client sees a disconnect."""
    transport = request.transport
    if transport is not None:
        transport.close()


def _stream_name(request: web.Request) -> str:
    try:
        return validate_stream_name(request.match_info["stream"])
    except RecordError as exc:
        raise _Reply.from_error(exc) from None


async def _read_json(request: web.Request, *, optional: bool = False) -> Any:
    """The body as JSON; size checked before parsing (Content-Length first, then while reading)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _Reply(413, "body_too_large")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _Reply(413, "body_too_large") from None
    if optional and not body.strip():
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _Reply(400, "invalid_json") from None


def _records_of(doc: Any) -> list[Any]:
    records = doc.get("records") if isinstance(doc, dict) else None
    if not isinstance(records, list) or not records:
        raise _Reply(400, "invalid_records")
    return records


async def _admin_update(
    request: web.Request, apply: Callable[[Any], None], current: Callable[[], Any]
) -> web.Response:
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _json(400, {"message": MESSAGES["invalid_json"]})
    try:
        apply(doc)
    except (ConfigError, TypeError) as exc:
        return _json(400, {"message": str(exc)})
    return _json(200, current())


# --- running it ----------------------------------------------------------------------------------------
def create_app(
    config: EmulatorConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], datetime] = _utc_now,
) -> web.Application:
    """A fresh emulator as an aiohttp app; `get_emulator(app)` reaches its state."""
    return Emulator(config, clock=clock, wall_clock=wall_clock).make_app()


async def serve(
    config: EmulatorConfig,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> web.AppRunner:
    """Start listening and return the running runner (`bound_port(runner)` tells the port; 0 picks one).
    Stop it with `await runner.cleanup()`."""
    return await start_app(create_app(config, clock=clock), host, port, handle_signals=False)


# Which command-line option a config or fault field comes from, so errors name what the user typed.
_OPTIONS = {
    "keys": "--key",
    "rate": "--rate",
    "burst": "--burst",
    "latency": "--latency",
    "error_503": "--fault-503",
    "error_429": "--fault-429",
    "retry_after": "--retry-after",
    "reset": "--fault-reset",
    "hang": "--fault-hang",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    a("--port", type=int, default=8080, help="port to listen on; 0 picks a free one (default 8080)")
    a("--key", action="append", default=[], help=f"an accepted API key (repeatable; also {KEYS_ENV}=k1,k2)")
    a("--rate", type=float, default=RATE_RECORDS_PER_SECOND, help="records per second per key (default 100)")
    a(
        "--burst",
        type=float,
        default=RATE_BURST_RECORDS,
        help="token bucket size in records (default 8640000)",
    )
    a("--max-future", type=float, default=86400, metavar="S", help="how far ahead a timestamp may be (s)")
    a("--admin", action="store_true", help="mount the /_admin/ routes (inspect totals, set faults and hooks)")
    a("--persist", metavar="PATH", help="keep streams in this SQLite file across restarts")
    a("--seed", type=int, default=0, help="seed of the fault RNG (default 0)")
    a("--fault-503", type=float, default=0.0, metavar="F", help="fraction of writes answered 503")
    a("--fault-429", type=float, default=0.0, metavar="F", help="fraction of writes answered 429")
    a("--retry-after", type=float, default=None, metavar="S", help="send Retry-After: S with 429 and 503")
    a("--latency", type=float, default=0.0, metavar="S", help="delay every write by S seconds")
    a("--fault-reset", type=float, default=0.0, metavar="F", help="fraction of writes reset before reading")
    a("--fault-hang", type=float, default=0.0, metavar="F", help="fraction of writes applied, never answered")
    a("--port-file", metavar="PATH", help="write the bound port here once listening")


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> EmulatorConfig:
    env_keys = [k.strip() for k in environ.get(KEYS_ENV, "").split(",") if k.strip()]
    keys = (*args.key, *env_keys)
    if not keys:
        raise ConfigError("--key", f"at least one API key is required (or set {KEYS_ENV})")
    try:
        faults = Faults(
            latency=args.latency,
            error_503=args.fault_503,
            error_429=args.fault_429,
            retry_after=args.retry_after,
            reset=args.fault_reset,
            hang=args.fault_hang,
        )
        return EmulatorConfig(
            keys=keys,
            rate=args.rate,
            burst=args.burst,
            max_future=timedelta(seconds=args.max_future),
            admin=args.admin,
            persist_path=args.persist,
            faults=faults,
            seed=args.seed,
        )
    except ConfigError as exc:
        raise ConfigError(_OPTIONS.get(exc.key, exc.key), exc.problem) from None


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)


async def run_command(args: argparse.Namespace) -> int:
    """`allocd emulator`: serve until SIGTERM or SIGINT, then stop cleanly and return 0."""
    config = config_from_args(args)
    _setup_logging()
    stop = asyncio.Event()
    # installed before the port is announced, so an early SIGTERM is handled too
    with stop_on_signals(stop):
        runner = await serve(config, args.host, args.port)
        try:
            port = bound_port(runner)
            if args.port_file:
                write_port_file(args.port_file, port)
            admin = "on" if config.admin else "off"
            log.info(
                "CloudZero API emulator on http://%s:%d (admin %s, %d keys)",
                args.host,
                port,
                admin,
                len(config.keys),
            )
            await stop.wait()
            log.info("stopping")
        finally:
            await runner.cleanup()
    return 0
