"""Settings from a TOML file and `ALLOCD_<SECTION>_<KEY>` environment variables (the environment wins).

Each section is a frozen dataclass, `[events]` included (its streams and field mapping as dataclasses of
their own); each field's comment is its documentation (the README's configuration tables use the same
names). `load_settings` is the one place the whole file is validated: a bad value stops start-up with a
ConfigError naming the key as the user wrote it (`kafka.session_timeout_ms`,
`ALLOCD_KAFKA_SESSION_TIMEOUT_MS`, `events.streams.billing.granularity`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import urlsplit

from allocd.cloudzero.records import (
    MAX_DIMENSIONS,
    MAX_RECORDS_PER_REQUEST,
    RATE_RECORDS_PER_SECOND,
    CanonicalFilter,
    Granularity,
    RecordError,
    canonical_filter,
    is_recognised_dimension,
    validate_filter,
    validate_stream_name,
)
from allocd.errors import ConfigError
from allocd.mapping import TIMESTAMP_FORMATS, split_path

__all__ = [
    "ApiSettings",
    "EventsSettings",
    "KafkaSettings",
    "MappingSettings",
    "PipelineSettings",
    "ServerSettings",
    "Settings",
    "SidecarSettings",
    "StreamSettings",
    "load_settings",
]

_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"  # host:port[,host:port]
    topics: tuple[str, ...] = ("allocd-events",)  # topics to consume
    group_id: str = "allocd"  # consumer group; also keys the checkpoints
    checkpoint_topic: str = "allocd-checkpoints"  # journal + checkpoints (the authority for offsets)
    dlq_topic: str = "allocd-dlq"  # invalid events and records the API refused, with reasons in headers
    create_topics: bool = True  # create the checkpoint and DLQ topics when missing
    auto_offset_reset: str = "earliest"  # where a partition with no checkpoint and no commit starts
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    rebalance_timeout_ms: int = 30_000  # how long a rebalance waits for members to release
    max_poll_records: int = 5_000
    fetch_max_bytes: int = 52_428_800
    connect_timeout_seconds: float = 60.0  # start-up retries unreachable brokers this long, then exits
    client_id: str = "allocd"
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str = "PLAIN"  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str = ""
    sasl_password_file: str = ""  # path to a file holding the SASL password (a mounted secret)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""

    def validate(self, prefix: str) -> None:
        if not self.topics:
            raise ConfigError(f"{prefix}topics", "at least one topic is required")
        if self.security_protocol not in _SECURITY_PROTOCOLS:
            raise ConfigError(
                f"{prefix}security_protocol", f"must be one of {', '.join(_SECURITY_PROTOCOLS)}"
            )
        if self.sasl_mechanism not in _SASL_MECHANISMS:
            raise ConfigError(f"{prefix}sasl_mechanism", f"must be one of {', '.join(_SASL_MECHANISMS)}")
        if self.security_protocol.startswith("SASL") and not self.sasl_username:
            raise ConfigError(f"{prefix}sasl_username", "required with a SASL security_protocol")
        if self.security_protocol.startswith("SASL") and not self.sasl_password_file:
            raise ConfigError(f"{prefix}sasl_password_file", "required with a SASL security_protocol")
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ConfigError(f"{prefix}auto_offset_reset", "must be earliest or latest")
        if self.checkpoint_topic in self.topics or self.dlq_topic in self.topics:
            raise ConfigError(f"{prefix}topics", "must not include the checkpoint or DLQ topic")
        _positive(self, prefix, "session_timeout_ms", "heartbeat_interval_ms", "max_poll_records")
        _positive(self, prefix, "connect_timeout_seconds")


@dataclass(frozen=True)
class ApiSettings:
    base_url: str = "https://api.cloudzero.com"
    api_key_file: str = ""  # path to the key (a mounted Secret); else the ALLOCD_API_KEY env var
    api_key_env: str = "ALLOCD_API_KEY"  # name of the env var holding the key when no file is given
    records_per_request: int = MAX_RECORDS_PER_REQUEST  # [seen] what CloudZero's own tools send (3,000)
    records_per_second: float = float(RATE_RECORDS_PER_SECOND)  # [doc] this process's share of the org's 100
    burst: float = 0.0  # token bucket burst in records; 0 = one full request
    request_timeout: float = 30.0  # seconds per attempt; a timeout after sending is in doubt
    retry_deadline: float = 300.0  # seconds of failing attempts + backoff per request, then the cycle waits

    @property
    def effective_burst(self) -> float:
        return float(self.burst or self.records_per_request)

    def validate(self, prefix: str) -> None:
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(
                f"{prefix}base_url", f"must be an http:// or https:// URL, got {self.base_url!r}"
            )
        if not 1 <= self.records_per_request <= 10_000:
            raise ConfigError(f"{prefix}records_per_request", "must be between 1 and 10000")
        _positive(self, prefix, "records_per_second", "request_timeout", "retry_deadline")
        if not (self.burst == 0 or self.burst >= 1):
            raise ConfigError(f"{prefix}burst", f"must be 0 (one full request) or >= 1, got {self.burst!r}")


@dataclass(frozen=True)
class PipelineSettings:
    grace_seconds: float = 300.0  # a window closes at its end plus this
    max_flush_interval_seconds: float = 86_400.0  # forces a cycle of open windows; bounds offset lag
    max_open_keys: int = 1_000_000  # open cells before a forced cycle
    max_memory_bytes: int = 512 * 1024 * 1024  # accumulator estimate before a forced cycle
    max_pending_snapshots: int = 1  # snapshots waiting behind the one in flight before pausing
    flush_on_shutdown: bool | None = None  # deliver open windows on SIGTERM; unset: only the sidecar does
    shutdown_timeout_seconds: float = 30.0
    tick_seconds: float = 0.5  # how often windows are checked for closing when no events arrive
    checkpoint_interval_seconds: float = 600.0  # checkpoint owned partitions at least this often, idle too
    window_seconds: int = 0  # TEST ONLY: override every stream's window size (0 = its granularity)

    def flushes_on_shutdown(self, sidecar: bool) -> bool:
        """The sidecar's spool may die with its pod, so it delivers open windows on SIGTERM by default."""
        return sidecar if self.flush_on_shutdown is None else self.flush_on_shutdown

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "max_flush_interval_seconds", "max_open_keys", "shutdown_timeout_seconds")
        _positive(self, prefix, "tick_seconds", "max_memory_bytes", "checkpoint_interval_seconds")
        if self.grace_seconds < 0:
            raise ConfigError(f"{prefix}grace_seconds", "must be >= 0")
        if self.max_pending_snapshots < 0:
            raise ConfigError(f"{prefix}max_pending_snapshots", "must be >= 0")
        if self.window_seconds < 0:
            raise ConfigError(f"{prefix}window_seconds", "must be >= 0")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"  # metrics/health server
    port: int = 9464
    liveness_timeout_seconds: float = 120.0  # /healthz fails when a loop made no progress this long
    assignment_grace_seconds: float = 60.0  # /readyz is OK this long while waiting for partitions
    log_level: str = "INFO"

    def validate(self, prefix: str) -> None:
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"{prefix}log_level", "must be DEBUG, INFO, WARNING or ERROR")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{prefix}port", "must be a TCP port")


