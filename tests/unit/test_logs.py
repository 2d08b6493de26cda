"""JSON log lines, the repeat limiter and the secret scrubber."""

from __future__ import annotations

import io
import logging
import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest

from allocd.logs import (
    REDACTED,
    JsonFormatter,
    RateLimitFilter,
    SecretFilter,
    configure_logging,
    register_secret,
    scrub,
)

from .fakes import FakeClock

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def root_restored() -> Iterator[None]:
    """configure_logging changes the root logger; put it back for the next test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def out(root_restored: None) -> io.StringIO:
    stream = io.StringIO()
    configure_logging("DEBUG", stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_is_one_json_object_with_the_fixed_fields_and_extras(out: io.StringIO) -> None:
    logging.getLogger("allocd.test").info(
        "flushed %d records",
        42,
        extra={"stream": "billing", "partition": 3, "offset": 1_000, "request_id": "r1"},
    )
    [entry] = lines(out)
    assert RFC3339_UTC.fullmatch(str(entry["time"]))
    logged = datetime.fromisoformat(str(entry["time"]).replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - logged).total_seconds()) < 60
    assert entry["level"] == "INFO"
    assert entry["logger"] == "allocd.test"
    assert entry["message"] == "flushed 42 records"
    assert (entry["stream"], entry["partition"], entry["offset"], entry["request_id"]) == (
        "billing",
        3,
        1000,
        "r1",
    )


def test_exceptions_are_carried_in_exc(out: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("allocd.test").exception("cycle failed")
    [entry] = lines(out)
    assert entry["level"] == "ERROR"
    assert "Traceback" in str(entry["exc"])
    assert "RuntimeError: boom" in str(entry["exc"])


def test_values_json_cannot_hold_still_produce_a_line() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    record.big = 2**80  # beyond orjson's integers
    record.obj = object()
    entry = orjson.loads(JsonFormatter().format(record))
    assert entry["big"] == str(2**80)
    assert str(entry["obj"]).startswith("<object object")


def test_configure_logging_twice_installs_one_handler_and_sets_the_level(root_restored: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", first)
    configure_logging("WARNING", second)
    logging.getLogger("allocd.test").info("hidden")
    logging.getLogger("allocd.test").warning("shown")
    assert first.getvalue() == ""
    assert [entry["message"] for entry in lines(second)] == ["shown"]


def test_an_unknown_level_is_refused(root_restored: None) -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("LOUD", io.StringIO())


# --- rate limiting ----------------------------------------------------------------------------------
def limited_logger(name: str, clock: FakeClock) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RateLimitFilter(60.0, clock=clock))
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_repeats_are_suppressed_and_then_counted() -> None:
    clock = FakeClock()
    logger, stream = limited_logger("allocd.test.limited", clock)
    for offset in range(100):
        logger.warning("bad event at offset %d", offset)
        clock.now += 0.5  # 50 s in all: still within one interval
    assert len(lines(stream)) == 1
    clock.now = 61.0
    logger.warning("bad event at offset %d", 500)
    first, second = lines(stream)
    assert first["message"] == "bad event at offset 0"
    assert second["message"] == "bad event at offset 500 (suppressed 99 similar messages)"
    assert second["suppressed"] == 99


def test_different_templates_loggers_and_info_lines_are_not_suppressed() -> None:
    clock = FakeClock()
    logger, stream = limited_logger("allocd.test.templates", clock)
    other, other_stream = limited_logger("allocd.test.other", clock)
    logger.warning("decode failed: %s", "a")
    logger.warning("journal slow: %s", "b")
    logger.error("decode failed: %s", "c")  # same template and logger: suppressed whatever the level
    for partition in range(5):
        logger.info("partition %d assigned", partition)
    other.warning("decode failed: %s", "d")
    assert [entry["message"] for entry in lines(stream)] == [
        "decode failed: a",
        "journal slow: b",
        *(f"partition {p} assigned" for p in range(5)),
    ]
    assert len(lines(other_stream)) == 1


def test_the_limiter_tracks_a_bounded_number_of_templates() -> None:
    limiter = RateLimitFilter(60.0, max_keys=3, clock=FakeClock())
    for i in range(10):
        record = logging.LogRecord("x", logging.WARNING, __file__, 1, f"template {i}", (), None)
        assert limiter.filter(record)
    assert len(limiter._seen) == 3


# --- secrets ----------------------------------------------------------------------------------------
def test_a_registered_secret_never_appears_in_a_line(out: io.StringIO) -> None:
    key = "czk-" + secrets.token_hex(16)
    register_secret(key)
    log = logging.getLogger("allocd.test")
    log.warning("sending with key %s", key)
    log.warning(f"inline {key}")
    log.warning("in extra", extra={"header": f"Authorization: {key}", "nested": {"k": key}})
    try:
        raise ValueError(f"bad key {key}")
    except ValueError:
        log.exception("request failed")
    text = out.getvalue()
    assert key not in text
    assert text.count(REDACTED) >= 5
    assert len(lines(out)) == 4


def test_a_secret_that_json_escapes_is_scrubbed_too(out: io.StringIO) -> None:
    key = 'q"uo\\te-' + secrets.token_hex(8)
    register_secret(key)
    logging.getLogger("allocd.test").warning("key is %s", key)
    assert key.split("-")[1] not in out.getvalue()
    assert lines(out)[0]["message"] == f"key is {REDACTED}"


def test_the_secret_filter_cleans_records_for_any_handler() -> None:
    key = "sk-" + secrets.token_hex(16)
    register_secret(key)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "key=%s", (key,), None)
    record.detail = f"auth {key}"
    assert SecretFilter().filter(record)
    assert record.getMessage() == f"key={REDACTED}"
    assert record.detail == f"auth {REDACTED}"
    assert scrub(f"a {key} b {key}") == f"a {REDACTED} b {REDACTED}"


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        register_secret("")
