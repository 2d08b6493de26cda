"""What the Kafka daemon (daemon.py) and the sidecar (sidecar.py) share, built once from the settings: the
API key (kept out of the logs), the decoder, metrics and health, the /metrics /healthz /readyz server and
the API client, whose observer beats liveness on every request."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from allocd.cloudzero.apikey import ApiKey
from allocd.cloudzero.client import CloudZeroClient
from allocd.config import ApiSettings, Settings
from allocd.events import Decoder
from allocd.logs import register_secret
from allocd.observability import BeatingObserver, Health, Metrics
from allocd.webserver import Runner, bound_port, start_http_server

__all__ = ["Parts", "make_client", "make_key", "shared_parts"]


@dataclass(slots=True)
class Parts:
    key: ApiKey
    decoder: Decoder
    metrics: Metrics
    health: Health
    server: Runner
    client: CloudZeroClient

    @property
    def server_port(self) -> int:
        return bound_port(self.server)

    def reload_key(self) -> bool:
        """Re-read a rotated key (after a 403) and keep it out of the logs like the first one."""
        changed = self.key.reload()
        register_secret(self.key.get())
        return changed


def make_key(api: ApiSettings) -> ApiKey:
    key = ApiKey.from_file(api.api_key_file) if api.api_key_file else ApiKey.from_env(api.api_key_env)
    register_secret(key.get())
    return key


def make_client(api: ApiSettings, key: ApiKey, metrics: Metrics, health: Health) -> CloudZeroClient:
    return CloudZeroClient(api, key, observer=BeatingObserver(metrics, health))


@contextlib.asynccontextmanager
async def shared_parts(settings: Settings) -> AsyncIterator[Parts]:
    """Build the shared parts, serve metrics and health, and close both on exit."""
    key = make_key(settings.api)
    decoder = Decoder(settings.events)
    metrics = Metrics()
    health = Health(
        liveness_timeout=settings.server.liveness_timeout_seconds,
        startup_grace=settings.server.assignment_grace_seconds,
        conditions=("assigned",),
    )
    health.set_condition("api_key", True, "")
    server = await start_http_server(metrics, health, settings.server.host, settings.server.port)
    try:
        client = make_client(settings.api, key, metrics, health)
        try:
            yield Parts(key, decoder, metrics, health, server, client)
        finally:
            await client.close()
    finally:
        await server.cleanup()
