"""`allocd send`: send records from a file to the API — an ops tool for replays, corrections and deletes.

    allocd send --stream S --op sum|replace|delete [--base-url URL] [--key-file PATH] [--rate N] FILE

FILE is a JSON array of records, a `{"records": [...]}` object, or NDJSON (one record per line); `-` reads
stdin. The key comes from `--key-file` or the `ALLOCD_API_KEY` environment variable. Prints one summary
line; exits 0 when every record was delivered, 1 when anything was rejected, in doubt or left unsent (or
nothing could be delivered), 2 on bad input (nothing sent). Warnings (rejections, doubt) go to stderr; `-v`
logs every attempt. The first Ctrl-C stops starting new requests (the one in flight finishes) and prints
the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from allocd.cloudzero.apikey import ApiKey
from allocd.cloudzero.client import CloudZeroClient, RequestOutcome
from allocd.cloudzero.records import Op
from allocd.config import ApiSettings
from allocd.errors import ConfigError
from allocd.shutdown import stop_on_signals

__all__ = ["KEY_ENV", "add_arguments", "load_records", "run_command", "summarize"]

KEY_ENV = "ALLOCD_API_KEY"
_OPTIONS = {
    "base_url": "--base-url",
    "records_per_request": "--records-per-request",
    "records_per_second": "--rate",
    "request_timeout": "--timeout",
    "retry_deadline": "--deadline",
}
_SHOWN_INDEXES = 10  # rejected indexes listed per message; the rest are counted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--stream", required=True, help="the allocation stream to write to")
    a("--op", required=True, choices=[op.value for op in Op], help="the API operation")
    a("--base-url", default=ApiSettings.base_url, help=f"API base URL (default {ApiSettings.base_url})")
    a("--key-file", help=f"file holding the API key (default: the {KEY_ENV} environment variable)")
    a("--rate", type=float, default=ApiSettings.records_per_second, help="records per second (default 100)")
    a("--records-per-request", type=int, default=ApiSettings.records_per_request, help="default 3000")
    a("--timeout", type=float, default=ApiSettings.request_timeout, help="seconds per attempt (default 30)")
    a("--deadline", type=float, default=ApiSettings.retry_deadline, help="retry deadline per request (s)")
    a("-v", "--verbose", action="store_true", help="log every attempt and retry to stderr")
    a("file", metavar="FILE", help="JSON array, {'records': [...]} object, or NDJSON; '-' for stdin")


def load_records(text: bytes, name: str = "FILE") -> list[dict[str, Any]]:
    """Records from a JSON array, a `{"records": [...]}` object, or NDJSON. ConfigError names the line."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return list(_ndjson(text, name))
    if isinstance(doc, dict) and "records" in doc:
        doc = doc["records"]
    elif isinstance(doc, dict):
        doc = [doc]  # NDJSON with a single line
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise ConfigError(name, "expected a JSON array of record objects, {'records': [...]}, or NDJSON")
    return doc


def _ndjson(text: bytes, name: str) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(name, f"line {number} is not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ConfigError(name, f"line {number} is not a JSON object")
        yield record


def summarize(total: int, outcome: RequestOutcome) -> str:
    """One line: delivered / rejected with messages / in doubt / not sent."""
    parts = [f"{len(outcome.delivered)}/{total} delivered"]
    if outcome.rejected:
        by_message: dict[str, list[int]] = {}
        for index, message in outcome.rejected:
            by_message.setdefault(message, []).append(index)
        shown = []
        for message, indexes in by_message.items():
            listed = ", ".join(str(i) for i in indexes[:_SHOWN_INDEXES])
            more = f" and {len(indexes) - _SHOWN_INDEXES} more" if len(indexes) > _SHOWN_INDEXES else ""
            shown.append(f"records {listed}{more}: {message}")
        parts.append(f"{len(outcome.rejected)} rejected ({'; '.join(shown)})")
    if outcome.in_doubt:
        parts.append(
            f"{outcome.in_doubt} in doubt (attempts the API may have applied; a sum may count twice)"
        )
    if outcome.pending:
        why = f": {outcome.error}" if outcome.error else " (interrupted)"
        parts.append(f"{len(outcome.pending)} not sent{why}")
    return ", ".join(parts)


def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError("FILE", f"cannot read {path}: {exc.strerror}") from None


async def run_command(args: argparse.Namespace) -> int:
    if getattr(args, "verbose", False):
        logging.basicConfig(
            level=logging.DEBUG, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
        )
    records = load_records(_read_input(args.file))
    key = ApiKey.from_file(args.key_file) if args.key_file else ApiKey.from_env(KEY_ENV)
    key.get()  # a missing key is a usage error, reported before anything is sent
    api = ApiSettings(
        base_url=args.base_url,
        records_per_request=args.records_per_request,
        records_per_second=args.rate,
        request_timeout=args.timeout,
        retry_deadline=args.deadline,
    )
    try:
        api.validate("")
    except ConfigError as exc:  # named as the user wrote it: the option, not the config key
        raise ConfigError(_OPTIONS.get(exc.key, exc.key), exc.problem) from None
    stop = asyncio.Event()
    with stop_on_signals(stop):  # the request in flight finishes
        async with CloudZeroClient(api, key) as client:
            outcome = await client.send(args.stream, Op(args.op), records, stop)
    print(summarize(len(records), outcome))
    clean = outcome.settled and not outcome.rejected and not outcome.in_doubt
    return 0 if clean else 1
