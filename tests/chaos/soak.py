"""The soak: produce live events and poison at a steady rate while a seeded schedule breaks things — SIGKILL,
SIGTERM, a member joining, broker link faults, API link faults, API faults through the emulator's admin
route — then let the daemons drain, stop them, and tally (tally.py) against ground truth.

Phases: start the stack and two members → produce + chaos for `seconds` → clear every fault, restart the
members that are down → drain (until every window cell reached its truth and the API was quiet, or a
deadline) → SIGTERM every member → read the journal and the DLQ → tally. The schedule is a pure function of
the seed (`plan`), printed with the seed, so a failure can be replayed; timing still varies between runs.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import logging
import math
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from allocd.cloudzero.records import Granularity, bucket_start, canonical_filter, parse_timestamp
from allocd.journal import CorruptEntry, cell_digest, decode_entry

from ..integration.harness import metric_value
from .diagnose import JournalRecord, write_diagnosis
from .inputs import STREAMS, InputFactory, WCell
from .stack import Slot, Stack
from .tally import Delivery, Evidence, Tally, journal_view, tally

__all__ = ["ALL_KINDS", "SCRIPTS", "Action", "SoakConfig", "SoakResult", "plan", "run_soak"]

log = logging.getLogger("tests.chaos")

# kind → weight in the random part of the schedule (every enabled kind also runs once early on).
ALL_KINDS: dict[str, float] = {
    "kill": 3,
    "term": 2,
    "join": 1.5,
    "kafka_latency": 1,
    "kafka_stall": 1,
    "kafka_reset": 1,
    "kafka_black_hole": 1,
    "api_link_latency": 1,
    "api_link_stall": 1,
    "api_link_reset": 1.5,
    "api_link_black_hole": 1,
    "api_503_storm": 1,
    "api_429": 1,
    "api_slow": 1,
    "api_hang": 1.5,
    "api_conn_reset": 1,
}
_SHUTDOWN_TIMEOUT = 8.0
_QUIET_SECONDS = 10.0
_EXIT_SLACK = 1.0  # seconds past shutdown_timeout for the interpreter to exit


@dataclass(frozen=True)
class SoakConfig:
    seed: int
    seconds: float  # production + chaos
    rate: float = 3000.0  # messages per second
    partitions: int = 6
    members: tuple[str, ...] = ("a", "b")  # always running (restarted after kills)
    joiners: tuple[str, ...] = ("c",)  # join and leave now and then
    window_seconds: int = 5
    grace_seconds: float = 1.0
    interval: tuple[float, float] = (3.0, 9.0)  # seconds between chaos actions
    kinds: tuple[str, ...] = tuple(ALL_KINDS)
    poison_fraction: float = 0.02
    drain_timeout: float = 1800.0  # at most, in all
    drain_stall: float = 120.0  # give up draining after this long without a cell completed
    script: str | None = None  # a name in SCRIPTS instead of the seeded schedule
    workdir: Path | None = None
    keep: bool = False  # keep the work dir even when the tally holds
    progress: Callable[[str], None] = lambda line: print(line, flush=True)


@dataclass(frozen=True)
class Action:
    at: float  # seconds after production started
    kind: str
    params: dict[str, Any]


@dataclass
class SoakResult:
    config: SoakConfig
    tally: Tally
    findings: list[str]
    workdir: Path
    timeline: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return self.tally.ok


# --- the schedule ----------------------------------------------------------------------------------------
# Scripted schedules that aim at one weakness (`--script NAME`), instead of the seeded random one.
SCRIPTS: dict[str, list[Action]] = {
    # A restarted member's broker link goes dark while it recovers its partitions from the journal, for
    # longer than its session timeout: the coordinator evicts it and gives the partitions to the other
    # member, but the recovery finishes when the link returns and the member delivers a cycle before a
    # heartbeat or commit tells it — a zombie, unless it confirms ownership before sending.
    "zombie": [
        action
        for i, delay in enumerate((4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 4.0, 5.2))
        for action in (
            Action(10.0 + 25 * i, "kill", {"slot": "a", "restart_after": 0.5}),
            Action(10.5 + 25 * i + delay, "kafka_black_hole", {"target": "a", "duration": 8.0, "kill": True}),
        )
    ],
}


def plan(config: SoakConfig) -> list[Action]:
    """The chaos schedule: each enabled kind once in a shuffled order, then weighted random picks."""
    if config.script:
        return [a for a in SCRIPTS[config.script] if a.at < config.seconds]
    rng = random.Random(config.seed)
    kinds = [k for k in config.kinds if k in ALL_KINDS]
    first = kinds[:]
    rng.shuffle(first)
    actions: list[Action] = []
    t = rng.uniform(2.0, 4.0)
    while t < config.seconds - 3.0 and kinds:
        kind = first.pop() if first else rng.choices(kinds, [ALL_KINDS[k] for k in kinds])[0]
        actions.append(Action(round(t, 2), kind, _params(kind, rng, config)))
        t += rng.uniform(*config.interval)
    return actions


def _params(kind: str, rng: random.Random, config: SoakConfig) -> dict[str, Any]:
    members = list(config.members) + list(config.joiners)
    slot = rng.choice(members)
    target = rng.choice(["", *members])  # "" = every daemon's Kafka links
    u = rng.uniform
    match kind:
        case "kill":
            return {"slot": slot, "restart_after": round(u(0.5, 8), 2)}
        case "term":
            return {"slot": slot, "restart_after": round(u(0.5, 5), 2)}
        case "join":
            return {"slot": rng.choice(list(config.joiners) or members), "stay": round(u(10, 40), 2)}
        case "kafka_latency":
            return {"target": target, "seconds": round(u(0.02, 0.4), 3), "duration": round(u(5, 20), 2)}
        case "kafka_stall":
            return {"target": target, "duration": round(u(1, 9), 2)}
        case "kafka_reset":
            return {"target": target}
        case "kafka_black_hole":
            return {"target": target, "duration": round(u(3, 20), 2), "kill": rng.random() < 0.7}
        case "api_link_latency":
            return {"slot": slot, "seconds": round(u(0.05, 1.5), 3), "duration": round(u(5, 20), 2)}
        case "api_link_stall":
            return {"slot": slot, "duration": round(u(0.5, 2.5), 2)}  # well under the client's timeout
        case "api_link_reset":
            return {"slot": slot}
        case "api_link_black_hole":
            return {"slot": slot, "duration": round(u(3, 25), 2)}
        case "api_503_storm":
            retry_after = round(u(0.2, 2), 2) if rng.random() < 0.5 else None
            return {
                "fraction": round(u(0.5, 1), 2),
                "retry_after": retry_after,
                "duration": round(u(5, 20), 2),
            }
        case "api_429":
            retry_after = round(u(0.2, 3), 2) if rng.random() < 0.5 else None
            return {
                "fraction": round(u(0.3, 0.9), 2),
                "retry_after": retry_after,
                "duration": round(u(5, 20), 2),
            }
        case "api_slow":
            return {"latency": round(u(0.3, 2.5), 2), "duration": round(u(5, 15), 2)}
        case "api_hang":
            return {"fraction": round(u(0.05, 0.3), 2), "duration": round(u(5, 15), 2)}
        case "api_conn_reset":
            return {"fraction": round(u(0.1, 0.5), 2), "duration": round(u(5, 15), 2)}
    raise ValueError(kind)


# --- the run ---------------------------------------------------------------------------------------------
@dataclass
class _Truth:
    cells: dict[WCell, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    events: Counter[WCell] = field(default_factory=Counter)
    poison: dict[tuple[int, int], str] = field(default_factory=dict)
    offsets: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    valid: int = 0
    sent: int = 0
    failed: int = 0


class Soak:
    def __init__(self, config: SoakConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.stack = Stack(workdir, config.seed, config.partitions)
        self.truth = _Truth()
        self.findings: list[str] = []
        self.timeline: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.api_faults: dict[int, dict[str, Any]] = {}
        self.fault_ids = iter(range(1, 1 << 30))
        self.delivered: dict[WCell, Decimal] = defaultdict(Decimal)
        self.seen_applied = 0
        self.max_lag = 0.0
        self.chaos_done = asyncio.Event()
        self.stopping = False
        self.journal: list[JournalRecord] = []
        self.code = code_version()

    # --- helpers -------------------------------------------------------------------------------------
    def note(self, kind: str, **info: Any) -> None:
        entry = {"t": round(time.monotonic() - self.started, 2), "kind": kind, **info}
        self.timeline.append(entry)
        log.info("chaos %s", entry)

    def spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.findings.append(f"harness task {task.get_name()} failed: {task.exception()!r}")
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def slot(self, name: str) -> Slot:
        return self.stack.slots[name]

    # --- producing -----------------------------------------------------------------------------------
    async def produce(self, until: float) -> None:
        cfg = self.config
        factory = InputFactory(
            cfg.seed, cfg.partitions, cfg.window_seconds, poison_fraction=cfg.poison_fraction
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self.stack.kafka.address,
            client_id="chaos-producer",  # not an allocd- id: the Kafka proxy never faults it
            acks="all",
            linger_ms=5,
            max_request_size=2 * 1024 * 1024,
            max_batch_size=256 * 1024,
        )
        await producer.start()
        acks: deque[asyncio.Task[None]] = deque()
        tick, carry = 0.05, 0.0
        next_at = time.monotonic()
        try:
            while time.monotonic() < until:
                carry += cfg.rate * tick
                n, carry = int(carry), carry - int(carry)
                now_ms = int(time.time() * 1000)
                batch = []
                for _ in range(n):
                    item = factory.next(now_ms)
                    fut = await producer.send(
                        self.stack.topic, item.value, partition=item.partition, timestamp_ms=item.timestamp_ms
                    )
                    batch.append((item, fut))
                self.truth.sent += n
                acks.append(asyncio.create_task(self._fold(batch)))
                while len(acks) > 40 or (acks and acks[0].done()):
                    await acks.popleft()  # bounded: acks lagging 2 s hold production back
                next_at += tick
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            while acks:
                await acks.popleft()
        finally:
            for task in acks:
                task.cancel()
            await producer.stop()

    async def _fold(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        for item, fut in batch:
            try:
                meta = await fut
            except Exception as exc:  # the producer's link is never faulted: this is the harness's problem
                self.truth.failed += 1
                self.findings.append(f"HARNESS: produce failed ({exc!r}); ground truth unknown")
                continue
            self.truth.offsets[meta.partition].append(meta.offset)
            if item.kind == "valid":
                self.truth.cells[item.cell] += item.amount
                self.truth.events[item.cell] += 1
                self.truth.valid += 1
            else:
                self.truth.poison[(meta.partition, meta.offset)] = item.kind

    # --- chaos ---------------------------------------------------------------------------------------
    async def chaos(self, actions: list[Action], t0: float, until: float) -> None:
        for action in actions:
            at = t0 + action.at
            if at >= until:
                break
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            try:
                await self.act(action)
            except Exception as exc:
                self.findings.append(f"HARNESS: action {action.kind} failed: {exc!r}")
                log.exception("action failed")

    async def act(self, action: Action) -> None:
        p = action.params
        kind = action.kind
        kafka = self.stack.kafka
        self.note(kind, **p)
        match kind:
            case "kill":
                slot = self.slot(p["slot"])
                if slot.running():
                    await self.stack.kill_slot(slot)
                    self.spawn(self._restart_later(slot, p["restart_after"]), f"restart-{slot.name}")
            case "term":
                slot = self.slot(p["slot"])
                if slot.running() and not slot.expect_exit:
                    self.spawn(self._term_and_restart(slot, p["restart_after"]), f"term-{slot.name}")
            case "join":
                slot = self.slot(p["slot"])
                if not slot.running():
                    await self.stack.start_slot(slot)
                    self.spawn(self._leave_later(slot, p["stay"]), f"leave-{slot.name}")
            case "kafka_latency":
                kafka.latency(_kafka_target(p["target"]), p["seconds"], p["duration"])
            case "kafka_stall":
                kafka.hold(_kafka_target(p["target"]), p["duration"], kill_at_end=False)
            case "kafka_reset":
                self.note("kafka_reset_done", links=kafka.reset(_kafka_target(p["target"])))
            case "kafka_black_hole":
                kafka.hold(_kafka_target(p["target"]), p["duration"], kill_at_end=p["kill"])
            case "api_link_latency":
                self.slot(p["slot"]).proxy.latency("", p["seconds"], p["duration"])
            case "api_link_stall":
                self.slot(p["slot"]).proxy.hold("", p["duration"], kill_at_end=False)
            case "api_link_reset":
                self.slot(p["slot"]).proxy.reset("")
            case "api_link_black_hole":
                self.slot(p["slot"]).proxy.hold("", p["duration"], kill_at_end=True)
            case "api_503_storm":
                await self.api_fault(
                    {"error_503": p["fraction"], "retry_after": p["retry_after"]}, p["duration"]
                )
            case "api_429":
                await self.api_fault(
                    {"error_429": p["fraction"], "retry_after": p["retry_after"]}, p["duration"]
                )
            case "api_slow":
                await self.api_fault({"latency": p["latency"]}, p["duration"])
            case "api_hang":
                await self.api_fault({"hang": p["fraction"]}, p["duration"])
            case "api_conn_reset":
                await self.api_fault({"reset": p["fraction"]}, p["duration"])

    async def _restart_later(self, slot: Slot, delay: float, *, after_crash: bool = False) -> None:
        await asyncio.sleep(delay)
        if self.chaos_done.is_set() and not after_crash:
            return  # end_chaos restarts whoever is down
        if not slot.running() and slot.name in self.config.members and not self.stopping:
            await self.stack.start_slot(slot)
            self.note("restarted", slot=slot.label)

    async def _term_and_restart(self, slot: Slot, delay: float) -> None:
        await self._term(slot)
        await self._restart_later(slot, delay)

    async def _term(self, slot: Slot) -> None:
        label = slot.label
        if slot.expect_exit:  # already being stopped: a second SIGTERM would mean "exit at once"
            with contextlib.suppress(TimeoutError):
                await slot.process.wait(_SHUTDOWN_TIMEOUT + 15)
            return
        await self.stack.scrape(slot)
        code, seconds = await self.stack.term_slot(slot, _SHUTDOWN_TIMEOUT + 15)
        self.note("terminated", slot=label, code=code, seconds=round(seconds, 2), killed=slot.killed)
        if slot.killed:
            return  # the schedule's SIGKILL overtook the shutdown: the exit says nothing about it
        if code != 0 or seconds > _SHUTDOWN_TIMEOUT + _EXIT_SLACK:
            self.findings.append(
                f"SIGTERM: {label} exited with {code} after {seconds:.1f} s (shutdown_timeout "
                f"{_SHUTDOWN_TIMEOUT:g} s; §2.6 wants 0 within it) — see {slot.process.log_path}"
            )

    async def _leave_later(self, slot: Slot, stay: float) -> None:
        label = slot.label
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.chaos_done.wait(), stay)
        if slot.running() and slot.label == label and not self.chaos_done.is_set():
            await self._term(slot)

    async def api_fault(self, faults: dict[str, Any], duration: float) -> None:
        """Emulator faults live for `duration`; overlapping episodes combine (the strongest of each)."""
        fid = next(self.fault_ids)
        self.api_faults[fid] = faults
        await self._push_api_faults()
        self.spawn(self._end_api_fault(fid, duration), f"api-fault-{fid}")

    async def _end_api_fault(self, fid: int, duration: float) -> None:
        await asyncio.sleep(duration)
        if self.api_faults.pop(fid, None) is not None:
            await self._push_api_faults()

    async def _push_api_faults(self) -> None:
        merged: dict[str, Any] = {}
        for faults in self.api_faults.values():
            for k, v in faults.items():
                if v is None:
                    continue
                merged[k] = max(merged.get(k, 0), v)
        await self.stack.admin("faults", merged)

    # --- background watchers -------------------------------------------------------------------------
    async def watch(self) -> None:
        """Restart members that died on their own (a finding); scrape metrics; measure loop lag."""
        last_scrape = 0.0
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.5)
            self.max_lag = max(self.max_lag, time.monotonic() - before - 0.5)
            for slot in self.stack.slots.values():
                proc = slot.process.proc
                if proc is not None and proc.poll() is not None and not slot.expect_exit:
                    slot.expect_exit = True
                    self.findings.append(
                        f"CRASH: {slot.label} exited on its own with code {proc.returncode} — see "
                        f"{slot.process.log_path}"
                    )
                    self.note("crashed", slot=slot.label, code=proc.returncode)
                    if slot.name in self.config.members:
                        self.spawn(self._restart_later(slot, 1.0, after_crash=True), f"crash-{slot.name}")
            if time.monotonic() - last_scrape > 5:
                last_scrape = time.monotonic()
                for slot in self.stack.slots.values():
                    await self.stack.scrape(slot)

    async def report_progress(self) -> None:
        while True:
            await asyncio.sleep(30)
            short, _ = self.shortfall()
            up = [s.label for s in self.stack.slots.values() if s.running()]
            self.config.progress(
                f"  t={time.monotonic() - self.started:6.0f}s produced={self.truth.sent:,} "
                f"acked={self.truth.valid + len(self.truth.poison):,} cells short={short:,} "
                f"applied requests={len(self.stack.emulator.applied):,} up={up} "
                f"actions={sum(1 for e in self.timeline if e['kind'] in ALL_KINDS)}"
            )

    # --- drain and evidence ----------------------------------------------------------------------------
    def shortfall(self) -> tuple[int, float]:
        """(window cells below their truth, seconds since the API last applied anything)."""
        applied = self.stack.emulator.applied
        for app in applied[self.seen_applied :]:
            for record in app.records:
                cell, amount = _record_cell(app.stream, record)
                self.delivered[cell] += amount
        self.seen_applied = len(applied)
        short = sum(1 for cell, v in self.truth.cells.items() if self.delivered.get(cell, 0) < v)
        quiet = time.time() - applied[-1].wall if applied else math.inf
        return short, quiet

    async def drain(self) -> bool:
        """Wait until every cell reached its truth and the API was quiet; give up when no cell was
        completed for `drain_stall` seconds (stuck, not slow) or after `drain_timeout` in all."""
        started = time.monotonic()
        best, best_at = math.inf, started
        while time.monotonic() - started < self.config.drain_timeout:
            short, quiet = self.shortfall()
            if short == 0 and quiet >= _QUIET_SECONDS:
                return True
            if short < best:
                best, best_at = short, time.monotonic()
            elif time.monotonic() - best_at > self.config.drain_stall:
                break
            await asyncio.sleep(1.0)
        short, _ = self.shortfall()
        self.findings.append(
            f"DRAIN: {short} window cells still short after {time.monotonic() - started:.0f} s of draining "
            f"(no progress for {time.monotonic() - best_at:.0f} s)"
        )
        return False

    async def read_topic(self, topic: str) -> list[Any]:
        """Every record of a one-partition topic, up to a barrier produced now (end offsets under-report)."""
        address = self.stack.kafka.address
        producer = AIOKafkaProducer(bootstrap_servers=address, client_id="chaos-reader")
        await producer.start()
        try:
            meta = await producer.send_and_wait(
                topic, b"chaos-barrier", key=uuid.uuid4().hex.encode(), partition=0
            )
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=address,
            client_id="chaos-reader",
            enable_auto_commit=False,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await consumer.start()
        out: list[Any] = []
        tp = TopicPartition(topic, 0)
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                batch = await consumer.getmany(tp, timeout_ms=500)
                for rec in batch.get(tp, []):
                    if rec.offset >= meta.offset:
                        return out
                    out.append(rec)
            raise TimeoutError(f"{topic}: barrier at {meta.offset} not reached")
        finally:
            await consumer.stop()

    async def evidence(self) -> Evidence:
        stack = self.stack
        self.journal = []
        for rec in await self.read_topic(f"{stack.group}-ckpt"):
            with contextlib.suppress(CorruptEntry):
                entry = decode_entry(rec.value)
                if entry is not None and entry.get("g") == stack.group:
                    self.journal.append((rec.offset, rec.timestamp, dict(entry)))
        journal = [entry for _, _, entry in self.journal]
        dlq: Counter[tuple[int, int]] = Counter()
        reasons: Counter[str] = Counter()
        deliveries: list[Delivery] = []
        refused = 0
        for rec in await self.read_topic(f"{stack.group}-dlq"):
            headers = {k: v.decode("utf-8", "replace") for k, v in (rec.headers or ())}
            if headers.get("allocd-kind") == "event" and headers.get("allocd-source-topic") == stack.topic:
                dlq[(int(headers["allocd-source-partition"]), int(headers["allocd-source-offset"]))] += 1
                reasons[headers.get("allocd-reason", "?")] += 1
            elif headers.get("allocd-kind") == "record":
                refused += 1
                cell, amount = _record_cell(headers["allocd-stream"], orjson.loads(rec.value))
                deliveries.append(Delivery(cell, amount, -1, True, "dlq"))
        unanswered = Counter[str]()
        for app in stack.emulator.applied:
            answered = app.answered
            for record in app.records:
                cell, amount = _record_cell(app.stream, record)
                deliveries.append(Delivery(cell, amount, app.seq, answered, app.why_unanswered))
            if not answered:
                unanswered[app.why_unanswered] += 1
        metrics_in_doubt = 0.0
        for slot in stack.slots.values():
            for text in slot.last_metrics.values():
                metrics_in_doubt += metric_value(text, "allocd_api_in_doubt_requests_total")
        notes = {
            "DLQ reasons": dict(reasons.most_common()),
            "recorder matches emulator totals": self.check_recorder(),
            "offsets dense per partition": self.check_offsets(),
            "journal": f"{len(journal):,} entries",
            "driver loop lag (max)": f"{self.max_lag:.2f} s",
            "api proxies: links, killed, unframed": [
                (s.proxy.stats["links"], s.proxy.stats["killed"], s.proxy.stats["unframed"])
                for s in stack.slots.values()
            ],
            "kafka proxy: links, killed": (stack.kafka.stats["links"], stack.kafka.stats["killed"]),
            "incarnations": {s.name: s.incarnation for s in stack.slots.values()},
            "code (at start)": self.code,
        }
        return Evidence(
            truth=dict(self.truth.cells),
            truth_events=dict(self.truth.events),
            deliveries=deliveries,
            journal=journal_view(journal),
            digest=cell_digest,
            poison=self.truth.poison,
            dlq=dlq,
            dlq_reasons=reasons,
            produced_valid=self.truth.valid,
            api_refused_records=refused,
            daemon_in_doubt=metrics_in_doubt,
            log_in_doubt=self.log_in_doubt(),
            notes=notes,
        )

    def applications(self) -> Iterable[dict[str, Any]]:
        labels = {key: label for slot in self.stack.slots.values() for key, label in slot.keys.items()}
        for app in self.stack.emulator.applied:
            yield {
                "seq": app.seq,
                "label": labels.get(app.key, "?"),
                "wall": app.wall,
                "stream": app.stream,
                "answered": app.answered,
                "why": app.why_unanswered,
                "status": app.entry.status,
                "link": [app.link.proxy, app.link.id, app.index] if app.link else None,
                "cells": [list(_record_cell(app.stream, r)) for r in app.records],
            }

    def check_recorder(self) -> str:
        """The recorded applications, bucketed as the API buckets, must equal the emulator's own totals."""
        expected: dict[tuple[str, str, str, Any], Decimal] = defaultdict(Decimal)
        for app in self.stack.emulator.applied:
            gran = Granularity(STREAMS[app.stream][0])
            for record in app.records:
                bucket = bucket_start(parse_timestamp(record["timestamp"]), gran).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                )
                flt = canonical_filter(record.get("filter"))
                expected[(app.stream, bucket, record["element_name"], flt)] += Decimal(str(record["value"]))
        actual = {}
        for stream in STREAMS:
            for (ts, element, flt), value in self.stack.emulator.totals(stream).items():
                actual[(stream, ts, element, flt)] = value
        diff = [k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k)]
        if diff:
            self.findings.append(
                f"HARNESS: recorder and emulator disagree on {len(diff)} cells, e.g. {diff[:3]}"
            )
            return f"no ({len(diff)} cells differ)"
        return f"yes ({len(actual):,} API cells)"

    def check_offsets(self) -> str:
        bad = [p for p, offs in self.truth.offsets.items() if sorted(offs) != list(range(len(offs)))]
        if bad:
            self.findings.append(
                f"HARNESS: produced offsets are not 0..n-1 on partitions {bad} (duplicates?)"
            )
            return f"no (partitions {bad})"
        return "yes"

    def log_in_doubt(self) -> int:
        count = 0
        for slot in self.stack.slots.values():
            with contextlib.suppress(FileNotFoundError):
                for line in slot.process.log_path.read_bytes().splitlines():
                    if b"in doubt (" in line and b"allocd.client" in line:
                        count += 1
        return count

    # --- the whole run ---------------------------------------------------------------------------------
    async def run(self) -> SoakResult:
        cfg = self.config
        actions = plan(cfg)
        (self.workdir / "plan.json").write_text(json.dumps([asdict(a) for a in actions], indent=1))
        slot_options: dict[str, dict[str, Any]] = {}
        variants = [{}, {"max_flush_interval_seconds": 9}, {"max_open_keys": 400}]
        for i, name in enumerate([*cfg.members, *cfg.joiners]):
            slot_options[name] = variants[i % len(variants)]
        await self.stack.start(
            slot_options,
            {
                "window_seconds": cfg.window_seconds,
                "grace_seconds": cfg.grace_seconds,
                "shutdown_timeout": _SHUTDOWN_TIMEOUT,
            },
        )
        for name in cfg.members:
            await self.stack.start_slot(self.slot(name))
        await self._wait_ready([self.slot(n) for n in cfg.members])
        self.spawn(self.watch(), "watch")
        self.spawn(self.report_progress(), "progress")
        t0 = time.monotonic()
        until = t0 + cfg.seconds
        self.note("production", seconds=cfg.seconds, rate=cfg.rate)
        chaos = asyncio.create_task(self.chaos(actions, t0, until))
        try:
            await self.produce(until)
        finally:
            chaos.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chaos
        await self.end_chaos()
        self.note("drain")
        await self.drain()
        self.note("stop")
        self.stopping = True
        for slot in self.stack.slots.values():
            await self.stack.scrape(slot)
        await asyncio.gather(*(self._term(s) for s in self.stack.slots.values() if s.running()))
        return await self.conclude()

    async def end_chaos(self) -> None:
        self.chaos_done.set()
        for task in list(self.tasks):
            if task.get_name().startswith(("restart-", "api-fault-")):
                task.cancel()
        self.stack.kafka.clear()
        for slot in self.stack.slots.values():
            slot.proxy.clear()
        self.api_faults.clear()
        await self._push_api_faults()
        for task in list(self.tasks):
            if task.get_name().startswith(("term-", "leave-")):  # a SIGTERM under way is waited for
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for name in self.config.members:
            if not self.slot(name).running():
                await self.stack.start_slot(self.slot(name))
        self.note("faults cleared", up=[s.label for s in self.stack.slots.values() if s.running()])

    async def _wait_ready(self, slots: list[Slot]) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if all([await self.stack.ready(s) for s in slots]):
                return
            for s in slots:
                if s.process.proc is not None and s.process.proc.poll() is not None:
                    raise RuntimeError(f"{s.label} exited during start-up:\n{s.process.log_tail()}")
            await asyncio.sleep(0.5)
        raise RuntimeError("members not ready within 90 s")

    async def conclude(self) -> SoakResult:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        result_tally = tally(await self.evidence())
        # Dumps for diagnosis (the work dir is removed when the tally holds, unless kept).
        cells = result_tally.problem_cells or result_tally.late_cells
        path = write_diagnosis(self.workdir, cells, self.applications(), self.journal, cell_digest)
        if not result_tally.ok:
            self.findings.append(f"diagnosis of the problem cells: {path}")
        with (self.workdir / "truth.jsonl").open("w") as fh:
            for cell, value in self.truth.cells.items():
                fh.write(json.dumps([cell, str(value), self.truth.events[cell]]) + "\n")
        (self.workdir / "timeline.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.timeline))
        report = {
            "seed": self.config.seed,
            "ok": result_tally.ok,
            "rows": result_tally.rows,
            "problems": result_tally.problems,
            "findings": self.findings,
        }
        (self.workdir / "tally.json").write_text(json.dumps(report, indent=1, default=str))
        return SoakResult(self.config, result_tally, self.findings, self.workdir, self.timeline)


def code_version() -> str:
    """The commit the daemons ran, and whether daemon/ had uncommitted changes (read-only git calls)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "daemon"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = sorted(Path(f).name for f in dirty[1::2])
    return head + (f" + uncommitted {', '.join(changed)}" if changed else "")


def _kafka_target(target: str) -> str:
    return f"allocd-{target}" if target else "allocd-"


def _record_cell(stream: str, record: dict[str, Any]) -> tuple[WCell, Decimal]:
    ts = record["timestamp"]
    start = calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")) * 1000
    flt = canonical_filter(record.get("filter"))
    return (stream, start, record["element_name"], flt), Decimal(str(record["value"]))


async def run_soak(config: SoakConfig) -> SoakResult:
    """Run one soak; the work dir (daemon logs, plan, timeline, tally.json) is kept when the tally fails."""
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix=f"allocd-chaos-{config.seed}-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(workdir / "driver.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    soak = Soak(config, workdir)
    ok = False
    try:
        result = await soak.run()
        ok = result.ok
        return result
    finally:
        await soak.stack.close()
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
        if ok and not config.keep:
            shutil.rmtree(workdir, ignore_errors=True)