@dataclass(frozen=True)
class SidecarSettings:
    enabled: bool = False  # source = local HTTP ingest with a durable spool instead of Kafka
    host: str = "127.0.0.1"
    port: int = 8125
    spool_dir: str = "/var/lib/allocd/spool"
    max_spool_bytes: int = 1024 * 1024 * 1024
    max_body_bytes: int = 4 * 1024 * 1024
    shared_secret_file: str = ""  # when set, POST /v1/events requires X-Allocd-Secret

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "max_spool_bytes", "max_body_bytes")


# --- [events]: what the decoder accepts ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MappingSettings:
    """`[events.mapping]`: dotted paths to each field of an event (mapping.lookup walks them); the defaults
    read the canonical shape."""

    element: str = "element_name"  # e.g. "customer.id"
    value: str = "value"  # e.g. "usage.records"
    timestamp: str = "timestamp"  # absent in an event → the source's record timestamp
    timestamp_format: str = "auto"  # auto (ISO 8601 string or epoch number) | iso | epoch_s | epoch_ms
    stream: str = "stream"  # absent in an event → the config's default stream
    id: str = "id"
    filter: str | None = "filter"  # a canonical filter object in the event; None (or "" in TOML): none
    # dimension name → dotted path, e.g. {"custom:region": "meta.region"}; a scalar becomes a one-value list,
    # a list of scalars stays a list; merged (values united) with the filter object.
    dimensions: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, *, prefix: str = "mapping.") -> MappingSettings:
        """Build from a config table; a ConfigError names the key as `prefix + key`."""
        _check_table(data, prefix.rstrip("."), _MAPPING_KEYS, prefix)
        values: dict[str, Any] = {}
        for name in ("element", "value", "timestamp", "stream", "id"):
            if name in data:
                values[name] = _path_setting(f"{prefix}{name}", data[name])
        if "filter" in data:
            raw = data["filter"]
            # TOML has no null: "" or false turn the filter object off.
            values["filter"] = None if raw in (None, "", False) else _path_setting(f"{prefix}filter", raw)
        if "timestamp_format" in data:
            fmt = data["timestamp_format"]
            if fmt not in TIMESTAMP_FORMATS:
                raise ConfigError(
                    f"{prefix}timestamp_format", f"must be one of {', '.join(TIMESTAMP_FORMATS)}"
                )
            values["timestamp_format"] = fmt
        if "dimensions" in data:
            values["dimensions"] = _dimension_settings(f"{prefix}dimensions", data["dimensions"])
        return cls(**values)


