"""The few CUDA runtime calls the same-host GPU path needs that torch does not expose.

- `cudaIpcOpenMemHandle` / `cudaIpcCloseMemHandle`: map the decode pool into the context of
  the *prefill* GPU (torch's own `rebuild_cuda_tensor` maps it on the GPU that owns it only,
  where a kernel of the prefill GPU cannot reach it).
- `cudaMemcpy2DAsync`: the copy-engine fallback (`CopyMode.MEMCPY`). `torch.Tensor.copy_`
  moves one contiguous range per call and, across devices, adds two events per call; one
  pitched copy moves a run of blocks in every (layer, K/V) row at once.
- `cudaMemcpyAsync`: the block ids (and zeroed digests) up and the digests down, on a
  given stream, without entering torch's stream context (~15 us a time in Python).
- `cudaEvent{Create,Record,Query,Synchronize}`, `cudaStreamWaitEvent`: the GPU path's
  per-request events as raw handles. torch's `Event` costs a Python object, a method
  dispatch and (for `current_stream()`) a Stream object per call; these are one ctypes call
  each (~1 us).

The functions are called through ctypes on the CUDA runtime library that torch has already
loaded (found in /proc/self/maps), so the calls share torch's runtime state: its streams,
its devices, and its per-thread last error, which is why a failed call clears it
(`cudaGetLastError`) before raising: torch would otherwise report the stale error at its
next kernel launch.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
from collections.abc import Iterable
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

_CUDA_SUCCESS = 0
_CUDA_ERROR_NOT_READY = 600
_CUDA_EVENT_DISABLE_TIMING = 2
_CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED = 704
_CUDA_MEMCPY_HOST_TO_DEVICE = 1
_CUDA_MEMCPY_DEFAULT = 4  # direction inferred from the pointers (unified addressing)
_CUDA_DEV_ATTR_MAX_PITCH = 11
_CUDA_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1  # map into this device's context, peer access on
CUDA_IPC_HANDLE_SIZE = 64


class _IpcMemHandle(ctypes.Structure):
    """cudaIpcMemHandle_t: 64 opaque bytes, passed by value."""

    _fields_ = [("reserved", ctypes.c_char * CUDA_IPC_HANDLE_SIZE)]


class CudaRuntimeUnavailable(Exception):
    """No CUDA runtime library could be loaded in this process."""


def find_cudart(maps_lines: Iterable[str], search_dirs: Iterable[str]) -> str | None:
    """Path of the CUDA runtime library: the one already mapped into the process (torch's),
    else the first libcudart.so* in search_dirs."""
    for line in maps_lines:
        path = line.split()[-1] if line.strip() else ""
        if os.path.basename(path).startswith("libcudart.so"):
            return path
    for d in search_dirs:
        found = sorted(glob.glob(os.path.join(d, "libcudart.so*")), reverse=True)
        if found:
            return found[0]
    return None


def _search_dirs() -> list[str]:
    """Where pip's CUDA runtime wheels put the library (nvidia/cu13/lib, nvidia/cuda_runtime/lib)."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    return [d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", "lib"))]


class CudaRuntime:
    def __init__(self, path: str) -> None:
        self.path = path
        lib = ctypes.CDLL(path)
        c_int, c_size_t, c_void_p = ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p
        self._memcpy_2d = lib.cudaMemcpy2DAsync
        self._memcpy_2d.argtypes = [c_void_p, c_size_t, c_void_p, c_size_t, c_size_t, c_size_t,
                                    c_int, c_void_p]  # fmt: skip
        self._memcpy_2d.restype = c_int
        self._memcpy = lib.cudaMemcpyAsync
        self._memcpy.argtypes = [c_void_p, c_void_p, c_size_t, c_int, c_void_p]
        self._memcpy.restype = c_int
        self._enable_peer = lib.cudaDeviceEnablePeerAccess
        self._enable_peer.argtypes = [c_int, ctypes.c_uint]
        self._enable_peer.restype = c_int
        self._get_attr = lib.cudaDeviceGetAttribute
        self._get_attr.argtypes = [ctypes.POINTER(c_int), c_int, c_int]
        self._get_attr.restype = c_int
        self._ipc_open = lib.cudaIpcOpenMemHandle
        self._ipc_open.argtypes = [ctypes.POINTER(c_void_p), _IpcMemHandle, ctypes.c_uint]
        self._ipc_open.restype = c_int
        self._ipc_close = lib.cudaIpcCloseMemHandle
        self._ipc_close.argtypes = [c_void_p]
        self._ipc_close.restype = c_int
        self._event_create = lib.cudaEventCreateWithFlags
        self._event_create.argtypes = [ctypes.POINTER(c_void_p), ctypes.c_uint]
        self._event_create.restype = c_int
        self._event_destroy = lib.cudaEventDestroy
        self._event_destroy.argtypes = [c_void_p]
        self._event_destroy.restype = c_int
        self._event_record = lib.cudaEventRecord
        self._event_record.argtypes = [c_void_p, c_void_p]
        self._event_record.restype = c_int
        self._event_query = lib.cudaEventQuery
        self._event_query.argtypes = [c_void_p]
        self._event_query.restype = c_int
        self._event_sync = lib.cudaEventSynchronize
        self._event_sync.argtypes = [c_void_p]
        self._event_sync.restype = c_int
        self._stream_wait = lib.cudaStreamWaitEvent
        self._stream_wait.argtypes = [c_void_p, c_void_p, ctypes.c_uint]
        self._stream_wait.restype = c_int
        self._last_error = lib.cudaGetLastError
        self._last_error.restype = c_int
        self._error_name = lib.cudaGetErrorName
        self._error_name.argtypes = [c_int]
        self._error_name.restype = ctypes.c_char_p

    def _check(self, err: int, what: str) -> None:
        if err != _CUDA_SUCCESS:
            self._last_error()  # clear it: torch checks cudaGetLastError after its launches
            name = (self._error_name(err) or b"?").decode()
            raise RuntimeError(f"{what} failed: {name} ({err})")

    def memcpy_2d_async(
        self,
        dst: int,
        dst_pitch: int,
        src: int,
        src_pitch: int,
        width: int,
        height: int,
        stream: int,
    ) -> None:
        """`height` rows of `width` bytes; row i at src + i*src_pitch -> dst + i*dst_pitch.
        Called with the stream's device current."""
        if height == 1:  # no pitch limit applies to a single row
            err = self._memcpy(dst, src, width, _CUDA_MEMCPY_DEFAULT, stream)
        else:
            err = self._memcpy_2d(
                dst, dst_pitch, src, src_pitch, width, height, _CUDA_MEMCPY_DEFAULT, stream
            )
        self._check(err, f"cudaMemcpy2DAsync({width} x {height} bytes)")

    def memcpy_async(self, dst: int, src: int, num_bytes: int, stream: int) -> None:
        """Queue a copy of num_bytes (direction from the addresses: device or pinned host)."""
        err = self._memcpy(dst, src, num_bytes, _CUDA_MEMCPY_DEFAULT, stream)
        if err:
            self._check(err, f"cudaMemcpyAsync({num_bytes} bytes)")

    def upload_async(self, dst: int, src: int, num_bytes: int, stream: int) -> None:
        """Queue a copy of num_bytes of pageable host memory to the device. The driver stages
        the bytes before it returns (src may go at once) and may first wait for the work
        queued on `stream`: use a stream whose work never waits on anything else."""
        err = self._memcpy(dst, src, num_bytes, _CUDA_MEMCPY_HOST_TO_DEVICE, stream)
        self._check(err, f"cudaMemcpyAsync({num_bytes} bytes to the device)")

    # ---- events, as raw handles (ints); hot: no formatting unless a call failed -----------

    def event_create(self) -> int:
        """A new event of the *current* device, without timing (cheapest to record and query).
        Destroy it with event_destroy."""
        event = ctypes.c_void_p()
        self._check(self._event_create(ctypes.byref(event), _CUDA_EVENT_DISABLE_TIMING),
                    "cudaEventCreateWithFlags")  # fmt: skip
        assert event.value, "cudaEventCreateWithFlags returned a null event"
        return event.value

    def event_destroy(self, event: int) -> None:
        self._check(self._event_destroy(event), "cudaEventDestroy")

    def event_record(self, event: int, stream: int) -> None:
        """The event completes once the work queued on `stream` so far is done (the event
        and the stream belong to one device)."""
        err = self._event_record(event, stream)
        if err:
            self._check(err, "cudaEventRecord")

    def event_query(self, event: int) -> bool:
        """Whether the work the event was last recorded behind is done (never waits)."""
        err = self._event_query(event)
        if err == _CUDA_SUCCESS:
            return True
        if err == _CUDA_ERROR_NOT_READY:
            self._last_error()  # as torch's Event.query: "not ready" must not linger as an error
            return False
        self._check(err, "cudaEventQuery")
        return False  # not reached: _check raised

    def event_synchronize(self, event: int) -> None:
        """Wait (on the host) until the event completed."""
        self._check(self._event_sync(event), "cudaEventSynchronize")

    def stream_wait_event(self, stream: int, event: int) -> None:
        """Work queued on `stream` from now on waits for the event's current state."""
        err = self._stream_wait(stream, event, 0)
        if err:
            self._check(err, "cudaStreamWaitEvent")

    def enable_peer_access(self, peer_device: int) -> None:
        """Let the current device's kernels and copy engines reach peer_device's memory."""
        err = self._enable_peer(peer_device, 0)
        if err == _CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED:
            self._last_error()
            return
        self._check(err, f"cudaDeviceEnablePeerAccess({peer_device})")

    def ipc_open_mem_handle(self, handle: bytes) -> int:
        """Map another process's allocation (a raw 64-byte cudaIpcMemHandle_t) into the
        context of the *current* device; returns its base address there. Peer access from
        the current device to the owning one is enabled as needed (LazyEnablePeerAccess).
        Opening a handle the current context has open already returns the same address and
        counts one more reference (each open needs one close)."""
        assert len(handle) == CUDA_IPC_HANDLE_SIZE, len(handle)
        ptr = ctypes.c_void_p()
        raw = _IpcMemHandle.from_buffer_copy(handle)
        err = self._ipc_open(ctypes.byref(ptr), raw, _CUDA_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
        self._check(err, "cudaIpcOpenMemHandle")
        assert ptr.value, "cudaIpcOpenMemHandle returned a null address"
        return ptr.value

    def ipc_close_mem_handle(self, base: int) -> None:
        """Unmap what ipc_open_mem_handle returned (with the same device current)."""
        self._check(self._ipc_close(base), "cudaIpcCloseMemHandle")

    def max_pitch(self, device: int) -> int:
        value = ctypes.c_int()
        self._check(self._get_attr(ctypes.byref(value), _CUDA_DEV_ATTR_MAX_PITCH, device),
                    "cudaDeviceGetAttribute(MaxPitch)")  # fmt: skip
        return value.value


@cache
def cuda_runtime() -> CudaRuntime:
    """The process's CUDA runtime (call after torch initialised CUDA, so that torch's own
    library is the one found). Raises CudaRuntimeUnavailable."""
    maps = Path("/proc/self/maps")
    lines = maps.read_text().splitlines() if maps.exists() else []
    path = find_cudart(lines, _search_dirs())
    if path is None:
        raise CudaRuntimeUnavailable("no libcudart.so in the process or in the nvidia wheels")
    try:
        runtime = CudaRuntime(path)
    except (OSError, AttributeError) as e:
        raise CudaRuntimeUnavailable(f"cannot use {path}: {e}") from e
    log.info("CUDA runtime for peer copies: %s", path)
    return runtime
