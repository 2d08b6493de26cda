"""Settings from TOML and ALLOCD_* variables: precedence, types, and errors that name the key as written."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from allocd.cloudzero.records import Granularity
from allocd.config import (
    ApiSettings,
    EventsSettings,
    KafkaSettings,
    PipelineSettings,
    ServerSettings,
    Settings,
    SidecarSettings,
    StreamSettings,
    load_settings,
)
from allocd.errors import ConfigError

SECTIONS: dict[str, type] = {
    "kafka": KafkaSettings,
    "api": ApiSettings,
    "pipeline": PipelineSettings,
    "server": ServerSettings,
    "sidecar": SidecarSettings,
}


def fields_of(kind: Any) -> list[tuple[str, str]]:
    """Every (section, field) whose type is `kind` (a bool that may be unset counts as a bool)."""
    out = []
    for section, cls in SECTIONS.items():
        for name, hint in get_type_hints(cls).items():
            if hint == kind or (kind is bool and hint == bool | None):
                out.append((section, name))
    return out


def env_name(section: str, key: str) -> str:
    return f"ALLOCD_{section.upper()}_{key.upper()}"


def load(tmp_path: Path, toml: str | None = None, **env: str) -> Settings:
    path = None
    if toml is not None:
        path = tmp_path / "allocd.toml"
        path.write_text(toml)
    return load_settings(path, env=env)


def error(tmp_path: Path, toml: str | None = None, **env: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, toml, **env)
    assert str(info.value).startswith(f"config {info.value.key}: ")
    return info.value


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


# --- defaults, file and environment -------------------------------------------------------------------------
def test_no_file_and_no_environment_gives_the_defaults() -> None:
    settings = load_settings(None, env={})
    assert settings == Settings()
    assert settings.kafka.topics == ("allocd-events",)
    assert settings.api.base_url == "https://api.cloudzero.com"
    assert settings.events == EventsSettings({})


def test_settings_are_frozen() -> None:
    settings = load_settings(None, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.kafka.group_id = "other"  # type: ignore[misc]


def test_the_file_sets_every_section(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        """
        [kafka]
        bootstrap_servers = "k1:9092,k2:9092"
        topics = ["a", "b"]
        session_timeout_ms = 6000
        [api]
        records_per_second = 25
        base_url = "http://127.0.0.1:8080"
        [pipeline]
        grace_seconds = 0
        max_open_keys = 1_000
        [server]
        port = 0
        log_level = "debug"
        [sidecar]
        enabled = true
        [events]
        default_stream = "billing"
        [events.streams.billing]
        """,
    )
    assert settings.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert settings.kafka.topics == ("a", "b")
    assert settings.kafka.session_timeout_ms == 6000
    assert settings.api.records_per_second == 25.0 and isinstance(settings.api.records_per_second, float)
    assert settings.api.base_url == "http://127.0.0.1:8080"
    assert settings.pipeline.grace_seconds == 0.0
    assert settings.pipeline.max_open_keys == 1000
    assert settings.server.port == 0 and settings.server.log_level == "debug"
    assert settings.sidecar.enabled is True
    assert settings.events.default_stream == "billing"
    assert settings.events.streams["billing"] == StreamSettings("billing")


def test_every_key_can_be_set_in_the_file(tmp_path: Path) -> None:
    """The defaults written back as TOML load to the same settings: no field is unreachable from a file."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            if default is not None:
                lines.append(f"{f.name} = {toml_value(default)}")
    assert load(tmp_path, "\n".join(lines)) == Settings()


def test_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    toml = '[kafka]\ngroup_id = "from-file"\nsession_timeout_ms = 6000\n[api]\nrecords_per_second = 10.0\n'
    settings = load(
        tmp_path,
        toml,
        ALLOCD_KAFKA_GROUP_ID="from-env",
        ALLOCD_API_RECORDS_PER_SECOND="2.5",
    )
    assert settings.kafka.group_id == "from-env"
    assert settings.api.records_per_second == 2.5
    assert settings.kafka.session_timeout_ms == 6000  # what the environment does not set, the file does


