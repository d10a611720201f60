"""The engine benchmark's ceilings and floors (engine_bench.py compares every figure to them).

Two halves:
  ceilings    measured on this GPU, timed with CUDA events (median): HBM copy bandwidth (2 GiB
              device-to-device, bytes read + written) and a bf16 8192^3 matmul rate
  arithmetic  what a model shape costs: bytes a decode step reads (weights once, the embedding
              table's batch rows only), matmul FLOPs of a prefill chunk, and the offline floor
              (prefill FLOPs / matmul rate + each decode step's bytes / copy bandwidth)
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from engine.config import ModelConfig

# ---- ceilings --------------------------------------------------------------------------------


def cuda_time_s(fn: Any, repeat: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    n = 2**30 // 2  # 2 GiB... in bf16 elements: 1 GiB tensor; read + written = 2 GiB
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time_s(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / t / 1e9


def matmul_tflops() -> float:
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    t = cuda_time_s(lambda: a @ b)
    return 2 * n**3 / t / 1e12


# ---- model arithmetic ------------------------------------------------------------------------


def weight_bytes_per_decode_step(cfg: ModelConfig, batch: int) -> int:
    """Every weight is read once per step, except the embedding table (batch rows only)."""
    embed = cfg.vocab_size * cfg.hidden_size
    return 2 * (cfg.num_parameters() - embed + batch * cfg.hidden_size) + (
        2 * embed if cfg.tie_word_embeddings else 0
    )


def prefill_flops(cfg: ModelConfig, num_tokens: int, context: int = 0) -> float:
    """Matmul FLOPs of a prefill chunk: linear layers + causal attention + one logits row."""
    embed = cfg.vocab_size * cfg.hidden_size
    linear = 2 * (cfg.num_parameters() - embed * (1 if cfg.tie_word_embeddings else 2)) * num_tokens
    # QK^T and PV over the causal triangle (plus the cached context).
    pairs = num_tokens * context + num_tokens * (num_tokens + 1) / 2
    attn = 4 * pairs * cfg.q_size * cfg.num_hidden_layers
    return linear + attn + 2 * embed


def offline_floor_s(
    cfg: ModelConfig,
    num_requests: int,
    prompt_len: int,
    output_len: int,
    copy_gbs: float,
    matmul: float,
) -> float:
    prefill = num_requests * prefill_flops(cfg, prompt_len) / (matmul * 1e12)
    decode = 0.0
    for step in range(1, output_len):  # the first token comes from prefill
        ctx = prompt_len + step
        step_bytes = weight_bytes_per_decode_step(cfg, num_requests) + num_requests * ctx * (
            cfg.kv_bytes_per_token(2)
        )
        decode += step_bytes / (copy_gbs * 1e9)
    return prefill + decode
