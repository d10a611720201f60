"""Transfer metrics: one record per finished transfer, and counters per side."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class TransferRecord:
    """One request's transfer as the prefill side saw it.

    duration_s runs from the first byte sent to the last byte landed; exposed_s is the part
    the prefill did not hide: from the end of the prefill step to the Commit answer.
    """

    request_id: str
    transport: str
    num_bytes: int
    num_chunks: int
    duration_s: float
    exposed_s: float

    @property
    def gbps(self) -> float:
        return self.num_bytes / self.duration_s / 1e9 if self.duration_s > 0 else 0.0


@dataclass
class Counters:
    transfers_committed: int = 0
    transfers_failed: int = 0
    leases_expired: int = 0
    chunks_rejected: int = 0
    bytes_received: int = 0
    reservations_refused: int = 0


class TransferCounters:
    """Thread-safe counters (gRPC threads and the lease sweeper update them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = Counters()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._c, name, getattr(self._c, name) + n)

    def snapshot(self) -> Counters:
        with self._lock:
            return Counters(**{f.name: getattr(self._c, f.name) for f in fields(Counters)})
