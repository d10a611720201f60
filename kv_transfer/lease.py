"""Reservations on the decode side: blocks held under a lease with a deadline.

A lease moves through its states once:

    ACTIVE ──Commit (every block arrived)──▶ COMMITTED   blocks now belong to the engine
       │ ──Abort, bad chunk, stream broken──▶ ABORTED     blocks freed
       └──deadline passed (sweeper)────────▶ EXPIRED     blocks freed

Whoever moves a lease out of ACTIVE (`LeaseTable.end`) owns the follow-up (freeing the
blocks or committing them); the transition happens under the lease's lock, which chunk
writes also hold, so blocks are never freed while a chunk is being written into them.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class LeaseState(enum.Enum):
    ACTIVE = "active"
    COMMITTED = "committed"
    ABORTED = "aborted"
    EXPIRED = "expired"


class LeaseNotFound(KeyError):
    """No active lease for this (request id, epoch): never reserved, ended or expired."""


@dataclass(eq=False)
class Lease:
    """One reservation. `received[layer][i]` says whether block i of the table arrived.

    Invariant: blocks [0, num_cached_blocks) are the decode side's prefix hits and are never
    sent; the lease is complete when every layer has every block from num_cached_blocks on.
    """

    request_id: str
    epoch: int
    block_ids: tuple[int, ...]  # the decode side's whole block table for the prompt
    num_cached_blocks: int
    num_layers: int
    deadline_s: float  # time.monotonic() after which the sweeper frees the blocks
    state: LeaseState = LeaseState.ACTIVE
    num_bytes_received: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _received: list[bytearray] = field(init=False, repr=False)
    _num_missing: int = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.block_ids)
        self._received = [bytearray(n) for _ in range(self.num_layers)]
        self._num_missing = self.num_layers * (n - self.num_cached_blocks)

    @property
    def num_blocks_to_send(self) -> int:
        return len(self.block_ids) - self.num_cached_blocks

    @property
    def is_complete(self) -> bool:
        return self._num_missing == 0

    def mark_received(self, layer_idx: int, first_block: int, num_blocks: int) -> None:
        """Record blocks [first_block, first_block + num_blocks) of a layer (idempotent).
        Byte-string operations, not a Python loop: a GPU-path Commit marks every block."""
        row = self._received[layer_idx]
        end = first_block + num_blocks
        if first_block < 0 or end > len(row):
            raise IndexError(f"blocks [{first_block}, {end}) outside the table of {len(row)}")
        self._num_missing -= row.count(0, first_block, end)
        row[first_block:end] = b"\x01" * num_blocks

    def mark_all_received(self) -> None:
        for layer_idx in range(self.num_layers):
            self.mark_received(layer_idx, self.num_cached_blocks, self.num_blocks_to_send)


class LeaseTable:
    """Active leases by request id, and a sweeper thread that expires overdue ones.

    `on_expire(lease)` runs on the sweeper thread for every lease it ended (state EXPIRED),
    outside the table's lock; it must free the lease's blocks.
    """

    def __init__(
        self,
        on_expire: Callable[[Lease], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_expire = on_expire
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def add(self, lease: Lease) -> None:
        with self._lock:
            if lease.request_id in self._leases:
                raise ValueError(f"request {lease.request_id!r} already has an active reservation")
            self._leases[lease.request_id] = lease

    def get(self, request_id: str, epoch: int) -> Lease:
        with self._lock:
            lease = self._leases.get(request_id)
        if lease is None or lease.epoch != epoch:
            raise LeaseNotFound(f"no active reservation for {request_id!r} at epoch {epoch}")
        return lease

    def end(self, lease: Lease, state: LeaseState) -> bool:
        """Move an ACTIVE lease to `state` and drop it; False if it had already ended.

        The caller must hold `lease.lock`.
        """
        assert state is not LeaseState.ACTIVE
        if lease.state is not LeaseState.ACTIVE:
            return False
        lease.state = state
        with self._lock:
            if self._leases.get(lease.request_id) is lease:
                del self._leases[lease.request_id]
        return True

    def expire_due(self) -> list[Lease]:
        """End every lease whose deadline has passed; returns them (on_expire already run)."""
        now = self._clock()
        with self._lock:
            due = [lease for lease in self._leases.values() if lease.deadline_s <= now]
        expired = []
        for lease in due:
            with lease.lock:
                if not self.end(lease, LeaseState.EXPIRED):
                    continue
                try:
                    self._on_expire(lease)
                except Exception:  # the sweeper must survive a failing callback
                    log.exception("freeing expired lease %s failed", lease.request_id)
            expired.append(lease)
        return expired

    def next_deadline_s(self) -> float | None:
        with self._lock:
            return min((lease.deadline_s for lease in self._leases.values()), default=None)

    def start_sweeper(self, max_interval_s: float = 0.1) -> None:
        """Sweep at each lease's deadline (at least every max_interval_s)."""
        assert self._sweeper is None, "sweeper already running"

        def run() -> None:
            while not self._stop.is_set():
                self.expire_due()
                nxt = self.next_deadline_s()
                wait = max_interval_s if nxt is None else nxt - self._clock()
                self._stop.wait(min(max(wait, 0.001), max_interval_s))

        self._sweeper = threading.Thread(target=run, name="kv-lease-sweeper", daemon=True)
        self._sweeper.start()

    def stop_sweeper(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout_s)
            self._sweeper = None

    def active(self) -> list[Lease]:
        with self._lock:
            return list(self._leases.values())
