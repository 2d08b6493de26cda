"""The tally at the end of a soak: what was produced, delivered, dead-lettered, in doubt — and whether every
difference from ground truth is an in-doubt request (pure code: plain values in, a verdict out).

The rule, per *window cell* w (stream, window start, element, filter — the daemon's cell key, which the
records in the emulator's request bodies name too):

- Every application of a record for w at the emulator is either *answered* (its response was handed to the
  client, per the API link proxy) or *unanswered* (hang fault, link cut, the client gone).
- The daemon journals one `ack` per request it got an answer for; `acks(w)` counts them. So
  `answered(w) - acks(w)` applications were answered but never journaled (the daemon died between the
  answer and the journal write): each must be a request the journal shows sent and never settled
  (`unsettled(w)`) — what a recovering daemon counts in doubt.
- Lost: delivered(w) < truth(w).
- Double-counted only by in-doubt requests: the excess delivered(w) - truth(w) must be exactly the sum of
  every unanswered application of w plus `answered(w) - acks(w)` whole answered ones (some choice of them):
  the acknowledged applications sum to the truth exactly and every other application is excess.
- One exception, and it makes the check a range: a *late ack* — journaled after another member's recovery
  read claimed one of the cycle's partitions. That member saw the request in doubt and re-sent its share of
  the events (at-least-once, counted in its metrics), so the excess may hold part of a late-acked
  application too. No single application may exceed the cell's truth (a record holds distinct events).
Anything else is a problem, named per cell. Poison must be in the DLQ (by source position), and nothing
else may be.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .inputs import WCell

__all__ = ["Delivery", "Evidence", "JournalView", "Tally", "journal_view", "tally"]

_SUBSET_LIMIT = 200_000  # combinations tried before falling back to a range check
_PROBLEM_EXAMPLES = 12


@dataclass(frozen=True, slots=True)
class Delivery:
    """One record applied at the emulator (or refused into the DLQ: `request` -1, answered)."""

    cell: WCell
    amount: Decimal
    request: int  # the emulator's request sequence number
    answered: bool
    why: str = ""  # for an unanswered one: hang, hook, link <fault>, client left


@dataclass
class JournalView:
    """What the journal says, per cell digest."""

    acks: Counter[str] = field(default_factory=Counter)  # requests that journaled an ack of the cell
    unsettled: Counter[str] = field(default_factory=Counter)  # requests sent, cell never acked nor failed
    late_acks: Counter[str] = field(default_factory=Counter)  # acks journaled after a recovery read
    requests: int = 0
    requests_in_doubt: int = 0
    cycles: int = 0
    checkpoints: int = 0
    reads: int = 0


def journal_view(entries: Iterable[dict[str, Any]]) -> JournalView:
    """Fold journal entries (`cycle`, `sent`, `ack`, `fail`, `ckpt`, and the `barrier` a recovering owner
    writes before it reads; see allocd/journal.py), in log order, per cell.

    A cell of a request is *unsettled* when neither its `ack` nor the request's `fail` was ever journaled:
    whoever recovers it counts the request in doubt and sends the cell again. An ack journaled after a
    recovery read (a barrier claiming one of the cycle's partitions) that came after the request's `sent`
    is a *late ack*: that reader saw the request in doubt and sent the cell's events of the partitions it
    took over again (the old owner was still finishing its request) — so a late ack permits a duplicate,
    it does not demand one.
    """
    sent: dict[tuple[str, int], tuple[int, set[str]]] = {}
    acked: dict[tuple[str, int], dict[str, int]] = defaultdict(dict)
    failed: dict[tuple[str, int], int] = {}
    cycles: dict[str, set[tuple[str, int]]] = {}  # cycle → the partitions its boundary names
    barriers: list[int] = []
    claims: list[set[tuple[str, int]] | None] = []  # per barrier: the partitions it claims (None: any)
    view = JournalView()
    for i, e in enumerate(entries):
        kind = e.get("t")
        if kind == "cycle":
            view.cycles += 1
            cycles[str(e["c"])] = {(t, int(p)) for t, p, _ in e.get("b", ())}
        elif kind == "ckpt":
            view.checkpoints += 1
        elif kind == "barrier":
            barriers.append(i)
            claim = e.get("claim")
            claims.append(None if claim is None else {(t, int(p)) for t, p in claim})
        elif kind in ("sent", "ack", "fail"):
            key = (str(e["c"]), int(e["r"]))
            if kind == "sent":
                sent.setdefault(key, (i, set()))[1].update(e["cells"])
            elif kind == "ack":  # `all`: every cell of the request's `sent`
                for d in sent.get(key, (0, set()))[1] if e.get("all") else e["cells"]:
                    acked[key].setdefault(d, i)
            else:
                failed.setdefault(key, i)
    for cells in acked.values():
        view.acks.update(cells.keys())
    view.reads = len(barriers)
    view.requests = len(sent)
    never = 1 << 62
    for key, (at, cells) in sent.items():
        # The first recovery read after `sent` by a member taking over one of the cycle's partitions
        # (barriers that name no claim are taken to claim everything).
        named = cycles.get(key[0], set())
        read_after = None
        for k in range(bisect.bisect_right(barriers, at), len(barriers)):
            if claims[k] is None or claims[k] & named:
                read_after = barriers[k]
                break
        fail_at = failed.get(key, never)
        doubtful = False
        for d in cells:
            settled_at = min(acked.get(key, {}).get(d, never), fail_at)
            if settled_at == never:
                view.unsettled[d] += 1
                doubtful = True
            elif read_after is not None and read_after < settled_at and settled_at != fail_at:
                view.late_acks[d] += 1
                doubtful = True
        view.requests_in_doubt += doubtful
    return view


@dataclass
class Evidence:
    """Everything the tally needs, gathered by the soak."""

    truth: dict[WCell, Decimal]
    truth_events: dict[WCell, int]
    deliveries: list[Delivery]
    journal: JournalView
    digest: Callable[[WCell], str]
    poison: dict[tuple[int, int], str]  # (partition, offset) → poison kind
    dlq: Counter[tuple[int, int]]  # (partition, offset) of dead-lettered events → times written
    dlq_reasons: Counter[str] = field(default_factory=Counter)
    produced_valid: int = 0
    api_refused_records: int = 0
    daemon_in_doubt: float = 0.0  # sum of allocd_api_in_doubt_requests_total over the daemons' last scrapes
    log_in_doubt: int = 0  # "in doubt" attempts logged by the daemons' API clients (survives SIGKILL)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Tally:
    rows: list[tuple[str, str]]
    problems: list[str]
    problem_cells: list[WCell]
    late_cells: list[WCell]  # duplicates explained only by a late ack (an old owner finishing late)
    lost_cells: int
    lost_events: int
    unexplained_cells: int
    double_cells: int
    missing_dlq: int
    unexpected_dlq: int

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        width = max(len(k) for k, _ in self.rows)
        lines = [f"  {k.ljust(width)}  {v}" for k, v in self.rows]
        verdict = "HOLDS" if self.ok else f"FAILS ({len(self.problems)} problems)"
        lines.append(f"  {'tally'.ljust(width)}  {verdict}")
        lines.extend(f"  ! {p}" for p in self.problems[:_PROBLEM_EXAMPLES])
        if len(self.problems) > _PROBLEM_EXAMPLES:
            lines.append(f"  ! … and {len(self.problems) - _PROBLEM_EXAMPLES} more (tally.json)")
        return "\n".join(lines)


def _subset_sums_to(values: list[Decimal], k: int, target: Decimal) -> bool:
    if k == 0:
        return target == 0
    if k > len(values):
        return False
    if math.comb(len(values), k) > _SUBSET_LIMIT:
        ordered = sorted(values)
        return sum(ordered[:k], Decimal(0)) <= target <= sum(ordered[-k:], Decimal(0))
    return any(sum(c, Decimal(0)) == target for c in itertools.combinations(values, k))


def _explained(answered: list[Decimal], extra: int, late: int, rest: Decimal) -> bool:
    """Is `rest` (the excess beyond the unanswered applications) made of `extra` whole answered
    applications, plus — when acks came late — up to `late` more, each possibly in part?

    A late ack's duplicate is partial: the reader that saw the request in doubt re-sends only the events of
    the partitions it took over, a share of the old owner's record. So with late acks the check is a range.
    """
    if late == 0:
        return _subset_sums_to(answered, extra, rest)
    ordered = sorted(answered)
    low = sum(ordered[:extra], Decimal(0))
    high = sum(ordered[-(extra + late) :], Decimal(0)) if extra + late else Decimal(0)
    return low <= rest <= high


def _cell_text(cell: WCell) -> str:
    stream, start, element, flt = cell
    return f"{stream}@{start} {element[:40]!r} {dict(flt)}"


def tally(ev: Evidence) -> Tally:
    by_cell: dict[WCell, list[Delivery]] = defaultdict(list)
    for d in ev.deliveries:
        by_cell[d.cell].append(d)
    problems: list[str] = []
    problem_cells: list[WCell] = []
    late_cells: list[WCell] = []
    why_doubled: Counter[str] = Counter()
    lost_cells = lost_events = unexplained = doubled = 0
    short = excess_total = Decimal(0)
    events_delivered = 0
    extra_answered_total = 0
    for cell in sorted(set(ev.truth) | set(by_cell), key=repr):
        truth = ev.truth.get(cell, Decimal(0))
        apps = by_cell.get(cell, [])
        delivered = sum((d.amount for d in apps), Decimal(0))
        excess = delivered - truth
        unanswered = [d.amount for d in apps if not d.answered]
        answered = [d.amount for d in apps if d.answered]
        digest = ev.digest(cell)
        acks = ev.journal.acks.get(digest, 0)
        late = ev.journal.late_acks.get(digest, 0)
        unsettled = ev.journal.unsettled.get(digest, 0)
        extra = len(answered) - acks  # answered, never journaled: each one is excess
        where = _cell_text(cell)
        before = len(problems)
        if excess < 0:
            lost_cells += 1
            lost_events += ev.truth_events.get(cell, 0)
            short += -excess
            problems.append(f"LOST {-excess} of {truth} in {where} ({len(apps)} applications)")
            problem_cells.append(cell)
            continue
        events_delivered += ev.truth_events.get(cell, 0)
        rest = excess - sum(unanswered, Decimal(0))
        biggest = max((d.amount for d in apps), default=Decimal(0))
        if biggest > truth:  # one record holds distinct events only: never more than all of them
            unexplained += 1
            problems.append(f"RECORD ABOVE TRUTH {where}: one application of {biggest}, truth {truth}")
        elif acks > len(answered):
            unexplained += 1
            problems.append(f"ACKED WITHOUT ANSWER {where}: {acks} journaled acks, {len(answered)} answered")
        elif rest < 0:
            unexplained += 1
            problems.append(
                f"SHORT BEHIND A DUPLICATE {where}: acknowledged deliveries miss {-rest} (covered only by an "
                "unanswered request)"
            )
        elif not _explained(answered, extra, late, rest):
            unexplained += 1
            problems.append(
                f"DOUBLE-COUNTED {rest} in {where}: not the sum of {extra} answered-unjournaled (+ up to "
                f"{late} late-acked) applications of {sorted(answered)} (truth {truth}, "
                f"unanswered {sorted(unanswered)})"
            )
        elif extra > unsettled:
            unexplained += 1
            problems.append(
                f"DOUBLE-COUNTED {where}: {extra} answered requests not journaled, but the journal shows "
                f"only {unsettled} unsettled requests for it"
            )
        if len(problems) > before:
            problem_cells.append(cell)
        elif excess > 0:
            if not _subset_sums_to(answered, extra, rest):
                why_doubled["late ack"] += 1
                late_cells.append(cell)
            else:
                why_doubled["unanswered" if extra == 0 else "answered, unjournaled"] += 1
        if excess > 0:
            doubled += 1
            excess_total += excess
        extra_answered_total += max(0, extra)
    missing = [pos for pos in ev.poison if pos not in ev.dlq]
    unexpected = [pos for pos in ev.dlq if pos not in ev.poison]
    for pos in missing[:_PROBLEM_EXAMPLES]:
        problems.append(f"POISON NOT IN THE DLQ: partition {pos[0]} offset {pos[1]} ({ev.poison[pos]})")
    if len(missing) > _PROBLEM_EXAMPLES:
        problems.append(f"… {len(missing) - _PROBLEM_EXAMPLES} more poison messages missing from the DLQ")
    for pos in unexpected[:_PROBLEM_EXAMPLES]:
        problems.append(f"VALID EVENT IN THE DLQ: partition {pos[0]} offset {pos[1]}")
    requests = {d.request for d in ev.deliveries if d.request >= 0}
    unanswered_requests: dict[int, str] = {d.request: d.why for d in ev.deliveries if not d.answered}
    why = Counter(unanswered_requests.values())
    rows = [
        ("messages produced", f"{ev.produced_valid + len(ev.poison):,}"),
        ("  valid events", f"{ev.produced_valid:,} in {len(ev.truth):,} window cells"),
        ("  poison", f"{len(ev.poison):,} ({len(set(ev.poison.values()))} kinds)"),
        ("events delivered", f"{events_delivered:,} (cells whose total reached the truth)"),
        ("events in the DLQ", f"{len(ev.dlq):,} positions, {sum(ev.dlq.values()) - len(ev.dlq):,} rewrites"),
        ("  poison missing from DLQ", f"{len(missing):,}"),
        ("  valid events in DLQ", f"{len(unexpected):,}"),
        ("records refused by the API", f"{ev.api_refused_records:,}"),
        ("requests applied by the API", f"{len(requests):,} ({len(ev.deliveries):,} records)"),
        ("in-doubt: unanswered", f"{len(unanswered_requests):,} requests {dict(sorted(why.items()))}"),
        ("in-doubt: answered, unjournaled", f"{extra_answered_total:,} cell applications"),
        ("journal: requests in doubt", f"{ev.journal.requests_in_doubt:,} of {ev.journal.requests:,}"),
        (
            "journal: acks after a recovery read",
            f"{sum(ev.journal.late_acks.values()):,} cells (old owner late)",
        ),
        ("daemons: in doubt (metrics)", f"{ev.daemon_in_doubt:g} (last scrapes; SIGKILL loses some)"),
        ("daemons: in doubt (logs)", f"{ev.log_in_doubt:,} attempts (warnings are rate-limited)"),
        ("LOST", f"{lost_cells:,} cells, ≤ {lost_events:,} events, value {short}"),
        ("double-counted cells", f"{doubled:,}, excess value {excess_total}"),
        ("  explained by", str(dict(why_doubled.most_common()))),
        ("  not explained by in-doubt", f"{unexplained:,}"),
    ]
    rows.extend((k, str(v)) for k, v in ev.notes.items())
    return Tally(
        rows,
        problems,
        problem_cells,
        late_cells,
        lost_cells,
        lost_events,
        unexplained,
        doubled,
        len(missing),
        len(unexpected),
    )
