"""glibc malloc settings for a process that moves KV chunks over gRPC (opt-in).

gRPC Python hands each received message over as a new `bytes` (4 MiB for a KV chunk), and
the sender builds each chunk as a new `bytes` too. glibc serves blocks that large with mmap,
or, once it has raised its threshold, from a heap whose top it gives back to the OS when
more than twice that block is free; either way many messages land in fresh pages, each
page faulted in on first touch. On the 2-core CPU box (2026-11-27, alternating A/B runs of
`kv_transfer_bench --cpu`, 256 MB per trial) the receiving process took 50k to 180k page
faults per GB, for the bare gRPC stream as much as for the KV path; keeping freed memory
(`keep_freed_memory`, in both processes) brought them to ~0, the KV path from 0.45-0.51 to
0.55-0.64 GB/s and from 2.5-2.7 to 2.2-2.4 CPU-s/GB (sender and receiver together; means
of 6 to 8 runs per side, four A/Bs). The bare stream gains more (0.64-0.84 to 0.87-1.13
GB/s: the faults were most of what it pays beyond the socket), so the path's ratio to it
falls, 0.65-0.69 to 0.58-0.62.

It is not on by default: it changes allocation for the whole process, and freed memory up
to `trim_threshold_bytes` per malloc arena stays with the process instead of going back to
the OS. `cluster.kv_transfer.keep_freed_memory: true` turns it on in every worker, once, at
the start of its actor, before the engine and the KV-transfer threads allocate.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MAX_MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)


@dataclass(frozen=True)
class MallocSettings:
    # Blocks below this come from the heap, not mmap: above a KV chunk's message size.
    mmap_threshold_bytes: int = 16 * 2**20
    # Free memory at a heap's top kept before trimming: a few chunk streams' messages.
    trim_threshold_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        if not 0 < self.mmap_threshold_bytes <= _MAX_MMAP_THRESHOLD_BYTES:
            raise ValueError(
                f"mmap_threshold_bytes must be in (0, {_MAX_MMAP_THRESHOLD_BYTES}] "
                f"(glibc's limit), got {self.mmap_threshold_bytes}"
            )
        if self.trim_threshold_bytes <= 0:
            raise ValueError(f"trim_threshold_bytes must be > 0, got {self.trim_threshold_bytes}")


def keep_freed_memory(settings: MallocSettings | None = None) -> bool:
    """Apply `settings` to this process's malloc (every thread, from now on).

    Returns False, changing nothing, where the C library is not glibc (no `mallopt`).
    Setting either threshold also turns off glibc's dynamic adjustment of both.
    """
    settings = settings or MallocSettings()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok = libc.mallopt(_M_MMAP_THRESHOLD, settings.mmap_threshold_bytes) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, settings.trim_threshold_bytes) == 1 and ok
    assert ok, "mallopt refused settings that MallocSettings checked"
    return True
