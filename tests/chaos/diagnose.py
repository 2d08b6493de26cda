"""When the tally fails: dump what explains a problem cell — every application of it at the API (which daemon
incarnation, when, answered or not) and every journal entry naming it, with the recovery reads between —
so a finding can be traced to the cycle, request and member that produced it."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .inputs import WCell

__all__ = ["JournalRecord", "retally", "write_diagnosis"]

JournalRecord = tuple[int, int, dict[str, Any]]  # (offset, Kafka timestamp ms, entry)
_CELLS_EXPLAINED = 25


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds * 1000) % 1000:03d}"


def write_diagnosis(
    workdir: Path,
    problem_cells: list[WCell],
    applications: Iterable[dict[str, Any]],
    journal: list[JournalRecord],
    digest: Callable[[WCell], str],
) -> Path:
    """Write applied.jsonl, journal.jsonl and diagnosis.txt into `workdir`; returns the diagnosis path.

    `applications` are dicts with: seq, label, wall, stream, answered, why, cells ([cell, value] pairs).
    """
    apps = list(applications)
    with (workdir / "applied.jsonl").open("w") as fh:
        for app in apps:
            fh.write(json.dumps(app, default=str) + "\n")
    with (workdir / "journal.jsonl").open("w") as fh:
        for offset, ts, entry in journal:
            fh.write(json.dumps({"offset": offset, "ts": ts, **entry}) + "\n")
    wanted = {digest(c): c for c in problem_cells[:_CELLS_EXPLAINED]}
    by_cell: dict[str, list[str]] = {d: [] for d in wanted}
    for app in apps:
        for cell, value in app["cells"]:
            d = digest(tuple(cell))  # type: ignore[arg-type]
            if d in by_cell:
                state = "answered" if app["answered"] else f"UNANSWERED ({app['why']})"
                by_cell[d].append(
                    f"    api  {_clock(app['wall'])} request {app['seq']} by {app['label']}: {value} {state}"
                )
    cycles: dict[str, dict[str, Any]] = {}
    for offset, ts, entry in journal:
        kind = entry.get("t")
        if kind == "cycle":
            cycles[entry["c"]] = entry
        elif kind in ("sent", "ack") and any(d in by_cell for d in entry.get("cells", ())):
            cycle = cycles.get(entry["c"], {})
            bounds = ",".join(f"p{p}<{b}" for _, p, b in cycle.get("b", []))
            for d in entry["cells"]:
                if d in by_cell:
                    by_cell[d].append(
                        f"    log  {_clock(ts / 1000)} @{offset} {kind:4} cycle {entry['c']} "
                        f"request {entry['r']} ({cycle.get('trigger', '?')}, boundary {bounds})"
                    )
        elif kind == "barrier":
            for lines in by_cell.values():
                lines.append(f"    log  {_clock(ts / 1000)} @{offset} recovery read (barrier)")
    path = workdir / "diagnosis.txt"
    with path.open("w") as fh:
        for d, cell in wanted.items():
            fh.write(f"cell {cell} digest {d}\n")
            lines = sorted(by_cell[d], key=lambda line: line[9:21])
            # Keep barriers only where they separate this cell's own entries.
            fh.write("\n".join(_trim_barriers(lines)) + "\n\n")
    return path


def _trim_barriers(lines: list[str]) -> list[str]:
    out: list[str] = []
    pending: str | None = None
    seen_own = False
    for line in lines:
        if "recovery read" in line:
            pending = line if seen_own else None
            continue
        if pending is not None:
            out.append(pending)
            pending = None
        out.append(line)
        seen_own = True
    return out


def retally(workdir: Path) -> Any:
    """Tally the cells again from a failed soak's dumps (applied.jsonl, journal.jsonl, truth.jsonl), e.g.
    after a change to the tally's rule; poison and the DLQ are not dumped, so they are left out."""
    from decimal import Decimal

    from allocd.journal import cell_digest

    from .tally import Delivery, Evidence, journal_view, tally

    def cell_of(raw: list[Any]) -> WCell:
        stream, start, element, flt = raw
        return (stream, int(start), element, tuple((k, tuple(v)) for k, v in flt))

    truth: dict[WCell, Decimal] = {}
    events: dict[WCell, int] = {}
    for line in (workdir / "truth.jsonl").read_text().splitlines():
        raw, value, count = json.loads(line)
        truth[cell_of(raw)] = Decimal(value)
        events[cell_of(raw)] = count
    deliveries = []
    for line in (workdir / "applied.jsonl").read_text().splitlines():
        app = json.loads(line)
        for raw, value in app["cells"]:
            deliveries.append(Delivery(cell_of(raw), Decimal(value), app["seq"], app["answered"], app["why"]))
    journal = [json.loads(line) for line in (workdir / "journal.jsonl").read_text().splitlines()]
    return tally(
        Evidence(
            truth, events, deliveries, journal_view(journal), cell_digest, {}, Counter(), produced_valid=0
        )
    )
