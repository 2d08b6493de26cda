"""The API client against the real emulator over loopback: totals, the emulator's own 429s, injected 503s,
accept-then-hang, and the `allocd send` command. Totals are read back from `/_admin/totals`."""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from allocd.cloudzero import send
from allocd.cloudzero.apikey import ApiKey
from allocd.cloudzero.client import ClientObserver, CloudZeroClient
from allocd.cloudzero.emulator import EmulatorConfig, Faults, bound_port, serve
from allocd.cloudzero.records import Op, canonical_filter
from allocd.config import ApiSettings
from allocd.errors import AuthError
from tests.api_client import client_settings

pytestmark = pytest.mark.integration

KEY = "it-key-5c2e"
STREAM = "client-it"
Totals = dict[tuple[str, str, Any], Decimal]


@dataclass
class Emulator:
    url: str
    http: aiohttp.ClientSession

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, f"{self.url}/_admin/{path}", json=body) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def totals(self, stream: str = STREAM) -> Totals:
        doc = await self.admin("GET", f"totals?stream={stream}")
        cells = doc["streams"].get(stream, {"cells": []})["cells"]
        return {
            (c["timestamp"], c["element_name"], canonical_filter(c["filter"])): Decimal(c["value"])
            for c in cells
            if not c["deleted"]
        }

    async def statuses(self) -> list[int | None]:
        return [r["status"] for r in (await self.admin("GET", "requests"))["requests"]]


