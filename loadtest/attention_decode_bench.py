"""Decode attention in the attention benchmark: `paged_decode_attention` against the copy.

Batch 1 and 64 at context 1024, batch 64 at 4096: GB/s of K/V (+ q, out) bytes over the copy
bandwidth. Each timing replays a CUDA graph of several launches over rotating block tables
whose blocks together exceed L2, so batch 1 is not timed out of the cache.

Every launch configuration is first checked against an fp32 torch reference on fresh random
data; a variant that fails is reported and not timed. The default row is the launch the
kernel chooses by itself; the others are the sweep from which that choice is tuned.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from engine.triton_attention_config import DecodeConfig, choose_decode_config
from engine.triton_decode_attention import paged_decode_attention
from loadtest.attention_paged_cache import (
    BLOCK_SIZE,
    DTYPE,
    HEAD_DIM,
    NUM_HEADS,
    NUM_KV_HEADS,
    Row,
    check_variant,
    random_cache,
    random_tables,
    summary_rows,
)
from loadtest.attention_timing import Env, Report, time_graph_s

ROTATION_BYTES = 256 * 2**20  # K/V touched per graph replay, >> 50-60 MB of L2


def decode_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, ctx: int
) -> torch.Tensor:
    """fp32 decode attention for equal context lengths. q: [B, Hq, D] -> [B, Hq, D]."""
    batch = q.shape[0]
    k = k_cache[tables.long()].flatten(1, 2)[:, :ctx].float()  # [B, ctx, Hkv, D]
    v = v_cache[tables.long()].flatten(1, 2)[:, :ctx].float()
    qg = q.float().view(batch, NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS, HEAD_DIM)
    scores = torch.einsum("bhgd,bnhd->bhgn", qg, k) * HEAD_DIM**-0.5
    out = torch.einsum("bhgn,bnhd->bhgd", scores.softmax(-1), v)
    return out.reshape(batch, NUM_HEADS, HEAD_DIM)


def decode_candidates(default: DecodeConfig, batch: int, env: Env) -> list[DecodeConfig]:
    if env.smoke:
        return [default, DecodeConfig(block_n=16, num_warps=4, num_stages=1, num_splits=3)]
    if batch == 1:
        shapes = [
            (64, 4, 3, 8),
            (64, 4, 3, 16),
            (32, 4, 3, 32),
            (32, 4, 2, 16),
            (16, 4, 2, 64),
            (128, 8, 2, 8),
        ]
    else:
        shapes = [
            (64, 4, 3, 1),
            (64, 4, 2, 1),
            (64, 4, 4, 1),
            (32, 4, 4, 1),
            (32, 2, 3, 1),
            (128, 4, 2, 1),
            (128, 8, 3, 1),
            (64, 8, 3, 1),
            (64, 4, 3, 2),
            (32, 4, 4, 2),
        ]
    configs = [default]
    for n, w, s, sp in shapes:
        config = DecodeConfig(block_n=n, num_warps=w, num_stages=s, num_splits=sp)
        if config not in configs:
            configs.append(config)
    return [*configs, default]  # the default again, last: its two timings show the spread


def bench_decode(env: Env, report: Report, batch: int, ctx: int, copy_gbs: float) -> list[str]:
    gen = torch.Generator().manual_seed(batch * 100003 + ctx)
    blocks_per_seq = ctx // BLOCK_SIZE
    itemsize = torch.tensor([], dtype=DTYPE).element_size()
    kv_bytes = batch * ctx * NUM_KV_HEADS * HEAD_DIM * 2 * itemsize
    qo_bytes = 2 * batch * NUM_HEADS * HEAD_DIM * itemsize
    num_tables = max(1, min(64, math.ceil(ROTATION_BYTES / kv_bytes))) if not env.smoke else 2
    num_launches = max(num_tables, 8) if not env.smoke else 2
    num_blocks, tables = random_tables(num_tables, batch, blocks_per_seq, gen)
    cache = random_cache(env, num_blocks, seed=batch + ctx)
    k_cache, v_cache = cache[0], cache[1]
    tables = tables.to(env.device)
    q = torch.randn((batch, NUM_HEADS, HEAD_DIM), generator=gen).to(dtype=DTYPE, device=env.device)
    ctx_lens = torch.full((batch,), ctx, dtype=torch.int32, device=env.device)
    out = torch.empty_like(q)
    ref = decode_reference(q, k_cache, v_cache, tables[0], ctx)
    scale = HEAD_DIM**-0.5

    default = choose_decode_config(
        batch, NUM_KV_HEADS, blocks_per_seq, BLOCK_SIZE, HEAD_DIM, DTYPE, env.device
    )
    report(
        f"decode B={batch} ctx={ctx}: KV {kv_bytes / 1e6:.1f} MB per launch, "
        f"{num_tables} rotating tables, {num_launches} launches per graph; default {default}"
    )
    title = f"decode B={batch} ctx={ctx}"
    rows: list[Row] = []
    for config in decode_candidates(default, batch, env):
        name = (
            f"n{config.block_n} w{config.num_warps} s{config.num_stages} split{config.num_splits}"
        )

        def launch(i: int, config: DecodeConfig = config) -> Callable[[], object]:
            table = tables[i % num_tables]
            return lambda: paged_decode_attention(
                q, k_cache, v_cache, table, ctx_lens, scale, out=out, config=config
            )

        err = check_variant(report, name, out, launch(0), ref)
        if err is None:
            continue
        t = time_graph_s(env, [launch(i) for i in range(num_launches)])
        gbs = (kv_bytes + qo_bytes) / t / 1e9
        tag = " (default)" if config == default else ""
        report(
            f"  {name}{tag}: {t * 1e6:8.2f} us  {gbs:7.1f} GB/s  {gbs / copy_gbs:5.1%} of copy  "
            f"rel err {err:.1e}"
        )
        rows.append((config == default, t, gbs, name))
    if not rows:
        return [f"{title}: every variant failed (see log)"]
    lines = []
    for label, row in summary_rows(rows):
        lines.append(
            f"decode B={batch:<3d} ctx={ctx:<5d} {label:7s} {row[3]:<22s} "
            f"{row[1] * 1e6:8.1f} us {row[2]:7.0f} GB/s {row[2] / copy_gbs:6.1%} of copy"
        )
    return lines
