"""Paged decode attention on the GPU: a Triton kernel that reads K/V through the block table.

`paged_decode_attention`: one query token per sequence. One program owns one
(sequence, kv head) pair and all `Hq // Hkv` query heads of that GQA group, so each K/V
byte is read once. When `B * Hkv` programs cannot fill the GPU (batch 1), the context is
cut into `num_splits` slices (flash-decoding): each slice writes a partial output and its
log-sum-exp, and a small reduce kernel merges them.

Out-of-place with an optional `out=`, CUDA-graph capturable (no host sync, no `.item()`,
every grid a function of tensor shapes only). The cache walk, the base-2 softmax and the
launch-shape table it shares with prefill: triton_attention_config.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import engine.triton_interpreter  # noqa: F401  (patches the interpreter when interpreting)
from engine.triton_attention_config import (
    LOG2E,
    DecodeConfig,
    check_cache,
    choose_decode_config,
    dot_precision,
)


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
    check_cache(k_cache, v_cache, head_dim)
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
        scale * LOG2E,
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
        DOT_PRECISION=dot_precision(q.dtype),
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


__all__ = ["paged_decode_attention"]