def test_allocd_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text('[kafka]\ngroup_id = "via-env-path"\n')
    assert load_settings(None, env={"ALLOCD_CONFIG": str(path)}).kafka.group_id == "via-env-path"
    explicit = tmp_path / "explicit.toml"
    explicit.write_text('[kafka]\ngroup_id = "explicit"\n')
    assert load_settings(explicit, env={"ALLOCD_CONFIG": str(path)}).kafka.group_id == "explicit"


def test_the_events_section_is_typed_with_its_env_overrides(tmp_path: Path) -> None:
    toml = '[events]\ndefault_stream = "a"\nundeclared = "reject"\n'
    toml += '[events.streams.billing]\ngranularity = "DAILY"\n'
    settings = load(tmp_path, toml, ALLOCD_EVENTS_DEFAULT_STREAM="b", ALLOCD_EVENTS_UNDECLARED="accept")
    assert settings.events.default_stream == "b"
    assert settings.events.undeclared == "accept"
    assert settings.events.streams == {"billing": StreamSettings("billing", Granularity.DAILY)}


# --- the file itself ----------------------------------------------------------------------------------------
def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(missing, env={})
    assert info.value.key == "config file"
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_invalid_toml_is_named(tmp_path: Path) -> None:
    err = error(tmp_path, "[kafka\ngroup_id = 1\n")
    assert err.key == "config file"
    assert "not valid TOML" in err.problem and "allocd.toml" in err.problem


def test_an_unknown_section_is_named(tmp_path: Path) -> None:
    err = error(tmp_path, "[kafak]\ngroup_id = 'x'\n")
    assert err.key == "kafak"
    assert "unknown section" in err.problem and "kafka" in err.problem


def test_a_section_that_is_not_a_table_is_named(tmp_path: Path) -> None:
    err = error(tmp_path, "kafka = 5\n")
    assert err.key == "kafka" and "table" in err.problem


@pytest.mark.parametrize("section", list(SECTIONS))
def test_an_unknown_key_names_section_dot_key_and_lists_the_known_ones(tmp_path: Path, section: str) -> None:
    err = error(tmp_path, f"[{section}]\nno_such_key = 1\n")
    assert err.key == f"{section}.no_such_key"
    assert "unknown key" in err.problem
    for f in dataclasses.fields(SECTIONS[section]):
        assert f.name in err.problem


# --- types: from the file, errors name section.key ----------------------------------------------------------
BAD_FILE_VALUES = {
    int: ['"5"', "5.5", "true", "[5]"],
    float: ["true", "[1.0]"],
    bool: ['"true"', "1", "0"],
    str: ["5", "true", '["a"]'],
    tuple[str, ...]: ['"a,b"', '["a", 1]', "5"],
}


@pytest.mark.parametrize("kind", list(BAD_FILE_VALUES), ids=lambda k: getattr(k, "__name__", "list"))
def test_a_wrong_type_in_the_file_names_section_dot_key(tmp_path: Path, kind: Any) -> None:
    targets = fields_of(kind)
    assert targets, f"no {kind} field to try"
    for section, key in targets:
        for bad in BAD_FILE_VALUES[kind]:
            err = error(tmp_path, f"[{section}]\n{key} = {bad}\n")
            assert err.key == f"{section}.{key}", (section, key, bad)
            assert "expected" in err.problem


def test_file_numbers_convert_only_when_exact(tmp_path: Path) -> None:
    settings = load(tmp_path, "[kafka]\nsession_timeout_ms = 6000.0\n[api]\nrequest_timeout = 5\n")
    assert settings.kafka.session_timeout_ms == 6000 and isinstance(settings.kafka.session_timeout_ms, int)
    assert settings.api.request_timeout == 5.0 and isinstance(settings.api.request_timeout, float)


# --- types: from the environment, errors name the variable --------------------------------------------------
BAD_ENV_VALUES = {
    int: ["abc", "4.0", "0x10", "1e3", ""],
    float: ["abc", "1,5", ""],
    bool: ["maybe", "2", "tru"],
}


