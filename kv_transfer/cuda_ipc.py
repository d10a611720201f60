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

so layer i moves while layer i+1 computes, and the decode GPU runs nothing for it. The
block ids (local and decode, checked against both pools on the host, with numpy) go to the
GPU once per distinct block list of a session, one copy per row on a stream of their own,
and are reused by every layer that sends the same blocks: a send_layer is an event record,
a wait and one (direct) launch, ~20 us of host time however fragmented either block table
is. Opening a session takes a device buffer from the transport's ring (no
allocation) and zeroes its digests: nothing else happens before the first send, since a
whole request's fixed host cost is most of what separates a 1k-token copy (~0.35 ms) from
the bare copy. `finish` queues the digests' copy to host behind the last launch, polls one
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
from collections.abc import Sequence

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
from kv_transfer.transport import (
    KVTransport,
    SentBytes,
    TransferError,
    TransferSession,
    TransportKind,
)
from kv_transfer.wire import KVLayout
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
        from kv_transfer.ipc_kernels import DeviceWords  # needs triton: GPU only

        assert remote.dtype == pool.dtype and pool.cache.is_contiguous()
        assert remote.shape[:2] == pool.cache.shape[:2] and remote.shape[3:] == pool.cache.shape[3:]
        self.client = client
        self.pool = pool
        self.remote = remote
        self.runtime = runtime
        self.copy_mode = copy_mode
        self.local_device = pool.cache.device
        self.half_block_bytes = pool.layer_block_bytes // 2
        self.local_words = pool.cache.view(torch.int16)  # the kernel's view of both pools
        self.remote_words = DeviceWords(remote.address)
        self.max_pitch = runtime.max_pitch(self.local_device.index)
        self.stream = torch.cuda.Stream(self.local_device, priority=-1)  # sends and digests
        self.upload_stream = torch.cuda.Stream(self.local_device)  # block ids; never waits
        self.uploads = _Uploads(runtime, self.upload_stream, num_slots=64, pinned=True)
        self.buffers = _SessionBuffers(self.local_device, pool.num_layers)
        self.ready = torch.cuda.Event()  # re-recorded by every send (a wait takes its state)
        pinned = self.local_device.type == "cuda"
        self.digests_host = torch.empty(pool.num_layers, dtype=torch.int64, pin_memory=pinned)
        self.finish_lock = threading.Lock()  # one finish at a time uses digests_host
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
            self.runtime.ipc_close_mem_handle(self.remote.base)

    def enqueue(
        self,
        layers: range,
        ids: torch.Tensor,
        first_index: int,
        digests: torch.Tensor,
        local_ids: Sequence[int],
        remote_ids: Sequence[int],
    ) -> int:
        """Queue on the send stream (made to wait for the data) the copy of blocks ids[0] ->
        ids[1] (int32 [2, n] on the device) in `layers`, and their digests into
        digests[layer]; returns how many launches or copies that was. Cost: one launch
        (KERNEL), or one cudaMemcpy2DAsync per run of blocks plus one launch (MEMCPY)."""
        from kv_transfer.ipc_kernels import launch_blocks

        half_words = self.half_block_bytes // 2
        num_local, num_remote = self.pool.num_blocks, self.remote.num_blocks
        if self.copy_mode is CopyMode.KERNEL:
            launch_blocks(self.local_words, self.remote_words, ids, digests, layers, first_index,
                          num_local, num_remote, half_words, self.stream)  # fmt: skip
            return 1
        runs = contiguous_runs(list(local_ids), np.asarray(remote_ids).tolist())  # plain ints
        copies = plan_copies(layers, runs, num_local, num_remote,
                             self.half_block_bytes, self.max_pitch)  # fmt: skip
        issue_copies(self.runtime, copies, self.pool.cache.data_ptr(), self.remote.address,
                     self.stream.cuda_stream)  # fmt: skip
        launch_blocks(self.local_words, None, ids, digests, layers, first_index, num_local,
                      num_local, half_words, self.stream)  # fmt: skip
        return len(copies) + 1


def _check_ids(name: str, ids: np.ndarray, num_blocks: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= num_blocks):
        raise ValueError(f"{name} block ids out of range [0, {num_blocks})")


