"""Paged attention on the GPU: Triton kernels that read K/V through the block table.

Two kernels, both out-of-place with an optional `out=`, both CUDA-graph capturable (no host
sync, no `.item()`, every grid a function of tensor shapes only):

- `paged_decode_attention`: one query token per sequence. One program owns one
  (sequence, kv head) pair and all `Hq // Hkv` query heads of that GQA group, so each K/V
  byte is read once. When `B * Hkv` programs cannot fill the GPU (batch 1), the context is
  cut into `num_splits` slices (flash-decoding): each slice writes a partial output and its
  log-sum-exp, and a small reduce kernel merges them.
- `paged_prefill_attention`: a packed batch of prefill chunks (varlen, causal, the query
  tokens are the last `query_len` positions of each sequence). One program owns a
  `BLOCK_M` tile of one sequence's queries for one q head and walks K/V in `BLOCK_N` tiles
  up to the tile's last query position; tiles wholly below the diagonal skip the mask,
  tiles wholly above it are never visited.

Both walk the paged cache the same way (block_size 16 shown, BLOCK_N = 64):

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
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_MAX_DECODE_SPLITS = 64


def _patch_interpreter() -> None:
    """Two gaps in Triton 3.6's CPU interpreter, patched when TRITON_INTERPRET=1
    (CPU correctness runs only; never on the GPU path).

    - A loaded scalar is a 1-element array, and `int(array)` (used for loop bounds read
      from memory) is refused by NumPy >= 2.4: index through the single element instead.
    - `tl.dot` on bf16 operands multiplies their raw uint16 storage: upcast to fp32 first.
    """
    import numpy as np
    import triton.runtime.interpreter as interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched_tensor(tensor: type, scope: interpreter._LangPatchScope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def as_fp32(x: interpreter.TensorHandle) -> interpreter.TensorHandle:
        if x.dtype.scalar != tl.bfloat16:
            return x
        data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def patched_dot(self: object, a: object, b: object, d: object, *args: object) -> object:
        return create_dot(self, as_fp32(a), as_fp32(b), d, *args)

    interpreter._patch_lang_tensor = patched_tensor
    builder.create_dot = patched_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter()


# --------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------


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


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int) -> None:
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must share strides"
    assert k_cache.stride(-1) == 1 and k_cache.shape[-1] == head_dim
    assert head_dim & (head_dim - 1) == 0 and head_dim >= 16, "head_dim must be a power of 2"


# --------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------


# Integers that change from batch to batch are not specialized on (Triton would otherwise
# compile a variant per class of value: 1, a multiple of 16, other): a step of a new batch
# shape must not stall the engine for a compile. ModelRunner.warm_up compiles what is left
# (the constexpr variants) before serving.
@triton.jit(
    do_not_specialize=["num_splits", "stride_bt_b", "stride_po_b", "stride_po_h", "stride_po_s",
                       "stride_pl_b", "stride_pl_h"],
)  # fmt: skip
def _paged_decode_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [num_blocks, block_size, Hkv, D]
    v_ptr,  # same shape and strides as k
    block_tables_ptr,  # [B, max_blocks_per_seq] int32
    context_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, D]; written when SPLIT is False
    part_out_ptr,  # [B, Hq, num_splits, D] fp32; written when SPLIT is True
    part_lse_ptr,  # [B, Hq, num_splits] fp32 (base 2)
    qk_scale,
    num_splits,
    stride_q_b,
    stride_q_h,
    stride_c_block,
    stride_c_tok,
    stride_c_head,
    stride_bt_b,
    stride_o_b,
    stride_o_h,
    stride_po_b,
    stride_po_h,
    stride_po_s,
    stride_pl_b,
    stride_pl_h,
    GROUP: tl.constexpr,  # Hq // Hkv
    GROUP_PAD: tl.constexpr,  # max(16, next_pow2(GROUP)): tl.dot needs M >= 16
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    ctx_len = tl.load(context_lens_ptr + b)
    # Slices are whole tiles; later slices of a short sequence may be empty.
    tiles_per_split = tl.cdiv(tl.cdiv(ctx_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, ctx_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    q = tl.load(
        q_ptr + b * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :],
        mask=g_mask[:, None],
        other=0.0,
    )  # [GROUP_PAD, D]

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)

    bt_row = block_tables_ptr + b * stride_bt_b
    head_off = kv_head * stride_c_head
    # Cost per (sequence, kv head): (end - start) * D * itemsize bytes of K and of V, each
    # read once; 4 * GROUP_PAD * D flops per token on the tensor cores.
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block_ids = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_mask, other=0)
        row_off = (
            block_ids.to(tl.int64) * stride_c_block + (offs_n % PAGE_SIZE) * stride_c_tok + head_off
        )
        kv_off = row_off[:, None] + offs_d[None, :]  # [BLOCK_N, D]
        k = tl.load(k_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=n_mask[:, None], other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty slice (or context_len 0, a padded batch row) leaves l_i = 0: write zeros.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    if SPLIT:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        po = part_out_ptr + b * stride_po_b + heads[:, None] * stride_po_h + split * stride_po_s
        tl.store(po + offs_d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_lse_ptr + b * stride_pl_b + heads * stride_pl_h + split, lse, mask=g_mask)
    else:
        o = out_ptr + b * stride_o_b + heads[:, None] * stride_o_h + offs_d[None, :]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


@triton.jit(
    do_not_specialize=["num_splits", "stride_po_b", "stride_po_h", "stride_po_s", "stride_pl_b",
                       "stride_pl_h"],
)  # fmt: skip
def _decode_reduce_kernel(
    part_out_ptr,  # [B, Hq, num_splits, D] fp32
    part_lse_ptr,  # [B, Hq, num_splits] fp32 (base 2)
    out_ptr,  # [B, Hq, D]
    num_splits,
    stride_po_b,
    stride_po_h,
    stride_po_s,
    stride_pl_b,
    stride_pl_h,
    stride_o_b,
    stride_o_h,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < num_splits
    lse = tl.load(
        part_lse_ptr + b * stride_pl_b + h * stride_pl_h + offs_s, mask=s_mask, other=float("-inf")
    )
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # empty slices weigh 0
    denom = tl.sum(w, 0)
    part = tl.load(
        part_out_ptr
        + b * stride_po_b
        + h * stride_po_h
        + offs_s[:, None] * stride_po_s
        + offs_d[None, :],
        mask=s_mask[:, None],
        other=0.0,
    )  # [SPLITS_PAD, D]
    acc = tl.sum(part * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + b * stride_o_b + h * stride_o_h + offs_d, acc.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged K/V.

    q: [B, Hq, D] (any strides, last dim contiguous); k_cache, v_cache: [num_blocks,
    block_size, Hkv, D]; block_tables: [B, max_blocks_per_seq] int32; context_lens: [B]
    int32, cached tokens including the current one (a row with 0 gets zeros).
    Returns out: [B, Hq, D] in q's dtype.

    Cost: reads sum(context_lens) * Hkv * D * 2 * itemsize bytes of K/V once each, one
    launch (plus a reduce launch and B * Hq * num_splits * (D + 1) * 4 bytes of partials
    when split). `config` overrides the shape-chosen launch (benchmarks, tests).
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    _check_cache(k_cache, v_cache, head_dim)
    assert q.stride(-1) == 1 and num_heads % num_kv_heads == 0
    assert block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1
    assert block_tables.shape[0] == batch and context_lens.shape == (batch,)
    assert context_lens.dtype == torch.int32 and context_lens.is_contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    if batch == 0:
        return out
    if config is None:
        config = choose_decode_config(
            batch,
            num_kv_heads,
            block_tables.shape[1],
            k_cache.shape[1],
            head_dim,
            q.dtype,
            q.device,
        )

    group = num_heads // num_kv_heads
    split = config.num_splits > 1
    if split:
        part_out = torch.empty(
            (batch, num_heads, config.num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(
            (batch, num_heads, config.num_splits), dtype=torch.float32, device=q.device
        )
    else:  # unused by the kernel; any fp32 tensor keeps the signature fixed
        part_out = out.new_empty((1, 1, 1, 1), dtype=torch.float32)
        part_lse = out.new_empty((1, 1, 1), dtype=torch.float32)

    grid = (batch, num_kv_heads, config.num_splits)
    _paged_decode_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_out,
        part_lse,
        scale * _LOG2E,
        config.num_splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[1],
        BLOCK_N=config.block_n,
        SPLIT=split,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split:
        _decode_reduce_kernel[(batch, num_heads)](
            part_out,
            part_lse,
            out,
            config.num_splits,
            part_out.stride(0),
            part_out.stride(1),
            part_out.stride(2),
            part_lse.stride(0),
            part_lse.stride(1),
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            SPLITS_PAD=max(2, triton.next_power_of_2(config.num_splits)),
            num_warps=4,
        )
    return out


# --------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["stride_bt_b"])  # the batch's block-table width
def _paged_prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [num_blocks, block_size, Hkv, D]
    v_ptr,
    block_tables_ptr,  # [B, max_blocks_per_seq] int32
    query_start_loc_ptr,  # [B+1] int32
    seq_lens_ptr,  # [B] int32: context + query tokens
    out_ptr,  # [T, Hq, D]
    qk_scale,
    stride_q_t,
    stride_q_h,
    stride_c_block,
    stride_c_tok,
    stride_c_head,
    stride_bt_b,
    stride_o_t,
    stride_o_h,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(0)
    b = tl.program_id(1)
    # Heaviest query tiles (furthest down the diagonal) are launched first.
    m_tile = tl.num_programs(2) - 1 - tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    m0 = m_tile * BLOCK_M
    if m0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len
    kv_head = head // GROUP

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    q = tl.load(
        q_ptr + (q_start + offs_m)[:, None] * stride_q_t + head * stride_q_h + offs_d[None, :],
        mask=m_mask[:, None],
        other=0.0,
    )  # [BLOCK_M, D]
    pos_m = ctx_len + offs_m  # absolute position of each query row

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    bt_row = block_tables_ptr + b * stride_bt_b
    head_off = kv_head * stride_c_head
    # Keys [0, full_end) are visible to every row of the tile: no mask. Keys
    # [full_end, hi) straddle the diagonal. Keys >= hi are above it for every row: skipped.
    hi = ctx_len + tl.minimum(m0 + BLOCK_M, q_len)
    full_end = ((ctx_len + m0 + 1) // BLOCK_N) * BLOCK_N

    # Cost per tile: hi * D * itemsize bytes of K and V (L2 serves the GROUP heads and the
    # other query tiles of a sequence), 4 * BLOCK_M * hi * D flops.
    for n0 in range(0, full_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        block_ids = tl.load(bt_row + offs_n // PAGE_SIZE)
        row_off = (
            block_ids.to(tl.int64) * stride_c_block + (offs_n % PAGE_SIZE) * stride_c_tok + head_off
        )
        kv_off = row_off[:, None] + offs_d[None, :]
        k = tl.load(k_ptr + kv_off)
        v = tl.load(v_ptr + kv_off)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    for n0 in range(full_end, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        block_ids = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_mask, other=0)
        row_off = (
            block_ids.to(tl.int64) * stride_c_block + (offs_n % PAGE_SIZE) * stride_c_tok + head_off
        )
        kv_off = row_off[:, None] + offs_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = (offs_n[None, :] <= pos_m[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o = out_ptr + (q_start + offs_m)[:, None] * stride_o_t + head * stride_o_h + offs_d[None, :]
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal varlen attention of packed prefill chunks over their paged K/V.

    q: [T, Hq, D] (sequences concatenated; any strides, last dim contiguous);
    query_start_loc: [B+1] int32; seq_lens: [B] int32 = context_len + query_len, the query
    tokens being each sequence's last query_len positions, whose K/V are already in the
    cache; max_query_len: host int >= every query_len (sizes the grid).
    Returns out: [T, Hq, D] in q's dtype.

    Cost: 4 * D * Hq * sum_b(q_len_b * ctx_b + q_len_b^2 / 2) flops; K/V bytes come from
    HBM about once per sequence (the query tiles and GQA heads of one sequence share L2).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    batch = seq_lens.shape[0]
    _check_cache(k_cache, v_cache, head_dim)
    assert q.stride(-1) == 1 and num_heads % num_kv_heads == 0
    assert block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1
    assert block_tables.shape[0] == batch and query_start_loc.shape == (batch + 1,)
    assert query_start_loc.dtype == torch.int32 and seq_lens.dtype == torch.int32
    assert query_start_loc.is_contiguous() and seq_lens.is_contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    if batch == 0 or num_tokens == 0 or max_query_len <= 0:
        return out
    if config is None:
        config = choose_prefill_config(max_query_len, head_dim, q.dtype)

    grid = (num_heads, batch, triton.cdiv(max_query_len, config.block_m))
    _paged_prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        out,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[1],
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def prefill_flops(query_lens: list[int], seq_lens: list[int], num_heads: int, head_dim: int) -> int:
    """Matmul flops of causal prefill (QK^T and PV), counting only visible (query, key) pairs."""
    pairs = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(query_lens, seq_lens, strict=True))
    return 4 * head_dim * num_heads * pairs


__all__ = [
    "DecodeConfig",
    "PrefillConfig",
    "choose_decode_config",
    "choose_prefill_config",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_flops",
]
