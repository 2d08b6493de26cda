"""What one partition assignment costs in journal reading, as a function of the history the journal holds.

    python -m tests.bench.bench_recovery [--histories 6h,1d,7d] [--requests-per-cycle 10]
                                         [--out bench-results/recovery.json]

For each history, a fresh checkpoint topic of the embedded broker gets the journal of that much time at the
API's full rate: 100 records/s in 3,000-record requests (one per 30 s), 4 partitions owned by one member of
group "bench", cycles of N requests, each followed by a checkpoint of every partition. Entries go through
`allocd.journal.Journal` over `KafkaJournalStore`, a whole cycle per `append` (the sends pipelined): a
`sent` per request and, all of it acknowledged, the ack the flush cycle then writes
(`request_settled_whole`). The writer asks `still_owner` before each
checkpoint, as the flush cycle does, so checkpoints carry a live member's stamps (`m`, `v`). A cycle's
requests hold distinct cells of its hourly window; each cycle of that hour delivers the window's cells again
(their new sums), so digests are computed once per hour. Then a child process — a new member — claims the 4
partitions with `read_recent` and runs `journal.recover` on what it kept: its wall time and its peak RSS
above idle are the assignment's cost, and the recovered positions must be the last checkpoint's. The
baseline, in the same child: a plain consumer fetching the topic's last records (the broker's own cost,
which on Tansu grows with the log); "flat in history" is judged on the ratio to it. Writing 7 days (20,160
requests) takes about 2-3 minutes on 2 cores; `--histories 6h,1d` is a quick run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from allocd.cloudzero.records import Granularity
from allocd.config import KafkaSettings
from allocd.embedded import EmbeddedBroker, create_topics
from allocd.journal import Entry, Journal, JournalStore, PartitionState, cell_digest, encode_entry, recover
from allocd.kafka_conn import make_producer
from allocd.stores import kafka as kafka_store
from allocd.stores.kafka import KafkaJournalStore
from allocd.windows import TP, Accumulator, Snapshot
from tests.bench.measure import Result, machine, print_table, proc_rss, self_peak_rss, write_json

__all__ = ["main"]

GROUP, STREAM = "bench", "usage"
TPS: list[TP] = [("events", p) for p in range(4)]
RECORDS_PER_S, REQUEST_RECORDS = 100, 3_000
START_MS = 1_700_006_400_000  # an hour boundary: simulated time starts here
HOUR_MS = 3_600_000
UNITS = {"m": 60, "h": 3_600, "d": 86_400}
TARGET_S, TARGET_MB, TARGET_DRIFT = 2.0, 64.0, 0.25  # at 7 days; 7-day figures within 25% of 6-hour ones
WRITER_FETCH_WAIT_MS = 1_000


@contextlib.contextmanager
def fetch_wait_floor(ms: int) -> Iterator[None]:
    """Give the store's consumers a fetch max wait of at least `ms`, for the writer only (setup, not
    measured). Tansu's memory storage has no offset index: a fetch's cost grows with what the broker holds,
    and when finding the records takes longer than the max wait it answers with none. Past about 20,000
    journal records the `still_owner` tail's 10 ms gets nothing, ever (Kafka's max wait only bounds waiting
    for new data). The recovery read itself uses the store's READ_FETCH_WAIT_MS."""
    module: Any = kafka_store
    original = module.AIOKafkaConsumer

    def consumer(*args: Any, **kwargs: Any) -> Any:
        kwargs["fetch_max_wait_ms"] = max(ms, kwargs.get("fetch_max_wait_ms", 500))
        return original(*args, **kwargs)

    module.AIOKafkaConsumer = consumer if ms else original
    try:
        yield
    finally:
        module.AIOKafkaConsumer = original


class Batched:
    """A journal store that holds appends until `flush`, so a whole cycle goes out as one pipelined append."""

    def __init__(self, store: KafkaJournalStore) -> None:
        self.store = store
        self.pending: list[Entry] = []
        self.entries = 0
        self.bytes = 0

    async def append(self, entries: list[Entry]) -> None:
        self.pending.extend(entries)

    async def flush(self) -> None:
        entries, self.pending = self.pending, []
        self.entries += len(entries)
        self.bytes += sum(len(encode_entry(e)) for e in entries)  # before the store's stamps (g, m, v)
        await self.store.append(entries)

    async def still_owner(self, tps: list[TP]) -> bool:
        await self.flush()
        return await self.store.still_owner(tps)


async def claim(store: KafkaJournalStore, tps: list[TP]) -> tuple[list[Entry], int, int, bool]:
    """A member's recovery read of `tps`: (entries kept, entries scanned, bytes read, reached the start)."""
    read = await store.read_recent(claim=tps)
    return read.entries, read.scanned, read.bytes, read.reached_start


