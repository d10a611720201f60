"""The same-host GPU path: copies straight into the decode pool, opened by CUDA IPC.

Handshake (once per (prefill pool, decode service) pair, over gRPC `OpenPool`): the decode
side exports its whole pool tensor with `torch.multiprocessing.reductions.reduce_tensor` and
sends the rebuild arguments field by field in a `PoolHandle` (ints, bytes, an allowlisted
class name: nothing is unpickled). The prefill side maps it once (`CudaIpcTransport.connect`)
and keeps the mapped tensor for the transport's life. CUDA maps IPC memory into the context
of the device that owns it (the decode GPU, say cuda:1), so every copy is *pulled*: issued
on a stream of the decode GPU, whose copy engine reads the prefill pool over peer access
(enabled once from the decode GPU to the prefill GPU at connect) and writes its own memory.
(A copy kernel on the prefill GPU storing into the mapping, as an earlier version tried,
touches an address that GPU has no mapping for: "illegal memory access".)

Per request, after Reserve (which names the decode block ids), each `send_layer`:

    prefill GPU   compute stream ──record(ready)── layer i+1 ...
                                      │
    decode GPU    copy stream    wait(ready) ─ one cudaMemcpy2DAsync per run of blocks
                                               contiguous on both sides: rows = (layer, K/V)
    prefill GPU   digest stream  wait(ready) ─ weighted sums of the sent blocks' words

so layer i moves while layer i+1 computes; `finish` waits until both streams passed their
last work (events), and only then does Commit go out. `abort` waits for the copies already
queued before it returns, so neither side frees blocks that a copy still reads or writes.

Integrity: both pools' layouts are checked at the handshake, Reserve names the exact
destination blocks, and Commit carries one digest per layer, which the decode side
recomputes over what landed: the sum over the request's sent blocks i (table index) and
halves h (K=0, V=1) of (2i + h + 1) * (sum of the half-block's 16-bit words), in int64 (it
wraps identically on both sides). Weights make a swapped or misplaced block count, not just
a missing one. A full xxh3 would need the bytes on the host, which costs more than the copy;
the digest is one read of the bytes at HBM speed, beside the copies.

Processes must see the same GPU numbering: under Ray set
RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 and `torch.cuda.set_device` per actor.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import grpc
import torch

from engine.kv_pool import KVPool
from kv_transfer.client import KVTransferClient, RemoteReservation
from kv_transfer.cuda_runtime import CudaRuntime, CudaRuntimeUnavailable, cuda_runtime
from kv_transfer.transport import (
    KVTransport,
    SentBytes,
    TransferError,
    TransferSession,
    TransportKind,
)
from kv_transfer.wire import KVLayout, block_runs, dtype_from_pb, dtype_to_pb
from protos import kv_transfer_pb2 as pb

_SPIN_S = 0.002  # finish spins this long before sleeping between polls (a copy: 0.3-3 ms)


class GpuPathUnavailable(Exception):
    """The pair cannot use the same-host GPU path (use grpc)."""


@cache
def host_id() -> str:
    """Names this machine for this boot: two processes with equal ids share GPUs."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()}/{boot.read_text().strip() if boot.exists() else ''}"


_STORAGE_CLASSES = {
    "TypedStorage": torch.storage.TypedStorage,
    "UntypedStorage": torch.UntypedStorage,
}


def export_pool(cache_tensor: torch.Tensor) -> pb.PoolHandle:
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(cache_tensor)
    (
        _tensor_cls,
        size,
        stride,
        offset,
        storage_cls,
        dtype,
        device,
        handle,
        storage_size_bytes,
        storage_offset_bytes,
        _requires_grad,
        ref_counter_handle,
        ref_counter_offset,
        event_handle,
        event_sync_required,
    ) = args
    assert storage_cls.__name__ in _STORAGE_CLASSES, storage_cls
    return pb.PoolHandle(
        size=list(size),
        stride=list(stride),
        storage_offset=offset,
        dtype=dtype_to_pb(dtype),
        device_index=device,
        storage_handle=handle,
        storage_size_bytes=storage_size_bytes,
        storage_offset_bytes=storage_offset_bytes,
        ref_counter_handle=ref_counter_handle,
        ref_counter_offset=ref_counter_offset,
        event_handle=event_handle or b"",
        event_sync_required=event_sync_required,
        storage_class=storage_cls.__name__,
    )


