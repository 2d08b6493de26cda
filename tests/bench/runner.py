"""Runs the benchmark scenarios against one embedded broker and reports them (tables + bench-results/*.json).

1. baseline      the raw client alone (a child process: tests/bench/baseline.py)
2. e2e           `allocd run` end to end (a child process: tests/bench/end_to_end.py)
3. cardinality   bytes of RSS per open cell (a child process: tests/bench/cardinality.py)
4. keyhour       records per key-hour in a steady run (in process: tests/bench/keyhour.py)

Scenarios 1 and 2 read the same topic, filled once by the generator (tests/bench/workload.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from allocd.cloudzero.emulator import EmulatorConfig, bound_port, serve
from allocd.embedded import EmbeddedBroker
from tests.bench.end_to_end import BENCH_KEY, run_end_to_end
from tests.bench.keyhour import run_keyhour
from tests.bench.measure import Result, machine, print_table, write_json
from tests.bench.profile import format_top
from tests.bench.workload import Truth, Workload, fill_topic, truth_by_hour, write_truth

__all__ = ["SCENARIOS", "Options", "report", "run_bench"]

SCENARIOS = ("baseline", "e2e", "cardinality", "keyhour")
ROOT = Path(__file__).resolve().parents[2]  # the repository: child processes import tests.bench from it


@dataclass(frozen=True)
class Options:
    workload: Workload = field(default_factory=Workload)
    scenarios: tuple[str, ...] = SCENARIOS
    cells: int = 1_000_000  # scenario 3
    cell_filters: int = 4
    steady: Workload = field(default_factory=lambda: Workload(events=200_000, hours=4))  # scenario 4
    step_s: int = 300
    out: Path = Path("bench-results")
    timeout: float = 600
    repeat: int = 1  # runs of scenarios 1 and 2 each; the median is reported
    profile: bool = False  # py-spy the daemon in scenario 2 (slows it: for finding hot spots, not numbers)


@contextlib.asynccontextmanager
async def _emulator() -> AsyncIterator[str]:
    """A fresh emulator in this process with the rate limit out of the way; yields its URL."""
    runner = await serve(EmulatorConfig(keys=(BENCH_KEY,), admin=True, rate=1e9, burst=1e12), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}"
    finally:
        await runner.cleanup()


async def _child(module: str, args: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """Run `python -m module args --out out` from the repository and return the JSON it wrote."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, "--out", str(out), cwd=ROOT, stdout=subprocess.DEVNULL
    )
    try:
        code = await asyncio.wait_for(proc.wait(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if code != 0:
        raise RuntimeError(f"{module} exited with {code}")
    return orjson.loads(await asyncio.to_thread(out.read_bytes))


async def _baseline(
    bootstrap: str, topic: str, ends: dict[int, int], truth: Truth, work: Path, o: Options
) -> Result:
    raw = await _child(
        "tests.bench.baseline",
        [
            "--bootstrap",
            bootstrap,
            "--topic",
            topic,
            "--ends",
            orjson.dumps(ends, option=orjson.OPT_NON_STR_KEYS).decode(),
        ],
        work / "baseline.json",
        o.timeout,
    )
    sums = {(s, h, e): Decimal(v) for s, h, e, v in raw.pop("sums")}
    expected = truth_by_hour(truth)
    return {
        "scenario": "baseline (raw client)",
        "events": raw["events"],
        "seconds": raw["seconds"],
        "events_per_s": raw["events"] / raw["seconds"],
        "cpu_seconds": raw["cpu_seconds"],
        "cpu_us_per_event": raw["cpu_seconds"] / raw["events"] * 1e6,
        "peak_rss_mb": raw["peak_rss"] / 2**20,
        "totals_match": sums == expected,
    }


async def _cardinality(work: Path, o: Options) -> Result:
    raw = await _child(
        "tests.bench.cardinality",
        ["--cells", str(o.cells), "--filters", str(o.cell_filters)],
        work / "cardinality.json",
        o.timeout,
    )
    return {"scenario": "high cardinality (1 hour)", **raw}


THROUGHPUT_COLUMNS = [
    ("scenario", "scenario"),
    ("events", "events"),
    ("seconds", "seconds"),
    ("events_per_s", "events/s"),
    ("cpu_seconds", "CPU s"),
    ("cpu_us_per_event", "CPU µs/event"),
    ("peak_rss_mb", "peak RSS MB"),
    ("totals_match", "totals = truth"),
    ("records_per_key_hour", "records/key-hour"),
    ("runs_events_per_s", "each run's events/s"),
]
CARDINALITY_COLUMNS = [
    ("cells", "open cells"),
    ("rss_before_mb", "RSS before MB"),
    ("rss_after_mb", "RSS after MB"),
    ("peak_rss_mb", "peak RSS MB"),
    ("bytes_per_cell", "bytes/cell"),
    ("estimate_bytes_per_cell", "estimate bytes/cell"),
    ("cpu_us_per_event", "CPU µs/event"),
]
KEYHOUR_COLUMNS = [
    ("events", "events"),
    ("simulated_hours", "simulated hours"),
    ("key_hours", "key-hours"),
    ("records_sent", "records sent"),
    ("records_per_key_hour", "records/key-hour"),
    ("cycles_closed", "cycles (closed)"),
    ("cycles_forced", "cycles (forced)"),
    ("late_events", "late events"),
    ("totals_match", "totals = truth"),
]


async def _throughput(bootstrap: str, work: Path, o: Options, say: Any) -> dict[str, Result]:
    """Scenarios 1 and 2 over one topic filled by the generator; the ground truth goes to `o.out`."""
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    ends, truth = await fill_topic(bootstrap, topic, o.workload)
    say(f"generated {sum(ends.values()):,} events in {time.monotonic() - started:.1f} s ({o.workload})")
    o.out.mkdir(parents=True, exist_ok=True)
    write_truth(o.out / "ground-truth.json", truth)
    runs: dict[str, list[Result]] = {"baseline": [], "e2e": []}
    for n in range(o.repeat):  # interleaved, so a slow spell of the machine hits both alike
        if "baseline" in o.scenarios:
            runs["baseline"].append(await _baseline(bootstrap, topic, ends, truth, work, o))
        if "e2e" in o.scenarios:
            profile = o.out / "profile-e2e.txt" if o.profile and n == 0 else None
            async with _emulator() as url:
                runs["e2e"].append(
                    await run_end_to_end(
                        bootstrap,
                        topic,
                        ends,
                        truth,
                        url,
                        work,
                        timeout=o.timeout,
                        profile=profile,
                        keep_log=o.out / f"e2e-mismatch-{time.strftime('%H%M%S')}-{n}",
                    )
                )
            if profile:
                say(format_top(profile))
    results = {name: _median(rs) for name, rs in runs.items() if rs}
    if len(results) == 2:
        # Each allocd run over the baseline run just before it: the machine's speed drifts (a shared VM
        # varies by a quarter between runs), and a pair sees the same spell. The median pair is the ratio.
        pairs = sorted(
            e["events_per_s"] / b["events_per_s"] for b, e in zip(runs["baseline"], runs["e2e"], strict=True)
        )
        results["e2e"]["ratio_to_baseline"] = pairs[len(pairs) // 2]
        results["e2e"]["ratio_per_pair"] = [round(r, 3) for r in pairs]
    return results


def _median(runs: list[Result]) -> Result:
    """The run with the median events/s, all runs' rates beside it; every run must have matched the truth."""
    ordered = sorted(runs, key=lambda r: r["events_per_s"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["totals_match"] = all(r["totals_match"] for r in runs)
    chosen["runs_events_per_s"] = [round(r["events_per_s"]) for r in runs]
    return chosen


def report(results: dict[str, Result]) -> None:
    """The tables, as `python -m tests.bench` prints them."""
    rows = [results[k] for k in ("baseline", "e2e") if k in results]
    if rows:
        print_table("Throughput (scenarios 1 and 2)", rows, THROUGHPUT_COLUMNS)
    if "ratio_to_baseline" in results.get("e2e", {}):
        e2e = results["e2e"]
        pairs = ", ".join(f"{r:.2f}" for r in e2e.get("ratio_per_pair", []))
        print(
            f"allocd end to end / baseline events/s = {e2e['ratio_to_baseline']:.2f}"
            f" (the median of the run pairs {pairs})"
        )
    if "cardinality" in results:
        print_table("Memory per open cell (scenario 3)", [results["cardinality"]], CARDINALITY_COLUMNS)
    if "keyhour" in results:
        print_table("Records per key-hour, steady run (scenario 4)", [results["keyhour"]], KEYHOUR_COLUMNS)


async def run_bench(o: Options, bootstrap: str | None = None, *, quiet: bool = False) -> dict[str, Result]:
    """Run the chosen scenarios (starting a broker unless `bootstrap` is given), write each result as JSON
    to `o.out` and return them; print the tables unless `quiet`."""
    if bootstrap is None:
        async with EmbeddedBroker() as broker:
            return await run_bench(o, broker.bootstrap, quiet=quiet)
    say = (lambda *a: None) if quiet else print
    info = machine()
    say(f"machine: {info['nproc']} CPUs, {info['cpu']}, Python {info['python']}")
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="allocd-bench-") as tmp:
        work = Path(tmp)
        if {"baseline", "e2e"} & set(o.scenarios):
            results.update(await _throughput(bootstrap, work, o, say))
        if "cardinality" in o.scenarios:
            results["cardinality"] = await _cardinality(work, o)
        if "keyhour" in o.scenarios:
            async with _emulator() as url:
                results["keyhour"] = await run_keyhour(
                    bootstrap, url, work, o.steady, step_s=o.step_s, timeout=o.timeout
                )
    if not quiet:
        report(results)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for name, result in results.items():
        workload = o.steady if name == "keyhour" else o.workload
        write_json(o.out, name, {"at": stamp, "machine": info, "workload": workload.describe(), **result})
    return results
