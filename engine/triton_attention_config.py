"""What the paged attention kernels share: the cache walk, the softmax, the launch shapes.

Both kernels (triton_decode_attention.py, triton_prefill_attention.py) walk the paged cache
the same way (block_size 16 shown, BLOCK_N = 64):

    token n of sequence b  ->  block_tables[b, n // block_size], row n % block_size
    BLOCK_N tile [n0, n0+64) ->  4 block-table entries, gathered row by row

    k_cache / v_cache: [num_blocks, block_size, Hkv, D], last dim contiguous; a row of one
    kv head is D * itemsize bytes (256 B at D = 128, bf16), the unit of every load.

Positions at or beyond a sequence's length are never loaded (masked loads), so block-table
padding entries and the unused tail of a sequence's last block are never read.

Softmax is online, in fp32, in base 2 (`qk_scale = scale * log2(e)`, `exp2`). fp32 inputs
use IEEE fp32 dots (no tf32), so fp32 results carry no tf32 rounding.

Launch shapes come from a small table keyed on shapes (`choose_decode_config`,
`choose_prefill_config`), not from `triton.autotune`: a captured graph replays one launch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

LOG2E = 1.4426950408889634
_MAX_DECODE_SPLITS = 64


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode kernel.

    block_n: context tokens per inner-loop tile, a power of two; its rows are gathered
    through the block table one by one, so it need not match block_size. num_splits:
    context slices per (sequence, kv head); 1 writes `out` directly, more adds fp32
    partial buffers and a reduce launch.
    """

    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int

    def __post_init__(self) -> None:
        assert self.block_n >= 16 and self.block_n & (self.block_n - 1) == 0, self
        assert 1 <= self.num_splits <= _MAX_DECODE_SPLITS, self


@dataclass(frozen=True)
class PrefillConfig:
    """Launch shape of the prefill kernel: a BLOCK_M x BLOCK_N (queries x keys) tile."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for n in (self.block_m, self.block_n):
            assert n >= 16 and n & (n - 1) == 0, self


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # TRITON_INTERPRET on CPU tensors: any small number exercises split-K


def choose_decode_config(
    batch: int,
    num_kv_heads: int,
    max_blocks_per_seq: int,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> DecodeConfig:
    """Pick the decode launch from shapes alone (never from context_lens values).

    Split-K only when B * Hkv programs would leave SMs idle; then enough slices for about
    two programs per SM, at most one slice per tile. Measured on H100 (Llama-3-8B shape,
    bf16, see loadtest/attention_bench.py): batch 64 at 1k context reads K/V at 95% of the
    copy bandwidth with one slice; batch 1 at 1k is launch-bound (7.6 us with 16 slices,
    8.9 us with 8).
    """
    wide = dtype.itemsize >= 4 or head_dim > 128
    block_n = 32 if wide else 64  # keeps 3 stages of fp32 (or D > 128) K/V tiles in smem
    num_sms = _num_sms(device)
    programs = batch * num_kv_heads
    max_tiles = triton.cdiv(max_blocks_per_seq * block_size, block_n)
    num_splits = 1
    if programs < num_sms:
        num_splits = min(triton.cdiv(2 * num_sms, programs), max_tiles, _MAX_DECODE_SPLITS)
    return DecodeConfig(block_n=block_n, num_warps=4, num_stages=3, num_splits=num_splits)


def choose_prefill_config(max_query_len: int, head_dim: int, dtype: torch.dtype) -> PrefillConfig:
    """Pick the prefill tile from shapes: short chunks get a short query tile.

    On H100 (one 2048-token sequence, 32/8 heads, D 128, bf16, two runs of the sweep in
    loadtest/attention_bench.py) the 128x32 tile with 4 warps and 4 stages ran at 1.3-1.5x
    torch SDPA flash and was the fastest or within 15% of it, in 96 KB of shared memory;
    no other variant did better in both runs. fp32 takes a smaller tile to fit.
    """
    if dtype.itemsize >= 4:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if max_query_len <= 64:
        return PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    if head_dim <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    return PrefillConfig(block_m=128, block_n=32, num_warps=4, num_stages=4)


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int) -> None:
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must share strides"
    assert k_cache.stride(-1) == 1 and k_cache.shape[-1] == head_dim
    assert head_dim & (head_dim - 1) == 0 and head_dim >= 16, "head_dim must be a power of 2"


__all__ = [
    "DecodeConfig",
    "PrefillConfig",
    "choose_decode_config",
    "choose_prefill_config",
]
