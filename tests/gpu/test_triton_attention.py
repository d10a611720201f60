"""Triton paged attention against a float64 reference read through the block table.

Every check draws fresh random inputs. Every cache slot that no sequence owns (block 0,
which padding entries of the block tables point at, unowned blocks, and the tail of each
sequence's last block) holds NaN, so a kernel that reads one, even behind a softmax
weight of zero, fails. Outputs are poisoned with NaN before each launch so an unwritten
element fails too.

Runs on CUDA. With BATON_TRITON_INTERPRET=1 it runs on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1) at small sizes and tiles instead.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

INTERPRET = os.environ.get("BATON_TRITON_INTERPRET") == "1"
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when the kernels are defined

pytest.importorskip("triton")


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not INTERPRET and not torch.cuda.is_available(),
        reason="needs CUDA (or BATON_TRITON_INTERPRET=1 for the CPU interpreter)",
    ),
]

from engine.triton_attention_config import (  # noqa: E402
    DecodeConfig,
    PrefillConfig,
    choose_decode_config,
)
from engine.triton_decode_attention import paged_decode_attention  # noqa: E402
from engine.triton_prefill_attention import paged_prefill_attention  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
BLOCK_SIZE = 16
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-3}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


# ----------------------------------------------------------------------------------------
# Fixtures: a paged cache with random K/V in owned slots and NaN everywhere else
# ----------------------------------------------------------------------------------------


class PagedBatch:
    """A KV cache `[2, num_blocks, block_size, Hkv, D]` and block tables for `seq_lens`.

    Block 0 is never owned (padding entries point at it); owned blocks are a random
    permutation so no sequence's blocks are contiguous.
    """

    def __init__(
        self,
        seq_lens: list[int],
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        gen: torch.Generator,
        extra_table_cols: int = 3,
    ) -> None:
        blocks_per_seq = [-(-n // BLOCK_SIZE) for n in seq_lens]
        num_blocks = 1 + sum(blocks_per_seq) + 5  # block 0 + owned + a few never owned
        max_blocks = max(blocks_per_seq) + extra_table_cols
        perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
        tables = torch.zeros((len(seq_lens), max_blocks), dtype=torch.int32)  # padding = 0
        owned = torch.zeros((num_blocks, BLOCK_SIZE), dtype=torch.bool)
        for b, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
            ids = [perm.pop() for _ in range(nb)]
            tables[b, :nb] = torch.tensor(ids, dtype=torch.int32)
            for t in range(n):
                owned[ids[t // BLOCK_SIZE], t % BLOCK_SIZE] = True
        cache = torch.randn((2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim), generator=gen)
        cache[:, ~owned] = float("nan")
        self.cache = cache.to(dtype=dtype, device=DEVICE)  # [2, NB, BS, Hkv, D]
        self.k_cache, self.v_cache = self.cache[0], self.cache[1]
        self.block_tables = tables.to(DEVICE)  # [B, max_blocks] int32
        self.seq_lens = seq_lens


def reference(
    q: torch.Tensor,  # [T, Hq, D]
    batch: PagedBatch,
    query_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Float64 attention on CPU, K/V gathered through the block table, explicit causal mask."""
    k_cache = batch.k_cache.cpu().double()
    v_cache = batch.v_cache.cpu().double()
    tables = batch.block_tables.cpu().long()
    q = q.cpu().double()
    out = torch.empty_like(q)
    start = 0
    for b, (n, seq_len) in enumerate(zip(query_lens, batch.seq_lens, strict=True)):
        ids = tables[b, : -(-seq_len // BLOCK_SIZE)]
        k = k_cache[ids].flatten(0, 1)[:seq_len]  # [L, Hkv, D]
        v = v_cache[ids].flatten(0, 1)[:seq_len]
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start : start + n], k) * scale  # [Hq, n, L]
        q_pos = torch.arange(seq_len - n, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out[start : start + n] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        start += n
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.cpu().double()
    return ((out - ref).norm() / ref.norm()).item()


def nan_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)


def check(out: torch.Tensor, poisoned: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.data_ptr() == poisoned.data_ptr(), "out= was not used"
    assert not torch.isnan(out).any(), f"{int(torch.isnan(out).sum())} elements unwritten or NaN"
    err = rel_err(out, ref)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} >= {TOLERANCE[dtype]:.0e}"


