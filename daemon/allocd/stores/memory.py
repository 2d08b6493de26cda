"""A journal store in memory, for unit tests: entries go through their wire encoding, as in a real store."""

from __future__ import annotations

from collections.abc import Iterable

from allocd.journal import Entry, TailRead, decode_entry, encode_entry, scan_list
from allocd.windows import TP

__all__ = ["MemoryJournalStore"]


class MemoryJournalStore:
    """A list; one process, so it is always the owner."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    async def append(self, entries: list[Entry]) -> None:
        for e in entries:  # through the stored form and back, as a real store would hand them out
            decoded = decode_entry(encode_entry(e))
            if decoded is not None:
                self.entries.append(decoded)

    async def read_all(self) -> list[Entry]:
        return list(self.entries)

    async def read_recent(self, claim: Iterable[TP] = ()) -> TailRead:
        return scan_list(self.entries, claim)

    async def still_owner(self, tps: Iterable[TP]) -> bool:
        return True
