"""One engine under open-loop traffic, step by step (GPU machine): where serving time goes.

    python -m loadtest.step_trace --out-dir $OUT
    python -m loadtest.step_trace --rates 4,8 --duration-s 15 --input-len 2048 --output-len 256

The engine of one colocated replica (llama3-8b preset, bf16, random weights, the limits of
cluster_configs/gpu-colocated.yaml) in this process, no cluster around it: Poisson arrivals
of random prompts are added between steps as their time comes, and every step is recorded:

    wall time    of `Engine.step()` (it ends in a host read of the sampled tokens)
    batch        prefill sequences and tokens, decode rows, whether a CUDA graph ran
    compiles     new entries in Triton's on-disk cache during the step (looked up only for
                 steps over SLOW_STEP_S): a JIT compile stalls the whole engine

Each rate runs twice ("cold" then "warm", the second in the same process): compiles in the
first pass and not the second are one-time costs of new batch shapes. Per pass: step time
percentiles by kind (prefill-only, mixed, decode-only), the slow steps listed, and the
engine-side TTFT / TPOT of the requests (no router, no transfer: what the engine alone
gives, to compare with a cluster run of the same workload).

Writes step_trace.json and step_trace.log to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.presets import preset
from engine.sampling_params import SamplingParams
from loadtest.bench_log import log_to
from loadtest.engine_bench_runs import random_prompts
from loadtest.figures import current_commit

log = logging.getLogger("step_trace")
SLOW_STEP_S = 0.15  # a 2k-token prefill is ~50 ms on an H100: 3x that is a stall


def triton_cache_entries() -> int:
    """Entries of Triton's on-disk kernel cache (one per compiled variant), 0 if none."""
    path = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    try:
        return sum(1 for _ in os.scandir(path))
    except FileNotFoundError:
        return 0


def _pcts(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    xs = sorted(xs)

    def at(p: float) -> float:
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]

    return {"n": len(xs), "p50_ms": at(50) * 1e3, "p90_ms": at(90) * 1e3,
            "p99_ms": at(99) * 1e3, "max_ms": xs[-1] * 1e3}  # fmt: skip


def run_pass(
    engine: Engine, rate: float, duration_s: float, input_len: int, output_len: int, seed: int
) -> dict[str, Any]:
    """Poisson arrivals at `rate` for duration_s, then until every request is done."""
    rng = random.Random(seed)
    arrivals: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        arrivals.append(t)
        t += rng.expovariate(rate)
    prompts = random_prompts(len(arrivals), input_len, engine.config.model.vocab_size, seed)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    sent: dict[str, float] = {}
    steps: list[dict[str, Any]] = []
    nxt = 0
    t0 = time.perf_counter()
    while nxt < len(arrivals) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while nxt < len(arrivals) and arrivals[nxt] <= now:
            rid = f"r{seed}-{nxt}"
            engine.add_request(rid, prompts[nxt], params)
            sent[rid] = t0 + arrivals[nxt]  # due time: queueing in this loop counts
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(min(arrivals[nxt] - now, 0.01))
            continue
        s0 = time.perf_counter()
        outputs = engine.step()
        s1 = time.perf_counter()
        batch = engine.current_batch
        num_prefill = batch.num_prefill_seqs
        step = {
            "t_s": s0 - t0,
            "wall_s": s1 - s0,
            "prefill_seqs": num_prefill,
            "prefill_tokens": sum(batch.num_new_tokens[:num_prefill]),
            "decode_rows": len(batch.seqs) - num_prefill,
        }
        if step["wall_s"] > SLOW_STEP_S:
            step["triton_cache_entries"] = triton_cache_entries()
        steps.append(step)
        for out in outputs:
            first.setdefault(out.request_id, s1)
            if out.finished:
                done[out.request_id] = s1
    entries = [s["triton_cache_entries"] for s in steps if "triton_cache_entries" in s]
    kinds: dict[str, list[float]] = {"prefill_only": [], "mixed": [], "decode_only": []}
    for s in steps:
        kind = (
            ("mixed" if s["decode_rows"] else "prefill_only")
            if s["prefill_seqs"]
            else "decode_only"
        )
        kinds[kind].append(s["wall_s"])
    ttft = [first[r] - sent[r] for r in sent]
    tpot = [(done[r] - first[r]) / (output_len - 1) for r in sent if output_len > 1]
    slow = [s for s in steps if s["wall_s"] > SLOW_STEP_S]
    return {
        "rate_rps": rate,
        "num_requests": len(arrivals),
        "num_steps": len(steps),
        "elapsed_s": time.perf_counter() - t0,
        "steps_by_kind": {k: _pcts(v) for k, v in kinds.items()},
        "ttft": _pcts(ttft),
        "tpot": _pcts(tpot),
        "busy_fraction_prefill": sum(s["wall_s"] for s in steps if s["prefill_seqs"])
        / max(time.perf_counter() - t0, 1e-9),
        "slow_steps": slow[:50],
        "num_slow_steps": len(slow),
        "triton_cache_entries_seen": sorted(set(entries)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="4,8", help="requests/s, comma-separated")
    ap.add_argument("--duration-s", type=float, default=15.0)
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--out-dir", type=Path, default=Path("results"))
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_to(args.out_dir / "step_trace.log", "w")
    entries_start = triton_cache_entries()
    t0 = time.perf_counter()
    engine = Engine(EngineConfig(
        model=preset("llama3-8b"), dtype="bfloat16", device="cuda", max_num_seqs=128,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=8192,
    ))  # fmt: skip
    log.info("engine ready in %.1f s; Triton cache entries %d -> %d", time.perf_counter() - t0,
             entries_start, triton_cache_entries())  # fmt: skip
    passes = []
    for i, rate in enumerate(float(r) for r in args.rates.split(",")):
        # Fresh prompts in every pass (a repeated prompt would be a prefix-cache hit).
        for label, seed in (("cold", 2 * i + 1), ("warm", 2 * i + 2)):
            before = triton_cache_entries()
            p = run_pass(engine, rate, args.duration_s, args.input_len, args.output_len, seed)
            p["pass"] = label
            p["new_triton_cache_entries"] = triton_cache_entries() - before
            passes.append(p)
            log.info("rate %.1f %s: %d requests, %d steps in %.1f s; new Triton cache entries "
                     "%d; slow steps %d; steps %s; TTFT %s; TPOT %s", rate, label,
                     p["num_requests"], p["num_steps"], p["elapsed_s"],
                     p["new_triton_cache_entries"], p["num_slow_steps"],
                     json.dumps(p["steps_by_kind"]), json.dumps(p["ttft"]),
                     json.dumps(p["tpot"]))  # fmt: skip
            for s in p["slow_steps"][:15]:
                log.info("  slow step %s", s)
    out = {
        "run": {"date": time.strftime("%Y-%m-%d"), "commit": current_commit(),
                "device": torch.cuda.get_device_name(0), "args": vars(args) | {
                    "out_dir": str(args.out_dir)}},
        "passes": passes,
    }  # fmt: skip
    (args.out_dir / "step_trace.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
