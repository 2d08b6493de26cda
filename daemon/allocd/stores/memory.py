"""A journal store in memory, for unit tests: entries go through their wire encoding, as in a real store."""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from allocd.journal import Entry, encode_entry
from allocd.windows import TP

__all__ = ["MemoryJournalStore"]


class MemoryJournalStore:
    """A list; one process, so it is always the owner."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    async def append(self, entries: list[Entry]) -> None:
        self.entries.extend(orjson.loads(encode_entry(e)) for e in entries)

    async def read_all(self, claim: Iterable[TP] = ()) -> list[Entry]:
        return list(self.entries)

    async def still_owner(self, tps: Iterable[TP]) -> bool:
        return True