@pytest.mark.parametrize("kind", list(BAD_ENV_VALUES), ids=lambda k: k.__name__)
def test_a_wrong_type_in_the_environment_names_the_variable(tmp_path: Path, kind: Any) -> None:
    targets = fields_of(kind)
    assert targets
    for section, key in targets:
        var = env_name(section, key)
        for bad in BAD_ENV_VALUES[kind]:
            err = error(tmp_path, None, **{var: bad})
            assert err.key == var, (var, bad)
            assert repr(bad) in err.problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), ("TRUE", True), (" yes ", True), ("on", True),
     ("0", False), ("false", False), ("No", False), ("off", False), ("", False)],
)  # fmt: skip
def test_booleans_from_the_environment(tmp_path: Path, text: str, expected: bool) -> None:
    assert load(tmp_path, None, ALLOCD_SIDECAR_ENABLED=text).sidecar.enabled is expected
    assert load(tmp_path, None, ALLOCD_KAFKA_CREATE_TOPICS=text).kafka.create_topics is expected


def test_an_unset_boolean_stays_unset_until_set(tmp_path: Path) -> None:
    """flush_on_shutdown distinguishes "not given" from "turned off" (the sidecar defaults to on)."""
    assert load(tmp_path, None).pipeline.flush_on_shutdown is None
    assert load(tmp_path, None, ALLOCD_PIPELINE_FLUSH_ON_SHUTDOWN="false").pipeline.flush_on_shutdown is False
    assert load(tmp_path, "[pipeline]\nflush_on_shutdown = true\n").pipeline.flush_on_shutdown is True


@pytest.mark.parametrize(("text", "expected"), [("42", 42), (" 42 ", 42), ("1_000", 1000), ("0", 0)])
def test_integers_from_the_environment(tmp_path: Path, text: str, expected: int) -> None:
    settings = load(tmp_path, None, ALLOCD_PIPELINE_MAX_PENDING_SNAPSHOTS=text)
    assert settings.pipeline.max_pending_snapshots == expected


def test_a_negative_integer_from_the_environment_is_parsed_then_refused_by_validation(tmp_path: Path) -> None:
    err = error(tmp_path, None, ALLOCD_PIPELINE_MAX_PENDING_SNAPSHOTS="-3")
    assert err.key == "pipeline.max_pending_snapshots" and err.problem == "must be >= 0"


@pytest.mark.parametrize(("text", "expected"), [("0.25", 0.25), ("5", 5.0), ("1e3", 1000.0), (" 2.5 ", 2.5)])
def test_floats_from_the_environment(tmp_path: Path, text: str, expected: float) -> None:
    assert load(tmp_path, None, ALLOCD_API_RECORDS_PER_SECOND=text).api.records_per_second == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("a", ("a",)), ("a,b", ("a", "b")), (" a , b ,, c ", ("a", "b", "c")), ("a,", ("a",))],
)
def test_lists_from_the_environment_are_comma_separated(tmp_path: Path, text: str, expected: tuple) -> None:
    assert load(tmp_path, None, ALLOCD_KAFKA_TOPICS=text).kafka.topics == expected


def test_an_empty_list_from_the_environment_is_refused(tmp_path: Path) -> None:
    assert error(tmp_path, None, ALLOCD_KAFKA_TOPICS=" , ").key == "kafka.topics"


def test_strings_from_the_environment_are_taken_as_they_are(tmp_path: Path) -> None:
    settings = load(tmp_path, None, ALLOCD_KAFKA_SASL_USERNAME=" user ", ALLOCD_SERVER_HOST="127.0.0.1")
    assert settings.kafka.sasl_username == " user "
    assert settings.server.host == "127.0.0.1"


@pytest.mark.parametrize(
    "env",
    [
        {"ALLOCD_API_RECORDS_PER_SECOND": "nan"},
        {"ALLOCD_PIPELINE_GRACE_SECONDS": "nan"},
        {"ALLOCD_API_REQUEST_TIMEOUT": "NaN"},
    ],
)
def test_nan_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load(tmp_path, None, **env)


def test_a_string_for_a_float_in_the_file_is_refused(tmp_path: Path) -> None:
    assert error(tmp_path, '[api]\nrecords_per_second = "100"\n').key == "api.records_per_second"


