"""The Dockerfile: hadolint-clean at every severity, and the properties the issue asks for, read from it."""

from __future__ import annotations

import json
import re

from allocd.config import ServerSettings
from tests.deploy.deploytools import ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_clean() -> None:
    run([tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)])


def test_multi_stage_from_a_base_argument() -> None:
    steps = instructions()
    assert steps[0] == ("ARG", "BASE=python:3.11-slim")
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) >= 2
    assert all(args.startswith("${BASE}") for args in froms)


def test_runtime_stage_is_lean_and_unprivileged() -> None:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    runtime = steps[last_from:]
    (user,) = [args for word, args in runtime if word == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, "a fixed numeric non-root UID"
    runs = " ".join(args for word, args in runtime if word == "RUN")
    for banned in ("apt-get", "pip", "gcc", "build-essential"):
        assert banned not in runs, f"the runtime stage must not install anything with {banned}"
    assert any(word == "COPY" and "--from=" in args for word, args in runtime)


def test_entrypoint_cmd_port_and_labels() -> None:
    steps = dict(instructions()[::-1])  # the last of each instruction wins
    assert json.loads(steps["ENTRYPOINT"]) == ["allocd"], "exec form: allocd is PID 1 and gets SIGTERM"
    assert json.loads(steps["CMD"]) == ["run"]
    assert steps["EXPOSE"] == str(ServerSettings().port)
    labels = " ".join(args for word, args in instructions() if word == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_calls_python3_only() -> None:
    for word, args in instructions():
        if word == "RUN":
            assert not re.search(r"(^|[\s/;&|])python(\s|$)", args), f"call python3, not python: {args}"


def test_dockerignore_keeps_local_state_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*")] == "*", "an allow-list"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "daemon"}
