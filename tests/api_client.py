"""Building the API client's settings in tests: one keyword set, split into what the user configures
(config.ApiSettings) and the client's fixed knobs (client.ClientTuning)."""

from __future__ import annotations

import dataclasses
from typing import Any

from allocd.cloudzero.client import ClientTuning
from allocd.config import ApiSettings

__all__ = ["client_settings"]

_TUNING = {f.name for f in dataclasses.fields(ClientTuning)}


def client_settings(**config: Any) -> dict[str, Any]:
    """`CloudZeroClient(**client_settings(base_url=..., backoff_base=...), key=...)`'s settings and tuning."""
    tuning = {k: v for k, v in config.items() if k in _TUNING}
    settings = {k: v for k, v in config.items() if k not in _TUNING}
    return {"settings": ApiSettings(**settings), "tuning": ClientTuning(**tuning)}
