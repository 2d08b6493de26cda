"""allocd's errors, named for what the caller must do next.

    AllocdError
    ├── ConfigError              bad configuration: stop start-up, the message names the key
    ├── StartupError             a dependency stayed unreachable at start-up: exit, the message says what
    ├── InvalidEvent             a bad event: send it to the DLQ with `reason`, move on
    └── DeliveryError            something went wrong talking to the API
        ├── TransientError       retry later (after `retry_after` seconds when known)
        ├── PermanentError       the API refused records (400/413): dead-letter them, never retry
        ├── AuthError            403: pause delivery, re-read the key, resume when accepted
        └── InDoubtError         the outcome is unknown (timeout, reset after sending): count and report

Library exceptions (aiohttp, aiokafka) are translated at the boundary with `raise ... from exc`.
"""

from __future__ import annotations

__all__ = [
    "AllocdError",
    "AuthError",
    "ConfigError",
    "DeliveryError",
    "InDoubtError",
    "InvalidEvent",
    "PermanentError",
    "StartupError",
    "TransientError",
]


class AllocdError(Exception):
    """Base of every error allocd raises on purpose."""


class ConfigError(AllocdError):
    """A configuration value is missing or invalid; `key` names it the way the user wrote it."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"config {key}: {problem}")


class StartupError(AllocdError):
    """Start-up could not reach what it needs (the Kafka brokers) within its configured time."""


class InvalidEvent(AllocdError):
    """An event that cannot be counted; `reason` is a short stable code (a metric label), `detail` prose."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class DeliveryError(AllocdError):
    """A request to the API did not succeed. `status` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class TransientError(DeliveryError):
    """Retry later; `retry_after` (seconds) comes from the server's Retry-After when it sent one."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message, status)


class PermanentError(DeliveryError):
    """The API rejected the request for good (400, 413): do not retry, dead-letter what it carried."""


class AuthError(DeliveryError):
    """403: the key is missing, revoked or rotated. Nothing is dropped; delivery waits for a good key."""


class InDoubtError(DeliveryError):
    """The request may or may not have been applied (timeout or reset after the body was sent)."""
