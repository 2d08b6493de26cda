"""The Helm chart: lints, renders manifests that validate against Kubernetes 1.32, and renders a config that
allocd itself accepts, with the secrets, probes, grace period, security context and rate split it promises."""

from __future__ import annotations

import json
import math
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import pytest

from allocd.cloudzero.records import Granularity
from allocd.config import EventsSettings, Settings, StreamSettings, load_settings
from tests.deploy.deploytools import (
    CHART,
    CRD_KINDS,
    DEPLOY,
    EXAMPLES,
    allocd_container,
    docs_of_kind,
    helm_template,
    load_yaml,
    one_of_kind,
    run,
    tool,
    validate_manifests,
)

VALUES = [pytest.param(None, id="default"), *(pytest.param(p, id=p.stem) for p in EXAMPLES)]


def render(values: Path | None = None, **sets: str) -> list[dict[str, Any]]:
    return validate_manifests(helm_template([values] if values else [], sets).stdout)


def container_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The allocd container's environment as the process would see it; secret values are placeholders."""
    deployments = docs_of_kind(docs, "Deployment")
    if not deployments:
        return {}
    env = allocd_container(deployments[0]["spec"]["template"]["spec"]).get("env", [])
    return {e["name"]: e.get("value", "from-a-secret") for e in env}


def rendered_settings(docs: list[dict[str, Any]], tmp_path: Path) -> Settings:
    """Load the ConfigMap's allocd.toml with allocd's own loader and the container's environment."""
    (config_map,) = [d for d in docs_of_kind(docs, "ConfigMap") if "allocd.toml" in d["data"]]
    path = tmp_path / "allocd.toml"
    path.write_text(config_map["data"]["allocd.toml"])
    settings = load_settings(path, env=container_env(docs))
    assert isinstance(settings.events, EventsSettings)  # [events] is validated by load_settings too
    return settings


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one_of_kind(docs, "Deployment")["spec"]["template"]["spec"]


