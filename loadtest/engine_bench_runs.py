"""Baton's timed runs for the engine benchmark (engine_bench.py): random prompts, greedy.

Each returns what engine_bench.py turns into figures:
  decode      a batch prefilled and warmed up (`start_decode_batch`), then the median step
              time, with the bytes that step reads (weights + KV) for the floor
  prefill     one prompt in one step, median of `repeat` after a warm-up
  offline     requests all added at once and run to completion: elapsed time, output tokens
"""

from __future__ import annotations

import statistics
import time

import torch

from engine.engine import Engine
from engine.sampling_params import SamplingParams
from loadtest.engine_bench_roofline import weight_bytes_per_decode_step

GREEDY = dict(temperature=0.0, ignore_eos=True)


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
