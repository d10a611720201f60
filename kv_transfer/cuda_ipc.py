"""The same-host GPU path: the prefill GPU writes straight into the decode pool (CUDA IPC).

Handshake (once per (prefill pool, decode service) pair, over gRPC `OpenPool`; see
ipc_handle.py): the decode pool is mapped into the *prefill* GPU's context, so that GPU's
kernels and copy engines write it over NVLink. `CudaIpcTransport.close` unmaps it.

Per request, after Reserve (which names the decode block ids), each `send_layer`:

    prefill GPU  compute stream ──record(ready)── layer i+1 ...
                                     │
    prefill GPU  send stream     wait(ready) ─ ONE launch (ipc_kernels.py): every
                 (high priority)               (layer, K/V, block) chunk read, stored into
                                               the decode pool and summed into the
                                               session's per-layer digests

so layer i moves while layer i+1 computes, and the decode GPU runs nothing for it.

What a request costs on the host, and why it is laid out so: a 1k-token request's bytes
move in ~0.35 ms, so every fixed microsecond of host work between `open` and the launch
(and after the kernel, until `finish` returns) shows in the whole-request figure. Each
session has a slot (`_Slot`: a device buffer, its pinned host twin, two raw CUDA events),
taken from the transport's pool, and everything goes on the one send stream in order:
`open` stages the decode ids (Reserve named them) and zeroed digests and queues ONE copy
up; each new block list stages and checks its local ids (numpy) and queues ONE copy of its
columns up, reused by every layer that sends the same blocks; a send is then an event
record on the caller's stream, a wait and one direct launch with cached arguments
(`ipc_kernels.DirectLaunch`: pointers as plain ints). CUDA calls go through ctypes on raw
handles (cuda_runtime.py), not torch's Stream/Event objects. `finish` queues the digests'
copy down into the slot's pinned twin and one event behind the last launch, polls that one
event, and only then does Commit go out. `abort` waits for the launches already queued, so
no side frees blocks a kernel touches.

CopyMode.MEMCPY (constructor argument, or BATON_KV_COPY_MODE=memcpy) is the copy-engine
fallback: one cudaMemcpy2DAsync per run of blocks contiguous on both sides (ipc_plan.py),
pushed by the prefill GPU on the same stream, then one digest-only launch.

Integrity: both pools' layouts are checked at the handshake, Reserve names the exact
destination blocks, and Commit carries one digest per layer (ipc_plan.layer_digests), which
the decode side recomputes over what landed with the same kernel (one read at HBM speed).
A full xxh3 would need the bytes on the host, which costs more than the copy.

Processes must see the same GPU numbering: under Ray set
RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 and `torch.cuda.set_device` per actor.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Callable, Sequence

import grpc
import numpy as np
import torch

from engine.kv_pool import KVPool
from kv_transfer.client import KVTransferClient, RemoteReservation
from kv_transfer.cuda_runtime import CudaRuntime, CudaRuntimeUnavailable, cuda_runtime
from kv_transfer.ipc_handle import GpuPathUnavailable, RemotePool, host_id, open_pool
from kv_transfer.ipc_plan import (
    contiguous_runs,
    issue_copies,
    layer_digests,  # noqa: F401  (callers import it from here)
    plan_copies,
)
from kv_transfer.layout import KVLayout
from kv_transfer.transport import (
    KVTransport,
    SentBytes,
    TransferError,
    TransferSession,
    TransportKind,
)
from protos import kv_transfer_pb2 as pb

_SPIN_S = 0.002  # finish spins this long before sleeping between polls (a layer: 20-60 us)
COPY_MODE_ENV = "BATON_KV_COPY_MODE"


class CopyMode(enum.Enum):
    KERNEL = "kernel"  # one Triton launch per send: copy and digest in one pass (default)
    MEMCPY = "memcpy"  # copy engine: one cudaMemcpy2DAsync per run, then a digest launch


def copy_mode_from_env() -> CopyMode:
    value = os.environ.get(COPY_MODE_ENV, CopyMode.KERNEL.value)
    try:
        return CopyMode(value)
    except ValueError:
        raise ValueError(f"{COPY_MODE_ENV}={value!r}: use 'kernel' or 'memcpy'") from None


class CudaIpcTransport(KVTransport):
    kind = TransportKind.CUDA_IPC
    rpc_transport = pb.TRANSPORT_CUDA_IPC

    def __init__(
        self,
        client: KVTransferClient,
        pool: KVPool,
        remote: RemotePool,
        runtime: CudaRuntime,
        copy_mode: CopyMode = CopyMode.KERNEL,
    ) -> None:
        """remote: the decode pool as mapped here; `close` unmaps it."""
        from kv_transfer.ipc_kernels import DeviceWords, DirectLaunch  # needs triton: GPU only

        assert remote.dtype == pool.dtype and pool.cache.is_contiguous()
        assert remote.shape[:2] == pool.cache.shape[:2] and remote.shape[3:] == pool.cache.shape[3:]
        self.client = client
        self.pool = pool
        self.remote = remote
        self.runtime = runtime
        self.copy_mode = copy_mode
        self.local_device = pool.cache.device
        self.device_index = self.local_device.index
        self.half_block_bytes = pool.layer_block_bytes // 2
        self.local_words = pool.cache.view(torch.int16)  # the kernel's view of both pools
        self.remote_words = DeviceWords(remote.address)
        self.max_pitch = runtime.max_pitch(self.device_index)
        self.stream = torch.cuda.Stream(self.local_device, priority=-1)  # ids, sends, digests
        self.stream_raw = self.stream.cuda_stream
        # The caller's current stream, as a raw handle: torch.cuda.current_stream builds a
        # Stream object per call (~5 us); inductor's accessor returns the int.
        get_raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self.current_raw_stream: Callable[[int], int] = get_raw or (
            lambda index: torch.cuda.current_stream(index).cuda_stream
        )
        half_words = self.half_block_bytes // 2
        num_local, num_remote = pool.num_blocks, remote.num_blocks
        self.copy_launch = DirectLaunch(self.local_words, self.remote_words, num_local,
                                        num_remote, half_words, True, self.device_index,
                                        self.stream_raw)  # fmt: skip
        self.digest_launch = DirectLaunch(self.local_words, None, num_local, num_local,
                                          half_words, True, self.device_index, self.stream_raw)  # fmt: skip
        with torch.cuda.device(self.local_device):  # the slots' events belong to this device
            self.slots = _SlotPool(runtime, self.local_device, pool.num_layers, num_ready=4)
        self._closed = False

    @classmethod
    def connect(
        cls, client: KVTransferClient, pool: KVPool, copy_mode: CopyMode | None = None
    ) -> CudaIpcTransport:
        """copy_mode: None reads BATON_KV_COPY_MODE (default kernel)."""
        if pool.device.type != "cuda":
            raise GpuPathUnavailable("the local KV pool is not on a GPU")
        mode = copy_mode_from_env() if copy_mode is None else copy_mode
        try:
            runtime = cuda_runtime()
        except CudaRuntimeUnavailable as e:
            raise GpuPathUnavailable(str(e)) from e
        try:
            handle = client.open_pool(host_id(), KVLayout.of_pool(pool))
        except grpc.RpcError as e:
            raise GpuPathUnavailable(f"{e.code().name}: {e.details()}") from e
        local = pool.cache.device  # pool.device may lack an index
        if local.index != handle.device_index and not torch.cuda.can_device_access_peer(
            local.index, handle.device_index
        ):
            raise GpuPathUnavailable(
                f"{local} cannot reach cuda:{handle.device_index} peer to peer"
            )
        return cls(client, pool, open_pool(handle, runtime, local), runtime, mode)

    def open(self, reservation: RemoteReservation) -> TransferSession:
        if self._closed:
            raise TransferError("the transport is closed")
        return _IpcSession(self, reservation)

    def close(self) -> None:
        """Unmap the decode pool once the sends queued so far are done."""
        if self._closed:
            return
        self._closed = True
        self.stream.synchronize()
        with torch.cuda.device(self.local_device):
            self.slots.close()
            self.runtime.ipc_close_mem_handle(self.remote.base)


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


class _Slot:
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


class _SlotPool:
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

    def _new(self, capacity: int) -> _Slot:
        return _Slot(self._runtime, self._device, capacity, self._num_layers)

    def take(self, num_blocks: int) -> _Slot:
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

    def give_back(self, slot: _Slot) -> None:
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


class _IpcSession(TransferSession):
    """A reservation's transfer, in its slot (see `_Slot` for the layout). Everything goes
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
        self._slot: _Slot | None = t.slots.take(n)
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

    def _upload_local(self, slot: _Slot, first: int, local: tuple[int, ...]) -> None:
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

    def _enqueue(self, slot: _Slot, layers: range, first: int, local: tuple[int, ...]) -> int:
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

    def _launch_blocks(self, slot: _Slot, dst: object, layers: range, first: int, k: int) -> None:
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