# --- validate(): each rule names section.key ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[kafka]\ntopics = []", "kafka.topics"),
        ('[kafka]\nsecurity_protocol = "TLS"', "kafka.security_protocol"),
        ('[kafka]\nsasl_mechanism = "GSSAPI"', "kafka.sasl_mechanism"),
        ('[kafka]\nsecurity_protocol = "SASL_SSL"', "kafka.sasl_username"),
        ('[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_username = "u"', "kafka.sasl_password_file"),
        ('[kafka]\nauto_offset_reset = "none"', "kafka.auto_offset_reset"),
        ('[kafka]\ntopics = ["events", "allocd-checkpoints"]', "kafka.topics"),
        ('[kafka]\ntopics = ["events", "allocd-dlq"]', "kafka.topics"),
        ('[kafka]\ntopics = ["cp"]\ncheckpoint_topic = "cp"', "kafka.topics"),
        ("[kafka]\nsession_timeout_ms = 0", "kafka.session_timeout_ms"),
        ("[kafka]\nheartbeat_interval_ms = -1", "kafka.heartbeat_interval_ms"),
        ("[kafka]\nmax_poll_records = 0", "kafka.max_poll_records"),
        ('[api]\nbase_url = "api.cloudzero.com"', "api.base_url"),
        ('[api]\nbase_url = "ftp://x"', "api.base_url"),
        ("[api]\nrecords_per_request = 0", "api.records_per_request"),
        ("[api]\nrecords_per_request = 10001", "api.records_per_request"),
        ("[api]\nrecords_per_second = 0", "api.records_per_second"),
        ("[api]\nrequest_timeout = -1", "api.request_timeout"),
        ("[api]\nretry_deadline = 0", "api.retry_deadline"),
        ("[pipeline]\ngrace_seconds = -0.5", "pipeline.grace_seconds"),
        ("[pipeline]\nmax_flush_interval_seconds = 0", "pipeline.max_flush_interval_seconds"),
        ("[pipeline]\nmax_open_keys = 0", "pipeline.max_open_keys"),
        ("[pipeline]\nmax_memory_bytes = 0", "pipeline.max_memory_bytes"),
        ("[pipeline]\nmax_pending_snapshots = -1", "pipeline.max_pending_snapshots"),
        ("[pipeline]\nshutdown_timeout_seconds = 0", "pipeline.shutdown_timeout_seconds"),
        ("[pipeline]\ntick_seconds = 0", "pipeline.tick_seconds"),
        ("[pipeline]\nwindow_seconds = -1", "pipeline.window_seconds"),
        ('[server]\nlog_level = "verbose"', "server.log_level"),
        ("[server]\nport = 65536", "server.port"),
        ("[server]\nport = -1", "server.port"),
        ("[sidecar]\nmax_spool_bytes = 0", "sidecar.max_spool_bytes"),
        ("[sidecar]\nmax_body_bytes = -1", "sidecar.max_body_bytes"),
    ],
)
def test_validate_rules_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    assert error(tmp_path, toml + "\n").key == key


@pytest.mark.parametrize(
    "toml",
    [
        '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_username = "u"\nsasl_mechanism = "SCRAM-SHA-512"\n'
        'sasl_password_file = "/run/pw"',
        '[kafka]\nsecurity_protocol = "SSL"',
        '[kafka]\nauto_offset_reset = "latest"',
        "[api]\nrecords_per_request = 1",
        "[api]\nrecords_per_request = 10000",
        '[api]\nbase_url = "http://127.0.0.1:1"',
        "[pipeline]\ngrace_seconds = 0\nmax_pending_snapshots = 0\nwindow_seconds = 10",
        '[server]\nport = 0\nlog_level = "warning"',
        "[server]\nport = 65535",
    ],
)
def test_the_edges_of_each_rule_are_allowed(tmp_path: Path, toml: str) -> None:
    assert isinstance(load(tmp_path, toml + "\n"), Settings)


def test_a_validation_error_for_an_env_value_still_names_the_key(tmp_path: Path) -> None:
    err = error(tmp_path, None, ALLOCD_KAFKA_SESSION_TIMEOUT_MS="0")
    assert "session_timeout_ms" in err.key
    assert err.problem == "must be > 0"


def test_section_validate_can_be_called_directly() -> None:
    with pytest.raises(ConfigError) as info:
        KafkaSettings(topics=()).validate("kafka.")
    assert info.value.key == "kafka.topics"
    ApiSettings().validate("api.")  # the defaults are valid
    assert math.isclose(ApiSettings().records_per_second, 100.0)
