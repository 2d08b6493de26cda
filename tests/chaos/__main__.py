"""`python -m tests.chaos --seed N --minutes M`: one soak; prints the seed, the schedule, the tally.

Exit status: 0 when the tally holds, 1 when it fails (the work dir with the daemons' logs is kept and named),
2 when the harness itself could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import traceback
from pathlib import Path

from .diagnose import retally
from .soak import ALL_KINDS, SCRIPTS, SoakConfig, plan, run_soak

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=None, help="schedule and input seed (default: random)")
    p.add_argument("--minutes", type=float, default=10.0, help="production + chaos time (default 10)")
    p.add_argument("--rate", type=float, default=3000.0, help="messages per second (default 3000)")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--members", default="a,b", help="members always running (default a,b)")
    p.add_argument("--joiners", default="c", help="members that join and leave (default c; '' for none)")
    p.add_argument("--kinds", default=",".join(ALL_KINDS), help="fault kinds to use (comma-separated)")
    p.add_argument("--script", choices=sorted(SCRIPTS), help="a scripted schedule instead of the seeded one")
    p.add_argument("--drain-timeout", type=float, default=1800.0, help="longest drain after production")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new /tmp/allocd-chaos-<seed>-*")
    p.add_argument("--keep", action="store_true", help="keep the work dir even when the tally holds")
    p.add_argument(
        "--retally", type=Path, metavar="WORKDIR", help="tally a failed soak's dumps again; no run"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.retally is not None:
        again = retally(args.retally)
        print(again.table())
        return 0 if again.ok else 1
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = sorted(set(kinds) - set(ALL_KINDS))
    if unknown:
        print(f"unknown fault kinds {unknown}; known: {', '.join(ALL_KINDS)}", file=sys.stderr)
        return 2
    config = SoakConfig(
        seed=seed,
        seconds=args.minutes * 60,
        rate=args.rate,
        partitions=args.partitions,
        members=tuple(m for m in args.members.split(",") if m),
        joiners=tuple(j for j in args.joiners.split(",") if j),
        kinds=kinds,
        drain_timeout=args.drain_timeout,
        script=args.script,
        workdir=args.workdir,
        keep=args.keep,
    )
    actions = plan(config)
    print(f"chaos soak: seed={seed} minutes={args.minutes:g} rate={args.rate:g}/s actions={len(actions)}")
    script = f" --script {args.script}" if args.script else ""
    print(
        f"replay: python -m tests.chaos --seed {seed} --minutes {args.minutes:g} --rate {args.rate:g}{script}"
    )
    for action in actions[:8]:
        print(f"  {action.at:7.2f}s {action.kind} {json.dumps(action.params)}")
    if len(actions) > 8:
        print(f"  … {len(actions) - 8} more (plan.json in the work dir)")
    try:
        result = asyncio.run(run_soak(config))
    except Exception:
        traceback.print_exc()
        print(f"chaos soak seed={seed}: the harness failed", file=sys.stderr)
        return 2
    print(f"\nchaos soak seed={seed}: tally")
    print(result.tally.table())
    for finding in result.findings:
        print(f"  finding: {finding}")
    if result.ok:
        print(f"seed {seed}: the tally holds" + (f" (work dir {result.workdir})" if args.keep else ""))
        return 0
    print(f"seed {seed}: the tally FAILS; logs and tally.json kept in {result.workdir}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
