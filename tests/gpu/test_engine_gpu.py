"""The engine on CUDA (bf16, Triton kernels, CUDA graphs) against transformers, within tolerance.

Teacher-forced comparison: Baton generates greedily and reports each token's logprob; the
transformers model scores the same token sequence in one forward pass. The logprobs must agree
within bf16 tolerance at every position, whatever path produced them (fresh prefill, chunked
prefill with context, prefix-cache hits, graph-replayed decode, eager decode).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

transformers = pytest.importorskip("transformers")

from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

HF_CONFIGS = {
    "llama3": transformers.LlamaConfig(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
        initializer_range=0.05,
    ),
    "qwen3": transformers.Qwen3Config(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
        initializer_range=0.05,
    ),
}


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    hf_config = HF_CONFIGS[request.param]
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    hf.eval()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, path


def make_engine(path, **overrides) -> Engine:
    config = EngineConfig(
        model=ModelConfig.from_path(path),
        dtype="bfloat16",
        device="cuda",
        kv_cache_memory_bytes=512 * 2**20,
        max_num_seqs=16,
        max_num_batched_tokens=overrides.pop("max_num_batched_tokens", 2048),
        max_model_len=4096,
        **overrides,
    )
    return Engine(config, model_path=path)


def teacher_forced_logprobs(hf, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf(torch.tensor([tokens], device="cuda")).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # [L, V]


def run(engine: Engine, prompts: list[list[int]], max_tokens: int = 16):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=1)
    outs: dict[str, list] = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
        outs[f"r{i}"] = []
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id].extend(zip(o.new_token_ids, o.logprobs, strict=True))
    return [outs[f"r{i}"] for i in range(len(prompts))]


# bf16 tolerance on a logprob: both models round every activation to 8 mantissa bits, in a
# different order (fused kernels vs transformers' eager ops); on H100 the largest difference
# seen on these models was 0.151 (one position); the bench saw at most 0.063 on the 8B shape.
MAX_LOGPROB_DIFF = 0.25
MEAN_LOGPROB_DIFF = 0.05


def check_against_hf(hf, prompts, results) -> None:
    diffs = []
    for prompt, result in zip(prompts, results, strict=True):
        tokens = prompt + [t for t, _ in result]
        ref = teacher_forced_logprobs(hf, tokens)
        for j, (token, lp) in enumerate(result):
            pos = len(prompt) - 1 + j
            diffs.append(abs(lp.logprob - ref[pos, token].item()))
            assert diffs[-1] < MAX_LOGPROB_DIFF, (pos, lp.logprob)
            # The chosen token is the reference's best up to bf16 near-ties.
            assert ref[pos].max().item() - ref[pos, token].item() < MAX_LOGPROB_DIFF
    assert sum(diffs) / len(diffs) < MEAN_LOGPROB_DIFF


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 4096, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.timeout(600)
def test_mixed_batch_matches_transformers(models) -> None:
    hf, path = models
    engine = make_engine(path)
    prompts = random_prompts([1, 7, 16, 33, 100, 513], seed=1)
    check_against_hf(hf, prompts, run(engine, prompts))
    engine.block_manager.check_idle()


@pytest.mark.timeout(600)
def test_chunked_prefill_and_prefix_hits_match_transformers(models) -> None:
    hf, path = models
    engine = make_engine(path, max_num_batched_tokens=64)
    shared = random_prompts([200], seed=2)[0]
    prompts = [shared + tail for tail in random_prompts([5, 40, 77], seed=3)]
    first = run(engine, prompts[:1])
    rest = run(engine, prompts[1:])
    assert engine.prefix_cache_stats.hit_tokens >= 2 * 192
    check_against_hf(hf, prompts, first + rest)
    engine.block_manager.check_idle()


@pytest.mark.timeout(600)
def test_graph_and_eager_paths_match_transformers(models) -> None:
    hf, path = models
    prompts = random_prompts([30, 64, 90], seed=4)
    graphed = make_engine(path)
    assert graphed.runner._graphs, "decode CUDA graphs were not captured"
    check_against_hf(hf, prompts, run(graphed, prompts))
    eager = make_engine(path, enforce_eager=True)
    assert not eager.runner._graphs
    check_against_hf(hf, prompts, run(eager, prompts))
