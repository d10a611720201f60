"""Paged prefill attention on the GPU: a Triton kernel that reads K/V through the block table.

`paged_prefill_attention`: a packed batch of prefill chunks (varlen, causal, the query
tokens are the last `query_len` positions of each sequence). One program owns a
`BLOCK_M` tile of one sequence's queries for one q head and walks K/V in `BLOCK_N` tiles
up to the tile's last query position; tiles wholly below the diagonal skip the mask,
tiles wholly above it are never visited. `prefill_flops` counts what that computes.

Out-of-place with an optional `out=`, CUDA-graph capturable (no host sync, no `.item()`,
the grid a function of tensor shapes and the host int `max_query_len` only). The cache
walk, the base-2 softmax and the launch-shape table it shares with decode:
triton_attention_config.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import engine.triton_interpreter  # noqa: F401  (patches the interpreter when interpreting)
from engine.triton_attention_config import (
    LOG2E,
    PrefillConfig,
    check_cache,
    choose_prefill_config,
    dot_precision,
)


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
    check_cache(k_cache, v_cache, head_dim)
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
        scale * LOG2E,
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
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def prefill_flops(query_lens: list[int], seq_lens: list[int], num_heads: int, head_dim: int) -> int:
    """Matmul flops of causal prefill (QK^T and PV), counting only visible (query, key) pairs."""
    pairs = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(query_lens, seq_lens, strict=True))
    return 4 * head_dim * num_heads * pairs


__all__ = ["paged_prefill_attention", "prefill_flops"]
