"""What a transfer sees of a KV pool: its `KVLayout` (with the proto's dtype enum), and one
layer's blocks as bytes, read out for sending (`kv_buffers`) and written in on receipt
(`write_kv`).

A run of consecutive block ids is one contiguous slice of a layer's K (or V) rows, so a CPU
pool's blocks are read as zero-copy views, one per half and run (a GPU pool's with one gather
and one copy to the host), and any pool's are written with one slice copy per half and run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.kv_pool import KVPool
from kv_transfer.chunk_error import ChunkError, ChunkErrorKind
from protos import kv_transfer_pb2 as pb

_DTYPE_TO_PB = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float16: pb.DTYPE_FLOAT16,
}
_PB_TO_DTYPE = {v: k for k, v in _DTYPE_TO_PB.items()}


def dtype_to_pb(dtype: torch.dtype) -> int:
    if dtype not in _DTYPE_TO_PB:
        raise ValueError(f"KV dtype {dtype} cannot be transferred; use float32, bfloat16, float16")
    return _DTYPE_TO_PB[dtype]


def dtype_from_pb(value: int) -> torch.dtype:
    if value not in _PB_TO_DTYPE:
        raise ChunkError(ChunkErrorKind.BAD_LAYOUT, f"unknown dtype enum {value}")
    return _PB_TO_DTYPE[value]


@dataclass(frozen=True)
class KVLayout:
    """Shape of a worker's KV pool as far as a transfer is concerned."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of_pool(cls, pool: KVPool) -> KVLayout:
        return cls(pool.num_layers, pool.block_size, pool.num_kv_heads, pool.head_dim, pool.dtype)

    @classmethod
    def from_pb(cls, msg: pb.KVLayout) -> KVLayout:
        return cls(
            msg.num_layers, msg.block_size, msg.num_kv_heads, msg.head_dim, dtype_from_pb(msg.dtype)
        )

    def to_pb(self) -> pb.KVLayout:
        return pb.KVLayout(
            num_layers=self.num_layers,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=dtype_to_pb(self.dtype),
        )

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def layer_block_bytes(self) -> int:
        """K and V of one block of one layer."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    def blocks_per_chunk(self, max_chunk_bytes: int) -> int:
        return max(1, max_chunk_bytes // self.layer_block_bytes)


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """(start, length) of the runs of consecutive ids, in order."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def kv_buffers(pool: KVPool, layer_idx: int, block_ids: Sequence[int]) -> list[memoryview]:
    """K then V of `block_ids` in one layer as flat byte views, in block-table order.

    CPU pool: one zero-copy view per half and run of consecutive blocks (the pool's rows of a
    run are contiguous); the caller must keep the blocks unchanged while it uses the views.
    GPU pool: one gather and one device-to-host copy into a single buffer.
    """
    if pool.device.type != "cpu":
        kv = pool.read_blocks(layer_idx, block_ids).cpu()  # [2, n, bs, Hkv, D]
        return [_byte_view(kv)]
    runs = block_runs(block_ids)
    return [
        _byte_view(pool.cache[layer_idx, half, start : start + n])  # [n, bs, Hkv, D], contiguous
        for half in (0, 1)
        for start, n in runs
    ]


def _byte_view(t: torch.Tensor) -> memoryview:
    assert t.is_contiguous() and t.device.type == "cpu"
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_kv(pool: KVPool, layer_idx: int, block_ids: Sequence[int], kv: torch.Tensor) -> None:
    """`pool.write_blocks` for kv [2, n, bs, Hkv, D], one slice copy per run and half."""
    expected = (2, len(block_ids), *pool.block_shape)
    if tuple(kv.shape) != expected or kv.dtype != pool.dtype:
        raise ValueError(f"KV data {tuple(kv.shape)} {kv.dtype}, expected {expected} {pool.dtype}")
    if max(block_ids) >= pool.num_blocks or min(block_ids) < 0:
        raise ValueError(f"block ids out of range [0, {pool.num_blocks})")
    i = 0
    for start, n in block_runs(block_ids):
        for half in (0, 1):
            pool.cache[layer_idx, half, start : start + n].copy_(kv[half, i : i + n])
        i += n
