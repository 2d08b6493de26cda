"""The dead-letter interface every sink implements (the journal's is `allocd.journal.JournalStore`)."""

from __future__ import annotations

from typing import Any, Protocol

from allocd.sources.base import Message

__all__ = ["DeadLetters"]


class DeadLetters(Protocol):
    async def events(self, items: list[tuple[Message, str, str]]) -> None:
        """Store invalid events (message, reason, detail) durably; raise when that cannot be done."""

    async def records(self, stream: str, items: list[tuple[dict[str, Any], str]]) -> None:
        """Store API-refused records (record, API message) durably; raise when that cannot be done."""
