"""KV-transfer faults, injected on the prefill side for the failure-path tests.

`ChunkFaults` is a transport factory with the signature of `make_transport` (hand it to
`PrefillWorker(transport_factory=...)`, or to a prefill actor through `launch`): it builds
the usual transport over a client whose chunk streams pass through a fault, chosen by the
request id in the stream's first chunk (`FaultRule`); other requests pass untouched.
Nothing in the transport or the receiver knows about it: the receiver must catch the
damage by itself.

    FLIP      the stream's first message has its last byte inverted (the KV data's last
              byte: `data` is a KVChunk's last field), so the chunk's checksum fails
    TRUNCATE  the stream's first message loses its last byte: the data is short
    STALL     the first message goes out, then nothing for `stall_s` (a stuck sender)
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from engine.kv_pool import KVPool
from kv_transfer.client import KVTransferClient
from kv_transfer.transport import KVTransport, TransportKind, make_transport
from kv_transfer.wire import split_chunk


class Fault(enum.Enum):
    NONE = "none"
    FLIP = "flip"
    TRUNCATE = "truncate"
    STALL = "stall"


@dataclass(frozen=True)
class FaultRule:
    """Apply `fault` to the chunk streams of the client request `request_id` in the given
    router attempts (workers see "<request_id>@a<attempt>-<random>"), on any worker."""

    request_id: str
    fault: Fault
    attempts: tuple[int, ...] = (1,)


def _attempt_of(worker_request_id: str) -> tuple[str, int]:
    rid, _, suffix = worker_request_id.rpartition("@")
    number = suffix[1:].partition("-")[0]
    if not rid or not suffix.startswith("a") or not number.isdigit():
        return worker_request_id, 0
    return rid, int(number)


class _FaultyClient:
    """A KVTransferClient whose chunk streams go through the factory's faults."""

    def __init__(self, client: KVTransferClient, faults: ChunkFaults) -> None:
        self._client = client
        self._faults = faults

    def __getattr__(self, name: str) -> object:
        return getattr(self._client, name)

    def stream_future(self, messages: Iterator[bytes]) -> grpc.Future:
        return self._client.stream_future(self._faults.wrap(messages))


@dataclass(frozen=True)
class ChunkFaults:
    """Transport factory (picklable, stateless: the same on every worker and after a
    restart)."""

    rules: tuple[FaultRule, ...]
    stall_s: float = 60.0

    def fault_for(self, worker_request_id: str) -> Fault:
        rid, attempt = _attempt_of(worker_request_id)
        for rule in self.rules:
            if rule.request_id == rid and attempt in rule.attempts:
                return rule.fault
        return Fault.NONE

    def wrap(self, messages: Iterator[bytes]) -> Iterator[bytes]:
        """The stream's messages; the first one's request id decides the fault."""
        fault = Fault.NONE
        for i, message in enumerate(messages):
            if i == 0:
                fault = self.fault_for(split_chunk(message).header.request_id)
                if fault is Fault.FLIP:
                    message = message[:-1] + bytes([message[-1] ^ 0xFF])
                elif fault is Fault.TRUNCATE:
                    message = message[:-1]
            yield message
            if i == 0 and fault is Fault.STALL:
                time.sleep(self.stall_s)

    def __call__(self, kind: TransportKind, client: KVTransferClient, pool: KVPool) -> KVTransport:
        return make_transport(kind, _FaultyClient(client, self), pool)  # type: ignore[arg-type]