class _Uploads:
    """Block ids on their way to the prefill GPU: pinned staging slots used round robin,
    copied on the transport's upload stream, which holds nothing but these copies (so they
    run at once, never behind compute). A slot is rewritten only once its copy is done.
    Cost: a few us of host time per upload (a pageable copy: ~40, the driver stages it)."""

    SLOT_WORDS = 4096  # int32 words per slot; a larger upload takes several slots

    def __init__(
        self, runtime: CudaRuntime, stream: torch.cuda.Stream, num_slots: int, pinned: bool
    ) -> None:
        self._host = torch.empty((num_slots, self.SLOT_WORDS), dtype=torch.int32, pin_memory=pinned)
        self._host_words = self._host.numpy()
        self._events = [torch.cuda.Event() for _ in range(num_slots)]
        self._used = [False] * num_slots
        self._next = 0
        self._runtime = runtime
        self._stream = stream
        self._lock = threading.Lock()

    def upload(self, dst: int, dst_pitch: int, rows: np.ndarray) -> torch.cuda.Event:
        """Queue the copy of int32 rows [R, k] to device rows dst_pitch bytes apart from
        address dst (one copy per row and slot's worth of columns); returns an event that
        completes once they landed."""
        with self._lock:
            return self._upload(dst, dst_pitch, rows)

    def _upload(self, dst: int, dst_pitch: int, rows: np.ndarray) -> torch.cuda.Event:
        num_rows, width = rows.shape
        step = self.SLOT_WORDS // num_rows
        event = self._events[0]
        for start in range(0, width, step):
            k, self._next = self._next, (self._next + 1) % len(self._events)
            event = self._events[k]
            if self._used[k]:
                event.synchronize()  # queued num_slots uploads ago: done long since
            chunk = rows[:, start : start + step]
            cols = chunk.shape[1]
            self._host_words[k, : num_rows * cols].reshape(num_rows, cols)[:] = chunk
            src = self._host.data_ptr() + 4 * k * self.SLOT_WORDS
            for row in range(num_rows):  # 1-D copies: a pitched one from host costs ~150 us
                self._runtime.memcpy_async(dst + 4 * start + row * dst_pitch,
                                           src + 4 * row * cols, 4 * cols,
                                           self._stream.cuda_stream)  # fmt: skip
            event.record(self._stream)
            self._used[k] = True
        return event


class _SessionBuffers:
    """Device buffers for sessions, reused: a session takes one at open and gives it back
    when `finish` or `abort` returns (every launch that used it has completed then), so
    there are as many as sessions were ever open at once (32 KB each). One allocated at
    open would cost ~20 us of host time (the allocation belongs to the upload stream, and
    entering a stream context is slow in Python); a session over more than MAX_BLOCKS
    blocks allocates its own, which is not kept."""

    MAX_BLOCKS = 4096  # table length a buffer fits: 64k tokens at 16 per block

    def __init__(self, device: torch.device, num_layers: int) -> None:
        self._device = device
        self._num_layers = num_layers
        self._words = 2 * self.MAX_BLOCKS + 2 * num_layers
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, num_blocks: int, upload_stream: torch.cuda.Stream) -> torch.Tensor:
        """int32 [2 * num_blocks + 2 * num_layers] on the device, contents undefined."""
        need = 2 * num_blocks + 2 * self._num_layers
        size = self._words if num_blocks <= self.MAX_BLOCKS else need
        if size == self._words:
            with self._lock:
                if self._free:
                    return self._free.pop()[:need]
        with torch.cuda.stream(upload_stream):
            return torch.empty(size, dtype=torch.int32, device=self._device)[:need]

    def give_back(self, buf: torch.Tensor) -> None:
        base = buf if buf._base is None else buf._base
        if base.numel() == self._words:
            with self._lock:
                self._free.append(base)


