"""The transformers side of the engine benchmark (engine_bench.py), on the same GPU.

Three pieces:
  model        a LlamaForCausalLM of the same shape (bf16), given exactly Baton's weights
               (the fused qkv and gate_up projections split back)
  correctness  teacher-forced: Baton's logprob of each token it generated against
               transformers' on the same sequence
  baseline     output tokens/s of batched `generate` and of continuous-batching
               `generate_batch` (when this transformers version has it)
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from engine.engine import Engine
from engine.sampling_params import SamplingParams
from loadtest.engine_bench_runs import GREEDY, random_prompts

log = logging.getLogger("engine_bench")


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
