"""The CPU reference attention backend against an independent float64 oracle.

The oracle keeps each sequence's K/V contiguous (no pool, no block tables) and computes
softmax(q k^T) v position by position; the backend must write every new token into the
right pool slot and read it back through a scattered, non-monotonic block table.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.attention import AttentionMetadata, TorchReferenceBackend
from engine.kv_pool import KVPool
from engine.presets import preset


def oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [n, Hq, D] at the last n positions of k/v: [L, Hkv, D]; float64, loops for clarity.
    n, hq, _ = q.shape
    seq_len, hkv, _ = k.shape
    out = torch.empty(n, hq, q.shape[-1], dtype=torch.float64)
    for i in range(n):
        pos = seq_len - n + i
        for h in range(hq):
            kh = k[: pos + 1, h // (hq // hkv)].double()
            vh = v[: pos + 1, h // (hq // hkv)].double()
            w = torch.softmax(kh @ q[i, h].double() * scale, dim=0)
            out[i, h] = w @ vh
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_backend_matches_float64_oracle(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model = preset("tiny")  # 4 q heads, 2 kv heads, head_dim 16
    block_size, num_blocks = 4, 64
    pool = KVPool(model, num_blocks, block_size, torch.float32, torch.device("cpu"))
    pool.cache.fill_(float("nan"))  # any slot read before written poisons the output
    backend = TorchReferenceBackend(pool, model.num_attention_heads, model.head_dim)
    hq, hkv, d = model.num_attention_heads, model.num_key_value_heads, model.head_dim

    # Three sequences: a fresh prompt, a chunk with cached context, a decode token.
    contexts, query_lens = [0, 9, 14], [7, 5, 1]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, full_k, full_v = [], [], []
    for ctx, n in zip(contexts, query_lens, strict=True):
        blocks = [perm.pop() for _ in range(math.ceil((ctx + n) / block_size))]
        tables.append(blocks)
        full_k.append(torch.randn(ctx + n, hkv, d, generator=g))
        full_v.append(torch.randn(ctx + n, hkv, d, generator=g))
        # The context was written by earlier steps.
        for p in range(ctx):
            pool.cache[0, 0, blocks[p // block_size], p % block_size] = full_k[-1][p]
            pool.cache[0, 1, blocks[p // block_size], p % block_size] = full_v[-1][p]

    q = torch.randn(sum(query_lens), hq, d, generator=g)
    k_new = torch.cat([k[c:] for k, c in zip(full_k, contexts, strict=True)])
    v_new = torch.cat([v[c:] for v, c in zip(full_v, contexts, strict=True)])
    slots = [
        t[p // block_size] * block_size + p % block_size
        for t, c, n in zip(tables, contexts, query_lens, strict=True)
        for p in range(c, c + n)
    ]
    width = max(len(t) for t in tables)
    block_tables = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t)
    seq_lens = [c + n for c, n in zip(contexts, query_lens, strict=True)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor([0, 7, 12, 13], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        num_prefill_seqs=2,
        num_prefill_tokens=12,
        max_query_len=7,
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    out = backend.forward(0, q, k_new, v_new, meta)

    start = 0
    for k, v, n in zip(full_k, full_v, query_lens, strict=True):
        ref = oracle(q[start : start + n], k, v, backend.scale)
        err = (out[start : start + n].double() - ref).norm() / ref.norm()
        assert err < 1e-6, err
        start += n
    # Every new token landed in its slot.
    flat_k = pool.cache[0, 0].reshape(-1, hkv, d)
    assert torch.equal(flat_k[torch.tensor(slots)], k_new)
