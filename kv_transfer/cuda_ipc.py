"""The same-host GPU path: peer copies straight into the decode pool, opened by CUDA IPC.

Handshake (once per (prefill, decode) pair, over gRPC `OpenPool`): the decode side exports
its whole pool tensor with `torch.multiprocessing.reductions.reduce_tensor` and sends the
rebuild arguments field by field in a `PoolHandle` (ints, bytes, an allowlisted class name:
nothing is unpickled). The prefill side rebuilds the tensor; it lives on the decode GPU.

Per request, after Reserve (which names the decode block ids), each `send_layer` runs on a
side stream that waits on an event recorded on the compute stream, so layer i moves while
layer i+1 computes:

    remote[layer, :, d:d+k] <- local[layer, :, s:s+k]    one peer copy per run of blocks
                                                          contiguous on both sides

then `finish` waits for the side stream and Commit goes out over gRPC.

Integrity on this path: both pools' layouts are checked at the handshake, Reserve names the
exact destination blocks, and Commit carries one digest per layer (the int64 sum of the
sent blocks' 16-bit words), which the decode side recomputes over what landed. A full
xxh3 of the bytes would need them on the host, which costs more than the copy; the digest
costs one read of the bytes at HBM speed, on a second stream beside the copies, and catches
missing, misplaced or partial copies (not a deliberate forgery: the token covers that).

Processes must see the same GPU numbering: under Ray set
RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 and `torch.cuda.set_device` per actor.
"""

from __future__ import annotations

import enum
import socket
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import grpc
import torch

from engine.kv_pool import KVPool
from kv_transfer.client import KVTransferClient, RemoteReservation
from kv_transfer.transport import (
    KVTransport,
    SentBytes,
    TransferError,
    TransferSession,
    TransportKind,
)
from kv_transfer.wire import KVLayout, dtype_from_pb, dtype_to_pb
from protos import kv_transfer_pb2 as pb


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


def layer_digests(cache_tensor: torch.Tensor, block_ids: Sequence[int]) -> list[int]:
    """Per layer, the int64 sum of the 16-bit words of K and V of block_ids."""
    ids = torch.as_tensor(list(block_ids), dtype=torch.long, device=cache_tensor.device)
    blocks = cache_tensor.index_select(2, ids)  # [L, 2, n, bs, Hkv, D]
    words = blocks.reshape(blocks.shape[0], -1).view(torch.int16)
    return words.sum(dim=1, dtype=torch.int64).tolist()


