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

Here: the transport, what it holds for its sessions (the mapping, the send stream, the
cached launches, the slot pool) and its choice of copy mode (ipc_copy_mode.py; MEMCPY is
the copy-engine fallback). A request's session and its host cost: ipc_session.py; the
slots it stages ids and digests in: ipc_slots.py.

Integrity: both pools' layouts are checked at the handshake, Reserve names the exact
destination blocks, and Commit carries one digest per layer (ipc_plan.layer_digests), which
the decode side recomputes over what landed with the same kernel (one read at HBM speed).
A full xxh3 would need the bytes on the host, which costs more than the copy.

Processes must see the same GPU numbering: under Ray set
RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 and `torch.cuda.set_device` per actor.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import torch

from engine.kv_pool import KVPool
from kv_transfer.client import KVTransferClient, RemoteReservation
from kv_transfer.cuda_runtime import CudaRuntime, CudaRuntimeUnavailable, cuda_runtime
from kv_transfer.ipc_copy_mode import (
    COPY_MODE_ENV,  # noqa: F401  (callers import it from here)
    CopyMode,
    copy_mode_from_env,
)
from kv_transfer.ipc_handle import GpuPathUnavailable, RemotePool, host_id, open_pool
from kv_transfer.ipc_plan import layer_digests  # noqa: F401  (callers import it from here)
from kv_transfer.ipc_session import IpcSession
from kv_transfer.ipc_slots import SlotPool
from kv_transfer.layout import KVLayout
from kv_transfer.transport import KVTransport, TransferError, TransferSession, TransportKind
from protos import kv_transfer_pb2 as pb


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
            self.slots = SlotPool(runtime, self.local_device, pool.num_layers, num_ready=4)
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
        return IpcSession(self, reservation)

    def close(self) -> None:
        """Unmap the decode pool once the sends queued so far are done."""
        if self._closed:
            return
        self._closed = True
        self.stream.synchronize()
        with torch.cuda.device(self.local_device):
            self.slots.close()
            self.runtime.ipc_close_mem_handle(self.remote.base)
