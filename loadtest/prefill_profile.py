"""Where a prefill step's time goes (GPU machine): the evidence behind prefill optimisations.

    python -m loadtest.prefill_profile --out-dir $OUT

For the llama3-8b preset (bf16, random weights), one engine step prefilling N prompts of
L tokens (default 1 x 2048 and 4 x 2048, the prefill worker's full step):

  step        median wall time of `Engine.step()`, and its matmul FLOPs over the bf16 matmul
              rate measured in the same run
  kernels     torch.profiler over 3 steps: GPU time per step by kernel, grouped
              (matmul, attention, norm/rotary/activation, copies, other), largest first
  sdpa        torch SDPA (flash backend where it runs) on one L-token causal sequence of the
              same heads, against the engine's attention kernel time per layer

Writes prefill_profile.json and the profiler tables to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.presets import preset_hf_config
from engine.sampling_params import SamplingParams
from loadtest.bench_log import log_to
from loadtest.engine_bench_roofline import cuda_time_s, matmul_tflops, prefill_flops
from loadtest.engine_bench_runs import GREEDY, random_prompts

log = logging.getLogger("prefill_profile")

GROUPS = (
    ("matmul", ("gemm", "gemv", "cutlass", "sm90", "nvjet", "matmul", "xmma")),
    ("attention", ("attention", "attn", "flash", "fmha", "paged_prefill", "paged_decode")),
    ("norm/rotary/act", ("rms", "norm", "rotary", "silu", "swiglu", "act")),
    ("copy/index", ("copy", "index", "cat", "gather", "scatter", "memcpy", "memset")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def prefill_step(engine: Engine, num_prompts: int, length: int, seed: int) -> None:
    vocab = engine.config.model.vocab_size
    params = SamplingParams(max_tokens=1, **GREEDY)
    for i, p in enumerate(random_prompts(num_prompts, length, vocab, seed)):
        engine.add_request(f"p{seed}-{i}", p, params)
    engine.step()
    assert not engine.has_unfinished(), "the prompts did not fit one step"


def profile_shape(
    engine: Engine, num_prompts: int, length: int, matmul_rate: float, out_dir: Path
) -> dict[str, Any]:
    times = []
    for r in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        prefill_step(engine, num_prompts, length, seed=100 * num_prompts + r)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    flops = num_prompts * prefill_flops(engine.config.model, length)
    fig: dict[str, Any] = {
        "prompts": num_prompts,
        "length": length,
        "step_ms": step_s * 1e3,
        "tflops": flops / step_s / 1e12,
        "matmul_fraction": flops / step_s / 1e12 / matmul_rate,
    }
    from torch.profiler import ProfilerActivity, profile

    n = 3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for r in range(n):
            prefill_step(engine, num_prompts, length, seed=100 * num_prompts + 50 + r)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[group_of(e.key)] += e.self_device_time_total / n / 1e3
    fig["gpu_ms_by_group"] = dict(sorted(groups.items(), key=lambda kv: -kv[1]))
    fig["gpu_ms"] = sum(groups.values())
    fig["top_kernels"] = [
        {
            "name": e.key[:100],
            "ms_per_step": e.self_device_time_total / n / 1e3,
            "count": e.count / n,
        }
        for e in sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    ]
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
    (out_dir / f"prefill_profile_{num_prompts}x{length}.txt").write_text(table)
    return fig


def sdpa_ms(cfg: ModelConfig, length: int) -> float:
    """One layer's causal attention over `length` tokens, torch SDPA (GQA)."""
    q = torch.randn(
        1, cfg.num_attention_heads, length, cfg.head_dim, dtype=torch.bfloat16, device="cuda"
    )
    k = torch.randn(
        1, cfg.num_key_value_heads, length, cfg.head_dim, dtype=torch.bfloat16, device="cuda"
    )
    v = torch.randn_like(k)
    return (
        cuda_time_s(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        )
        * 1e3
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--shapes", default="1x2048,4x2048,1x1024,2x1024")
    parser.add_argument("--out-dir", default="results")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_to(out_dir / "prefill_profile.log")
    cfg = ModelConfig.from_hf_dict(preset_hf_config(args.preset))
    result: dict[str, Any] = {
        "card": torch.cuda.get_device_name(),
        "matmul_tflops": matmul_tflops(),
    }
    engine = Engine(
        EngineConfig(
            model=cfg,
            dtype="bfloat16",
            device="cuda",
            gpu_memory_utilization=0.85,
            max_num_seqs=32,
            max_num_batched_tokens=8192,
            max_model_len=8192,
            enable_prefix_caching=False,  # every shape's prompts prefilled in full
        )
    )
    result["shapes"] = []
    for shape in args.shapes.split(","):
        num, length = (int(x) for x in shape.split("x"))
        fig = profile_shape(engine, num, length, result["matmul_tflops"], out_dir)
        fig["sdpa_ms_per_layer_per_prompt"] = sdpa_ms(cfg, length)
        fig["sdpa_ms_per_step"] = fig["sdpa_ms_per_layer_per_prompt"] * num * cfg.num_hidden_layers
        log.info("%s", json.dumps({k: v for k, v in fig.items() if k != "top_kernels"}))
        for k in fig["top_kernels"]:
            log.info("   %8.2f ms/step %6.1f/step %s", k["ms_per_step"], k["count"], k["name"])
        result["shapes"].append(fig)
    (out_dir / "prefill_profile.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
