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

Correctness comes first: before timing, Baton's greedy tokens for a short prompt are checked
against transformers on the same weights (bf16: the first tokens must agree).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.presets import preset_hf_config  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

log = logging.getLogger("engine_bench")
GREEDY = dict(temperature=0.0, ignore_eos=True)


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


# ---- Baton -----------------------------------------------------------------------------------


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def run_to_completion(engine: Engine) -> int:
    tokens = 0
    while engine.has_unfinished():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return tokens


def start_decode_batch(
    engine: Engine, batch: int, context: int, max_tokens: int, seed: int
) -> list[str]:
    """Add `batch` greedy requests of `context - 1` random prompt tokens, prefill them all and
    run three decode steps (warm-up); returns their request ids."""
    cfg = engine.config.model
    params = SamplingParams(max_tokens=max_tokens, **GREEDY)
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    for rid, p in zip(ids, random_prompts(batch, context - 1, cfg.vocab_size, seed), strict=True):
        engine.add_request(rid, p, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()
    for _ in range(3):
        engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return ids


def bench_decode(
    engine: Engine, batch: int, context: int, steps: int, seed: int
) -> dict[str, float]:
    cfg = engine.config.model
    ids = start_decode_batch(engine, batch, context, steps + 8, seed)
    ctx_start = statistics.mean(s.num_tokens for s in engine.scheduler.running)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()  # ends in a host read of the sampled tokens: synchronous
        times.append(time.perf_counter() - t0)
    ctx_mean = ctx_start + steps / 2
    for rid in ids:
        engine.abort(rid)
    step_s = statistics.median(times)
    kv_bytes = batch * ctx_mean * cfg.kv_bytes_per_token(2)
    return {
        "step_ms": step_s * 1e3,
        "bytes": weight_bytes_per_decode_step(cfg, batch) + kv_bytes,
        "context_mean": ctx_mean,
    }


def bench_prefill(engine: Engine, num_tokens: int, seed: int, repeat: int = 5) -> float:
    cfg = engine.config.model
    times = []
    for r in range(repeat + 1):
        (prompt,) = random_prompts(1, num_tokens, cfg.vocab_size, seed + r)
        engine.add_request(f"prefill-{r}", prompt, SamplingParams(max_tokens=1, **GREEDY))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        assert not engine.has_unfinished()
    return statistics.median(times[1:])  # the first run warms up


def bench_offline(
    engine: Engine, num_requests: int, prompt_len: int, output_len: int, seed: int
) -> dict[str, float]:
    cfg = engine.config.model
    prompts = random_prompts(num_requests, prompt_len, cfg.vocab_size, seed)
    params = SamplingParams(max_tokens=output_len, **GREEDY)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"offline-{i}", p, params)
    tokens = run_to_completion(engine)
    elapsed = time.perf_counter() - t0
    assert tokens == num_requests * output_len, tokens
    return {"elapsed_s": elapsed, "output_tokens": tokens}


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


# ---- transformers baseline -------------------------------------------------------------------


def build_hf_model(hf_dict: dict[str, Any]) -> Any:
    import transformers

    config = transformers.LlamaConfig(**{k: v for k, v in hf_dict.items() if k != "architectures"})
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def copy_weights_into_hf(engine: Engine, hf_model: Any) -> None:
    """Give transformers exactly Baton's weights (so the correctness check means something)."""
    ours = dict(engine.model.named_parameters())
    cfg = engine.config.model
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if ".self_attn.q_proj." in name:
                src = ours[name.replace("q_proj", "qkv_proj")][:q]
            elif ".self_attn.k_proj." in name:
                src = ours[name.replace("k_proj", "qkv_proj")][q : q + kv]
            elif ".self_attn.v_proj." in name:
                src = ours[name.replace("v_proj", "qkv_proj")][q + kv :]
            elif ".mlp.gate_proj." in name:
                src = ours[name.replace("gate_proj", "gate_up_proj")][:inter]
            elif ".mlp.up_proj." in name:
                src = ours[name.replace("up_proj", "gate_up_proj")][inter:]
            else:
                src = ours[name]
            param.copy_(src)


def bench_hf(
    hf_model: Any, num_requests: int, prompt_len: int, output_len: int, vocab: int, seed: int
) -> dict[str, float]:
    import transformers

    prompts = random_prompts(num_requests, prompt_len, vocab, seed)
    gen = transformers.GenerationConfig(
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    results: dict[str, float] = {}
    ids = torch.tensor(prompts, device="cuda")
    with torch.inference_mode():
        hf_model.generate(ids[:2, :64], generation_config=gen)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    produced = (out.shape[1] - prompt_len) * num_requests
    results["generate_tokens_per_s"] = produced / elapsed
    try:  # generate_batch runs its own thread; it refuses to run under inference_mode
        t0 = time.perf_counter()
        batch_out = hf_model.generate_batch(inputs=prompts, generation_config=gen)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        produced = sum(len(r.generated_tokens) for r in batch_out.values())
        results["generate_batch_tokens_per_s"] = produced / elapsed
    except Exception as exc:  # an API that moved between transformers versions
        log.warning("generate_batch failed: %r", exc)
    return results


def check_correctness(engine: Engine, hf_model: Any) -> dict[str, float]:
    """Teacher-forced: Baton's logprob of each token it generated vs transformers' (bf16).

    With random weights the logits are nearly flat, so comparing free-running greedy tokens
    would only measure bf16 near-ties; scoring the same sequence with both models does not.
    """
    cfg = engine.config.model
    prompts = random_prompts(4, 96, cfg.vocab_size, seed=1234)
    params = SamplingParams(max_tokens=16, logprobs=1, **GREEDY)
    for i, p in enumerate(prompts):
        engine.add_request(f"check-{i}", p, params)
    got: dict[str, list[tuple[int, float]]] = {f"check-{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += [(lp.token_id, lp.logprob) for lp in out.logprobs]
    worst = 0.0
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            tokens = p + [t for t, _ in got[f"check-{i}"]]
            logits = hf_model(torch.tensor([tokens], device="cuda")).logits[0].float()
            ref = torch.log_softmax(logits, dim=-1)
            for j, (token, lp) in enumerate(got[f"check-{i}"]):
                worst = max(worst, abs(lp - ref[len(p) - 1 + j, token].item()))
    return {"max_logprob_abs_diff": worst}


# ---- main ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--out", default="results/engine_bench.json")
    parser.add_argument("--log", default="results/engine_bench.log")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        handlers=[logging.FileHandler(args.log), logging.StreamHandler()],
    )
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