def open_pool(h: pb.PoolHandle) -> torch.Tensor:
    """The decode side's pool tensor, mapped into this process (on the decode GPU)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if h.storage_class not in _STORAGE_CLASSES:
        raise GpuPathUnavailable(f"unknown storage class {h.storage_class!r}")
    return rebuild_cuda_tensor(
        torch.Tensor,
        tuple(h.size),
        tuple(h.stride),
        h.storage_offset,
        _STORAGE_CLASSES[h.storage_class],
        dtype_from_pb(h.dtype),
        h.device_index,
        h.storage_handle,
        h.storage_size_bytes,
        h.storage_offset_bytes,
        False,
        h.ref_counter_handle,
        h.ref_counter_offset,
        h.event_handle or None,
        h.event_sync_required,
    )


def layer_digests(
    cache_tensor: torch.Tensor, layers: range, block_ids: Sequence[int], first_index: int
) -> torch.Tensor:
    """Digest per layer in `layers` of the blocks block_ids, which sit at table indices
    first_index, first_index + 1, ...: int64 [len(layers)] on the pool's device.

    Runs on the current stream; reads the pool in place (one strided view per run of
    consecutive ids), no copy of the blocks.
    """
    out = torch.zeros(len(layers), dtype=torch.int64, device=cache_tensor.device)
    i = first_index
    for start, n in block_runs(block_ids):
        words = cache_tensor[layers.start : layers.stop, :, start : start + n].view(torch.int16)
        sums = words.sum(dim=(3, 4, 5), dtype=torch.int64)  # [l, 2, n]
        idx = torch.arange(i, i + n, dtype=torch.int64, device=out.device)
        weights = 2 * idx[None, :] + torch.arange(2, device=out.device)[:, None] + 1  # [2, n]
        out += (sums * weights).sum(dim=(1, 2))
        i += n
    return out


@dataclass(frozen=True)
class PitchedCopy:
    """One cudaMemcpy2DAsync: `height` rows of `width` bytes, row r at offset + r * pitch."""

    src_offset: int  # bytes from the start of the local (prefill) pool
    src_pitch: int
    dst_offset: int  # bytes from the start of the remote (decode) pool
    dst_pitch: int
    width: int
    height: int


def plan_copies(
    layers: range,
    runs: Sequence[tuple[int, int, int]],
    local_num_blocks: int,
    remote_num_blocks: int,
    half_block_bytes: int,
    max_pitch: int,
) -> list[PitchedCopy]:
    """The copies that move `runs` (src_start, dst_start, length) of every layer in `layers`.

    Pool layout [L, 2, N, bs, Hkv, D], C order: the K (or V) rows of k consecutive blocks of
    one layer are k * half_block_bytes contiguous bytes, and the (layer, half) pairs follow
    each other N * half_block_bytes apart:

        row (l, h) of run (s, d, k):  src  (2l + h) * N_local  * half + s * half
                                      dst  (2l + h) * N_remote * half + d * half

    so a run over layers [l0, l1) is one pitched copy of 2 * (l1 - l0) rows. If a pitch is
    above the device's limit (pools of about 2 GB per (layer, half)), one copy per row.
    """
    src_pitch = local_num_blocks * half_block_bytes
    dst_pitch = remote_num_blocks * half_block_bytes
    first_row, num_rows = 2 * layers.start, 2 * len(layers)
    copies = []
    for s, d, k in runs:
        if src_pitch <= max_pitch and dst_pitch <= max_pitch:
            rows = [(first_row, num_rows)]
        else:
            rows = [(r, 1) for r in range(first_row, first_row + num_rows)]
        for row, height in rows:
            copies.append(
                PitchedCopy(
                    src_offset=row * src_pitch + s * half_block_bytes,
                    src_pitch=src_pitch,
                    dst_offset=row * dst_pitch + d * half_block_bytes,
                    dst_pitch=dst_pitch,
                    width=k * half_block_bytes,
                    height=height,
                )
            )
    return copies


def issue_copies(
    runtime: CudaRuntime, copies: Sequence[PitchedCopy], src_base: int, dst_base: int, stream: int
) -> None:
    """Queue `copies` between two pools whose first bytes are at src_base and dst_base."""
    for c in copies:
        runtime.memcpy_2d_async(
            dst_base + c.dst_offset,
            c.dst_pitch,
            src_base + c.src_offset,
            c.src_pitch,
            c.width,
            c.height,
            stream,
        )


def contiguous_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split a block mapping into (src_start, dst_start, length) runs contiguous on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


class CudaIpcTransport(KVTransport):
    kind = TransportKind.CUDA_IPC
    rpc_transport = pb.TRANSPORT_CUDA_IPC

    def __init__(
        self, client: KVTransferClient, pool: KVPool, remote: torch.Tensor, runtime: CudaRuntime
    ) -> None:
        """remote: the decode pool as mapped here; it must stay referenced (the mapping lives
        as long as the tensor's storage)."""
        assert remote.dtype == pool.dtype and remote.is_contiguous()
        assert remote.shape[:2] == pool.cache.shape[:2] and remote.shape[3:] == pool.cache.shape[3:]
        self.client = client
        self.pool = pool
        self.remote = remote  # [L, 2, remote_blocks, bs, Hkv, D] on the decode GPU
        self.runtime = runtime
        self.local_device = pool.cache.device
        self.remote_device = remote.device
        self.half_block_bytes = pool.layer_block_bytes // 2
        with torch.cuda.device(self.remote_device):
            if self.remote_device != self.local_device:
                runtime.enable_peer_access(self.local_device.index)
            self.max_pitch = runtime.max_pitch(self.remote_device.index)
        self.copy_stream = torch.cuda.Stream(self.remote_device)  # copies are pulled
        self.digest_stream = torch.cuda.Stream(self.local_device)

    @classmethod
    def connect(cls, client: KVTransferClient, pool: KVPool) -> CudaIpcTransport:
        if pool.device.type != "cuda":
            raise GpuPathUnavailable("the local KV pool is not on a GPU")
        try:
            handle = client.open_pool(host_id(), KVLayout.of_pool(pool))
        except grpc.RpcError as e:
            raise GpuPathUnavailable(f"{e.code().name}: {e.details()}") from e
        try:
            remote = open_pool(handle)
        except RuntimeError as e:  # CUDA refused the handle (other host, no P2P)
            raise GpuPathUnavailable(f"cannot open the remote pool: {e}") from e
        try:
            runtime = cuda_runtime()
        except CudaRuntimeUnavailable as e:
            raise GpuPathUnavailable(str(e)) from e
        local, peer = pool.cache.device.index, remote.device.index  # pool.device may lack one
        if local != peer and not torch.cuda.can_device_access_peer(peer, local):
            raise GpuPathUnavailable(f"cuda:{peer} cannot reach cuda:{local} peer to peer")
        return cls(client, pool, remote, runtime)

    def open(self, reservation: RemoteReservation) -> TransferSession:
        return _IpcSession(self, reservation)

    def enqueue_copies(
        self, layers: range, local_block_ids: Sequence[int], remote_block_ids: Sequence[int]
    ) -> int:
        """Queue the copies on copy_stream (the caller made it wait for the data); returns
        how many calls were made. Cost: one cudaMemcpy2DAsync per run of blocks."""
        runs = contiguous_runs(local_block_ids, remote_block_ids)
        copies = plan_copies(
            layers,
            runs,
            self.pool.num_blocks,
            self.remote.shape[2],
            self.half_block_bytes,
            self.max_pitch,
        )
        with torch.cuda.device(self.remote_device):
            issue_copies(
                self.runtime,
                copies,
                self.pool.cache.data_ptr(),
                self.remote.data_ptr(),
                self.copy_stream.cuda_stream,
            )
        return len(copies)


class _IpcSession(TransferSession):
    def __init__(self, transport: CudaIpcTransport, reservation: RemoteReservation) -> None:
        self._t = transport
        self._dst = reservation.block_ids
        with torch.cuda.stream(transport.digest_stream):  # allocated for the digest stream
            self._digests = torch.zeros(
                transport.pool.num_layers, dtype=torch.int64, device=transport.local_device
            )
        self._num_bytes = 0
        self._num_copies = 0
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
        current stream of the prefill GPU (the compute that wrote them)."""
        t = self._t
        if self._aborted:
            raise TransferError("send on an aborted session")
        if not self._num_copies:
            self._first_send_s = time.perf_counter()
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(t.local_device))
        dst = self._dst[first_block : first_block + len(local_block_ids)]
        t.copy_stream.wait_event(ready)
        self._num_copies += t.enqueue_copies(layers, local_block_ids, dst)
        t.digest_stream.wait_event(ready)
        with torch.cuda.stream(t.digest_stream):
            sums = layer_digests(t.pool.cache, layers, local_block_ids, first_block)
            self._digests[layers.start : layers.stop] += sums
        self._num_bytes += len(local_block_ids) * t.pool.layer_block_bytes * len(layers)

    def _record_done(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        copied, digested = torch.cuda.Event(), torch.cuda.Event()
        copied.record(self._t.copy_stream)
        digested.record(self._t.digest_stream)
        return copied, digested

    def finish(self, timeout_s: float) -> SentBytes:
        copied, digested = self._record_done()
        start_s = time.monotonic()
        while not (copied.query() and digested.query()):  # a polling wait that can time out
            waited_s = time.monotonic() - start_s
            if waited_s > timeout_s:
                # The copies cannot be recalled; the caller aborts the reservation.
                raise TransferError(f"GPU copy not done after {timeout_s:.1f} s")
            if waited_s > _SPIN_S:
                time.sleep(50e-6)
        with torch.cuda.stream(self._t.digest_stream):
            digests = self._digests.tolist()
        return SentBytes(self._num_bytes, self._num_copies, self._first_send_s, tuple(digests))

    def abort(self) -> None:
        """Stop; returns once the copies already queued are done (see the module doc)."""
        self._aborted = True
        copied, digested = self._record_done()
        copied.synchronize()
        digested.synchronize()