def _path_setting(key: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(key, f"expected a dotted field path, got {raw!r}")
    split_path(raw, key)
    return raw


def _dimension_settings(key: str, raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise ConfigError(key, "must be a table of dimension name → dotted field path")
    if len(raw) > MAX_DIMENSIONS:
        raise ConfigError(key, f"at most {MAX_DIMENSIONS} dimensions")
    out: dict[str, str] = {}
    for name, path in raw.items():
        if not isinstance(name, str) or not is_recognised_dimension(name):
            raise ConfigError(
                f"{key}.{name}", "not a recognised dimension (custom:, tag:, k8s_label: or built-in)"
            )
        out[name] = _path_setting(f"{key}.{name}", path)
    return out


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """`[events.streams.<name>]`: what the API fixes at a stream's first write, plus dimensions added to
    every event of it."""

    name: str
    granularity: Granularity = Granularity.HOURLY
    dimensions: frozenset[str] = frozenset()  # the filter dimension set; an event must carry exactly these
    constant_filter: CanonicalFilter = ()  # e.g. (("tag:environment", ("prod",)),); overrides the event's


@dataclass(frozen=True, slots=True)
class EventsSettings:
    """`[events]`: what the decoder accepts — the declared streams, the field mapping and the limits."""

    streams: Mapping[str, StreamSettings]  # by name
    default_stream: str | None = None  # the stream of an event that names none
    undeclared: str = "reject"  # "reject" (DLQ) | "accept" (HOURLY, no dimension check)
    mapping: MappingSettings = field(default_factory=MappingSettings)
    max_lateness_ms: int = 7 * 24 * 3600 * 1000  # older than this before the record timestamp → too_late
    max_future_ms: int = 15 * 60 * 1000  # later than this after the record timestamp → future
    max_event_bytes: int = 64 * 1024

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, prefix: str = "") -> EventsSettings:
        """Build from the `events` config table; a ConfigError names the key (`streams.billing.granularity`).

        `prefix` is put before every key (a missing trailing dot is added): `prefix="events"` gives
        `events.streams.billing.granularity`.
        """
        if prefix and not prefix.endswith("."):
            prefix += "."
        _check_table(data, prefix.rstrip(".") or "events", _CONFIG_KEYS, prefix)
        streams = _streams_setting(f"{prefix}streams", data.get("streams", {}))
        undeclared = data.get("undeclared", "reject")
        if undeclared not in ("reject", "accept"):
            raise ConfigError(f"{prefix}undeclared", f"must be reject or accept, got {undeclared!r}")
        default_stream = data.get("default_stream") or None  # "" (an empty env var) means none
        if default_stream is not None:
            try:
                validate_stream_name(default_stream)
            except RecordError as exc:
                raise ConfigError(f"{prefix}default_stream", exc.describe()) from None
            if undeclared == "reject" and default_stream not in streams:
                raise ConfigError(f"{prefix}default_stream", f"{default_stream!r} is not declared in streams")
        mapping = MappingSettings.from_dict(data.get("mapping", {}), prefix=f"{prefix}mapping.")
        limits: dict[str, int] = {}
        for name in _LIMIT_KEYS:
            value = _int_setting(f"{prefix}{name}", data, name)
            if value is not None:
                limits[name] = value
        return cls(streams, default_stream, undeclared, mapping, **limits)


_MAPPING_KEYS = ("element", "value", "timestamp", "timestamp_format", "stream", "id", "filter", "dimensions")
_EVENTS_ENV_KEYS = ("default_stream", "undeclared")  # the [events] keys the environment may set
_LIMIT_KEYS = ("max_lateness_ms", "max_future_ms", "max_event_bytes")
_CONFIG_KEYS = ("streams", "default_stream", "undeclared", "mapping", *_LIMIT_KEYS)
_STREAM_KEYS = ("granularity", "dimensions", "constant_filter")


def _check_table(data: Any, key: str, known: tuple[str, ...], prefix: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(key, "must be a table")
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key (known: {', '.join(sorted(known))})")


def _int_setting(key: str, data: Mapping[str, Any], name: str) -> int | None:
    if name not in data:
        return None
    raw = data[name]
    if type(raw) is not int or raw < (1 if name == "max_event_bytes" else 0):
        raise ConfigError(
            key, f"expected an integer {'> 0' if name == 'max_event_bytes' else '>= 0'}, got {raw!r}"
        )
    return raw


def _streams_setting(key: str, raw: Any) -> dict[str, StreamSettings]:
    if not isinstance(raw, Mapping):
        raise ConfigError(key, "must be a table of stream name → settings")
    out: dict[str, StreamSettings] = {}
    for name, spec in raw.items():
        try:
            validate_stream_name(name)
        except RecordError as exc:
            raise ConfigError(f"{key}.{name}", exc.describe()) from None
        out[name] = _stream_setting(f"{key}.{name}.", name, spec)
    return out


def _stream_setting(prefix: str, name: str, data: Any) -> StreamSettings:
    _check_table(data, prefix.rstrip("."), _STREAM_KEYS, prefix)
    raw_granularity = data.get("granularity", "HOURLY")
    try:
        granularity = Granularity(raw_granularity.upper())
    except (AttributeError, ValueError):
        raise ConfigError(
            f"{prefix}granularity", f"must be HOURLY, DAILY or MONTHLY, got {raw_granularity!r}"
        ) from None
    dims = data.get("dimensions", [])
    if not isinstance(dims, list | tuple) or not all(isinstance(d, str) for d in dims):
        raise ConfigError(f"{prefix}dimensions", "must be a list of dimension names")
    if len(set(dims)) != len(dims) or len(dims) > MAX_DIMENSIONS:
        raise ConfigError(f"{prefix}dimensions", f"at most {MAX_DIMENSIONS} dimensions, without repeats")
    for dim in dims:
        if not is_recognised_dimension(dim):
            raise ConfigError(f"{prefix}dimensions", f"{dim!r} is not a recognised dimension")
    constant = _constant_filter_setting(f"{prefix}constant_filter", data.get("constant_filter", {}))
    extra = sorted({k for k, _ in constant} - set(dims))
    if extra:
        raise ConfigError(
            f"{prefix}constant_filter", f"dimension {extra[0]!r} is missing from {prefix}dimensions"
        )
    return StreamSettings(name, granularity, frozenset(dims), constant)


def _constant_filter_setting(key: str, raw: Any) -> CanonicalFilter:
    if not isinstance(raw, Mapping):
        raise ConfigError(key, "must be a table of dimension → list of values")
    as_lists = {k: [v] if isinstance(v, str) else v for k, v in raw.items()}
    try:
        return canonical_filter(validate_filter(as_lists))
    except RecordError as exc:
        raise ConfigError(key, exc.describe()) from None


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    sidecar: SidecarSettings = field(default_factory=SidecarSettings)
    events: EventsSettings = field(default_factory=lambda: EventsSettings({}))


_SECTIONS = {
    "kafka": KafkaSettings,
    "api": ApiSettings,
    "pipeline": PipelineSettings,
    "server": ServerSettings,
    "sidecar": SidecarSettings,
}


def _positive(obj: object, prefix: str, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) > 0:  # written so that NaN fails too
            raise ConfigError(f"{prefix}{name}", "must be > 0")


def _coerce(key: str, raw: Any, kind: Any, from_env: bool) -> Any:
    """Convert one value to the field's type; env values arrive as strings."""
    try:
        if kind == bool | None:
            kind = bool
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if from_env and raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if from_env and raw.strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError
            return int(raw.replace("_", "")) if from_env else _exact_int(raw)
        if kind is float:
            if isinstance(raw, bool) or (isinstance(raw, str) and not from_env):
                raise ValueError
            value = float(raw)
            if value != value:
                raise ValueError
            return value
        if kind == tuple[str, ...]:
            items = raw.split(",") if from_env else raw
            if isinstance(items, str) or not all(isinstance(i, str) for i in items):
                raise ValueError
            return tuple(i.strip() for i in items if i.strip())
        if not isinstance(raw, str):
            raise ValueError
        return raw
    except (ValueError, TypeError, AttributeError):
        expected = {bool: "a boolean", int: "an integer", float: "a number"}.get(kind, "a string")
        if kind == tuple[str, ...]:
            expected = "a list of strings" + (" (comma-separated)" if from_env else "")
        raise ConfigError(key, f"expected {expected}, got {raw!r}") from None


def _exact_int(raw: Any) -> int:
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    raise ValueError


def _build_section(name: str, cls: type, data: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(names))})")
    values: dict[str, Any] = {}
    for fname in names:
        env_key = f"ALLOCD_{name.upper()}_{fname.upper()}"
        if env_key in env:
            values[fname] = _coerce(env_key, env[env_key], hints[fname], from_env=True)
        elif fname in data:
            values[fname] = _coerce(f"{name}.{fname}", data[fname], hints[fname], from_env=False)
    section = cls(**values)
    section.validate(f"{name}.")
    return section


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read the TOML file (optional) and the environment; validate everything; raise ConfigError on the first
    problem. `ALLOCD_CONFIG` names the file when `path` is None."""
    env = os.environ if env is None else env
    path = path or env.get("ALLOCD_CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError("config file", f"{path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config file", f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(_SECTIONS) - {"events"})
    if unknown:
        raise ConfigError(unknown[0], f"unknown section (known: {', '.join([*_SECTIONS, 'events'])})")
    sections = {}
    for name, cls in _SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, Mapping):
            raise ConfigError(name, "must be a table")
        sections[name] = _build_section(name, cls, raw, env)
    raw_events = data.get("events", {})
    if not isinstance(raw_events, Mapping):
        raise ConfigError("events", "must be a table")
    events = dict(raw_events)
    for name in _EVENTS_ENV_KEYS:
        env_key = f"ALLOCD_EVENTS_{name.upper()}"
        if env_key in env:
            events[name] = env[env_key]
    return Settings(**sections, events=EventsSettings.from_dict(events, prefix="events."))
