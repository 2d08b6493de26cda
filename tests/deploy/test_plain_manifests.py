"""deploy/kubernetes: the kustomize base for users without Helm builds, validates against Kubernetes 1.32,
and keeps the promises the chart keeps (config loads, grace period, rate split, secrets, security)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from allocd.config import EventsSettings, load_settings
from tests.deploy.deploytools import DEPLOY, allocd_container, one_of_kind, run, tool, validate_manifests

BASE = DEPLOY / "kubernetes"
ORG_RECORDS_PER_SECOND = 100


def build() -> list[dict[str, Any]]:
    return validate_manifests(run([tool("kubectl"), "kustomize", str(BASE)]).stdout)


def test_kustomize_build_validates() -> None:
    kinds = {d["kind"] for d in build()}
    assert kinds == {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"}


def test_config_and_deployment_agree(tmp_path: Path) -> None:
    docs = build()
    config_map = one_of_kind(docs, "ConfigMap")
    path = tmp_path / "allocd.toml"
    path.write_text(config_map["data"]["allocd.toml"])
    settings = load_settings(path, env={})
    assert isinstance(settings.events, EventsSettings)  # [events] is validated by load_settings too
    deployment = one_of_kind(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    container = allocd_container(spec)

    assert spec["terminationGracePeriodSeconds"] > settings.pipeline.shutdown_timeout_seconds
    assert settings.api.records_per_second * deployment["spec"]["replicas"] <= ORG_RECORDS_PER_SECOND
    # The generated ConfigMap (hash-suffixed name) is the one mounted at the path allocd reads.
    (config_volume,) = [v for v in spec["volumes"] if v.get("configMap")]
    assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert container["args"] == ["run", "--config", "/etc/allocd/allocd.toml"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == config_volume["name"]]
    assert mount["mountPath"] == "/etc/allocd"
    # The API key file is the mounted Secret's item.
    key_file = settings.api.api_key_file
    (key_mount,) = [m for m in container["volumeMounts"] if key_file.startswith(m["mountPath"] + "/")]
    (key_volume,) = [v for v in spec["volumes"] if v["name"] == key_mount["name"]]
    item = settings.api.api_key_file.removeprefix(key_mount["mountPath"] + "/")
    assert key_volume["secret"]["items"] == [{"key": item, "path": item}]

    (port,) = container["ports"]
    assert port["containerPort"] == settings.server.port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_service_and_pdb_select_the_pods() -> None:
    docs = build()
    labels = one_of_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert one_of_kind(docs, "Service")["spec"]["selector"].items() <= labels.items()
    pdb = one_of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
