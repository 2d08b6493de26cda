"""Settings from a TOML file and `ALLOCD_<SECTION>_<KEY>` environment variables (the environment wins).

Each section is a frozen dataclass; each field's comment is its documentation (the README's configuration
table is generated from the same names). A bad value stops start-up with a ConfigError naming the key as the
user wrote it (`kafka.session_timeout_ms` or `ALLOCD_KAFKA_SESSION_TIMEOUT_MS`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from allocd.errors import ConfigError

__all__ = [
    "ApiSettings",
    "KafkaSettings",
    "PipelineSettings",
    "ServerSettings",
    "Settings",
    "SidecarSettings",
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
    records_per_request: int = 3000  # what CloudZero's own tools send
    records_per_second: float = 100.0  # this process's share of the org's 100 records/s
    burst: float = 0.0  # token bucket burst in records; 0 = one full request
    request_timeout: float = 30.0  # seconds per attempt
    retry_deadline: float = 300.0  # seconds of retries per request before the cycle tries again

    def validate(self, prefix: str) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{prefix}base_url", "must start with http:// or https://")
        if not 1 <= self.records_per_request <= 10_000:
            raise ConfigError(f"{prefix}records_per_request", "must be between 1 and 10000")
        _positive(self, prefix, "records_per_second", "request_timeout", "retry_deadline")


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
    window_seconds: int = 0  # TEST ONLY: override every stream's window size (0 = its granularity)

    def flushes_on_shutdown(self, sidecar: bool) -> bool:
        """The sidecar's spool may die with its pod, so it delivers open windows on SIGTERM by default."""
        return sidecar if self.flush_on_shutdown is None else self.flush_on_shutdown

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "max_flush_interval_seconds", "max_open_keys", "shutdown_timeout_seconds")
        _positive(self, prefix, "tick_seconds", "max_memory_bytes")
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


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    sidecar: SidecarSettings = field(default_factory=SidecarSettings)
    events: Mapping[str, Any] = field(default_factory=dict)  # decoded by events.DecoderConfig.from_dict


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
    events = dict(data.get("events", {}))
    if "ALLOCD_EVENTS_DEFAULT_STREAM" in env:
        events["default_stream"] = env["ALLOCD_EVENTS_DEFAULT_STREAM"]
    if "ALLOCD_EVENTS_UNDECLARED" in env:
        events["undeclared"] = env["ALLOCD_EVENTS_UNDECLARED"]
    return Settings(**sections, events=events)
