"""deploy/prometheus/allocd-alerts.yaml: promtool accepts the rules and their unit tests pass, and every
series the rules read is one allocd exports."""

from __future__ import annotations

from allocd.observability import SERIES_NAMES
from tests.deploy.deploytools import DEPLOY, load_yaml, metric_names_in, run, tool

RULES = DEPLOY / "prometheus" / "allocd-alerts.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "allocd-alerts.test.yaml"
EXPECTED_ALERTS = {
    "AllocdConsumerLagGrowing",
    "AllocdNoSuccessfulFlush",
    "AllocdInDoubtRequests",
    "AllocdDeadLetterEventsHigh",
    "AllocdDeadLetterRecords",
    "AllocdDailyBudgetProjectedOver",
    "AllocdPausedTooLong",
    "AllocdApiKeyRejected",
}


def rules() -> list[dict]:
    (doc,) = load_yaml(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    proc = run([tool("promtool"), "check", "rules", str(RULES)])
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


def test_promtool_test_rules() -> None:
    proc = run([tool("promtool"), "test", "rules", str(RULE_TESTS)], check=False)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_every_alert_is_unit_tested() -> None:
    assert {r["alert"] for r in rules()} == EXPECTED_ALERTS
    (doc,) = load_yaml(RULE_TESTS.read_text())
    tested = {case["alertname"] for test in doc["tests"] for case in test.get("alert_rule_test", [])}
    firing = {
        case["alertname"]
        for test in doc["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == EXPECTED_ALERTS and firing == EXPECTED_ALERTS, "each alert: a firing case at least"


def test_rules_use_exported_series() -> None:
    used = metric_names_in(r["expr"] for r in rules())
    assert used, "the rules read allocd series"
    assert used <= set(SERIES_NAMES), f"not exported by allocd: {sorted(used - set(SERIES_NAMES))}"


def test_every_alert_has_severity_and_summary() -> None:
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