# ----------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------


def run_decode_check(
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    config: DecodeConfig | None = None,
    q_strided: bool = False,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    batch = PagedBatch(context_lens, num_kv_heads, head_dim, dtype, gen)
    if q_strided:  # q as a slice of a fused qkv projection: [B, Hq + 2 Hkv, D][:, :Hq]
        qkv = torch.randn(
            (len(context_lens), num_heads + 2 * num_kv_heads, head_dim), generator=gen
        )
        q = qkv.to(dtype=dtype, device=DEVICE)[:, :num_heads]
    else:
        q = torch.randn((len(context_lens), num_heads, head_dim), generator=gen)
        q = q.to(dtype=dtype, device=DEVICE)
    ctx = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = nan_like(q)
    res = paged_decode_attention(
        q, batch.k_cache, batch.v_cache, batch.block_tables, ctx, scale, out=out, config=config
    )
    check(res, out, reference(q, batch, [1] * len(context_lens), scale), dtype)


def decode_lens(rng: random.Random, max_len: int, count: int) -> list[int]:
    fixed = [1, BLOCK_SIZE, 2 * BLOCK_SIZE, BLOCK_SIZE + 1, BLOCK_SIZE - 1]
    return fixed + [rng.randint(1, max_len) for _ in range(count)]


if INTERPRET:
    DECODE_SHAPES = [(4, 2, 32), (2, 2, 16)]
    DECODE_MAX_LEN, DECODE_EXTRA = 90, 2
    DECODE_CONFIGS = [
        DecodeConfig(block_n=16, num_warps=4, num_stages=1, num_splits=1),
        DecodeConfig(block_n=16, num_warps=4, num_stages=1, num_splits=3),
    ]
else:
    DECODE_SHAPES = [(8, 2, 64), (8, 2, 128), (8, 8, 128), (32, 8, 128)]
    DECODE_MAX_LEN, DECODE_EXTRA = 700, 6
    DECODE_CONFIGS = [
        DecodeConfig(block_n=64, num_warps=4, num_stages=3, num_splits=1),
        DecodeConfig(block_n=32, num_warps=4, num_stages=2, num_splits=5),
        DecodeConfig(block_n=128, num_warps=8, num_stages=2, num_splits=16),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), DECODE_SHAPES)
