"""yamllint over every YAML file we ship (not the Go templates), and the compose stack: valid for
docker-compose, wired to the emulator and Kafka, with a config allocd accepts."""

from __future__ import annotations

from pathlib import Path

from allocd.config import EventsSettings, load_settings
from tests.deploy.deploytools import CHART, DEPLOY, ROOT, load_yaml, run, tool

YAMLLINT_CONFIG = Path(__file__).with_name("yamllint.yaml")
COMPOSE = DEPLOY / "compose" / "docker-compose.yaml"


def test_yamllint() -> None:
    targets = [DEPLOY, CHART / "values.yaml", CHART / "Chart.yaml", CHART / "examples"]
    args = [tool("yamllint"), "--strict", "-f", "parsable", "-c", str(YAMLLINT_CONFIG)]
    proc = run([*args, *map(str, targets)])
    assert proc.stdout == ""


def test_yamllint_covers_the_deploy_files() -> None:
    """The directories handed to yamllint hold the files we mean to lint."""
    names = {p.relative_to(ROOT).as_posix() for p in DEPLOY.rglob("*.yaml")}
    assert {
        "deploy/prometheus/allocd-alerts.yaml",
        "deploy/prometheus/allocd-alerts.test.yaml",
        "deploy/compose/docker-compose.yaml",
        "deploy/kubernetes/deployment.yaml",
    } <= names


def test_compose_config_is_valid() -> None:
    run([tool("docker-compose"), "-f", str(COMPOSE), "config", "--quiet"])


def test_compose_stack(tmp_path: Path) -> None:
    (compose,) = load_yaml(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"kafka", "emulator", "allocd"}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"], "KRaft mode"
    emulator, allocd = services["emulator"], services["allocd"]
    assert emulator["command"][0] == "emulator" and "--admin" in emulator["command"]
    key = emulator["command"][emulator["command"].index("--key") + 1]
    env = allocd["environment"]
    assert env["ALLOCD_API_KEY"] == key
    assert env["ALLOCD_API_BASE_URL"] == "http://emulator:8080"
    assert env["ALLOCD_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert allocd["depends_on"]["kafka"]["condition"] == "service_healthy"
    # The mounted config file, with the environment compose sets, is accepted by allocd.
    (mount,) = allocd["volumes"]
    source, target, _ = mount.split(":")
    assert allocd["command"] == ["run", "--config", target]
    settings = load_settings(COMPOSE.parent / source, env=env)
    assert isinstance(settings.events, EventsSettings)  # [events] is validated by load_settings too
    assert settings.api.base_url == "http://emulator:8080"
    grace = int(allocd["stop_grace_period"].removesuffix("s"))
    assert grace > settings.pipeline.shutdown_timeout_seconds
