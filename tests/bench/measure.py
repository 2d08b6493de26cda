"""Measuring a process (CPU seconds, peak RSS) and reporting results as a table and as JSON."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "Result",
    "machine",
    "print_table",
    "proc_cpu_seconds",
    "proc_peak_rss",
    "proc_rss",
    "self_cpu_seconds",
    "self_peak_rss",
    "write_json",
]

Result = dict[str, Any]
_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process (from /proc, so the caller need not be its parent)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15 of stat)


def _status_kb(pid: int | str, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(name)


def proc_peak_rss(pid: int | str) -> int:
    """Peak resident set size in bytes (VmHWM)."""
    return _status_kb(pid, "VmHWM")


def proc_rss(pid: int | str = "self") -> int:
    """Current resident set size in bytes (VmRSS)."""
    return _status_kb(pid, "VmRSS")


def self_cpu_seconds() -> float:
    return time.process_time()


def self_peak_rss() -> int:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that across exec, so a child would
    report its parent's size at fork time."""
    return _status_kb("self", "VmHWM")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def print_table(title: str, rows: Sequence[Result], columns: Sequence[tuple[str, str]]) -> None:
    """`columns` are (key in each row, heading); missing values print as '-'."""
    cells = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    print(f"\n{title}")
    for line in [[h for _, h in columns], *cells]:
        print(
            "  ".join(
                v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True))
            )
        )


def write_json(directory: Path, name: str, payload: Result) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return path
