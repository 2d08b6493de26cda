"""The benchmark harness (tests/bench) at a small N: every scenario completes and its totals equal the truth.

No timing is asserted; the full-size run is `make bench`. Records per key-hour is asserted because the steady
scenario's method makes it exact: its clock never passes a window's end plus grace before the window's
events have been read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from allocd.embedded import EmbeddedBroker
from tests.bench.runner import SCENARIOS, Options, run_bench
from tests.bench.workload import Workload

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def test_bench_harness_runs_every_scenario_at_small_n(broker: EmbeddedBroker, tmp_path: Path) -> None:
    options = Options(
        workload=Workload(events=5_000, elements=50, hours=2),
        cells=5_000,
        steady=Workload(events=3_000, elements=50, hours=2),
        step_s=900,
        out=tmp_path,
        repeat=1,
        timeout=60,
    )
    results = await run_bench(options, broker.bootstrap, quiet=True)

    assert set(results) == set(SCENARIOS)
    baseline, e2e, cells, steady = (results[name] for name in SCENARIOS)
    assert baseline["events"] == 5_000 and baseline["totals_match"]
    assert e2e["accepted"] == 5_000 and e2e["totals_match"], e2e.get("differ_sample")
    assert e2e["exit_code"] == 0
    assert e2e["ratio_to_baseline"] > 0
    assert cells["cells"] == 5_000 and cells["bytes_per_cell"] > 0
    assert steady["totals_match"], steady.get("differ_sample")
    assert steady["key_hours"] <= steady["records_sent"] <= 1.1 * steady["key_hours"]
    for name in SCENARIOS:
        assert (tmp_path / f"{name}.json").stat().st_size > 0
    assert (tmp_path / "ground-truth.json").stat().st_size > 0
