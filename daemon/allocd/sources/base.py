"""The one interface every source implements (Kafka, the sidecar's spool), and what they hand out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from allocd.windows import TP

__all__ = ["AssignmentListener", "Batch", "LostOwnership", "Message", "Record", "Source"]


class Record(Protocol):
    """What the pipeline reads of one raw event. aiokafka's ConsumerRecord has this shape, so the Kafka
    source hands its records on as they are, building no object per event."""

    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int:
        """The source's record timestamp (arrival), epoch ms: lateness is judged against it."""

    @property
    def value(self) -> bytes | None: ...


# One partition's records in offset order: the offset travels with the data (STYLE.md, arroyo).
Batch = tuple[TP, Sequence[Record]]


class Message(NamedTuple):
    """One raw event with its partition: a `Record` built by sources that have no record type of their
    own, and the unit the dead-letter stores take."""

    tp: TP
    offset: int
    timestamp: int  # the source's record timestamp (arrival), epoch ms
    value: bytes


class LostOwnership(Exception):
    """The source no longer owns a partition (failed commit, generation error): stop sending at once."""


class AssignmentListener(Protocol):
    async def on_revoked(self, tps: list[TP]) -> None:
        """Release `tps` before the rebalance proceeds: finish or journal the request in flight."""

    async def on_assigned(self, tps: list[TP]) -> None:
        """Recover `tps` from the journal and seek each to its checkpointed position."""


class Source(Protocol):
    name: str

    def wants_flush(self) -> bool:
        """True when the source's own buffer needs the open windows delivered early (the sidecar's spool
        nearly full); a forced cycle, correct because sum is additive."""

    def frontier_ms(self) -> float:
        """Arrival time (ms) below which everything assigned has been read; math.inf when caught up. A
        window closes only when both the wall clock and this frontier passed its end plus grace, so a
        backlog read in many batches still reaches the API as one record per window."""

    async def start(self, listener: AssignmentListener) -> None: ...

    async def fetch(self, timeout: float) -> list[Batch]:
        """Records from the assigned, unpaused partitions, one batch per partition; empty after `timeout`
        seconds."""

    def pause(self) -> None:
        """Stop returning messages (still polled, so group membership stays alive)."""

    def resume(self) -> None: ...

    def seek(self, tp: TP, offset: int) -> None: ...

    async def committed(self, tp: TP) -> int | None:
        """The group's committed offset, used only when no checkpoint exists."""

    async def reset_position(self, tp: TP) -> int:
        """Where a partition with no checkpoint and no commit starts, by the reset policy."""

    async def commit(self, positions: dict[TP, int]) -> None:
        """Commit positions for lag tools; raise LostOwnership when the source lost a partition."""

    async def end_offsets(self, tps: list[TP]) -> dict[TP, int]:
        """Best-effort end offsets, for the lag metric only."""

    async def stop(self) -> None: ...
