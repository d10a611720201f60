"""Engine benchmark on one GPU: every figure against a ceiling measured in the same run.

    python loadtest/engine_bench.py --out results/engine.json --log results/engine.log

Measures, for the `llama3-8b` shape with random bf16 weights:
  ceilings    HBM copy bandwidth (2 GiB device-to-device, bytes read + written) and a bf16
              8192^3 matmul rate
  decode      step time at batch 1 and 64, context 1k, over the floor
              (weight bytes + KV bytes read) / copy bandwidth
  prefill     one 2048-token prompt: achieved TFLOP/s over the matmul rate
  offline     64 requests of 1024 prompt / 128 output tokens: output tokens/s, as a fraction of
              the floor (prefill FLOPs / matmul rate + each decode step's bytes / copy
              bandwidth), and against transformers on the same GPU (the better of batched
              `generate` and continuous-batching `generate_batch`)
  capacity    KV tokens at gpu_memory_utilization=0.9 against (0.9 * total - weights) / KV
              bytes per token

Correctness comes first (unless --skip-hf): before timing, on the same shape cut to 2 layers,
Baton's logprobs of its own greedy tokens are checked against transformers' on the same
weights, teacher-forced (bf16: max |logprob diff| < 0.15).

This file is the command line, the JSON and the printed table; the parts live beside it:
engine_bench_roofline.py (ceilings, model arithmetic, floors), engine_bench_runs.py (Baton's
timed runs) and engine_bench_hf.py (transformers: the same weights, the correctness check, the
throughput baseline).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.presets import preset_hf_config  # noqa: E402
from loadtest.bench_log import log_to
from loadtest.engine_bench_hf import (  # noqa: E402
    bench_hf,
    build_hf_model,
    check_correctness,
    copy_weights_into_hf,
)
from loadtest.engine_bench_roofline import (  # noqa: E402
    copy_bandwidth_gbs,
    matmul_tflops,
    offline_floor_s,
    prefill_flops,
)
from loadtest.engine_bench_runs import bench_decode, bench_offline, bench_prefill  # noqa: E402

log = logging.getLogger("engine_bench")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--out", default="results/engine_bench.json")
    parser.add_argument("--log", default="results/engine_bench.log")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    log_to(Path(args.log))
    assert torch.cuda.is_available(), "the engine bench needs a GPU"
    card = torch.cuda.get_device_name()
    figures: dict[str, Any] = {"card": card, "torch": torch.__version__}
    figures["copy_gbs"] = copy_bandwidth_gbs()
    figures["matmul_tflops"] = matmul_tflops()
    log.info(
        "ceilings: copy %.0f GB/s, matmul %.0f TFLOP/s",
        figures["copy_gbs"],
        figures["matmul_tflops"],
    )

    hf_dict = preset_hf_config(args.preset)
    model_cfg = ModelConfig.from_hf_dict(hf_dict)

    if not args.skip_hf:
        # Correctness first, on the same shape cut to 2 layers (both models fit beside each other).
        small = {**hf_dict, "num_hidden_layers": 2}
        small_engine = Engine(
            EngineConfig(
                model=ModelConfig.from_hf_dict(small),
                dtype="bfloat16",
                device="cuda",
                kv_cache_memory_bytes=2 * 2**30,
                max_num_seqs=8,
                max_model_len=8192,
            )
        )
        hf_small = build_hf_model(small)
        copy_weights_into_hf(small_engine, hf_small)
        figures.update(check_correctness(small_engine, hf_small))
        log.info("correctness: max |logprob diff| %.4f", figures["max_logprob_abs_diff"])
        assert figures["max_logprob_abs_diff"] < 0.15, "Baton disagrees with transformers"
        del small_engine, hf_small
        gc.collect()
        torch.cuda.empty_cache()

    config = EngineConfig(
        model=model_cfg,
        dtype="bfloat16",
        device="cuda",
        gpu_memory_utilization=0.9,
        max_num_seqs=args.requests,
        max_num_batched_tokens=8192,
        max_model_len=8192,
    )
    t0 = time.perf_counter()
    engine = Engine(config)
    figures["engine_start_s"] = time.perf_counter() - t0
    total = torch.cuda.get_device_properties(0).total_memory
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    capacity = engine.block_manager.num_blocks * config.block_size
    ideal = (0.9 * total - weights) / model_cfg.kv_bytes_per_token(2)
    figures.update(kv_capacity_tokens=capacity, kv_capacity_fraction=capacity / ideal)

    for batch in (1, 64):
        d = bench_decode(engine, batch, context=1024, steps=32, seed=batch)
        floor_ms = d["bytes"] / (figures["copy_gbs"] * 1e9) * 1e3
        figures[f"decode_b{batch}_step_ms"] = d["step_ms"]
        figures[f"decode_b{batch}_floor_ms"] = floor_ms
        figures[f"decode_b{batch}_floor_ratio"] = d["step_ms"] / floor_ms
        log.info("decode b%d: %.2f ms, floor %.2f ms", batch, d["step_ms"], floor_ms)

    prefill_s = bench_prefill(engine, 2048, seed=77)
    tflops = prefill_flops(model_cfg, 2048) / prefill_s / 1e12
    figures.update(
        prefill_2k_ms=prefill_s * 1e3,
        prefill_2k_tflops=tflops,
        prefill_2k_matmul_fraction=tflops / figures["matmul_tflops"],
    )
    log.info("prefill 2k: %.1f ms, %.0f TFLOP/s", prefill_s * 1e3, tflops)

    n, pin, pout = args.requests, 1024, 128
    off = bench_offline(engine, n, pin, pout, seed=99)
    floor = offline_floor_s(model_cfg, n, pin, pout, figures["copy_gbs"], figures["matmul_tflops"])
    figures.update(
        offline_tokens_per_s=off["output_tokens"] / off["elapsed_s"],
        offline_elapsed_s=off["elapsed_s"],
        offline_floor_s=floor,
        offline_floor_fraction=floor / off["elapsed_s"],
    )
    log.info(
        "offline: %.0f tokens/s (floor fraction %.2f)",
        figures["offline_tokens_per_s"],
        figures["offline_floor_fraction"],
    )
    engine.block_manager.check_idle()
    Path(args.out).write_text(json.dumps(figures, indent=2))

    if not args.skip_hf:
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        hf_model = build_hf_model(hf_dict)
        hf = bench_hf(hf_model, n, pin, pout, model_cfg.vocab_size, seed=99)
        figures.update({f"hf_{k}": v for k, v in hf.items()})
        figures["vs_transformers_throughput_ratio"] = figures["offline_tokens_per_s"] / max(
            hf.values()
        )

    Path(args.out).write_text(json.dumps(figures, indent=2))
    print(f"\n=== engine bench on {card} ===")
    rows = [
        ("copy bandwidth (GB/s)", figures["copy_gbs"], ""),
        ("bf16 matmul 8192^3 (TFLOP/s)", figures["matmul_tflops"], ""),
        (
            "decode b1 step (ms) / floor",
            figures["decode_b1_step_ms"],
            f"{figures['decode_b1_floor_ratio']:.2f}x  (target <= 1.25)",
        ),
        (
            "decode b64 step (ms) / floor",
            figures["decode_b64_step_ms"],
            f"{figures['decode_b64_floor_ratio']:.2f}x  (target <= 1.5)",
        ),
        (
            "prefill 2k (TFLOP/s) / matmul",
            figures["prefill_2k_tflops"],
            f"{figures['prefill_2k_matmul_fraction']:.2f}  (target >= 0.6)",
        ),
        (
            "offline 64x1024/128 (tok/s) / floor",
            figures["offline_tokens_per_s"],
            f"{figures['offline_floor_fraction']:.2f}  (target >= 0.6)",
        ),
        (
            "KV capacity (tokens) / ideal",
            figures["kv_capacity_tokens"],
            f"{figures['kv_capacity_fraction']:.3f}",
        ),
    ]
    if "vs_transformers_throughput_ratio" in figures:
        rows.append(
            (
                "transformers best (tok/s)",
                max(v for k, v in figures.items() if k.startswith("hf_")),
                f"Baton {figures['vs_transformers_throughput_ratio']:.2f}x  (target >= 3.5)",
            )
        )
    for name, value, note in rows:
        print(f"{name:<40} {value:>12.2f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
