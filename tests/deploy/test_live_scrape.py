"""One real scrape of a running daemon (see conftest.live_scrape): promtool accepts the exposition, and every
series the Grafana dashboard and the alert rules query has samples in it."""

from __future__ import annotations

import json

from allocd.observability import SERIES_NAMES
from tests.deploy.deploytools import (
    DASHBOARD,
    LiveScrape,
    alert_exprs,
    dashboard_exprs,
    metric_names_in,
    run,
    sample_names,
    tool,
)


def test_promtool_check_metrics_on_a_live_scrape(live_scrape: LiveScrape) -> None:
    assert "allocd_build_info" in live_scrape.text
    proc = run([tool("promtool"), "check", "metrics"], stdin=live_scrape.text, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_queries_exist_in_a_live_scrape(live_scrape: LiveScrape) -> None:
    used = metric_names_in(dashboard_exprs())
    missing = used - sample_names(live_scrape.text)
    assert not missing, f"dashboard queries series with no samples in a real scrape: {sorted(missing)}"


def test_alert_rules_read_series_of_a_live_scrape(live_scrape: LiveScrape) -> None:
    used = metric_names_in(alert_exprs())
    missing = used - sample_names(live_scrape.text)
    assert not missing, f"alert rules read series with no samples in a real scrape: {sorted(missing)}"


def test_daemon_exits_zero_on_sigterm(live_scrape: LiveScrape) -> None:
    """What the chart's grace period relies on: SIGTERM drains and exits 0, well within the deadline."""
    assert live_scrape.exit_code == 0, live_scrape.log_tail


def test_dashboard_covers_the_main_areas() -> None:
    """Throughput, lag per partition, flush outcomes, latency, budget and memory, each on a panel."""
    used = metric_names_in(dashboard_exprs())
    for series in (
        "allocd_events_consumed_total",
        "allocd_consumer_lag",
        "allocd_flush_cycles_total",
        "allocd_api_request_seconds_bucket",
        "allocd_flush_cycle_seconds_bucket",
        "allocd_api_records_projected_daily",
        "allocd_api_daily_record_budget",
        "allocd_accumulator_bytes",
    ):
        assert series in used, series
    assert used <= set(SERIES_NAMES), f"not exported by allocd: {sorted(used - set(SERIES_NAMES))}"
    lag = [e for e in dashboard_exprs() if "allocd_consumer_lag" in e]
    assert any("partition" in e for e in lag), "lag is shown per partition"


def test_dashboard_is_well_formed() -> None:
    board = json.loads(DASHBOARD.read_text())
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert board["uid"] and board["title"] == "allocd"
