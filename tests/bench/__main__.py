"""`python -m tests.bench` (`make bench`): throughput against the raw client, memory per open cell and records
per key-hour. See tests/bench/runner.py for the scenarios and each scenario's module for its method.

    python -m tests.bench --events 1000000                 # everything, default sizes
    python -m tests.bench --scenarios baseline,e2e --events 200000
    python -m tests.bench --scenarios cardinality --cells 1000000
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from tests.bench.runner import SCENARIOS, Options, run_bench
from tests.bench.workload import Workload

__all__ = ["main"]


def _scenarios(text: str) -> tuple[str, ...]:
    chosen = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SCENARIOS)}")
    return chosen


def parse(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--scenarios", type=_scenarios, default=SCENARIOS, help=f"comma-separated, of {', '.join(SCENARIOS)}")
    a("--events", type=int, default=1_000_000, help="events for scenarios 1 and 2 (default 1,000,000)")
    a("--partitions", type=int, default=4)
    a("--elements", type=int, default=1_000, help="distinct element names (default 1,000)")
    a("--filters", type=int, default=4, help="filter variants per stream (default 4)")
    a("--hours", type=int, default=3, help="hours the events span (default 3)")
    a("--decimal-share", type=float, default=0.0, help="share of values sent as decimal strings")
    a("--skew", type=float, default=60.0, help="event time up to this many seconds before arrival")
    a("--seed", type=int, default=1)
    a("--cells", type=int, default=1_000_000, help="open cells for scenario 3 (default 1,000,000)")
    a("--cell-filters", type=int, default=4, help="filter variants in scenario 3 (default 4)")
    a("--steady-events", type=int, default=200_000, help="events for scenario 4 (default 200,000)")
    a("--steady-hours", type=int, default=4, help="simulated hours for scenario 4 (default 4)")
    a("--step", type=int, default=300, help="scenario 4's clock step in simulated seconds (default 300)")
    a("--out", type=Path, default=Path("bench-results"), help="directory for the JSON results")
    a("--timeout", type=float, default=600, help="seconds a scenario may take before it fails")
    a("--repeat", type=int, default=3, help="runs of scenarios 1 and 2 each, median reported (default 3)")
    a("--profile", action="store_true", help="sample the daemon in scenario 2 with py-spy (slows it down)")
    args = p.parse_args(argv)
    common = dict(
        partitions=args.partitions,
        elements=args.elements,
        filters=args.filters,
        decimal_share=args.decimal_share,
        skew_ms=int(args.skew * 1000),
        seed=args.seed,
    )
    return Options(
        workload=Workload(events=args.events, hours=args.hours, **common),
        scenarios=args.scenarios,
        cells=args.cells,
        cell_filters=args.cell_filters,
        steady=Workload(events=args.steady_events, hours=args.steady_hours, **common),
        step_s=args.step,
        out=args.out,
        timeout=args.timeout,
        repeat=args.repeat,
        profile=args.profile,
    )


def main(argv: list[str] | None = None) -> None:
    asyncio.run(run_bench(parse(argv)))


if __name__ == "__main__":
    main()
