"""A short seeded soak (part of `make test`): every fault kind on a small scale, and the tally must hold.

Replay a failure with `python -m tests.chaos --seed <seed> --minutes 0.67 --rate 600` (the seed is in the
failure message); the work dir with the daemons' logs is kept and named there too. `CHAOS_SEED` overrides it.
"""

from __future__ import annotations

import os

import pytest

from .soak import SoakConfig, run_soak

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SEED = int(os.environ.get("CHAOS_SEED", "2"))  # exercises hang, kill, term, join, link cuts early


async def test_short_soak_loses_nothing_and_doubles_only_in_doubt_requests() -> None:
    lines: list[str] = []
    config = SoakConfig(
        seed=SEED,
        seconds=40,
        rate=600,
        interval=(1.5, 4.0),
        drain_timeout=150,
        progress=lines.append,
    )
    result = await run_soak(config)
    report = "\n".join([f"seed {SEED}, work dir {result.workdir}", result.tally.table(), *result.findings])
    print(report)
    assert result.ok, report
    assert result.tally.missing_dlq == 0 and result.tally.lost_cells == 0
    assert len([e for e in result.timeline if e["kind"] in ("kill", "term", "join")]) >= 2
