"""One request's transfer on the same-host GPU path (`IpcSession`), and what it costs.

What a request costs on the host, and why it is laid out so: a 1k-token request's bytes
move in ~0.35 ms, so every fixed microsecond of host work between `open` and the launch
(and after the kernel, until `finish` returns) shows in the whole-request figure. Each
session has a slot (`ipc_slots.Slot`: a device buffer, its pinned host twin, two raw CUDA
events), taken from the transport's pool, and everything goes on the one send stream in
order: `open` stages the decode ids (Reserve named them) and zeroed digests and queues ONE
copy up; each new block list stages and checks its local ids (numpy) and queues ONE copy of
its columns up, reused by every layer that sends the same blocks; a send is then an event
record on the caller's stream, a wait and one direct launch with cached arguments
(`ipc_kernels.DirectLaunch`: pointers as plain ints). CUDA calls go through ctypes on raw
handles (cuda_runtime.py), not torch's Stream/Event objects. `finish` queues the digests'
copy down into the slot's pinned twin and one event behind the last launch, polls that one
event, and only then does Commit go out. `abort` waits for the launches already queued, so
no side frees blocks a kernel touches.

With CopyMode.MEMCPY (ipc_copy_mode.py) a send is one cudaMemcpy2DAsync per run of blocks
(ipc_plan.py) on the same stream, then one digest-only launch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from kv_transfer.client import RemoteReservation
from kv_transfer.ipc_copy_mode import CopyMode
from kv_transfer.ipc_plan import contiguous_runs, issue_copies, plan_copies
from kv_transfer.ipc_slots import Slot
from kv_transfer.transport import SentBytes, TransferError, TransferSession

if TYPE_CHECKING:
    from kv_transfer.cuda_ipc import CudaIpcTransport

_SPIN_S = 0.002  # finish spins this long before sleeping between polls (a layer: 20-60 us)


def _check_ids(name: str, ids: np.ndarray, num_blocks: int) -> None:
    """ids: int32. Read as uint32, a negative id is larger than any pool: one max covers both
    ends (~3 us instead of min and max)."""
    if ids.size and ids.view(np.uint32).max() >= num_blocks:
        raise ValueError(f"{name} block ids out of range [0, {num_blocks})")


def _int32_ids(name: str, ids: Sequence[int], num_blocks: int) -> np.ndarray:
    try:
        out = np.array(ids, dtype=np.int32)
    except OverflowError:
        raise ValueError(f"{name} block ids out of range [0, {num_blocks})") from None
    _check_ids(name, out, num_blocks)
    return out


class IpcSession(TransferSession):
    """A reservation's transfer, in its slot (see `Slot` for the layout). Everything goes
    on the transport's send stream, in order, so no event orders one copy against another:

        open          decode ids, zeroed digests and an empty (-1) local row staged in the
                      slot's pinned host twin; no CUDA call
        new block     its local ids checked and staged; ONE copy up: the first one takes
          list        everything from its first column to the digests' end (a whole
                      request: the whole slot, 2n + 2L words); later ones their columns
                      (layer streaming: once per step, reused by every layer of the step)
        each send     ready recorded on the caller's stream, waited for; ONE launch
        finish        digests copied down into the host twin, done recorded, polled

    Column i of the local row only ever holds -1 or table index i's block (checked), and a
    kernel reads a column only after the copy that carried its block, so a copy that runs
    late (behind compute) and picks up a later block list's columns changes nothing that a
    kernel reads. Host cost (2-core CPU box, CUDA calls excluded, 1k tokens): open ~10 us,
    a whole request's send ~13 us, finish ~4 us; was ~60, ~100 and ~15.
    """

    def __init__(self, transport: CudaIpcTransport, reservation: RemoteReservation) -> None:
        t = self._t = transport
        n = self._n = len(reservation.block_ids)
        self._slot: Slot | None = t.slots.take(n)
        try:
            words = self._slot.host_words
            words[n : 2 * n] = _int32_ids("decode", reservation.block_ids, t.remote.num_blocks)
        except ValueError:
            t.slots.give_back(self._slot)  # nothing queued yet
            raise
        words[:n] = -1  # the local row as uploaded (-1: not yet)
        self._slot.host_i64[n : n + t.pool.num_layers] = 0
        self._uploaded = False  # no copy up yet: the first carries the decode row and digests
        self._first = -1  # the last block list: columns [first, first + len(local)) ...
        self._local: tuple[int, ...] = ()  # ... of the local row
        self._lo, self._hi = n, 0  # the local row's columns ever uploaded lie in [lo, hi)
        self._num_bytes = 0
        self._num_launches = 0
        self._first_send_s = 0.0
        self._aborted = False

    @property
    def num_layers(self) -> int:
        return self._t.pool.num_layers

    def send_layer(self, layer_idx: int, first_block: int, local_block_ids: Sequence[int]) -> None:
        self._send(range(layer_idx, layer_idx + 1), first_block, local_block_ids)

    def send_all_layers(self, first_block: int, local_block_ids: Sequence[int]) -> None:
        self._send(range(self.num_layers), first_block, local_block_ids)

    def _send(self, layers: range, first_block: int, local_block_ids: Sequence[int]) -> None:
        """Copy and digest blocks of `layers`, behind the work queued so far on the caller's
        current stream of the prefill GPU (the compute that wrote them). Host cost with the
        block list of the last call: an event record, a stream wait and one launch."""
        t = self._t
        slot = self._slot
        if self._aborted or slot is None:
            raise TransferError("send on an aborted or finished session")
        assert 0 <= layers.start < layers.stop <= self.num_layers, layers
        if not self._num_launches:
            self._first_send_s = time.perf_counter()
        local = tuple(local_block_ids)
        if first_block != self._first or local != self._local:  # streaming: once per step
            self._upload_local(slot, first_block, local)
        t.runtime.event_record(slot.ready, t.current_raw_stream(t.device_index))
        t.runtime.stream_wait_event(t.stream_raw, slot.ready)
        self._num_launches += self._enqueue(slot, layers, first_block, local)
        self._num_bytes += len(local) * t.pool.layer_block_bytes * len(layers)

    def _upload_local(self, slot: Slot, first: int, local: tuple[int, ...]) -> None:
        """Check a new block list and queue the copy of its columns of the local row."""
        t = self._t
        end = first + len(local)
        if first < 0 or end > self._n:
            raise ValueError(f"blocks [{first}, {end}) beyond the reservation")
        now = _int32_ids("local", local, t.pool.num_blocks)
        words = slot.host_words
        if first < self._hi and end > self._lo:  # overlaps columns sent before: same blocks
            was = words[first:end]
            clash = np.flatnonzero((was >= 0) & (was != now))
            if clash.size:
                i = int(clash[0])
                raise ValueError(f"table index {first + i} sent from blocks {was[i]} and {now[i]}")
        words[first:end] = now
        self._lo, self._hi = min(self._lo, first), max(self._hi, end)
        self._first, self._local = first, local
        if not self._uploaded:  # columns [first, n), the decode row, the zeroed digests
            end = 2 * self._n + 2 * self.num_layers
            self._uploaded = True
        if end > first:
            t.runtime.memcpy_async(slot.device_address + 4 * first,
                                   slot.host_address + 4 * first, 4 * (end - first),
                                   t.stream_raw)  # fmt: skip

    def _enqueue(self, slot: Slot, layers: range, first: int, local: tuple[int, ...]) -> int:
        """Queue on the send stream the copy of blocks local -> the reservation's [first,
        first + k) in `layers`, and their digests; returns how many launches or copies that
        was. Cost: one launch (KERNEL), or one cudaMemcpy2DAsync per run of blocks plus one
        launch (MEMCPY)."""
        t = self._t
        n, k = self._n, len(local)
        ids_address = slot.device_address + 4 * first
        digests_address = slot.device_address + 8 * n
        if t.copy_mode is CopyMode.KERNEL:
            if not t.copy_launch(ids_address, n, k, digests_address, layers, first):
                self._launch_blocks(slot, t.remote_words, layers, first, k)
            return 1
        remote = slot.host_words[n + first : n + first + k].tolist()
        runs = contiguous_runs(list(local), remote)
        copies = plan_copies(layers, runs, t.pool.num_blocks, t.remote.num_blocks,
                             t.half_block_bytes, t.max_pitch)  # fmt: skip
        issue_copies(t.runtime, copies, t.pool.cache.data_ptr(), t.remote.address, t.stream_raw)
        if not t.digest_launch(ids_address, n, k, digests_address, layers, first):
            self._launch_blocks(slot, None, layers, first, k)
        return len(copies) + 1

    def _launch_blocks(self, slot: Slot, dst: object, layers: range, first: int, k: int) -> None:
        """The launch through Triton's own path, on tensor views of the slot (the first
        launch of a variant, which compiles it; CPU tests under the interpreter)."""
        from kv_transfer.ipc_kernels import launch_blocks

        t = self._t
        n = self._n
        ids = slot.device[: 2 * n].view(2, n)[:, first : first + k]
        digests = slot.device[2 * n : 2 * n + 2 * self.num_layers].view(torch.int64)
        launch_blocks(t.local_words, dst, ids, digests, layers, first, t.pool.num_blocks,
                      t.pool.num_blocks if dst is None else t.remote.num_blocks,
                      t.half_block_bytes // 2, t.stream)  # fmt: skip

    def _release_slot(self) -> None:
        """Every copy and launch that used the slot is done: the transport may reuse it."""
        if self._slot is not None:
            self._t.slots.give_back(self._slot)
            self._slot = None

    def finish(self, timeout_s: float) -> SentBytes:
        t = self._t
        slot = self._slot
        if slot is None:
            raise TransferError("finish on an aborted or finished session")
        n, num_layers = self._n, self.num_layers
        if not self._uploaded:  # nothing sent, nothing queued: the digests staged at open
            self._release_slot()
            return SentBytes(0, 0, 0.0, (0,) * num_layers)
        rt = t.runtime
        rt.memcpy_async(slot.host_address + 8 * n, slot.device_address + 8 * n, 8 * num_layers,
                        t.stream_raw)  # fmt: skip
        rt.event_record(slot.done, t.stream_raw)
        if not rt.event_query(slot.done):  # a polling wait that can time out
            start_s = time.monotonic()
            while not rt.event_query(slot.done):
                waited_s = time.monotonic() - start_s
                if waited_s > timeout_s:
                    # The launches cannot be recalled; the caller aborts the reservation.
                    # The slot stays out of the pool (kept, never freed).
                    raise TransferError(f"GPU copy not done after {timeout_s:.1f} s")
                if waited_s > _SPIN_S:
                    time.sleep(50e-6)
        digests = tuple(slot.host_i64[n : n + num_layers].tolist())
        self._release_slot()
        return SentBytes(self._num_bytes, self._num_launches, self._first_send_s, digests)

    def abort(self) -> None:
        """Stop; returns once the launches already queued are done (see the module doc)."""
        self._aborted = True
        slot = self._slot
        if slot is not None:
            self._t.runtime.event_record(slot.done, self._t.stream_raw)
            self._t.runtime.event_synchronize(slot.done)
            self._release_slot()
