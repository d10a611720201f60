"""What the same-host GPU path moves, without CUDA: the digest and the copy-engine plan.

- `layer_digests`: the per-layer digest that Commit carries and the decode side recomputes
  (definition in `layer_digests_torch`; on a CUDA pool one Triton launch, ipc_kernels.py).
- `contiguous_runs` / `plan_copies` / `issue_copies`: the copy-engine fallback
  (`CopyMode.MEMCPY`), one cudaMemcpy2DAsync per run of blocks contiguous on both sides. Its
  cost grows with fragmentation (a block table in descending order is one run per block),
  which is why the default path is one kernel launch per send instead.

All pure functions over pools and block ids: the CPU tests run them on CPU pools.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


def layer_digests_torch(
    cache: torch.Tensor, layers: range, block_ids: Sequence[int], first_index: int
) -> torch.Tensor:
    """Digest per layer in `layers` of the blocks block_ids, which sit at table indices
    first_index, first_index + 1, ...: int64 [len(layers)] on the pool's device.

    The sum over the blocks i and halves h (K=0, V=1) of (2i + h + 1) * (sum of the
    half-block's 16-bit words), in int64 (wrapping modulo 2**64 identically everywhere).
    Weights make a swapped or misplaced block count, not just a missing one. Gathers the
    blocks (one copy): the reference, and the path for CPU pools.
    """
    ids = torch.as_tensor(list(block_ids), dtype=torch.long, device=cache.device)
    blocks = cache[layers.start : layers.stop].index_select(2, ids)  # [l, 2, n, bs, Hkv, D]
    words = blocks.view(torch.int16).flatten(3)  # [l, 2, n, words]
    sums = words.sum(dim=3, dtype=torch.int64)  # [l, 2, n]
    idx = torch.arange(first_index, first_index + len(ids), dtype=torch.int64, device=ids.device)
    halves = torch.arange(2, dtype=torch.int64, device=ids.device)
    weights = 2 * idx[None, :] + halves[:, None] + 1  # [2, n]
    return (sums * weights).sum(dim=(1, 2))


def layer_digests(
    cache: torch.Tensor, layers: range, block_ids: Sequence[int], first_index: int
) -> torch.Tensor:
    """`layer_digests_torch`'s values; on a CUDA pool one kernel launch on the current
    stream that reads the blocks in place (ipc_kernels.cuda_layer_digests)."""
    if cache.device.type == "cuda":
        from kv_transfer.ipc_kernels import cuda_layer_digests  # needs triton: GPU only

        return cuda_layer_digests(cache, layers, block_ids, first_index)
    return layer_digests_torch(cache, layers, block_ids, first_index)


def contiguous_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split a block mapping into (src_start, dst_start, length) runs contiguous on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


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


class PitchedCopier(Protocol):
    def memcpy_2d_async(
        self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int,
        stream: int,
    ) -> None: ...  # fmt: skip


def issue_copies(
    runtime: PitchedCopier, copies: Sequence[PitchedCopy], src_base: int, dst_base: int,
    stream: int,
) -> None:  # fmt: skip
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
