"""The few CUDA runtime calls the same-host GPU path needs that torch does not expose.

`torch.Tensor.copy_` moves one contiguous range per call and, across devices, adds two
events per call; a request's KV in our pool layout is 2 x num_layers ranges per run of
blocks. One `cudaMemcpy2DAsync` moves all of them at once (rows = (layer, K/V) pairs, the
pitch = the pool's stride between them), so a 1k-token request is one call instead of 64.

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
_CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED = 704
_CUDA_MEMCPY_DEFAULT = 4  # direction inferred from the pointers (unified addressing)
_CUDA_DEV_ATTR_MAX_PITCH = 11


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

    def enable_peer_access(self, peer_device: int) -> None:
        """Let the current device's kernels and copy engines reach peer_device's memory."""
        err = self._enable_peer(peer_device, 0)
        if err == _CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED:
            self._last_error()
            return
        self._check(err, f"cudaDeviceEnablePeerAccess({peer_device})")

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