class _IpcSession(TransferSession):
    """The session's device memory, int32 words (n = the reservation's table length, L =
    layers), from the transport's `_SessionBuffers`:

        [ ids: 2 x n (row 0 the local ids, row 1 the decode ids) | digests: 2L words ]

    Open zeroes the digests (a memset on the send stream). Each new block list uploads its
    columns [first, first + k) of both rows (`_Uploads`), which the send stream waits for by
    event. Column i only ever holds table index i's blocks (checked), so a rewrite never
    changes a value that a queued kernel reads; kernels read ids[:, first:first + k] in
    place. The buffer goes back to the transport once `finish`
    or `abort` has seen every launch complete (a session that ends otherwise keeps it).
    """

    def __init__(self, transport: CudaIpcTransport, reservation: RemoteReservation) -> None:
        t = self._t = transport
        self._dst = np.asarray(reservation.block_ids, dtype=np.int64)
        n, num_layers = len(self._dst), t.pool.num_layers
        _check_ids("decode", self._dst, t.remote.num_blocks)
        self._buf: torch.Tensor | None = t.buffers.take(n, t.upload_stream)
        if self._buf.is_cuda:
            self._buf.record_stream(t.stream)
        self._ids = self._buf[: 2 * n].view(2, n)
        self._digests = self._buf[2 * n :].view(torch.int64)  # by layer; kernels add to it
        t.runtime.memset_async(self._digests.data_ptr(), 0, 8 * num_layers, t.stream.cuda_stream)
        self._local = np.full(n, -1, dtype=np.int64)  # the local row as uploaded (-1: not yet)
        self._ids_key: tuple[int, tuple[int, ...]] | None = None  # (first_block, local ids)
        self._ids_view = self._ids  # self._ids[:, first_block:first_block + k] of _ids_key
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
        if self._aborted:
            raise TransferError("send on an aborted session")
        assert 0 <= layers.start < layers.stop <= self.num_layers, layers
        if not self._num_launches:
            self._first_send_s = time.perf_counter()
        key = (first_block, tuple(local_block_ids))
        end = first_block + len(key[1])
        if first_block < 0 or end > len(self._dst):
            raise ValueError(f"blocks [{first_block}, {end}) beyond the reservation")
        if key != self._ids_key:  # layer streaming: once per step, not once per layer
            self._upload_ids(first_block, key[1])
            self._ids_key, self._ids_view = key, self._ids[:, first_block:end]
        t.ready.record(torch.cuda.current_stream(t.local_device))
        t.stream.wait_event(t.ready)
        self._num_launches += t.enqueue(layers, self._ids_view, first_block, self._digests,
                                        key[1], self._dst[first_block:end])  # fmt: skip
        self._num_bytes += len(key[1]) * t.pool.layer_block_bytes * len(layers)

    def _upload_ids(self, first_block: int, local: tuple[int, ...]) -> None:
        t = self._t
        now = np.asarray(local, dtype=np.int64)
        _check_ids("local", now, t.pool.num_blocks)
        end = first_block + len(now)
        was = self._local[first_block:end]
        clash = np.flatnonzero((was >= 0) & (was != now))
        if clash.size:
            i = int(clash[0])
            raise ValueError(
                f"table index {first_block + i} sent from blocks {was[i]} and {now[i]}"
            )
        self._local[first_block:end] = now
        rows = np.stack([now, self._dst[first_block:end]])
        n = len(self._dst)
        t.stream.wait_event(t.uploads.upload(self._ids.data_ptr() + 4 * first_block, 4 * n, rows))

    def _record_done(self) -> torch.cuda.Event:
        done = torch.cuda.Event()
        done.record(self._t.stream)
        return done

    def _release_buffer(self) -> None:
        """Every launch that used the buffer is done: the transport may reuse it."""
        if self._buf is not None:
            self._t.buffers.give_back(self._buf)
            self._buf = None

    def finish(self, timeout_s: float) -> SentBytes:
        t = self._t
        with t.finish_lock:  # the digests' copy to host, after the last send
            t.runtime.memcpy_async(t.digests_host.data_ptr(), self._digests.data_ptr(),
                                   8 * self.num_layers, t.stream.cuda_stream)  # fmt: skip
            done = self._record_done()
            start_s = time.monotonic()
            while not done.query():  # a polling wait that can time out
                waited_s = time.monotonic() - start_s
                if waited_s > timeout_s:
                    # The launches cannot be recalled; the caller aborts the reservation.
                    raise TransferError(f"GPU copy not done after {timeout_s:.1f} s")
                if waited_s > _SPIN_S:
                    time.sleep(50e-6)
            digests = tuple(t.digests_host.tolist())
        self._release_buffer()
        return SentBytes(self._num_bytes, self._num_launches, self._first_send_s, digests)

    def abort(self) -> None:
        """Stop; returns once the launches already queued are done (see the module doc)."""
        self._aborted = True
        self._record_done().synchronize()
        self._release_buffer()