async def raw_fetch(bootstrap: str, topic: str, records: int) -> float:
    """The broker's own cost, the baseline: seconds for a plain consumer (the store's fetch settings) to
    hand out the last `records` records of the topic. Tansu keeps no offset index, so this grows with the
    log; allocd's read is judged by its ratio to it."""
    ktp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, fetch_max_wait_ms=kafka_store.READ_FETCH_WAIT_MS
    )
    await consumer.start()
    try:
        end = (await consumer.end_offsets([ktp]))[ktp]
        started = time.perf_counter()
        consumer.assign([ktp])
        consumer.seek(ktp, max(0, end - records))  # before any await, as the store does
        got = 0
        while got < min(records, end):
            got += len((await consumer.getmany(ktp, timeout_ms=1000)).get(ktp, []))
        return time.perf_counter() - started
    finally:
        await consumer.stop()


def settings(bootstrap: str, topic: str) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=bootstrap, group_id=GROUP, checkpoint_topic=topic)


def cycle_snapshot(ts_ms: int, boundary: int) -> Snapshot:
    """A snapshot with one cell per partition: `cycle_started` journals its boundary and windows."""
    acc = Accumulator()
    for tp in TPS:
        acc.add(STREAM, Granularity.HOURLY, ts_ms, f"{tp[0]}-{tp[1]}", (), 1, tp, boundary - 1)
    return acc.take_all({tp: boundary for tp in TPS}, "bench")


async def write_history(bootstrap: str, topic: str, seconds: int, per_cycle: int) -> Result:
    """The journal of `seconds` at full rate; returns its size and the last checkpoint's positions."""
    await create_topics(bootstrap, {topic: 1})
    producer = make_producer(settings(bootstrap, topic))
    await producer.start()
    store = KafkaJournalStore(settings(bootstrap, topic), producer)
    batched = Batched(store)
    journal = Journal(cast(JournalStore, batched))  # only append and still_owner are called
    started = time.perf_counter()
    try:
        await claim(store, TPS)  # the writer's own claim, so its checkpoints count as an owner's
        requests, sent, boundary = seconds * RECORDS_PER_S // REQUEST_RECORDS, 0, 0
        hour, digests = -1, []
        while sent < requests:
            ts = START_MS + sent * REQUEST_RECORDS * 1000 // RECORDS_PER_S
            n = min(per_cycle, requests - sent)
            if ts - ts % HOUR_MS != hour:  # a new hourly window: its cells
                hour = ts - ts % HOUR_MS
                elements = range(per_cycle * REQUEST_RECORDS)
                digests = [cell_digest((STREAM, hour, f"element-{i}", ())) for i in elements]
            boundary += n * REQUEST_RECORDS // len(TPS)
            cid = await journal.cycle_started(cycle_snapshot(ts, boundary))
            for r in range(n):
                cells = digests[r * REQUEST_RECORDS : (r + 1) * REQUEST_RECORDS]
                await journal.request_sent(cid, r, cells)
                await journal.request_settled_whole(cid, r)  # all acknowledged: the ack names no cells
            if not await journal.still_owner(TPS):
                raise AssertionError("no other member claimed the partitions: still_owner must hold")
            states = {tp: PartitionState(boundary, {(STREAM, hour): boundary}, {}) for tp in TPS}
            for state in states.values():
                state.prune(boundary)  # as the flush cycle does at the committable position
            await journal.checkpoint(states)
            sent += n
        await batched.flush()
    finally:
        await store.close()
        await producer.stop()
    return {
        "requests": requests,
        "entries": batched.entries + 1,  # with the writer's barrier
        "journal_mb": batched.bytes / 2**20,
        "generate_s": time.perf_counter() - started,
        "positions": {f"{t}:{p}": boundary for t, p in TPS},
    }


async def read_once(bootstrap: str, topic: str) -> Result:
    """In the child: one new member's recovery read of the 4 partitions, then `recover` on it."""
    producer = make_producer(settings(bootstrap, topic))
    await producer.start()
    store = KafkaJournalStore(settings(bootstrap, topic), producer)
    try:
        idle = proc_rss()
        started = time.perf_counter()
        entries, scanned, nbytes, reached = await claim(store, TPS)
        read_s = time.perf_counter() - started
        recovered = recover(entries, TPS)
        peak = self_peak_rss()
        baseline = raw_fetch_s = await raw_fetch(bootstrap, topic, kafka_store.READ_FIRST_STEP)
    finally:
        await store.close()
        await producer.stop()
    return {
        "raw_fetch_s": raw_fetch_s,
        "ratio": read_s / baseline,
        "scanned": scanned,
        "read_mb": nbytes / 2**20,
        "kept": len(entries),
        "reached_start": reached,
        "read_s": read_s,
        "idle_mb": idle / 2**20,
        "peak_above_idle_mb": (peak - idle) / 2**20,
        "positions": {f"{t}:{p}": rec.state.position for (t, p), rec in recovered.items()},
    }