def contiguous_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split a block mapping into (src_start, dst_start, length) runs contiguous on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def _words(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as 8-byte words when the rows allow it: fewer, wider P2P stores."""
    if (t.shape[-1] * t.element_size()) % 8 == 0:
        return t.view(torch.int64)
    return t


class CopyMode(enum.Enum):
    # K and V of each layer as one contiguous cudaMemcpyAsync per run (copy engines; the
    # way shared/gpu/README.md measured at the full link). The default.
    MEMCPY = "memcpy"
    # One strided copy kernel per run, launched on the prefill GPU and storing into the
    # IPC-mapped pool over P2P. On 2 x H200 (first GPU run) it hit "illegal memory access":
    # the IPC mapping is not usable from another device's kernels without peer access set
    # up for it. Kept to be measured once fixed; never picked by default.
    KERNEL = "kernel"


class CudaIpcTransport(KVTransport):
    kind = TransportKind.CUDA_IPC
    rpc_transport = pb.TRANSPORT_CUDA_IPC

    def __init__(
        self, client: KVTransferClient, pool: KVPool, remote: torch.Tensor, mode: CopyMode
    ) -> None:
        assert remote.shape[0] == pool.num_layers and remote.shape[3:] == pool.cache.shape[3:]
        self.client = client
        self.pool = pool
        self.remote = remote  # [L, 2, remote_blocks, bs, Hkv, D] on the decode GPU
        self.mode = mode
        self.copy_stream = torch.cuda.Stream(pool.device)
        self.digest_stream = torch.cuda.Stream(pool.device)

    @classmethod
    def connect(
        cls, client: KVTransferClient, pool: KVPool, mode: CopyMode = CopyMode.MEMCPY
    ) -> CudaIpcTransport:
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
        return cls(client, pool, remote, mode)

    def open(self, reservation: RemoteReservation) -> TransferSession:
        return _IpcSession(self, reservation)


class _IpcSession(TransferSession):
    def __init__(self, transport: CudaIpcTransport, reservation: RemoteReservation) -> None:
        self._t = transport
        self._dst = reservation.block_ids
        self._digests: dict[int, torch.Tensor] = {}  # layer -> int64 scalar on the local GPU
        self._num_bytes = 0
        self._num_copies = 0
        self._first_send_s = 0.0
        self._aborted = False

    @property
    def num_layers(self) -> int:
        return self._t.pool.num_layers

    def send_layer(self, layer_idx: int, first_block: int, local_block_ids: Sequence[int]) -> None:
        self._send(slice(layer_idx, layer_idx + 1), first_block, local_block_ids)

    def send_all_layers(self, first_block: int, local_block_ids: Sequence[int]) -> None:
        self._send(slice(0, self.num_layers), first_block, local_block_ids)

    def _send(self, layers: slice, first_block: int, local_block_ids: Sequence[int]) -> None:
        """Copy blocks of layers [layers] on the side stream, once the compute stream got here.

        Cost: per run of blocks contiguous on both sides, one copy kernel over P2P (KERNEL,
        viewed as 8-byte words) or two cudaMemcpyPeerAsync per layer (MEMCPY), plus one
        reduction for the digest on the second stream.
        """
        t = self._t
        if not self._num_copies:
            self._first_send_s = time.perf_counter()
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(t.pool.device))
        dst = self._dst[first_block : first_block + len(local_block_ids)]
        runs = contiguous_runs(local_block_ids, dst)
        local = t.pool.cache[layers]  # [l, 2, blocks, bs, Hkv, D]
        remote = t.remote[layers]
        t.copy_stream.wait_event(ready)
        with torch.cuda.stream(t.copy_stream):
            for s, d, k in runs:
                if t.mode is CopyMode.KERNEL:
                    _words(remote[:, :, d : d + k]).copy_(_words(local[:, :, s : s + k]))
                    self._num_copies += 1
                else:
                    for i in range(local.shape[0]):
                        for kv in (0, 1):
                            remote[i, kv, d : d + k].copy_(local[i, kv, s : s + k])
                            self._num_copies += 1
        t.digest_stream.wait_event(ready)
        with torch.cuda.stream(t.digest_stream):
            sums = None
            for s, _, k in runs:
                words = local[:, :, s : s + k].view(torch.int16)
                part = words.sum(dim=(1, 2, 3, 4, 5), dtype=torch.int64)  # [l]
                sums = part if sums is None else sums + part
            if sums is not None:
                for i, layer_idx in enumerate(range(*layers.indices(t.pool.num_layers))):
                    prev = self._digests.get(layer_idx)
                    self._digests[layer_idx] = sums[i] if prev is None else prev + sums[i]
        self._num_bytes += len(local_block_ids) * t.pool.layer_block_bytes * local.shape[0]

    def finish(self, timeout_s: float) -> SentBytes:
        t = self._t
        done = torch.cuda.Event()
        done.record(t.copy_stream)
        digested = torch.cuda.Event()
        digested.record(t.digest_stream)
        deadline_s = time.monotonic() + timeout_s
        while not (done.query() and digested.query()):
            if self._aborted or time.monotonic() > deadline_s:
                raise TransferError(f"GPU copy not done after {timeout_s:.1f} s")
            time.sleep(20e-6)
        layers = sorted(self._digests)
        digests = torch.stack([self._digests[i] for i in layers]).tolist() if layers else []
        return SentBytes(self._num_bytes, self._num_copies, self._first_send_s, tuple(digests))

    def abort(self) -> None:
        self._aborted = True
