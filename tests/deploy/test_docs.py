"""docs/deployment.md: the sidecar pod snippet users copy is a valid Pod spec."""

from __future__ import annotations

import json
import re

from tests.deploy.deploytools import ROOT, allocd_container, load_yaml, validate_manifests

DOC = ROOT / "docs" / "deployment.md"


def test_sidecar_snippet_is_a_valid_pod() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    (snippet,) = [b for b in blocks if b.startswith("spec:")]
    (spec,) = load_yaml(snippet)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "billing-api"}, **spec}
    (validated,) = validate_manifests(json.dumps(pod))
    container = allocd_container(validated["spec"])
    assert container["restartPolicy"] == "Always"
    assert container["args"] == ["run", "--config", "/etc/allocd/allocd.toml"]
