"""Attention over the paged KV pool: the batch metadata and the backends behind one ABC.

A step's flat token batch is ordered prefill sequences first, then decoding sequences
(exactly one query token each):

    tokens:  [ p0 p0 p0 p0 | p1 p1 | d0 | d1 | d2 ]
    qsl:     0             4       6    7    8    9      (query_start_loc, [B+1])
    seq_lens:  ctx0 + 4      ctx1+2  L0   L1   L2         (tokens in the cache after this step)

Every backend first rotates q and k (rotary embeddings; on CUDA fused with the write) and
writes the step's new K/V into the pool at `slot_mapping`, then lets each query token attend
to all cached positions up to and including its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.kv_pool import KVPool

if TYPE_CHECKING:
    from engine.model import RotaryEmbedding


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: flat slot of each new token's K/V
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32: context + query tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32; padding entries are 0 and never read
    num_prefill_seqs: int
    num_prefill_tokens: int
    max_query_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]


class AttentionBackend(ABC):
    """Writes a layer's new K/V into the pool and computes attention for every query token."""

    def __init__(self, pool: KVPool, num_heads: int, head_dim: int) -> None:
        self.pool = pool
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def write_kv(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        # k, v: [T, Hkv, D] -> slots of the pool. Graph-capturable (no host sync).
        k_cache, v_cache = self.pool.layer(layer_idx)
        k_cache.view(-1, *k.shape[1:]).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, *v.shape[1:]).index_copy_(0, meta.slot_mapping, v)

    def rotate_and_write(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        rotary: RotaryEmbedding | None,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """Apply rotary embeddings (if given) and store k/v in the pool; returns q rotated."""
        if rotary is not None:
            assert positions is not None
            q, k = rotary(positions, q, k)
        self.write_kv(layer_idx, k, v, meta)
        return q

    @abstractmethod
    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        rotary: RotaryEmbedding | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> out [T, Hq, D]. With `rotary`, q and k are
        rotated by `positions` first (k as stored in the pool)."""


def gather_sequence_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the first seq_len tokens of one sequence, each [seq_len, Hkv, D]."""
    block_size = k_cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    ids = block_table[:num_blocks].long()
    k = k_cache.index_select(0, ids).flatten(0, 1)[:seq_len]
    v = v_cache.index_select(0, ids).flatten(0, 1)[:seq_len]
    return k, v


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of the last n positions of a sequence over all of it, plain torch.

    q: [n, Hq, D], k/v: [L, Hkv, D] with n <= L; query i sits at position L - n + i.
    Returns [n, Hq, D]. Cost: O(n * L) per head; the CPU path and the test oracle.
    """
    n, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [H, n, L]
    q_pos = torch.arange(seq_len - n, seq_len, device=q.device)[:, None]
    k_pos = torch.arange(seq_len, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.einsum("hqk,khd->qhd", probs, v)


class TorchReferenceBackend(AttentionBackend):
    """Plain torch, one sequence at a time, reading through the block table. Any device."""

    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        rotary: RotaryEmbedding | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = self.rotate_and_write(layer_idx, q, k, v, meta, rotary, positions)
        k_cache, v_cache = self.pool.layer(layer_idx)
        out = torch.empty_like(q)
        start = 0
        for b, (n, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
            ks, vs = gather_sequence_kv(k_cache, v_cache, meta.block_tables[b], seq_len)
            out[start : start + n] = reference_attention(q[start : start + n], ks, vs, self.scale)
            start += n
        return out


class TritonBackend(AttentionBackend):
    """CUDA: Triton kernels for paged prefill (varlen, causal) and paged decode.

    Decode-only steps are CUDA-graph capturable: the decode kernel's grid depends on shapes
    only and nothing here reads device values back to the host on that path.
    """

    def __init__(self, pool: KVPool, num_heads: int, head_dim: int) -> None:
        super().__init__(pool, num_heads, head_dim)
        # need triton: GPU machines only
        from engine import triton_ops
        from engine.triton_decode_attention import paged_decode_attention
        from engine.triton_prefill_attention import paged_prefill_attention

        self._prefill_attention = paged_prefill_attention
        self._decode_attention = paged_decode_attention
        self._ops = triton_ops

    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        rotary: RotaryEmbedding | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        k_cache, v_cache = self.pool.layer(layer_idx)
        if rotary is not None:
            assert positions is not None
            # One kernel: q rotated in place, k rotated and v stored into their slots.
            self._ops.rotary_and_cache_(
                q, k, v, positions, rotary.cos, rotary.sin, k_cache, v_cache, meta.slot_mapping
            )
        else:
            self.write_kv(layer_idx, k, v, meta)
        out = torch.empty_like(q)
        npt, nps = meta.num_prefill_tokens, meta.num_prefill_seqs
        if nps:
            # K/V were just written, so one paged kernel serves fresh prompts, chunks with
            # context and prefix hits alike (measured 1.3-1.5x SDPA flash at 2k tokens).
            self._prefill_attention(
                q[:npt],
                k_cache,
                v_cache,
                meta.block_tables[:nps],
                meta.query_start_loc[: nps + 1],
                meta.seq_lens[:nps],
                meta.max_query_len,
                self.scale,
                out=out[:npt],
            )
        if q.shape[0] > npt:
            self._decode_attention(
                q[npt:],
                k_cache,
                v_cache,
                meta.block_tables[nps:],
                meta.seq_lens[nps:],
                self.scale,
                out=out[npt:],
            )
        return out


def make_backend(pool: KVPool, num_heads: int, head_dim: int) -> AttentionBackend:
    """The fast path on CUDA, the reference path elsewhere."""
    if pool.device.type == "cuda":
        return TritonBackend(pool, num_heads, head_dim)
    return TorchReferenceBackend(pool, num_heads, head_dim)
