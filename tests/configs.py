"""The daemon's TOML for tests, written in one place: the integration harness, the sidecar tests, the chaos
soak and the benchmarks each pass what they vary and get the text `allocd run --config` reads.

`daemon_toml` lays out the tables every test config shares (a `[kafka]` table only when there is a
bootstrap address, `[api]`, `[pipeline]`, `[server]` on loopback with an OS-chosen port, `[sidecar]` when
asked for, `[events]`); `render_toml` writes any such mapping. A setting given as None is left out, so the
daemon's default applies. tests/unit/test_config.py keeps its inline snippets: they test the loader itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Table", "daemon_toml", "render_toml", "stream_tables"]

Table = Mapping[str, Any]  # a TOML table: scalar settings, and mappings for its sub-tables

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def daemon_toml(
    *,
    api_url: str,
    key_file: Path | str,
    bootstrap: str | None = None,
    topics: Sequence[str] = (),
    group: str | None = None,
    checkpoint_topic: str | None = None,
    dlq_topic: str | None = None,
    kafka: Table | None = None,
    records_per_request: int | None = None,
    records_per_second: float | None = None,
    api: Table | None = None,
    window_seconds: float | None = None,
    grace_seconds: float | None = None,
    shutdown_timeout: float | None = None,
    pipeline: Table | None = None,
    log_level: str | None = None,
    server: Table | None = None,
    sidecar: Table | None = None,
    undeclared: str | None = "reject",
    streams: Mapping[str, Table] | None = None,
    extra: Mapping[str, Table] | None = None,
) -> str:
    """A daemon's TOML.

    Kafka mode needs `bootstrap`, `topics` and `group`; the checkpoint and DLQ topics default to
    `<group>-ckpt` and `<group>-dlq`, and `kafka` adds further `[kafka]` settings. Sidecar mode has no
    bootstrap (no `[kafka]` table) and passes `sidecar`, the `[sidecar]` settings beyond `enabled = true`
    on 127.0.0.1, port 0. `api`, `pipeline` and `server` add further settings to those tables; `streams`
    maps a stream's name to its `[events.streams.<name>]` table; `extra` holds whole further tables
    (written before `[events]`).
    """
    tables: dict[str, Table] = {}
    if bootstrap is not None:
        if not topics or group is None:
            raise ValueError("a [kafka] table needs topics and a group")
        tables["kafka"] = {
            "bootstrap_servers": bootstrap,
            "topics": list(topics),
            "group_id": group,
            "checkpoint_topic": checkpoint_topic if checkpoint_topic is not None else f"{group}-ckpt",
            "dlq_topic": dlq_topic if dlq_topic is not None else f"{group}-dlq",
            **(kafka or {}),
        }
    elif kafka or topics or group is not None:
        raise ValueError("Kafka settings without a bootstrap address")
    tables["api"] = {
        "base_url": api_url,
        "api_key_file": str(key_file),
        "records_per_request": records_per_request,
        "records_per_second": records_per_second,
        **(api or {}),
    }
    tables["pipeline"] = {
        "window_seconds": window_seconds,
        "grace_seconds": grace_seconds,
        "shutdown_timeout_seconds": shutdown_timeout,
        **(pipeline or {}),
    }
    tables["server"] = {"host": "127.0.0.1", "port": 0, "log_level": log_level, **(server or {})}
    if sidecar is not None:
        tables["sidecar"] = {"enabled": True, "host": "127.0.0.1", "port": 0, **sidecar}
    for name, table in (extra or {}).items():
        if name in tables or name == "events":
            raise ValueError(f"[{name}] is built by daemon_toml; pass its settings, not an extra table")
        tables[name] = table
    tables["events"] = {"undeclared": undeclared, "streams": dict(streams or {})}
    return render_toml(tables)


def stream_tables(streams: Mapping[str, tuple[str | None, Sequence[str]]]) -> dict[str, Table]:
    """`[events.streams.*]` tables from name → (granularity, dimensions); a None granularity is left out."""
    return {
        name: {"granularity": granularity, "dimensions": list(dims)}
        for name, (granularity, dims) in streams.items()
    }


def render_toml(tables: Mapping[str, Table]) -> str:
    """TOML text for top-level tables; nested mappings become sub-tables, None values are left out."""
    out: list[str] = []
    for name, table in tables.items():
        _table(out, (name,), table)
    return "\n".join(out)


def _table(out: list[str], path: tuple[str, ...], table: Table) -> None:
    settings = {k: v for k, v in table.items() if v is not None and not isinstance(v, Mapping)}
    subtables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if settings or not subtables:  # an empty table is still declared; a table of tables needs no header
        lines = [f"[{'.'.join(_key(p) for p in path)}]"]
        lines += [f"{_key(k)} = {_value(v)}" for k, v in settings.items()]
        out.append("\n".join(lines) + "\n")
    for key, sub in subtables.items():
        _table(out, (*path, key), sub)


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | Path):
        return _string(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _string(text: str) -> str:
    """A TOML basic string: quote, backslash and the control characters (but tab) escaped."""
    escaped = []
    for ch in text:
        if ch in '"\\':
            escaped.append("\\" + ch)
        elif (ch < " " and ch != "\t") or ch == "\x7f":
            escaped.append(f"\\u{ord(ch):04x}")
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'
