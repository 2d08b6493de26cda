"""Prometheus metrics, liveness and readiness: what every stage reports through.

Every metric is declared here, in `Metrics` (and the sidecar's in `SidecarMetrics`, on the same registry),
on a registry of its own (tests build several). Stages receive these objects typed by the Protocols below —
`PipelineMetrics`, `HealthSignals`, and the client's `ClientObserver` (cloudzero/client.py) — and call their
small methods rather than touching prometheus_client themselves. `BeatingObserver` is the API client's
observer: metrics plus a liveness beat per request. The HTTP server for /metrics /healthz /readyz is in
`allocd.webserver`; structured logging in `allocd.logs`.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric

from allocd import __version__
from allocd.cloudzero.records import RATE_BURST_RECORDS, Op

if TYPE_CHECKING:
    from allocd.sources.spool import RecoveryReport, Spool

__all__ = [
    "CONTENT_TYPE",
    "DLQ_KINDS",
    "FLUSH_OUTCOMES",
    "FLUSH_TRIGGERS",
    "METRIC_NAMES",
    "SERIES_NAMES",
    "BeatingObserver",
    "DecayedRate",
    "Health",
    "HealthSignals",
    "Metrics",
    "PipelineMetrics",
    "Probe",
    "SidecarMetrics",
]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # text/plain; version=0.0.4; charset=utf-8

# Closed label sets: checked on use so a typo cannot grow a new series, and pre-created so rate() and
# increase() see a zero before the first event (a counter born at 1 shows no increase).
FLUSH_TRIGGERS = ("closed", "max_interval", "key_cap", "memory_cap", "source_cap", "shutdown")
FLUSH_OUTCOMES = ("completed", "abandoned", "failed")
DLQ_KINDS = ("event", "record")

_DAY = 86_400.0
_RATE_WINDOW = 3_600.0  # time constant of the projected daily rate
_MIN_RATE_SPAN = 60.0  # never project a day from less than a minute of sending

_FLUSH_SECONDS_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
_FLUSH_RECORDS_BUCKETS = (1, 10, 100, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000)
_RECOVERY_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_REQUEST_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class PipelineMetrics(Protocol):
    """What the pipeline and the flush cycle report (implemented by `Metrics`)."""

    def record_batch(
        self,
        source: str,
        consumed: int,
        accepted: dict[str, int],
        late: dict[str, int],
        skipped: int,
        rejected: list[str],
    ) -> None: ...
    def flush_cycle(self, trigger: str, outcome: str, seconds: float, records: int) -> None: ...
    def dlq_written(self, kind: str, n: int = 1) -> None: ...
    def dlq_write_failed(self) -> None: ...
    def in_doubt_recovered(self, requests: int, cells: int) -> None: ...
    def fenced(self) -> None: ...
    def recovered(self, seconds: float) -> None: ...
    def journal_corrupt(self, entries: int) -> None: ...
    def rounded(self, cells: int) -> None: ...
    def committed(self, positions: dict[tuple[str, int], int]) -> None: ...
    def set_accumulator(self, open_cells: int, open_windows: int, bytes_estimate: int) -> None: ...
    def set_pending(self, snapshots: int) -> None: ...
    def set_paused(self, paused: bool) -> None: ...
    def forget_partition(self, topic: str, partition: int) -> None: ...


class HealthSignals(Protocol):
    """What loops report for /healthz and /readyz (implemented by `Health`)."""

    def beat(self, loop: str) -> None: ...
    def set_condition(self, name: str, ok: bool, detail: str = "") -> None: ...


class DecayedRate:
    """A rate (units per second) that weighs the recent past, with time constant `tau` seconds.

    Each `add(n, t)` contributes n/tau · e^(-(now - t)/tau); for a steady rate λ the sum tends to λ, and a
    burst fades by a factor e per `tau`. Early on the sum has seen only 1 - e^(-elapsed/tau) of its weight,
    so it is divided by that (elapsed floored at `min_span`): the estimate is the plain average rate while
    elapsed ≪ tau, and the decayed rate after, instead of climbing from zero for an hour after a restart.
    """

    def __init__(self, now: float, tau: float = _RATE_WINDOW, min_span: float = _MIN_RATE_SPAN) -> None:
        self._tau = tau
        self._min_span = min_span
        self._start = now
        self._at = now
        self._sum = 0.0

    def add(self, n: float, now: float) -> None:
        self._sum = self._decayed(now) + n / self._tau
        self._at = max(self._at, now)

    def rate(self, now: float) -> float:
        elapsed = max(now - self._start, self._min_span)
        return self._decayed(now) / -math.expm1(-elapsed / self._tau)

    def _decayed(self, now: float) -> float:
        # A clock that stepped back counts as no time passing.
        return self._sum * math.exp(-max(now - self._at, 0.0) / self._tau)


class Metrics:
    """Every allocd metric, on a private registry, with the methods the pipeline and the API client call.

    `clock` is wall-clock unix time: it stamps the last-success gauges, finds the UTC day of the record
    budget, and times pauses and the projected rate (tests pass a fake one).
    """

    def __init__(self, clock: Callable[[], float] = time.time, *, rate_window: float = _RATE_WINDOW) -> None:
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        now = clock()
        self._day = _utc_day(now)
        self._sent_today = 0
        self._rate = DecayedRate(now, rate_window)
        self._paused_since: float | None = None
        self._partitions: dict[tuple[str, int], list[int | None]] = {}
        self._declare_events()
        self._declare_flush()
        self._declare_api()
        self._declare_kafka()

    # --- declarations -------------------------------------------------------------------------------
    def _counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(name, doc, tuple(labels), registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
        return Gauge(name, doc, tuple(labels), registry=self.registry)

    def _declare_events(self) -> None:
        c, g = self._counter, self._gauge
        self.events_consumed = c(
            "allocd_events_consumed_total", "Raw messages read from a source, before decoding.", ["source"]
        )
        self.events_accepted = c(
            "allocd_events_accepted_total",
            "Events decoded, validated and added to the accumulator.",
            ["stream"],
        )
        self.events_rejected = c(
            "allocd_events_rejected_total",
            "Events refused (sent to the DLQ), by rejection reason.",
            ["reason"],
        )
        self.events_late = c(
            "allocd_events_late_total",
            "Accepted events for a window that was already delivered; they reach the API as a delta.",
            ["stream"],
        )
        self.events_skipped = c(
            "allocd_events_skipped_total",
            "Replayed events skipped because their window was already delivered past their position.",
        )
        self.dlq_writes = c(
            "allocd_dlq_writes_total",
            "Items written to the dead-letter queue: event or API record.",
            ["kind"],
        )
        self.dlq_write_errors = c("allocd_dlq_write_errors_total", "Dead-letter queue writes that failed.")
        self.open_cells = g("allocd_open_cells", "Cells (stream, window, element, filter) held in memory.")
        self.open_windows = g("allocd_open_windows", "Windows with at least one cell held in memory.")
        self.accumulator_bytes = g("allocd_accumulator_bytes", "Estimated memory held by the accumulator.")
        self.rounded_cells = c(
            "allocd_rounded_cells_total",
            "Delivered cells whose total needs more than 15 significant digits (the API rounds them).",
        )
        for kind in DLQ_KINDS:
            self.dlq_writes.labels(kind)

    def _declare_flush(self) -> None:
        self.flush_cycles = self._counter(
            "allocd_flush_cycles_total",
            "Flush cycles finished, by what started them and how they ended.",
            ["trigger", "outcome"],
        )
        self.flush_cycle_seconds = Histogram(
            "allocd_flush_cycle_seconds",
            "Duration of a flush cycle from snapshot to its last acknowledgement (or abandonment).",
            buckets=_FLUSH_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.flush_cycle_records = Histogram(
            "allocd_flush_cycle_records",
            "API records carried by one flush cycle.",
            buckets=_FLUSH_RECORDS_BUCKETS,
            registry=self.registry,
        )
        self.snapshots_pending = self._gauge(
            "allocd_snapshots_pending", "Snapshots waiting behind the cycle in flight."
        )
        self.last_flush_success = self._gauge(
            "allocd_last_flush_success_timestamp_seconds", "Unix time the last flush cycle completed."
        )
        for trigger in FLUSH_TRIGGERS:
            for outcome in FLUSH_OUTCOMES:
                self.flush_cycles.labels(trigger, outcome)
        self.recovery_seconds = Histogram(
            "allocd_recovery_seconds",
            "Time an assignment spent reading the journal and recovering its partitions.",
            buckets=_RECOVERY_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.journal_corrupt_entries = self._counter(
            "allocd_journal_corrupt_entries",
            "Journal entries whose checksum or form was wrong when read: skipped, never applied.",
        )

    def _declare_api(self) -> None:
        c, g = self._counter, self._gauge
        self.api_records = c(
            "allocd_api_records_total", "Records sent to the API, by op and answer status.", ["op", "status"]
        )
        self.api_requests = c(
            "allocd_api_requests_total",
            'Requests sent to the API, by op and answer: HTTP status, or "error" when there was none.',
            ["op", "status"],
        )
        self.api_request_seconds = Histogram(
            "allocd_api_request_seconds",
            "Time from sending a request to its answer or failure.",
            ["op"],
            buckets=_REQUEST_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.api_retries = c(
            "allocd_api_retries_total", "Requests retried, by op and reason.", ["op", "reason"]
        )
        self.api_in_doubt_requests = c(
            "allocd_api_in_doubt_requests_total",
            "Requests whose outcome is unknown (timeout or reset after sending); sum may count them twice.",
            ["op"],
        )
        self.api_in_doubt_records = c(
            "allocd_api_in_doubt_records_total", "Records carried by in-doubt requests.", ["op"]
        )
        self.api_rejected_records = c(
            "allocd_api_rejected_records_total",
            "Records in requests the API refused for good (4xx but 403/408/429); dead-lettered.",
            ["op"],
        )
        self.rate_wait = c(
            "allocd_rate_limiter_wait_seconds_total", "Time requests waited for the client-side rate limiter."
        )
        self.fenced_requests = c(
            "allocd_fenced_requests_total",
            "Requests not sent because another member had claimed their partitions (a stale owner).",
        )
        self.api_auth_failures = c(
            "allocd_api_auth_failures_total", "Requests answered 403 (API key missing, revoked or rotated)."
        )
        self.daily_budget = g(
            "allocd_api_daily_record_budget", "Records the API allows per day (100/s, the documented burst)."
        )
        self.records_sent_today = g(
            "allocd_api_records_sent_today", "Records the API accepted (2xx) since 00:00 UTC today."
        )
        self.records_projected_daily = g(
            "allocd_api_records_projected_daily",
            "Accepted records per day at the recent rate (rate decayed over 1 h, times 86400).",
        )
        self.ready = g("allocd_ready", "1 when /readyz answers 200.")
        self.build_info = g("allocd_build_info", "Always 1; labels name the build.", ["version", "python"])
        self.daily_budget.set(RATE_BURST_RECORDS)
        self.records_sent_today.set_function(self._read_sent_today)
        self.records_projected_daily.set_function(lambda: self._rate.rate(self._clock()) * _DAY)
        self.build_info.labels(__version__, platform.python_version()).set(1)
        for op in Op:
            for counter in (self.api_in_doubt_requests, self.api_in_doubt_records, self.api_rejected_records):
                counter.labels(op)

    def _declare_kafka(self) -> None:
        c, g, tp = self._counter, self._gauge, ["topic", "partition"]
        self.consumer_paused = g("allocd_consumer_paused", "1 while the source is paused for backpressure.")
        self.paused_seconds = c("allocd_paused_seconds_total", "Time the source spent paused.")
        self.committed_offset = g("allocd_committed_offset", "Last committed offset (next to read).", tp)
        self.end_offset = g("allocd_end_offset", "Partition end offset (next to be written).", tp)
        self.consumer_lag = g("allocd_consumer_lag", "Messages between the committed and end offsets.", tp)
        self.last_commit = g("allocd_last_commit_timestamp_seconds", "Unix time of the last offset commit.")

    # --- the pipeline's calls -----------------------------------------------------------------------
    def flush_cycle(self, trigger: str, outcome: str, seconds: float, records: int) -> None:
        """A flush cycle ended; a completed one stamps the last-success time."""
        _check("trigger", trigger, FLUSH_TRIGGERS)
        _check("outcome", outcome, FLUSH_OUTCOMES)
        self.flush_cycles.labels(trigger, outcome).inc()
        self.flush_cycle_seconds.observe(seconds)
        self.flush_cycle_records.observe(records)
        if outcome == "completed":
            self.last_flush_success.set(self._clock())

    def record_batch(
        self,
        source: str,
        consumed: int,
        accepted: dict[str, int],
        late: dict[str, int],
        skipped: int,
        rejected: list[str],
    ) -> None:
        """One polled batch: counts per stream and per rejection reason, added once per batch (hot path)."""
        self.events_consumed.labels(source).inc(consumed)
        for stream, n in accepted.items():
            self.events_accepted.labels(stream).inc(n)
        for stream, n in late.items():
            self.events_late.labels(stream).inc(n)
        if skipped:
            self.events_skipped.inc(skipped)
        if rejected:
            reasons: dict[str, int] = {}
            for reason in rejected:
                reasons[reason] = reasons.get(reason, 0) + 1
            for reason, n in reasons.items():
                self.events_rejected.labels(reason).inc(n)

    def dlq_written(self, kind: str, n: int = 1) -> None:
        _check("kind", kind, DLQ_KINDS)
        self.dlq_writes.labels(kind).inc(n)

    def set_accumulator(self, open_cells: int, open_windows: int, bytes_estimate: int) -> None:
        self.open_cells.set(open_cells)
        self.open_windows.set(open_windows)
        self.accumulator_bytes.set(bytes_estimate)

    def set_paused(self, paused: bool) -> None:
        """Backpressure on or off; paused time accrues into allocd_paused_seconds_total."""
        self._accrue_pause()
        self._paused_since = self._clock() if paused else None
        self.consumer_paused.set(1 if paused else 0)

    def set_partition(
        self, topic: str, partition: int, committed: int | None = None, end: int | None = None
    ) -> None:
        """Update what is known of a partition's offsets; lag appears once both are known."""
        state = self._partitions.setdefault((topic, partition), [None, None])
        if committed is not None:
            state[0] = committed
            self.committed_offset.labels(topic, partition).set(committed)
        if end is not None:
            state[1] = end
            self.end_offset.labels(topic, partition).set(end)
        if state[0] is not None and state[1] is not None:
            self.consumer_lag.labels(topic, partition).set(max(state[1] - state[0], 0))

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop a revoked partition's series, so a former owner does not report a frozen lag."""
        self._partitions.pop((topic, partition), None)
        for gauge in (self.committed_offset, self.end_offset, self.consumer_lag):
            with contextlib.suppress(KeyError):
                gauge.remove(topic, str(partition))

    def commit_succeeded(self) -> None:
        self.last_commit.set(self._clock())

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def dlq_write_failed(self) -> None:
        self.dlq_write_errors.inc()

    def in_doubt_recovered(self, requests: int, cells: int) -> None:
        """Requests a recovery found in doubt (journaled as sent, never answered): their cells go again."""
        self.api_in_doubt_requests.labels(Op.SUM.value).inc(requests)
        self.api_in_doubt_records.labels(Op.SUM.value).inc(cells)

    def fenced(self) -> None:
        self.fenced_requests.inc()

    def recovered(self, seconds: float) -> None:
        self.recovery_seconds.observe(seconds)

    def journal_corrupt(self, entries: int) -> None:
        self.journal_corrupt_entries.inc(entries)

    def rounded(self, cells: int) -> None:
        self.rounded_cells.inc(cells)

    def committed(self, positions: dict[tuple[str, int], int]) -> None:
        """A group commit of `positions` succeeded."""
        self.commit_succeeded()
        for (topic, partition), position in positions.items():
            self.set_partition(topic, partition, committed=position)

    def set_pending(self, snapshots: int) -> None:
        self.snapshots_pending.set(snapshots)

    # --- the API client's observer interface (ClientObserver in cloudzero/client.py) -----------------
    def on_request(self, op: str, status: int | None, records: int, seconds: float) -> None:
        """A request ended with `status`, or with no answer (None → "error")."""
        label = "error" if status is None else str(status)
        self.api_requests.labels(op, label).inc()
        self.api_records.labels(op, label).inc(records)
        self.api_request_seconds.labels(op).observe(seconds)
        if status is None:
            return
        if 200 <= status < 300:
            self._count_accepted(records)
        elif status == 403:
            self.api_auth_failures.inc()

    def on_retry(self, op: str, reason: str) -> None:
        self.api_retries.labels(op, reason).inc()

    def on_in_doubt(self, op: str, records: int) -> None:
        self.api_in_doubt_requests.labels(op).inc()
        self.api_in_doubt_records.labels(op).inc(records)

    def on_rejected(self, op: str, records: int) -> None:
        """Counted when the client settles them as refused, not per 400'd attempt: bisection sends the
        same records again, and only the ones it narrows the refusal down to are dead-lettered."""
        self.api_rejected_records.labels(op).inc(records)

    def on_rate_wait(self, seconds: float) -> None:
        self.rate_wait.inc(seconds)

    # --- exposition ---------------------------------------------------------------------------------
    def render(self) -> bytes:
        """The text exposition (format 0.0.4), without prometheus_client's `_created` series."""
        self._accrue_pause()
        return generate_latest(_WithoutCreated(self.registry))

    def _count_accepted(self, records: int) -> None:
        now = self._clock()
        self._roll_day(now)
        self._sent_today += records
        self._rate.add(records, now)

    def _read_sent_today(self) -> float:
        self._roll_day(self._clock())
        return self._sent_today

    def _roll_day(self, now: float) -> None:
        day = _utc_day(now)
        if day != self._day:
            self._day = day
            self._sent_today = 0

    def _accrue_pause(self) -> None:
        if self._paused_since is None:
            return
        now = self._clock()
        self.paused_seconds.inc(max(now - self._paused_since, 0.0))
        self._paused_since = now