def test_decode_default_config(
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    rng = random.Random(1000 + head_dim + num_heads)
    for _ in range(2):
        lens = decode_lens(rng, DECODE_MAX_LEN, DECODE_EXTRA)
        run_decode_check(
            lens, num_heads, num_kv_heads, head_dim, dtype, seed=rng.randrange(1 << 30)
        )


@pytest.mark.parametrize("config", DECODE_CONFIGS, ids=lambda c: f"n{c.block_n}s{c.num_splits}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_decode_configs(config: DecodeConfig, dtype: torch.dtype) -> None:
    """Each launch shape the benchmark may pick, split-K with empty slices included."""
    rng = random.Random(7 + config.block_n + config.num_splits)
    num_heads, num_kv_heads, head_dim = DECODE_SHAPES[0]
    lens = decode_lens(rng, DECODE_MAX_LEN, DECODE_EXTRA)
    run_decode_check(
        lens, num_heads, num_kv_heads, head_dim, dtype, seed=rng.randrange(1 << 30), config=config
    )


def test_decode_batch_one_uses_split_k() -> None:
    """Batch 1 on a long table splits the context; the check covers the chosen launch."""
    num_heads, num_kv_heads, head_dim = DECODE_SHAPES[0]
    max_len = 4 * DECODE_MAX_LEN
    config = choose_decode_config(
        1, num_kv_heads, -(-max_len // BLOCK_SIZE) + 3, BLOCK_SIZE, head_dim, torch.bfloat16, DEVICE
    )
    assert config.num_splits > 1
    run_decode_check([max_len - 5], num_heads, num_kv_heads, head_dim, torch.bfloat16, seed=11)


def test_decode_strided_q_and_zero_context() -> None:
    """q as a view of a fused projection; a context_len of 0 (padded graph row) gives zeros."""
    num_heads, num_kv_heads, head_dim = DECODE_SHAPES[0]
    run_decode_check(
        [5, 40, 17], num_heads, num_kv_heads, head_dim, torch.float16, seed=3, q_strided=True
    )
    gen = torch.Generator().manual_seed(4)
    batch = PagedBatch([20, 1], num_kv_heads, head_dim, torch.float32, gen)
    q = torch.randn((2, num_heads, head_dim), generator=gen).to(DEVICE)
    ctx = torch.tensor([20, 0], dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, ctx, 0.1)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
    batch.seq_lens = [20]
    assert rel_err(out[:1], reference(q[:1], batch, [1], 0.1)) < 1e-3


# ----------------------------------------------------------------------------------------
# Prefill
# ----------------------------------------------------------------------------------------


def run_prefill_check(
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    config: PrefillConfig | None = None,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    batch = PagedBatch(seq_lens, num_kv_heads, head_dim, dtype, gen)
    q = torch.randn((sum(query_lens), num_heads, head_dim), generator=gen).to(
        dtype=dtype, device=DEVICE
    )
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = nan_like(q)
    res = paged_prefill_attention(
        q,
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        qsl,
        lens,
        max(query_lens),
        scale,
        out=out,
        config=config,
    )
    check(res, out, reference(q, batch, query_lens, scale), dtype)


if INTERPRET:
    PREFILL_SHAPES = [(4, 2, 32), (2, 2, 16)]
    MAX_QUERY, MAX_CONTEXT, NUM_SEQS = 40, 40, 3
    PREFILL_CONFIGS = [
        PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1),
        PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1),
    ]
else:
    PREFILL_SHAPES = [(8, 2, 64), (8, 2, 128), (8, 8, 64), (8, 8, 128)]
    MAX_QUERY, MAX_CONTEXT, NUM_SEQS = 300, 500, 6
    PREFILL_CONFIGS = [
        PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
        PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=2),
        PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
        PrefillConfig(block_m=128, block_n=32, num_warps=4, num_stages=4),
    ]


def prefill_lens(rng: random.Random) -> tuple[list[int], list[int]]:
    query_lens = [1, BLOCK_SIZE] + [rng.randint(1, MAX_QUERY) for _ in range(NUM_SEQS)]
    context_lens = [0, BLOCK_SIZE] + [
        rng.choice([0, rng.randint(0, MAX_CONTEXT)]) for _ in range(NUM_SEQS)
    ]
    return query_lens, context_lens


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), PREFILL_SHAPES)
def test_prefill_default_config(
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    rng = random.Random(2000 + head_dim + num_kv_heads)
    query_lens, context_lens = prefill_lens(rng)
    run_prefill_check(
        query_lens,
        context_lens,
        num_heads,
        num_kv_heads,
        head_dim,
        dtype,
        seed=rng.randrange(1 << 30),
    )


@pytest.mark.parametrize("config", PREFILL_CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_prefill_configs(config: PrefillConfig, dtype: torch.dtype) -> None:
    """Each launch shape the benchmark may pick, on GQA and on full-size heads.

    fp32 runs its own smaller tile (test_prefill_default_config) and these tiles at D = 64
    (test_prefill_tile_boundaries): at D = 128 the larger ones exceed shared memory in fp32.
    """
    rng = random.Random(5 + config.block_m + config.block_n)
    for num_heads, num_kv_heads, head_dim in PREFILL_SHAPES[:2]:
        query_lens, context_lens = prefill_lens(rng)
        run_prefill_check(
            query_lens,
            context_lens,
            num_heads,
            num_kv_heads,
            head_dim,
            dtype,
            seed=rng.randrange(1 << 30),
            config=config,
        )


@pytest.mark.parametrize("config", PREFILL_CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}")
def test_prefill_tile_boundaries(config: PrefillConfig) -> None:
    """Contexts and query lengths one either side of the tile sizes, where the unmasked and
    the diagonal key loops hand over."""
    bm, bn = config.block_m, config.block_n
    contexts = [0, 1, bn - 2, bn - 1, bn, 2 * bn - 2, bn + 1]
    queries = [1, bm - 1, bm, bm + 1, 2 * bm + 3, bm - 2, 3]
    num_heads, num_kv_heads, head_dim = PREFILL_SHAPES[0]
    run_prefill_check(
        queries,
        contexts,
        num_heads,
        num_kv_heads,
        head_dim,
        torch.float32,
        seed=bm + bn,
        config=config,
    )


def test_prefill_max_query_len_above_actual() -> None:
    """A grid sized for a larger max_query_len leaves the extra query tiles idle."""
    num_heads, num_kv_heads, head_dim = PREFILL_SHAPES[0]
    gen = torch.Generator().manual_seed(21)
    query_lens, seq_lens = [3, 9], [3, 29]  # contexts 0 and 20
    batch = PagedBatch(seq_lens, num_kv_heads, head_dim, torch.float32, gen)
    q = torch.randn((12, num_heads, head_dim), generator=gen).to(DEVICE)
    qsl = torch.tensor([0, 3, 12], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = nan_like(q)
    paged_prefill_attention(
        q, batch.k_cache, batch.v_cache, batch.block_tables, qsl, lens, 200, 0.2, out=out
    )
    check(out, out, reference(q, batch, query_lens, 0.2), torch.float32)


# ----------------------------------------------------------------------------------------
# CUDA graphs: one capture, replayed on new values in the same tensors
# ----------------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_cuda_graph_replay(num_splits: int) -> None:
    num_heads, num_kv_heads, head_dim, dtype = 32, 8, 128, torch.bfloat16
    config = DecodeConfig(block_n=64, num_warps=4, num_stages=3, num_splits=num_splits)
    rng = random.Random(num_splits)
    gen = torch.Generator().manual_seed(num_splits)
    num_seqs = 6
    first = PagedBatch(decode_lens(rng, 600, 1), num_kv_heads, head_dim, dtype, gen)
    q = torch.empty((num_seqs, num_heads, head_dim), dtype=dtype, device=DEVICE)
    ctx = torch.empty((num_seqs,), dtype=torch.int32, device=DEVICE)
    tables = torch.zeros((num_seqs, 64), dtype=torch.int32, device=DEVICE)
    cache = torch.empty((2, 300, BLOCK_SIZE, num_kv_heads, head_dim), dtype=dtype, device=DEVICE)
    out = torch.empty((num_seqs, num_heads, head_dim), dtype=dtype, device=DEVICE)

    def load(batch: PagedBatch) -> None:
        assert batch.cache.shape[1] <= cache.shape[1]
        cache.fill_(float("nan"))
        cache[:, : batch.cache.shape[1]] = batch.cache
        tables.zero_()
        tables[:, : batch.block_tables.shape[1]] = batch.block_tables
        ctx.copy_(torch.tensor(batch.seq_lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen).to(dtype))

    load(first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles outside the capture
        paged_decode_attention(
            q, cache[0], cache[1], tables, ctx, head_dim**-0.5, out=out, config=config
        )
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(
            q, cache[0], cache[1], tables, ctx, head_dim**-0.5, out=out, config=config
        )
    for _ in range(2):
        batch = PagedBatch(decode_lens(rng, 600, 1), num_kv_heads, head_dim, dtype, gen)
        load(batch)
        out.fill_(float("nan"))
        graph.replay()
        batch.k_cache, batch.v_cache = cache[0], cache[1]
        batch.block_tables = tables
        check(out, out, reference(q, batch, [1] * num_seqs, head_dim**-0.5), dtype)


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need CUDA")
def test_prefill_cuda_graph_capture() -> None:
    num_heads, num_kv_heads, head_dim, dtype = 8, 2, 128, torch.bfloat16
    gen = torch.Generator().manual_seed(5)
    query_lens, context_lens = [100, 37, 250], [0, 300, 17]
    seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    batch = PagedBatch(seq_lens, num_kv_heads, head_dim, dtype, gen)
    q = torch.randn((sum(query_lens), num_heads, head_dim), generator=gen).to(
        dtype=dtype, device=DEVICE
    )
    qsl = torch.tensor([0, 100, 137, 387], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)
    args = (q, batch.k_cache, batch.v_cache, batch.block_tables, qsl, lens, 256, head_dim**-0.5)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_prefill_attention(*args, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_prefill_attention(*args, out=out)
    q.copy_(torch.randn(q.shape, generator=gen).to(dtype))
    out.fill_(float("nan"))
    graph.replay()
    check(out, out, reference(q, batch, query_lens, head_dim**-0.5), dtype)
