"""Helpers for the deployment-artifact tests: locate the validation tools installed by
scripts/install-tools.sh, run them, render the chart, and read YAML (with the tools' own PyYAML, so the
project needs no YAML dependency)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "ALERTS",
    "CHART",
    "CRD_KINDS",
    "DASHBOARD",
    "DEPLOY",
    "EXAMPLES",
    "KUBE_VERSION",
    "ROOT",
    "LiveScrape",
    "alert_exprs",
    "allocd_container",
    "dashboard_exprs",
    "docs_of_kind",
    "helm_template",
    "load_yaml",
    "metric_names_in",
    "one_of_kind",
    "run",
    "sample_names",
    "tool",
    "validate_manifests",
    "wanted_series",
]

ROOT = Path(__file__).resolve().parents[2]
TOOLS_BIN = ROOT / ".tools" / "bin"
TOOLS_PYTHON = ROOT / ".tools" / "venv" / "bin" / "python"
CHART = ROOT / "helm" / "allocd"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "allocd-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "allocd-alerts.yaml"
KUBE_VERSION = "1.32.0"
# prometheus-operator kinds: kubernetes-validate has no schema for them, so they alone may go unvalidated.
CRD_KINDS = frozenset({"ServiceMonitor", "PodMonitor", "PrometheusRule"})

_INSTALL_HINT = "run scripts/install-tools.sh"


def tool(name: str) -> str:
    """The path of a validation tool; fails the test (never skips) when it is not installed."""
    candidate = TOOLS_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} is not installed: {_INSTALL_HINT}", pytrace=False)


def run(
    args: Sequence[str], *, stdin: str | None = None, timeout: float = 60, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a tool; with `check`, a non-zero exit fails the test showing its output."""
    proc = subprocess.run(
        list(args), input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def load_yaml(text: str) -> list[Any]:
    """Every non-empty document of a YAML stream, parsed by PyYAML from the tools' virtualenv."""
    if not TOOLS_PYTHON.exists():
        pytest.fail(f"{TOOLS_PYTHON} is missing: {_INSTALL_HINT}", pytrace=False)
    script = (
        "import json, sys, yaml\n"
        "docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n"
        "json.dump(docs, sys.stdout)\n"
    )
    return json.loads(run([str(TOOLS_PYTHON), "-c", script], stdin=text).stdout)


def helm_template(
    values_files: Iterable[Path] = (), sets: Mapping[str, str] | None = None, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart as release "allocd" in namespace "allocd"."""
    args = [tool("helm"), "template", "allocd", str(CHART), "--namespace", "allocd"]
    args += ["--kube-version", KUBE_VERSION]
    for path in values_files:
        args += ["--values", str(path)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return run(args, check=check)


def validate_manifests(text: str) -> list[dict[str, Any]]:
    """Validate rendered manifests with kubernetes-validate --strict; return the parsed documents.

    kubernetes-validate only warns (exit 0) on a kind it has no schema for: that is a failure here, except
    for the prometheus-operator kinds, and every other document must be reported as passed.
    """
    docs = load_yaml(text)
    proc = run([tool("kubernetes-validate"), "--strict", "-k", KUBE_VERSION, "-"], stdin=text, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    unknown = re.findall(r"Couldn't find schema for kind (\S+)", output)
    assert set(unknown) <= CRD_KINDS, f"no schema for non-CRD kinds {sorted(set(unknown) - CRD_KINDS)}"
    passed = len(re.findall(r"passed for resource", output))
    core = [d for d in docs if d["kind"] not in CRD_KINDS]
    assert passed == len(core), f"{passed} resources passed, {len(core)} expected:\n{output}"
    return docs


def docs_of_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one_of_kind(docs: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = docs_of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def allocd_container(pod_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The container named allocd, among containers or (native sidecar) initContainers."""
    containers = [*pod_spec.get("containers", []), *pod_spec.get("initContainers", [])]
    found = [c for c in containers if c["name"] == "allocd"]
    assert len(found) == 1, f"expected one allocd container, found {len(found)}"
    return found[0]


_METRIC = re.compile(r"\ballocd_[a-z0-9_]+\b")


def metric_names_in(expressions: Iterable[str]) -> set[str]:
    """allocd series names used by PromQL expressions."""
    return {name for expr in expressions for name in _METRIC.findall(expr)}


def dashboard_exprs() -> list[str]:
    """Every PromQL query of the Grafana dashboard: panel targets and template variable queries."""
    board = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(board["panels"])
    for var in board.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def alert_exprs() -> list[str]:
    (doc,) = load_yaml(ALERTS.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def wanted_series() -> set[str]:
    """The allocd series the dashboard and the alert rules read."""
    return metric_names_in([*dashboard_exprs(), *alert_exprs()])


@dataclass(frozen=True)
class LiveScrape:
    text: str  # the last /metrics body
    wanted: frozenset[str]  # series the fixture waited for
    exit_code: int | None  # allocd's exit status after SIGTERM (None: it had to be killed)
    log_tail: str


def sample_names(text: str) -> set[str]:
    """Names of the samples in a text exposition (comments skipped)."""
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names