def _utc_day(unix_time: float) -> int:
    return int(unix_time // _DAY)


def _check(label: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{label} {value!r} is not one of {', '.join(allowed)}")


class _WithoutCreated:
    """A view of a registry without `_created` samples: they double the series and no query uses them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


def _names(registry: CollectorRegistry) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(family names as exposed, every sample name a query may use) for the metrics of `registry`."""
    families: list[str] = []
    series: list[str] = []
    for family in registry.collect():
        if family.type == "counter":
            families.append(family.name + "_total")
            series.append(family.name + "_total")
        elif family.type == "histogram":
            families.append(family.name)
            series.extend(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            families.append(family.name)
            series.append(family.name)
    return tuple(sorted(families)), tuple(sorted(series))


# METRIC_NAMES as in `# TYPE` lines; SERIES_NAMES adds the histograms' _bucket/_sum/_count (for dashboards).
METRIC_NAMES, SERIES_NAMES = _names(Metrics(clock=lambda: 0.0).registry)


# --- health ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    """A probe's answer: `ok` chooses 200 or 503, `body` is the JSON that says why."""

    ok: bool
    body: dict[str, Any]


class Health:
    """Liveness from loops' heartbeats; readiness from named conditions.

    Liveness: each registered loop calls `beat(name)` on every iteration, idle or not, so the only way to
    fail is to be stuck: /healthz fails when a loop has not beaten for `liveness_timeout` seconds.
    Readiness: ready when every condition is true, or during the first `startup_grace` seconds (waiting for
    a partition assignment is normal then). `clock` is monotonic.
    """

    def __init__(
        self,
        *,
        liveness_timeout: float = 60.0,
        startup_grace: float = 60.0,
        conditions: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._timeout = liveness_timeout
        self._clock = clock
        self._grace_ends = clock() + startup_grace
        self._beats: dict[str, float] = {}
        self._conditions: dict[str, tuple[bool, str]] = {
            name: (False, "not reported yet") for name in conditions
        }

    def register(self, loop: str) -> None:
        """Watch `loop` from now on; it has `liveness_timeout` seconds to beat."""
        self.beat(loop)

    def beat(self, loop: str) -> None:
        """`loop` made progress (or looked and found nothing to do). Registers it on first use."""
        self._beats[loop] = self._clock()

    def unregister(self, loop: str) -> None:
        """`loop` ended on purpose (shutdown); stop watching it."""
        self._beats.pop(loop, None)

    def set_condition(self, name: str, ok: bool, detail: str = "") -> None:
        """Set a readiness condition; `detail` says why it is false, e.g. "api key rejected (403)"."""
        self._conditions[name] = (ok, detail)

    def liveness(self) -> Probe:
        now = self._clock()
        stalled = sorted(loop for loop, beat in self._beats.items() if now - beat >= self._timeout)
        since = {loop: round(now - beat, 3) for loop, beat in self._beats.items()}
        return Probe(not stalled, {"alive": not stalled, "stalled": stalled, "seconds_since_beat": since})

    def readiness(self) -> Probe:
        failing = {name: detail for name, (ok, detail) in self._conditions.items() if not ok}
        starting = self._clock() < self._grace_ends
        ready = not failing or starting
        reasons = [f"{name}: {detail}" if detail else name for name, detail in sorted(failing.items())]
        return Probe(ready, {"ready": ready, "starting": starting, "reasons": reasons})


# --- the sidecar ---------------------------------------------------------------------------------------
INGEST_STATUSES = ("202", "400", "401", "413", "503")  # what POST /v1/events answers
_SPOOL_SYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_SPOOL_GROUP_BUCKETS = (1, 2, 5, 10, 50, 100, 500, 1_000, 5_000, 10_000, 50_000)


class SidecarMetrics:
    """The sidecar's own metrics, on the `Metrics` registry (so /metrics shows them with the rest)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ingest_requests = Counter(
            "allocd_ingest_requests",
            "POST /v1/events answers, by HTTP status.",
            ["status"],
            registry=registry,
        )
        self.ingest_events = Counter(
            "allocd_ingest_events",
            "Events in 202 answers: accepted (durably spooled) or rejected (dead-lettered).",
            ["outcome"],
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "allocd_spool_bytes",
            "Bytes held by the spool (segments plus appends under way).",
            registry=registry,
        )
        self.spool_capacity = Gauge(
            "allocd_spool_capacity_bytes",
            "sidecar.max_spool_bytes: beyond it POSTs get 503.",
            registry=registry,
        )
        self.spool_segments = Gauge("allocd_spool_segments", "Segment files in the spool.", registry=registry)
        self.spool_sync_seconds = Histogram(
            "allocd_spool_sync_seconds",
            "Time to write and fsync one group of appends (group commit).",
            buckets=_SPOOL_SYNC_BUCKETS,
            registry=registry,
        )
        self.spool_group_records = Histogram(
            "allocd_spool_group_records",
            "Records made durable by one fsync (concurrent requests share it).",
            buckets=_SPOOL_GROUP_BUCKETS,
            registry=registry,
        )
        self.spool_corrupt_tails = Counter(
            "allocd_spool_corrupt_tails",
            "Spool segments found with a torn or corrupt tail at start-up (truncated; see the log).",
            registry=registry,
        )
        self.spool_truncated_bytes = Counter(
            "allocd_spool_truncated_bytes",
            "Bytes cut off torn or corrupt spool tails at start-up.",
            registry=registry,
        )
        for status in INGEST_STATUSES:
            self.ingest_requests.labels(status)
        for outcome in ("accepted", "rejected"):
            self.ingest_events.labels(outcome)

    def on_sync(self, seconds: float, records: int, _nbytes: int) -> None:
        """The spool's group-commit observer."""
        self.spool_sync_seconds.observe(seconds)
        self.spool_group_records.observe(records)

    def watch(self, spool: Spool) -> None:
        """Read the spool's gauges at scrape time, and count what its recovery truncated."""
        self.spool_bytes.set_function(lambda: spool.bytes_used)
        self.spool_segments.set_function(lambda: spool.segment_count)
        self.spool_capacity.set(spool.max_bytes)
        self.recovered(spool.recovery)

    def recovered(self, report: RecoveryReport) -> None:
        for issue in report.issues:
            self.spool_corrupt_tails.inc()
            self.spool_truncated_bytes.inc(issue.dropped_bytes)


# --- the API client's observer --------------------------------------------------------------------------
class BeatingObserver:
    """The client's observer (cloudzero.client.ClientObserver): metrics, plus a liveness beat per request,
    retry or rate-limit wait — a request that retries through an API outage is progress, not a stuck loop
    (/healthz must not fail on an outage)."""

    def __init__(self, metrics: Metrics, health: HealthSignals) -> None:
        self.metrics = metrics
        self.health = health

    def on_request(self, op: str, status: int | None, records: int, seconds: float) -> None:
        self.health.beat("flush")
        self.metrics.on_request(op, status, records, seconds)

    def on_retry(self, op: str, reason: str) -> None:
        self.health.beat("flush")
        self.metrics.on_retry(op, reason)

    def on_in_doubt(self, op: str, records: int) -> None:
        self.metrics.on_in_doubt(op, records)

    def on_rejected(self, op: str, records: int) -> None:
        self.metrics.on_rejected(op, records)

    def on_rate_wait(self, seconds: float) -> None:
        self.health.beat("flush")
        self.metrics.on_rate_wait(seconds)