@asynccontextmanager
async def emulator(**config: Any) -> AsyncIterator[Emulator]:
    config.setdefault("rate", 1_000_000.0)
    config.setdefault("burst", 10_000_000.0)
    runner = await serve(EmulatorConfig(keys=(KEY,), admin=True, **config), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            yield Emulator(f"http://127.0.0.1:{bound_port(runner)}", http)
    finally:
        await runner.cleanup()


class Recorder(ClientObserver):
    def __init__(self) -> None:
        self.retries: list[str] = []
        self.in_doubt: list[int] = []

    def on_retry(self, op: str, reason: str) -> None:
        self.retries.append(reason)

    def on_in_doubt(self, op: str, records: int) -> None:
        self.in_doubt.append(records)


def client(url: str, observer: ClientObserver | None = None, **config: Any) -> CloudZeroClient:
    config.setdefault("records_per_second", 1_000_000.0)
    config.setdefault("backoff_base", 0.01)
    config.setdefault("backoff_cap", 0.1)
    config.setdefault("retry_deadline", 20.0)
    return CloudZeroClient(
        key=ApiKey.from_value(KEY),
        observer=observer,
        rng=random.Random(1),
        **client_settings(base_url=url, **config),
    )


def workload(n: int, seed: int = 5) -> tuple[list[dict[str, Any]], Totals]:
    """`n` sum records over a few past hours, elements and features, and the totals they must add up to."""
    rng = random.Random(seed)
    records, truth = [], defaultdict(Decimal)
    for _ in range(n):
        hour = f"2024-03-01T{rng.randrange(6):02d}:00:00Z"
        minute = hour.replace(":00:00Z", f":{rng.randrange(60):02d}:00Z")  # the API buckets by hour
        element = f"cust-{rng.randrange(40)}"
        flt = {"custom:feature": [rng.choice(["billing", "export", "search"])]}
        whole, cents = rng.randint(1, 10_000), rng.randint(1, 99)
        value = str(whole) if rng.random() < 0.8 else f"{whole}.{cents:02d}"
        record = {"timestamp": minute, "granularity": "HOURLY", "element_name": element, "filter": flt}
        records.append({**record, "value": value})
        truth[(hour, element, canonical_filter(flt))] += Decimal(value)
    return records, dict(truth)


async def test_thousands_of_records_in_many_requests_add_up() -> None:
    records, truth = workload(3000)
    async with emulator() as emu, client(emu.url, records_per_request=250) as api:
        out = await api.send(STREAM, Op.SUM, records)
        assert out.settled and out.in_doubt == 0 and not out.rejected
        assert out.delivered == list(range(3000))
        assert out.attempts == 12
        assert await emu.totals() == truth
        assert await emu.statuses() == [200] * 12


async def test_the_emulators_own_rate_limit_429_is_retried_to_success() -> None:
    records, truth = workload(1000, seed=6)
    observer = Recorder()
    # The emulator allows 4,000 records/s with a burst of 100; the client sends 100-record requests unpaced.
    async with emulator(rate=4000.0, burst=100.0) as emu:
        async with client(emu.url, observer, records_per_request=100) as api:
            out = await api.send(STREAM, Op.SUM, records)
        statuses = await emu.statuses()
        assert out.settled and out.in_doubt == 0
        assert "429" in observer.retries
        assert statuses.count(429) == observer.retries.count("429") >= 1
        assert statuses.count(200) == 10
        assert await emu.totals() == truth


async def test_paced_client_stays_under_the_emulators_rate_limit() -> None:
    records, truth = workload(400, seed=7)
    # Paced a little below the emulator's 2,000/s: at exactly the same rate, network jitter decides.
    async with emulator(rate=2000.0, burst=100.0) as emu:
        started = time.monotonic()
        async with client(emu.url, records_per_request=100, records_per_second=1800.0, burst=100) as api:
            out = await api.send(STREAM, Op.SUM, records)
        assert time.monotonic() - started >= 0.15  # 300 records beyond the burst at 1,800/s
        assert out.settled
        assert await emu.statuses() == [200] * 4
        assert await emu.totals() == truth


async def test_injected_503s_are_retried() -> None:
    records, truth = workload(600, seed=8)
    observer = Recorder()
    faults = Faults(error_503=0.4, retry_after=0.01)
    async with (
        emulator(faults=faults, seed=3) as emu,
        client(emu.url, observer, records_per_request=60) as api,
    ):
        out = await api.send(STREAM, Op.SUM, records)
        assert out.settled and out.in_doubt == 0
        assert observer.retries.count("503") >= 1
        assert (await emu.statuses()).count(503) == observer.retries.count("503")
        assert await emu.totals() == truth


async def test_a_hang_is_reported_in_doubt_and_was_applied() -> None:
    records, truth = workload(1, seed=9)
    ((key, value),) = truth.items()
    observer = Recorder()
    async with emulator() as emu:
        await emu.admin("POST", "hooks", {"after_request": 1, "action": "hang"})
        async with client(emu.url, observer, request_timeout=0.5) as api:
            out = await api.send(STREAM, Op.SUM, records)
        assert out.in_doubt == 1 and observer.in_doubt == [1]
        assert out.delivered == [0]
        # The hung attempt was applied, and so was the retry: sum is at-least-once, and the doubt is counted.
        assert await emu.totals() == {key: 2 * value}


async def test_hang_fault_until_the_deadline_returns_the_doubt_instead_of_raising() -> None:
    records, truth = workload(1, seed=10)
    ((key, value),) = truth.items()
    async with emulator() as emu:
        await emu.admin("POST", "faults", {"hang": 1.0})
        async with client(emu.url, request_timeout=0.3, retry_deadline=0.5) as api:
            out = await api.send(STREAM, Op.SUM, records)
        assert out.in_doubt >= 1
        assert out.delivered == [] and out.pending == [0]
        assert out.interrupted and out.error is not None
        assert await emu.totals() == {key: out.in_doubt * value}  # every hung attempt was applied


async def test_bad_records_are_isolated_and_the_rest_delivered() -> None:
    records, _ = workload(50, seed=11)
    records[7] = {**records[7], "timestamp": "2999-01-01T00:00:00Z"}  # too far in the future
    records[31] = {**records[31], "filter": {"custom:feature": ["a"], "custom:other": ["b"]}}  # other dims
    async with emulator() as emu, client(emu.url, records_per_request=50) as api:
        out = await api.send(STREAM, Op.SUM, records)
    assert [i for i, _ in out.rejected] == [7, 31]
    assert out.rejected[0][1] == "Timestamp too far into the future"
    assert out.rejected[1][1] == "All records in a stream must contain the same filter keys"
    assert out.delivered == [i for i in range(50) if i not in (7, 31)]


async def test_a_wrong_key_is_an_auth_error() -> None:
    async with emulator() as emu:
        api = CloudZeroClient(ApiSettings(base_url=emu.url), ApiKey.from_value("not-the-key"))
        async with api:
            with pytest.raises(AuthError) as err:
                await api.send(STREAM, Op.SUM, workload(1)[0])
        assert err.value.status == 403
        assert "not-the-key" not in str(err.value)
        assert await emu.totals() == {}


# --- allocd send ---------------------------------------------------------------------------------------
def send_args(url: str, path: Path, key_file: Path, **more: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    send.add_arguments(parser)
    argv = ["--stream", STREAM, "--op", "sum", "--base-url", url, "--key-file", str(key_file)]
    argv += ["--rate", "1000000", "--records-per-request", "40", "--deadline", "5", str(path)]
    return parser.parse_args(argv)


@pytest.mark.parametrize("form", ["array", "object", "ndjson"])
async def test_send_command_delivers_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    records, truth = workload(100, seed=12)
    path = tmp_path / "records.json"
    if form == "array":
        path.write_bytes(orjson.dumps(records))
    elif form == "object":
        path.write_bytes(orjson.dumps({"records": records}))
    else:
        path.write_bytes(b"\n".join(orjson.dumps(r) for r in records) + b"\n")
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    async with emulator() as emu:
        code = await send.run_command(send_args(emu.url, path, key_file))
        assert await emu.totals() == truth
    assert code == 0
    assert capsys.readouterr().out.strip() == "100/100 delivered"


async def test_send_command_reports_rejections_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records, _ = workload(20, seed=13)
    records[4] = {**records[4], "timestamp": "2999-01-01T00:00:00Z"}
    path = tmp_path / "records.ndjson"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in records))
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    async with emulator() as emu:
        code = await send.run_command(send_args(emu.url, path, key_file))
    out = capsys.readouterr().out
    assert code == 1
    assert out.strip() == "19/20 delivered, 1 rejected (records 4: Timestamp too far into the future)"
    assert KEY not in out