def mounted_file(spec: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The volume and the item key that provide the file at `path` in the allocd container."""
    mounts = allocd_container(spec)["volumeMounts"]
    (mount,) = [m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume, path[len(mount["mountPath"].rstrip("/")) + 1 :]


def test_examples_exist() -> None:
    assert {p.stem for p in EXAMPLES} >= {"production", "sidecar", "sidecar-config-only"}


@pytest.mark.parametrize("values", VALUES)
def test_lint_strict(values: Path | None) -> None:
    args = [tool("helm"), "lint", "--strict", str(CHART)]
    proc = run([*args, "--values", str(values)] if values else args)
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values", VALUES)
def test_render_validates_and_config_loads(values: Path | None, tmp_path: Path) -> None:
    docs = render(values)
    settings = rendered_settings(docs, tmp_path)
    assert settings.api.records_per_second > 0
    assert all(d["metadata"]["name"].startswith("allocd") for d in docs)
    assert not docs_of_kind(docs, "Secret"), "never a Secret: keys come from existing ones"


@pytest.mark.parametrize("values", [v for v in VALUES if v.values[0] is None or "config-only" not in v.id])
def test_workload_contract(values: Path | None, tmp_path: Path) -> None:
    """Probes, port, grace period, security context and the mounted API key of every workload render."""
    docs = render(values)
    settings = rendered_settings(docs, tmp_path)
    spec = pod_spec(docs)
    container = allocd_container(spec)
    assert container["args"] == ["run", "--config", "/etc/allocd/allocd.toml"]
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("metrics", settings.server.port)
    assert settings.server.host == "0.0.0.0"
    probes = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe, path in probes.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}
    assert spec["terminationGracePeriodSeconds"] > settings.pipeline.shutdown_timeout_seconds
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    volume, item = mounted_file(spec, settings.api.api_key_file)
    assert volume["secret"]["items"] == [{"key": item, "path": item}]
    assert "ALLOCD_API_KEY" not in {e["name"] for e in container.get("env", [])}
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), "read-only root needs a /tmp"


def test_grace_period_follows_shutdown_timeout(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("config:\n  pipeline:\n    shutdown_timeout_seconds: 92.5\n")
    docs = render(values)
    assert rendered_settings(docs, tmp_path).pipeline.shutdown_timeout_seconds == 92.5
    assert pod_spec(docs)["terminationGracePeriodSeconds"] == 93 + 15
    proc = helm_template(sets={"terminationGracePeriodMarginSeconds": "0"}, check=False)
    assert proc.returncode != 0 and "terminationGracePeriodMarginSeconds" in proc.stderr


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        ({}, 50.0),
        ({"replicaCount": "3"}, 33.333),
        ({"replicaCount": "1"}, 100.0),
        ({"autoscaling.enabled": "true", "autoscaling.maxReplicas": "8"}, 12.5),
        ({"replicaCount": "4", "rateLimit.orgRecordsPerSecond": "60"}, 15.0),
        ({"replicaCount": "4", "config.api.records_per_second": "7"}, 7.0),
    ],
)
def test_rate_limit_split(sets: dict[str, str], expected: float, tmp_path: Path) -> None:
    docs = render(None, **sets)
    assert math.isclose(rendered_settings(docs, tmp_path).api.records_per_second, expected)


def test_hpa_replaces_replicas() -> None:
    docs = render(None, **{"autoscaling.enabled": "true", "autoscaling.maxReplicas": "5"})
    assert "replicas" not in one_of_kind(docs, "Deployment")["spec"]
    hpa = one_of_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] == 5
    assert hpa["spec"]["scaleTargetRef"]["name"] == one_of_kind(docs, "Deployment")["metadata"]["name"]


def test_default_render_has_pdb_and_metrics_service() -> None:
    docs = render()
    assert {d["kind"] for d in docs} == {
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    }
    labels = one_of_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        doc = one_of_kind(docs, kind)
        selector = doc["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), f"{kind} selects no allocd pod"
    (port,) = one_of_kind(docs, "Service")["spec"]["ports"]
    assert port["targetPort"] == "metrics"


def test_production_example_mounts_kafka_secrets(tmp_path: Path) -> None:
    docs = render(CHART / "examples" / "production.yaml")
    settings = rendered_settings(docs, tmp_path)
    spec = pod_spec(docs)
    assert settings.kafka.security_protocol == "SASL_SSL"
    for path in (settings.kafka.sasl_password_file, settings.kafka.ssl_cafile):
        volume, item = mounted_file(spec, path)
        assert {"key": item, "path": item} in volume["secret"]["items"]
    env = {e["name"]: e for e in allocd_container(spec)["env"]}
    assert env["ALLOCD_KAFKA_SASL_USERNAME"]["valueFrom"]["secretKeyRef"]["key"] == "username"
    assert {d["kind"] for d in docs} >= {"HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"}
    monitor = one_of_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == one_of_kind(docs, "Service")["spec"]["ports"][0]["name"]


def test_sidecar_example(tmp_path: Path) -> None:
    docs = render(CHART / "examples" / "sidecar.yaml")
    settings = rendered_settings(docs, tmp_path)
    spec = pod_spec(docs)
    (allocd,) = spec["initContainers"]
    assert allocd["name"] == "allocd" and allocd["restartPolicy"] == "Always", "a native sidecar"
    assert [c["name"] for c in spec["containers"]] == ["billing-api"]
    assert settings.sidecar.enabled and settings.pipeline.flush_on_shutdown is True
    assert (settings.sidecar.host, settings.sidecar.port) == ("127.0.0.1", 8125)
    volume, item = mounted_file(spec, settings.sidecar.shared_secret_file)
    assert volume["secret"]["secretName"] == "billing-api-allocd-ingest" and item == "secret"
    spool = [m for m in allocd["volumeMounts"] if m["mountPath"] == settings.sidecar.spool_dir]
    assert spool and spool[0].get("readOnly") is not True
    # The producer's own shutdown comes first, then allocd's drain, then the margin.
    assert spec["terminationGracePeriodSeconds"] == 30 + 20 + 15
    assert math.isclose(settings.api.records_per_second, 33.333)
    assert "Service" not in {d["kind"] for d in docs} and docs_of_kind(docs, "PodMonitor")


def test_sidecar_as_ordinary_container(tmp_path: Path) -> None:
    docs = render(CHART / "examples" / "sidecar.yaml", **{"sidecar.native": "false"})
    spec = pod_spec(docs)
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["billing-api", "allocd"]
    assert "restartPolicy" not in allocd_container(spec)


def test_sidecar_config_only_renders_config(tmp_path: Path) -> None:
    docs = render(CHART / "examples" / "sidecar-config-only.yaml")
    assert {d["kind"] for d in docs} == {"ConfigMap", "PrometheusRule"}
    settings = rendered_settings(docs, tmp_path)
    assert settings.sidecar.enabled and settings.api.records_per_second == 25


def test_prometheus_rule_is_the_alert_file() -> None:
    """Single source: the chart's files/allocd-alerts.yaml links to deploy/prometheus/allocd-alerts.yaml."""
    link = CHART / "files" / "allocd-alerts.yaml"
    source = DEPLOY / "prometheus" / "allocd-alerts.yaml"
    assert link.is_symlink() and link.resolve() == source.resolve()
    docs = render(None, **{"prometheusRule.enabled": "true"})
    rule = one_of_kind(docs, "PrometheusRule")
    (expected,) = load_yaml(source.read_text())
    assert rule["spec"] == expected
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"


def test_grafana_dashboard_configmap_is_the_dashboard_file() -> None:
    link = CHART / "files" / "allocd-dashboard.json"
    source = DEPLOY / "grafana" / "allocd-dashboard.json"
    assert link.is_symlink() and link.resolve() == source.resolve()
    docs = render(None, **{"grafanaDashboard.enabled": "true"})
    (config_map,) = [d for d in docs_of_kind(docs, "ConfigMap") if "allocd-dashboard.json" in d["data"]]
    assert json.loads(config_map["data"]["allocd-dashboard.json"]) == json.loads(source.read_text())
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_crd_kinds_are_only_the_operator_ones() -> None:
    docs = render(
        None,
        **{"serviceMonitor.enabled": "true", "podMonitor.enabled": "true", "prometheusRule.enabled": "true"},
    )
    crds = {d["kind"] for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")}
    assert crds == CRD_KINDS


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"mode": "daemonset"}, "mode"),
        ({"config.api.api_key": "plaintext"}, "config.api"),
        ({"replicaCount": "0"}, "replicaCount"),
        (
            {"autoscaling.enabled": "true", "autoscaling.minReplicas": "5", "autoscaling.maxReplicas": "2"},
            "minReplicas",
        ),
    ],
)
def test_bad_values_are_refused(sets: dict[str, str], message: str) -> None:
    proc = helm_template(sets=sets, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_config_toml_quotes_non_bare_keys(tmp_path: Path) -> None:
    """Stream names may hold dots; the TOML renderer must quote them, and strings must survive escaping."""
    docs = render(
        None,
        **{
            "config.events.streams.billing\\.usage.granularity": "DAILY",
            "config.events.streams.billing\\.usage.dimensions": "{custom:feature}",
            "config.kafka.client_id": 'allocd "prod"',
        },
    )
    settings = rendered_settings(docs, tmp_path)
    stream = settings.events.streams["billing.usage"]
    assert stream == StreamSettings("billing.usage", Granularity.DAILY, frozenset({"custom:feature"}))
    assert settings.kafka.client_id == 'allocd "prod"'
    toml = tomllib.loads((tmp_path / "allocd.toml").read_text())
    assert toml["api"]["api_key_file"] == settings.api.api_key_file


def test_packaged_chart_carries_the_linked_files(tmp_path: Path) -> None:
    """`helm package` resolves the links: a published chart holds the rules and dashboard themselves."""
    run([tool("helm"), "package", str(CHART), "--destination", str(tmp_path)])
    (archive,) = tmp_path.glob("allocd-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        assert "allocd/examples/production.yaml" in names and "allocd/values.schema.json" in names
        for member, source in (
            ("allocd/files/allocd-alerts.yaml", DEPLOY / "prometheus" / "allocd-alerts.yaml"),
            ("allocd/files/allocd-dashboard.json", DEPLOY / "grafana" / "allocd-dashboard.json"),
        ):
            extracted = tar.extractfile(member)
            assert extracted is not None and extracted.read() == source.read_bytes(), member
