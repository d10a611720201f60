"""The same-host GPU path's handshake: the decode pool's CUDA IPC handle, out and in.

The decode side exports its whole pool tensor with torch's `reduce_tensor` (`export_pool`)
and sends the handle field by field in a `PoolHandle` (ints, bytes, an allowlisted class
name: nothing is unpickled). The prefill side opens it itself (`open_pool`:
cudaIpcOpenMemHandle with LazyEnablePeerAccess while the *prefill* GPU is current), so the
decode pool becomes an address in the prefill GPU's context (`RemotePool`), which that
GPU's kernels and copy engines write over NVLink. torch's `rebuild_cuda_tensor` would map
it on the decode GPU only, where a prefill-GPU kernel faults ("illegal memory access"), and
this process never also opens it through torch. One consequence: torch's producer-side
reference count for the export is never released, so the decode process warns at exit
("Producer process has been terminated before all shared CUDA tensors released"); the
pool lives as long as that process anyway.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from kv_transfer.cuda_runtime import CUDA_IPC_HANDLE_SIZE, CudaRuntime
from kv_transfer.layout import dtype_from_pb, dtype_to_pb
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


@dataclass(frozen=True)
class RemotePool:
    """The decode pool, mapped into this process's context of the prefill GPU."""

    base: int  # what cudaIpcOpenMemHandle returned (unmapped by the transport's close)
    address: int  # the pool tensor's first byte
    shape: tuple[int, ...]  # [L, 2, N, bs, Hkv, D], C-contiguous
    dtype: torch.dtype
    device_index: int  # the GPU whose memory it is (the decode GPU)

    @property
    def num_blocks(self) -> int:
        return self.shape[2]


def ipc_handle_bytes(storage_handle: bytes) -> bytes:
    """The raw cudaIpcMemHandle_t in torch's storage handle: torch >= 2.5 prefixes a version
    byte and a type byte ('c': a cudaMalloc'd segment; 'e', an expandable segment, has no
    such handle); older torch sends the 64 bytes alone."""
    n = CUDA_IPC_HANDLE_SIZE
    if len(storage_handle) == n:
        return storage_handle
    if len(storage_handle) == n + 2 and storage_handle[1] == ord("c"):
        return storage_handle[2:]
    raise GpuPathUnavailable(
        f"the decode pool's storage handle ({len(storage_handle)} bytes, type "
        f"{storage_handle[1:2]!r}) is not a cudaMalloc segment's; unset "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments on the decode worker"
    )


def open_pool(h: pb.PoolHandle, runtime: CudaRuntime, device: torch.device) -> RemotePool:
    """Map the decode side's pool into `device`'s context (the prefill GPU)."""
    if h.storage_class not in _STORAGE_CLASSES:
        raise GpuPathUnavailable(f"unknown storage class {h.storage_class!r}")
    shape, dtype = tuple(h.size), dtype_from_pb(h.dtype)
    contiguous = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    if len(shape) != 6 or tuple(h.stride) != contiguous:
        raise GpuPathUnavailable(f"the decode pool is not a contiguous 6-d tensor: {h.size}")
    element_size = torch.empty((), dtype=dtype).element_size()
    if (h.storage_offset + math.prod(shape)) * element_size > h.storage_size_bytes:
        raise GpuPathUnavailable("the decode pool's handle is smaller than its tensor")
    raw = ipc_handle_bytes(h.storage_handle)
    with torch.cuda.device(device):
        try:
            base = runtime.ipc_open_mem_handle(raw)
        except RuntimeError as e:  # another host, no peer access, a stale handle
            raise GpuPathUnavailable(f"cannot open the remote pool: {e}") from e
    address = base + h.storage_offset_bytes + h.storage_offset * element_size
    return RemotePool(base, address, shape, dtype, h.device_index)
