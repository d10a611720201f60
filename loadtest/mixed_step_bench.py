"""What a prefill chunk costs a decode batch (GPU machine): the evidence for chunked local
prefill on a decode worker (the conditional route).

    python -m loadtest.mixed_step_bench --out-dir $OUT

For the llama3-8b preset (bf16, random weights): B running decodes at a 2k context, and
prompts of 2k tokens waiting; the scheduler's token budget is set to B + C, so every step
carries the B decodes and C prompt tokens (chunked prefill, one forward pass). For each
(B, C) the median step time over `--steps` steps, and from it:

  extra_ms          step time minus the decode-only step at the same B: what the chunk adds
  us_per_token      extra_ms / C: the price of a prompt token riding along a decode step,
                    against a dedicated prefill step's (the C-token step with B = 0)
  prefill_tok_s     C / step time: prompt tokens the decode GPU takes per second if every
                    step carries a chunk, at that step time (= the decodes' TPOT)

The prompts get max_tokens=1, so they finish when their prefill does and the decode batch
stays at B. Writes mixed_step.json and mixed_step.log to --out-dir. `--preset tiny --device
cpu` runs it in seconds (a smoke test: the figures mean nothing there).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.presets import preset_hf_config
from engine.sampling_params import SamplingParams
from loadtest.bench_log import log_to
from loadtest.engine_bench_runs import GREEDY, random_prompts, start_decode_batch

log = logging.getLogger("mixed_step_bench")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class MixedStepBench:
    def __init__(self, engine: Engine, prompt_len: int, device: str) -> None:
        self.engine = engine
        self.prompt_len = prompt_len
        self.device = device
        self._base_config = engine.scheduler.config
        self._ids = itertools.count()
        self.scheduled: list[tuple[int, int]] = []  # (decodes, prompt tokens) of each step
        schedule = engine.scheduler.schedule

        def recording_schedule():  # noqa: ANN202
            batch = schedule()
            prompt = sum(batch.num_new_tokens[: batch.num_prefill_seqs])
            self.scheduled.append((len(batch.seqs) - batch.num_prefill_seqs, prompt))
            return batch

        engine.scheduler.schedule = recording_schedule  # type: ignore[method-assign]

    def _set_budget(self, tokens: int) -> None:
        self.engine.scheduler.config = dataclasses.replace(
            self._base_config, max_num_batched_tokens=tokens
        )

    def _keep_prompts_waiting(self, needed_tokens: int) -> None:
        """Enough 1-token prompts queued that the next steps all carry a full chunk."""
        queued = sum(s.num_tokens - s.num_computed_tokens for s in self.engine.scheduler.waiting)
        vocab = self.engine.config.model.vocab_size
        params = SamplingParams(max_tokens=1, **GREEDY)
        while queued < needed_tokens:
            n = next(self._ids)
            (prompt,) = random_prompts(1, self.prompt_len, vocab, seed=10_000 + n)
            self.engine.add_request(f"prompt-{n}", prompt, params)
            queued += self.prompt_len

    def time_steps(self, batch: int, chunk: int, steps: int) -> list[float]:
        self._set_budget(batch + chunk if chunk else max(batch, 1))
        times = []
        self.scheduled.clear()
        for i in range(steps + 2):  # the first two settle the chunk pattern
            if chunk:
                self._keep_prompts_waiting(2 * chunk + self.prompt_len)
            _sync(self.device)
            t0 = time.perf_counter()
            self.engine.step()  # ends in a host read of the sampled tokens
            if i >= 2:
                times.append(time.perf_counter() - t0)
        shapes = set(self.scheduled[2:])
        if shapes != {(batch, chunk)}:
            raise RuntimeError(f"steps were not {batch} decodes + {chunk} prompt tokens: {shapes}")
        return times

    def drain_prompts(self) -> None:
        for seq in list(self.engine.scheduler.waiting) + list(self.engine.scheduler.running):
            if seq.request_id.startswith("prompt-"):
                self.engine.abort(seq.request_id)
        self._set_budget(self._base_config.max_num_batched_tokens)


def run(
    engine: Engine,
    batches: list[int],
    chunks: list[int],
    context: int,
    steps: int,
    device: str,
) -> list[dict[str, Any]]:
    bench = MixedStepBench(engine, prompt_len=context, device=device)
    rows: list[dict[str, Any]] = []
    for batch in batches:
        max_tokens = context  # never reached: the batch stays at B
        ids = start_decode_batch(engine, batch, context, max_tokens, seed=batch) if batch else []
        decode_ms = None
        for chunk in [0, *chunks] if batch else chunks:
            ms = statistics.median(bench.time_steps(batch, chunk, steps)) * 1e3
            bench.drain_prompts()
            if chunk == 0:
                decode_ms = ms
            row: dict[str, Any] = {"batch": batch, "chunk": chunk, "step_ms": ms}
            if chunk:
                row["prefill_tok_s"] = chunk / ms * 1e3
                if decode_ms is not None:
                    row["extra_ms"] = ms - decode_ms
                    row["us_per_token"] = (ms - decode_ms) / chunk * 1e3
                else:
                    row["us_per_token"] = ms / chunk * 1e3
            rows.append(row)
            log.info("%s", json.dumps(row))
        for rid in ids:
            engine.abort(rid)
    engine.block_manager.check_idle()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="0,32,64,96,128")
    parser.add_argument("--chunks", default="128,256,512,1024,2048")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out-dir", default="results")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_to(out / "mixed_step.log")
    batches = [int(b) for b in args.batches.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    cuda = args.device == "cuda"
    config = EngineConfig(
        model=ModelConfig.from_hf_dict(preset_hf_config(args.preset)),
        dtype="bfloat16" if cuda else "float32",
        device=args.device,
        gpu_memory_utilization=0.9,
        kv_cache_memory_bytes=None if cuda else 256 * 2**20,
        max_num_seqs=max(batches) + 8,
        max_num_batched_tokens=max(batches) + max(chunks),
        max_model_len=2 * args.context,
        enable_prefix_caching=False,  # every prompt chunk computed, never a cache hit
    )
    engine = Engine(config)
    card = torch.cuda.get_device_name(0) if cuda else "CPU"
    rows = run(engine, batches, chunks, args.context, args.steps, args.device)
    (out / "mixed_step.json").write_text(
        json.dumps(
            {"card": card, "preset": args.preset, "context": args.context, "rows": rows}, indent=2
        )
    )
    print(f"\n=== mixed steps on {card}: {args.preset}, decodes at context {args.context} ===")
    print(f"{'B':>4} {'C':>5} {'step ms':>8} {'extra ms':>9} {'us/token':>9} {'prefill tok/s':>14}")
    for r in rows:
        extra = f"{r['extra_ms']:9.2f}" if "extra_ms" in r else " " * 9
        per = f"{r['us_per_token']:9.2f}" if "us_per_token" in r else " " * 9
        tok = f"{r['prefill_tok_s']:14.0f}" if "prefill_tok_s" in r else ""
        print(f"{r['batch']:>4} {r['chunk']:>5} {r['step_ms']:8.2f} {extra} {per} {tok}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
