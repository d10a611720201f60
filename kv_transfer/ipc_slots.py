"""The same-host GPU path's per-session memory: `Slot` and the transport's `SlotPool`.

A session stages its block ids in a slot's pinned host twin and copies them up to the
slot's device buffer, where the kernels read them and add the per-layer digests; the
digests come back down into the twin (ipc_session.py walks a session through it). Slots
are pooled per transport so that a session's open costs no allocation and no CUDA call.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from kv_transfer.cuda_runtime import CudaRuntime


class Slot:
    """One session's memory, reused by later sessions: int32 words on the device (what the
    kernels read and add to) and their pinned host twin (where ids are staged and digests
    come back), both laid out, for a session of n blocks and L layers, as

        [ local ids: n | decode ids: n | digests: L x int64 ]     (n <= capacity)

    and two CUDA events (raw handles): `ready` (the compute a send waits for) and `done` (the
    session's last queued work). A slot is reused only once `done` completed, so no queued
    copy or kernel still reads or writes either buffer then."""

    __slots__ = ("capacity", "device", "device_address", "host", "host_words", "host_i64",
                 "host_address", "ready", "done")  # fmt: skip

    def __init__(
        self, runtime: CudaRuntime, device: torch.device, capacity: int, num_layers: int
    ) -> None:
        words = 2 * capacity + 2 * num_layers
        self.capacity = capacity
        self.device = torch.empty(words, dtype=torch.int32, device=device)
        self.host = torch.empty(words, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.host_words = self.host.numpy()
        self.host_i64 = self.host_words.view(np.int64)
        self.device_address = self.device.data_ptr()
        self.host_address = self.host.data_ptr()
        self.ready = runtime.event_create()
        self.done = runtime.event_create()


class SlotPool:
    """The transport's session slots: as many as sessions were ever open at once, each kept
    for the transport's life (so a session that ends without finish or abort never frees
    memory a queued launch uses). Take and give back cost a lock and a list operation; a
    new slot (~30 KB device and pinned, two events: ~100 us) only when none is free, or
    none large enough (capacity: MIN_CAPACITY blocks, or the session's size if larger)."""

    MIN_CAPACITY = 4096  # blocks: 64k tokens at 16 per block

    def __init__(
        self, runtime: CudaRuntime, device: torch.device, num_layers: int, num_ready: int
    ) -> None:
        self._runtime = runtime
        self._device = device
        self._num_layers = num_layers
        self._lock = threading.Lock()
        self._all = [self._new(self.MIN_CAPACITY) for _ in range(num_ready)]
        self._free = list(self._all)

    def _new(self, capacity: int) -> Slot:
        return Slot(self._runtime, self._device, capacity, self._num_layers)

    def take(self, num_blocks: int) -> Slot:
        with self._lock:
            for i in range(len(self._free) - 1, -1, -1):  # the last given back first
                if self._free[i].capacity >= num_blocks:
                    return self._free.pop(i)
        if self._device.type == "cuda":
            with torch.cuda.device(self._device):  # events belong to the current device
                slot = self._new(max(self.MIN_CAPACITY, num_blocks))
        else:
            slot = self._new(max(self.MIN_CAPACITY, num_blocks))
        with self._lock:
            self._all.append(slot)
        return slot

    def give_back(self, slot: Slot) -> None:
        with self._lock:
            self._free.append(slot)

    @property
    def num_slots(self) -> int:
        return len(self._all)

    def close(self) -> None:
        """Destroy the events (call once the send stream is idle, the device current)."""
        for slot in self._all:
            self._runtime.event_destroy(slot.ready)
            self._runtime.event_destroy(slot.done)
        self._all, self._free = [], []
