"""Prefill attention in the attention benchmark: `paged_prefill_attention` against SDPA.

One 2048-token sequence with 0 and with 1024 cached tokens: TFLOP/s (visible query-key pairs
only) against torch SDPA flash on the same shapes and the matmul.

Every launch configuration is first checked against SDPA on fresh random data; a variant
that fails is reported and not timed. The default row is the launch the kernel chooses by
itself; the others are the sweep from which that choice is tuned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.triton_attention_config import PrefillConfig, choose_prefill_config
from engine.triton_prefill_attention import paged_prefill_attention, prefill_flops
from loadtest.attention_paged_cache import (
    BLOCK_SIZE,
    DTYPE,
    HEAD_DIM,
    NUM_HEADS,
    NUM_KV_HEADS,
    Row,
    check_variant,
    gather,
    random_cache,
    random_tables,
    summary_rows,
)
from loadtest.attention_timing import Env, Report, time_s


def prefill_candidates(default: PrefillConfig, env: Env) -> list[PrefillConfig]:
    if env.smoke:
        return [PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)]
    configs = [default]
    for m, n, w, s in [
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 64, 4, 3),
        (64, 64, 4, 3),
        (128, 32, 8, 4),
        (64, 32, 4, 4),
        (128, 64, 4, 4),
    ]:
        config = PrefillConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)
        if config not in configs:
            configs.append(config)
    return [*configs, default]  # the default again, last: its two timings show the spread


def bench_prefill(env: Env, report: Report, ctx: int, matmul: float) -> list[str]:
    q_len = 2048 if not env.smoke else 48
    ctx = ctx if not env.smoke else ctx // 32
    seq_len = ctx + q_len
    gen = torch.Generator().manual_seed(7 + ctx)
    blocks = math.ceil(seq_len / BLOCK_SIZE)
    num_blocks, tables = random_tables(1, 1, blocks, gen)
    table = tables[0].to(env.device)  # [1, blocks]
    cache = random_cache(env, num_blocks, seed=ctx)
    k_cache, v_cache = cache[0], cache[1]
    q = torch.randn((q_len, NUM_HEADS, HEAD_DIM), generator=gen).to(dtype=DTYPE, device=env.device)
    qsl = torch.tensor([0, q_len], dtype=torch.int32, device=env.device)
    lens = torch.tensor([seq_len], dtype=torch.int32, device=env.device)
    scale = HEAD_DIM**-0.5
    flops = prefill_flops([q_len], [seq_len], NUM_HEADS, HEAD_DIM)

    # SDPA on the same data, K/V contiguous with heads repeated: [1, Hq, L, D].
    group = NUM_HEADS // NUM_KV_HEADS
    k = gather(k_cache, table[0], seq_len).repeat_interleave(group, 1).transpose(0, 1)[None]
    v = gather(v_cache, table[0], seq_len).repeat_interleave(group, 1).transpose(0, 1)[None]
    qs = q.transpose(0, 1)[None]  # [1, Hq, q_len, D]
    if ctx == 0:

        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale)
    else:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q_len, seq_len)

        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)

    backend = "default"
    if env.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_plain = sdpa

        def sdpa() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa_plain()

        backend = "flash"
    ref = sdpa()[0].transpose(0, 1)  # [q_len, Hq, D]
    t_sdpa = time_s(env, sdpa)
    sdpa_tflops = flops / t_sdpa / 1e12
    report(
        f"prefill q={q_len} ctx={ctx}: {flops / 1e12:.3f} TFLOP; SDPA ({backend}) "
        f"{t_sdpa * 1e3:.3f} ms {sdpa_tflops:.1f} TFLOP/s ({sdpa_tflops / matmul:.1%} of matmul)"
    )

    default = choose_prefill_config(q_len, HEAD_DIM, DTYPE)
    out = torch.empty_like(q)
    title = f"prefill q={q_len} ctx={ctx}"
    rows: list[Row] = []
    for config in prefill_candidates(default, env):
        name = f"m{config.block_m} n{config.block_n} w{config.num_warps} s{config.num_stages}"

        def run(config: PrefillConfig = config) -> torch.Tensor:
            return paged_prefill_attention(
                q, k_cache, v_cache, table, qsl, lens, q_len, scale, out=out, config=config
            )

        err = check_variant(report, f"{name} (vs SDPA)", out, run, ref)
        if err is None:
            continue
        t = time_s(env, run)
        tflops = flops / t / 1e12
        tag = " (default)" if config == default else ""
        report(
            f"  {name}{tag}: {t * 1e3:7.3f} ms {tflops:6.1f} TFLOP/s  {tflops / sdpa_tflops:5.1%} "
            f"of SDPA  {tflops / matmul:5.1%} of matmul  rel err vs SDPA {err:.1e}"
        )
        rows.append((config == default, t, tflops, name))
    if not rows:
        return [f"{title}: every variant failed (see log)"]
    lines = [
        f"prefill q={q_len} ctx={ctx:<5d} SDPA-{backend:14s} {t_sdpa * 1e3:8.3f} ms "
        f"{sdpa_tflops:6.1f} TFLOP/s {sdpa_tflops / matmul:6.1%} of matmul"
    ]
    for label, row in summary_rows(rows):
        lines.append(
            f"prefill q={q_len} ctx={ctx:<5d} {label:7s} {row[3]:<14s} {row[1] * 1e3:8.3f} ms "
            f"{row[2]:6.1f} TFLOP/s {row[2] / matmul:6.1%} of matmul "
            f"{row[2] / sdpa_tflops:6.1%} of SDPA"
        )
    return lines
