"""Where a decode step's time goes (GPU machine): the evidence behind decode optimisations.

    python -m loadtest.decode_profile --out-dir $OUT

For the llama3-8b preset (bf16, random weights, 1k context) at batch 1 and 64:

  step        median wall time of `Engine.step()` (what engine_bench reports)
  graph       median GPU time of the decode CUDA graph replayed back to back (no host work
              between replays): the model's forward alone
  host        median host time per step of schedule / prepare / replay (input copies and
              launch) / logits / sample, timed by wrapping those calls
  kernels     torch.profiler over 10 steps: the kernels by total CUDA time, and GPU busy time
              per step (sum of kernel durations) against the wall time: the idle gap
  gemv        each weight matrix's product at M=1 and M=64 alone, GB/s of weight read, against
              the copy bandwidth measured in the same run

Writes decode_profile.json and decode_profile.log (tables) to --out-dir.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.presets import preset_hf_config
from loadtest.bench_log import log_to
from loadtest.engine_bench_roofline import copy_bandwidth_gbs, cuda_time_s
from loadtest.engine_bench_runs import start_decode_batch

log = logging.getLogger("decode_profile")


def _timed(store: dict[str, list[float]], name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store[name].append(time.perf_counter() - t0)

    return wrapper


def profile_batch(engine: Engine, batch: int, out_dir: Path) -> dict[str, Any]:
    ids = start_decode_batch(engine, batch, 1024, max_tokens=4096, seed=batch)
    fig: dict[str, Any] = {"batch": batch}

    steps = []
    for _ in range(30):
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    fig["step_ms"] = statistics.median(steps) * 1e3

    runner = engine.runner
    size = runner._graph_bucket(batch)
    if size is not None:
        graph = runner._graphs[size].graph
        fig["graph_ms"] = cuda_time_s(graph.replay, repeat=30) * 1e3

    host: dict[str, list[float]] = defaultdict(list)
    originals = {
        "schedule": (engine.scheduler, "schedule"),
        "prepare": (runner, "prepare"),
        "replay": (runner, "_replay"),
        "logits": (runner.model, "compute_logits"),
        "sample": (engine, "sampler"),
        "append": (engine, "_append_token"),
    }
    saved = {k: getattr(obj, attr) for k, (obj, attr) in originals.items()}
    for name, (obj, attr) in originals.items():
        setattr(obj, attr, _timed(host, name, saved[name]))
    try:
        for _ in range(20):
            engine.step()
    finally:
        for name, (obj, attr) in originals.items():
            setattr(obj, attr, saved[name])
    fig["host_ms"] = {k: statistics.median(v) * 1e3 for k, v in host.items()}
    fig["host_ms"]["append_total"] = sum(host["append"]) / 20 * 1e3

    from torch.profiler import ProfilerActivity, profile

    n_prof = 10
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n_prof):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernels = [e for e in events if getattr(e, "device_time_total", 0) > 0]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    busy_us = sum(e.self_device_time_total for e in events)
    fig["profiled_step_ms"] = wall / n_prof * 1e3
    fig["gpu_busy_ms_per_step"] = busy_us / n_prof / 1e3
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
    (out_dir / f"decode_profile_b{batch}.txt").write_text(table)
    fig["top_kernels"] = [
        {
            "name": e.key[:90],
            "count_per_step": e.count / n_prof,
            "us_per_step": e.self_device_time_total / n_prof,
        }
        for e in sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:25]
        if e.self_device_time_total > 0
    ]
    for i in ids:
        engine.abort(i)
    return fig


def gemv_figures(cfg: ModelConfig, copy_gbs: float) -> list[dict[str, Any]]:
    shapes = {
        "qkv": (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size),
        "o": (cfg.hidden_size, cfg.q_size),
        "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size),
        "down": (cfg.hidden_size, cfg.intermediate_size),
        "lm_head": (cfg.vocab_size, cfg.hidden_size),
    }
    rows = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        for m in (1, 64):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")

            def ten(x: torch.Tensor = x, w: torch.Tensor = w) -> None:
                for _ in range(10):
                    F.linear(x, w)

            t = cuda_time_s(ten, repeat=20) / 10
            gbs = w.numel() * 2 / t / 1e9
            rows.append(
                {"name": name, "m": m, "us": t * 1e6, "gbs": gbs, "of_copy": gbs / copy_gbs}
            )
            log.info("gemv %-8s m=%-3d %8.1f us %7.0f GB/s (%.2f of copy)", name, m, t * 1e6,
                     gbs, gbs / copy_gbs)  # fmt: skip
        del w
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--out-dir", default="results")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_to(out_dir / "decode_profile.log")
    result: dict[str, Any] = {"card": torch.cuda.get_device_name()}
    result["copy_gbs"] = copy_bandwidth_gbs()
    model_cfg = ModelConfig.from_hf_dict(preset_hf_config(args.preset))
    result["gemv"] = gemv_figures(model_cfg, result["copy_gbs"])
    engine = Engine(
        EngineConfig(
            model=model_cfg,
            dtype="bfloat16",
            device="cuda",
            gpu_memory_utilization=0.85,
            max_num_seqs=64,
            max_num_batched_tokens=8192,
            max_model_len=8192,
        )
    )
    result["batches"] = []
    for batch in (1, 64):
        fig = profile_batch(engine, batch, out_dir)
        log.info("b%d: %s", batch, json.dumps({k: v for k, v in fig.items() if k != "top_kernels"}))
        for k in fig["top_kernels"]:
            log.info("   %7.1f us/step %5.1f/step %s", k["us_per_step"], k["count_per_step"],
                     k["name"])  # fmt: skip
        result["batches"].append(fig)
    (out_dir / "decode_profile.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