def read_in_child(bootstrap: str, topic: str) -> Result:
    """`read_once` in a fresh interpreter, so its RSS is the reader's alone; {"error": ...} if it failed."""
    command = [sys.executable, "-m", "tests.bench.bench_recovery", "--read-only", bootstrap, topic]
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(command, cwd=root, capture_output=True, check=False, timeout=600)
    if done.returncode:
        error = done.stderr.decode().strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        print(f"the reader failed:\n{done.stderr.decode()[-3000:]}", file=sys.stderr)
        return {"error": error[0]}
    result: Result = orjson.loads(done.stdout.splitlines()[-1])
    return result


def history(text: str) -> tuple[str, int]:
    label = text.strip()
    if len(label) < 2 or label[-1] not in UNITS or not label[:-1].isdigit():
        raise argparse.ArgumentTypeError(f"{label!r}: a number and one of {', '.join(UNITS)} (6h, 1d, 7d)")
    return label, int(label[:-1]) * UNITS[label[-1]]


def targets(rows: list[Result]) -> list[str]:
    """The targets beside the table: at 7 days <= 2 s and <= 64 MB above idle, within 25% of 6 hours."""
    by = {row["history"]: row for row in rows if "read_s" in row}
    if "7d" not in by:
        return ["targets (7d: <= 2 s, <= 64 MB above idle, within 25% of 6h): no 7d read measured"]
    week, verdict = by["7d"], {True: "ok", False: "MISSED"}
    read_s, peak = week["read_s"], week["peak_above_idle_mb"]
    out = [
        f"7d read {read_s:.2f} s (target <= {TARGET_S:g} s): {verdict[read_s <= TARGET_S]}",
        f"7d peak {peak:.1f} MB above idle (target <= {TARGET_MB:g} MB): {verdict[peak <= TARGET_MB]}",
    ]
    for key in ("ratio", "read_mb", "peak_above_idle_mb") if "6h" in by else ():
        base, value = by["6h"][key], week[key]
        drift = (value - base) / base if base else 0.0
        met = verdict[drift <= TARGET_DRIFT]
        out.append(f"7d {key} {value:.2f} vs 6h {base:.2f}: {drift:+.0%} (target <= +25%): {met}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--histories", type=lambda s: [history(h) for h in s.split(",") if h.strip()])
    parser.add_argument("--requests-per-cycle", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench-results/recovery.json"))
    parser.add_argument("--read-only", nargs=2, metavar=("BOOTSTRAP", "TOPIC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read_only:
        print(orjson.dumps(asyncio.run(read_once(*args.read_only))).decode())
        return
    rows: list[Result] = []
    with EmbeddedBroker() as broker:
        for label, seconds in args.histories or [history(h) for h in ("6h", "1d", "7d")]:
            topic = f"bench-recovery-{label}"
            with fetch_wait_floor(WRITER_FETCH_WAIT_MS):  # the writer's `still_owner` tail reads
                written = asyncio.run(
                    write_history(broker.bootstrap, topic, seconds, args.requests_per_cycle)
                )
            print(
                f"wrote {label}: {written['requests']:,} requests, {written['entries']:,} entries, "
                f"{written['journal_mb']:,.0f} MB in {written['generate_s']:.1f} s",
                flush=True,
            )
            read = read_in_child(broker.bootstrap, topic)
            expected = written.pop("positions")
            outcome = read.get("error") or ("ok" if read.pop("positions") == expected else "MISMATCH")
            rows.append({"history": label, **written, **read, "recovered": outcome})
    keys = (
        "history entries journal_mb generate_s scanned read_mb kept reached_start read_s raw_fetch_s ratio"
        " peak_above_idle_mb"
    )
    headings = (
        "history|entries|journal MB|write s|scanned|read MB|kept|to start|read s|raw fetch s|read/raw"
        "|peak MB > idle"
    )
    columns = [*zip(keys.split(), headings.split("|"), strict=True), ("recovered", "recovered")]
    yes_no = {True: "yes", False: "no", None: None}
    shown = [{**row, "reached_start": yes_no[row.get("reached_start")]} for row in rows]
    print_table(f"one assignment's recovery read ({len(TPS)} partitions, group {GROUP!r})", shown, columns)
    lines = targets(rows)
    print("\n".join(["", *lines]))
    options = {
        "requests_per_cycle": args.requests_per_cycle,
    }
    payload = {"machine": machine(), **options, "rows": rows, "targets": lines}
    path = write_json(args.out.parent, args.out.stem, payload)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
