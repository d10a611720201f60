"""Greedy tokens of the engine equal transformers' `generate` on the same weights (float32, CPU).

Each architecture is built with its transformers config class and random weights (norm scales
and biases randomised too, so that every parameter matters), saved as safetensors and loaded
back by the engine. The scenarios cover what changes the engine's arithmetic path but must not
change its tokens: batches mixing prompt lengths, prefix-cache hits, chunked prefill,
preemption with recompute, and prefill/decode disaggregation through the engine's own block
operations. Every scenario ends with all blocks free or cached.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine, PoolExhausted, RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import FinishReason

VOCAB_SIZE = 256
MAX_LEN = 256  # max_position_embeddings of every test model, and the engines' context
BLOCK_SIZE = 16
NUM_NEW_TOKENS = 16

COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": MAX_LEN,
    "initializer_range": 0.1,  # well-separated logits: argmax is not decided by rounding
    "bos_token_id": None,
    "eos_token_id": None,  # generate() runs to max_new_tokens, like ignore_eos=True
    "pad_token_id": None,
}

HF_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    # llama3 rope scaling (with an original context short enough to scale these frequencies),
    # tied embeddings, head_dim 32 != 64 / 4, biases on every projection.
    "llama": lambda: transformers.LlamaConfig(
        **COMMON,
        head_dim=32,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=MAX_LEN),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),  # q/k/v bias
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32),  # q/k RMSNorm
}
ARCHS = list(HF_CONFIGS)


@dataclass
class Reference:
    """One random-weight transformers model, its checkpoint folder and cached greedy outputs."""

    arch: str
    model: transformers.PreTrainedModel
    path: Path
    _greedy: dict[tuple[tuple[int, ...], int], list[int]] = field(default_factory=dict)

    def greedy(self, prompt: list[int], num_new_tokens: int = NUM_NEW_TOKENS) -> list[int]:
        key = (tuple(prompt), num_new_tokens)
        if key not in self._greedy:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),  # token 0 is not padding here
                    do_sample=False,
                    max_new_tokens=num_new_tokens,
                )
            tokens = out[0, len(prompt) :].tolist()
            assert len(tokens) == num_new_tokens
            self._greedy[key] = tokens
        return self._greedy[key]

    def engine(self, **overrides: Any) -> Engine:
        settings: dict[str, Any] = {
            "model": ModelConfig.from_path(self.path),
            "block_size": BLOCK_SIZE,
            "num_kv_blocks": 64,
        }
        settings.update(overrides)
        return Engine(EngineConfig(**settings), model_path=self.path)


def build_reference(arch: str, folder: Path) -> Reference:
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[arch]()).eval()
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return Reference(arch, model, folder)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices gain nothing from threads, and on a shared 2-core machine a spinning
    second thread that loses its core makes every op wait: one thread is faster and steady."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def references() -> Iterator[dict[str, Reference]]:
    """Architecture -> Reference, built on first use so that -k runs pay only for theirs."""
    refs: dict[str, Reference] = {}
    yield refs
    refs.clear()


@pytest.fixture(params=ARCHS)
def ref(
    request: pytest.FixtureRequest,
    references: dict[str, Reference],
    tmp_path_factory: pytest.TempPathFactory,
) -> Reference:
    return get_reference(request.param, references, tmp_path_factory)


@pytest.fixture
def qwen3(references: dict[str, Reference], tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return get_reference("qwen3", references, tmp_path_factory)


def get_reference(
    arch: str, references: dict[str, Reference], tmp_path_factory: pytest.TempPathFactory
) -> Reference:
    if arch not in references:
        references[arch] = build_reference(arch, tmp_path_factory.mktemp(arch))
    return references[arch]


def random_prompt(num_tokens: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (num_tokens,), generator=g).tolist()


GREEDY = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True)


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    outputs: list[RequestOutput] = field(default_factory=list)

    @property
    def final(self) -> RequestOutput:
        return self.outputs[-1]


def run_to_completion(
    engine: Engine, results: dict[str, Result] | None = None, max_steps: int = 2000
) -> dict[str, Result]:
    """Step until no request is left; a hang fails the test instead of stalling the run."""
    results = {} if results is None else results
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return results
        for out in engine.step():
            result = results.setdefault(out.request_id, Result())
            result.token_ids.extend(out.new_token_ids)
            result.outputs.append(out)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def run_requests(
    engine: Engine, prompts: dict[str, list[int]], params: SamplingParams = GREEDY
) -> dict[str, Result]:
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params)
    return run_to_completion(engine)


def record_batches(engine: Engine) -> list[dict[str, int]]:
    """Wrap the engine's scheduler to record {request_id: tokens} of every batch."""
    batches: list[dict[str, int]] = []
    schedule = engine.scheduler.schedule

    def recording() -> ScheduledBatch:
        batch = schedule()
        batches.append(
            {s.request_id: n for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)}
        )
        return batch

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    return batches


def assert_idle(engine: Engine) -> None:
    assert not engine.has_unfinished()
    assert engine.scheduler.num_unfinished == 0
    engine.block_manager.check_idle()
    assert engine.num_free_blocks == engine.block_manager.num_blocks


# ---- colocated exactness -------------------------------------------------------------------


def test_mixed_prompt_lengths_in_one_batch(ref: Reference) -> None:
    prompts = {f"len{n}": random_prompt(n, seed=n) for n in (1, 7, 16, 33, 100)}
    engine = ref.engine()
    batches = record_batches(engine)
    results = run_requests(engine, prompts)
    assert batches[0] == {"len1": 1, "len7": 7, "len16": 16, "len33": 33, "len100": 100}
    assert all(len(b) == 5 for b in batches)  # all five in flight until the end
    for request_id, prompt in prompts.items():
        assert results[request_id].token_ids == ref.greedy(prompt), request_id
        assert results[request_id].final.finish_reason is FinishReason.LENGTH
    assert_idle(engine)


def test_prefix_cache_hits(ref: Reference) -> None:
    prefix = random_prompt(48, seed=100)
    prompts = {
        "a": prefix + random_prompt(5, seed=101),
        "b": prefix + random_prompt(9, seed=102),
        "aligned": prefix + random_prompt(16, seed=103),  # 64 tokens: 4 full blocks
    }
    engine = ref.engine()

    first = run_requests(engine, prompts)  # one batch: nobody's blocks are cached yet
    assert [first[r].final.num_cached_tokens for r in prompts] == [0, 0, 0]
    assert engine.prefix_cache_stats.hit_tokens == 0
    assert_idle(engine)

    second = run_requests(engine, prompts)
    # 48 = the shared prefix's 3 blocks; the aligned prompt's 4th block is recomputed so
    # that one token is left to produce logits from.
    assert [second[r].final.num_cached_tokens for r in prompts] == [48, 48, 48]
    assert all(out.num_cached_tokens == 48 for r in prompts for out in second[r].outputs)
    stats = engine.prefix_cache_stats
    assert stats.queried_tokens == 2 * (53 + 57 + 64)
    assert stats.hit_tokens == 3 * 48
    for request_id, prompt in prompts.items():
        expected = ref.greedy(prompt)
        assert first[request_id].token_ids == expected, request_id
        assert second[request_id].token_ids == expected, request_id
    assert_idle(engine)

    # A later request sharing only the prefix hits it too.
    other = prefix + random_prompt(20, seed=104)
    late = run_requests(engine, {"late": other})
    assert late["late"].final.num_cached_tokens == 48
    assert late["late"].token_ids == ref.greedy(other)
    assert_idle(engine)


def test_prefix_cache_salt_isolates_tenants(qwen3: Reference) -> None:
    prompt = random_prompt(40, seed=200)
    engine = qwen3.engine()
    results: dict[str, Result] = {}
    for request_id, salt in (("a1", "tenant-a"), ("b1", "tenant-b"), ("a2", "tenant-a")):
        engine.add_request(request_id, prompt, GREEDY, cache_salt=salt)
        run_to_completion(engine, results)
    assert [results[r].final.num_cached_tokens for r in ("a1", "b1", "a2")] == [0, 0, 32]
    expected = qwen3.greedy(prompt)
    assert all(results[r].token_ids == expected for r in results)
    assert_idle(engine)


def test_chunked_prefill(ref: Reference) -> None:
    prompts = {"long": random_prompt(100, seed=300), "short": random_prompt(33, seed=301)}
    engine = ref.engine(max_num_batched_tokens=16)
    batches = record_batches(engine)
    results = run_requests(engine, prompts)
    assert all(sum(b.values()) <= 16 for b in batches)
    long_chunks = [b["long"] for b in batches if "long" in b]
    short_chunks = [b["short"] for b in batches if "short" in b]
    assert long_chunks[:7] == [16, 16, 16, 16, 16, 16, 4]
    assert short_chunks[:3] == [12, 15, 6]  # what the long prompt and its decode leave over
    for request_id, prompt in prompts.items():
        assert results[request_id].token_ids == ref.greedy(prompt), request_id
    assert_idle(engine)


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_preemption_with_a_tiny_pool(ref: Reference, enable_prefix_caching: bool) -> None:
    prompts = {f"p{i}": random_prompt(n, seed=400 + i) for i, n in enumerate((20, 35, 30, 45))}
    params = dataclasses.replace(GREEDY, max_tokens=24)
    # Each request needs at most 5 blocks at its longest; together they need 16.
    engine = ref.engine(num_kv_blocks=7, enable_prefix_caching=enable_prefix_caching)
    results = run_requests(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    for request_id, prompt in prompts.items():
        assert results[request_id].token_ids == ref.greedy(prompt, 24), request_id
    assert_idle(engine)


def test_chunking_preemption_and_prefix_hits_together(ref: Reference) -> None:
    """Staggered arrivals into a small pool and budget with 4-token blocks: every mechanism
    that reorders the arithmetic fires in one run."""
    prefix = random_prompt(20, seed=1000)
    prompts = {
        f"r{i}": prefix[: 4 * i + 4] + random_prompt(3 + 5 * i, seed=1001 + i) for i in range(5)
    }
    params = dataclasses.replace(GREEDY, max_tokens=20)
    engine = ref.engine(block_size=4, num_kv_blocks=24, max_num_batched_tokens=8, max_num_seqs=3)
    batches = record_batches(engine)
    pending = list(prompts.items())
    for request_id, prompt in pending[:2]:
        engine.add_request(request_id, prompt, params)
    results: dict[str, Result] = {}
    for request_id, prompt in pending[2:]:  # one more arrival after each step
        for out in engine.step():
            results.setdefault(out.request_id, Result()).token_ids.extend(out.new_token_ids)
        engine.add_request(request_id, prompt, params)
    run_to_completion(engine, results)

    assert engine.scheduler.num_preemptions > 0
    assert engine.prefix_cache_stats.hit_tokens > 0
    assert engine.prefix_cache_stats.evictions > 0
    assert max(sum(b.values()) for b in batches) == 8
    assert max(len(b) for b in batches) == 3
    for request_id, prompt in prompts.items():
        assert results[request_id].token_ids == ref.greedy(prompt, 20), request_id
    assert_idle(engine)


# ---- disaggregation through the engine's own block operations -------------------------------


@pytest.mark.parametrize("warm_prefill", [False, True], ids=["cold_prefill", "warm_prefill"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_disaggregated_prefill_and_decode(
    arch: str,
    warm_prefill: bool,
    references: dict[str, Reference],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    ref = get_reference(arch, references, tmp_path_factory)
    prefix = random_prompt(48, seed=500)
    prompt = prefix + random_prompt(13, seed=501)  # 61 tokens: 3 full blocks + 13 tokens
    expected = ref.greedy(prompt)

    colocated = run_requests(ref.engine(), {"r": prompt})["r"].token_ids
    assert colocated == expected

    prefill, decode = ref.engine(), ref.engine()
    # The decode engine has seen the prefix before: its first 3 blocks will not be sent.
    # A warm prefill engine has it too, and holds those shared cached blocks for export.
    warmup = prefix + random_prompt(7, seed=502)
    for engine in (decode, prefill) if warm_prefill else (decode,):
        assert run_requests(engine, {"warmup": warmup})["warmup"].token_ids == ref.greedy(warmup)

    prefill.add_request("r", prompt, dataclasses.replace(GREEDY, max_tokens=1), hold_kv=True)
    streamed: dict[int, torch.Tensor] = {}  # what a sender reads as soon as a layer is done

    def on_layer_done(layer: int) -> None:
        (seq,) = prefill.scheduler.running
        streamed[layer] = prefill.pool.read_blocks(layer, seq.block_table)

    (first_output,) = prefill.step(on_layer_done)
    first = Result([*first_output.new_token_ids], [first_output])
    assert first.token_ids == expected[:1]
    assert first.final.finished and first.final.finish_reason is FinishReason.LENGTH
    assert first.final.num_cached_tokens == (48 if warm_prefill else 0)
    assert list(streamed) == [0, 1]
    assert not prefill.has_unfinished()
    src_blocks, num_kv_tokens = prefill.held_blocks("r")
    assert num_kv_tokens == 61 and len(src_blocks) == 4
    assert prefill.num_free_blocks == 64 - 4

    reservation = decode.reserve("r", prompt, GREEDY)
    assert reservation.num_cached_tokens == 48
    assert len(reservation.block_ids) == 4
    skip = reservation.num_cached_tokens // BLOCK_SIZE
    sent = [prefill.pool.read_blocks(layer, src_blocks) for layer in range(2)]
    for layer, data in enumerate(sent):  # each layer was complete when its callback ran
        assert torch.equal(streamed[layer].view(torch.int32), data.view(torch.int32))
    for layer, data in enumerate(sent):
        # data: [2 (K, V), 4 blocks, block_size, Hkv, D]
        decode.pool.write_blocks(layer, reservation.block_ids[skip:], data[:, skip:])
    for layer, data in enumerate(sent):
        received = decode.pool.read_blocks(layer, reservation.block_ids)
        # The written blocks are byte-identical (unused slots of the last block included).
        assert torch.equal(
            received[:, skip:].contiguous().view(torch.int32),
            data[:, skip:].contiguous().view(torch.int32),
        )
        # The cached prefix was computed by the decode engine itself: same values.
        torch.testing.assert_close(received[:, :skip], data[:, :skip], rtol=0, atol=1e-5)

    assert prefill.release("r")
    assert not prefill.release("r")
    assert_idle(prefill)

    committed = decode.commit("r", first.token_ids[0])
    assert committed.new_token_ids == expected[:1] and not committed.finished
    assert committed.num_cached_tokens == 48
    rest = run_to_completion(decode)["r"]
    assert first.token_ids + rest.token_ids == expected == colocated
    assert rest.final.finish_reason is FinishReason.LENGTH
    assert_idle(decode)


def test_reservation_errors_and_cancel(qwen3: Reference) -> None:
    engine = qwen3.engine(num_kv_blocks=4)
    prompt = random_prompt(40, seed=600)
    reservation = engine.reserve("r1", prompt, GREEDY)
    assert reservation.block_ids == [0, 1, 2] and reservation.num_cached_tokens == 0
    with pytest.raises(ValueError, match="already in use"):
        engine.reserve("r1", prompt, GREEDY)
    with pytest.raises(PoolExhausted):
        engine.reserve("r2", random_prompt(20, seed=601), GREEDY)
    assert engine.num_free_blocks == 1
    assert engine.cancel_reservation("r1")
    assert not engine.cancel_reservation("r1")
    assert_idle(engine)

    engine.reserve("r3", prompt, GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.commit("r3", VOCAB_SIZE)
    assert_idle(engine)
    engine.reserve("r4", prompt, GREEDY)
    assert engine.abort("r4")  # abort reaches reservations too
    assert_idle(engine)


# ---- sampling, finishing, aborting ---------------------------------------------------------


def test_seeded_sampling_is_independent_of_the_batch(qwen3: Reference) -> None:
    prompt = random_prompt(20, seed=700)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=42, ignore_eos=True)
    other_seed = dataclasses.replace(seeded, seed=43)
    unseeded = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)

    alone = run_requests(qwen3.engine(), {"x": prompt}, seeded)["x"].token_ids

    engine = qwen3.engine(seed=7)
    engine.add_request("other1", random_prompt(50, seed=701), unseeded)
    engine.add_request("x", prompt, seeded)
    engine.add_request("greedy", random_prompt(3, seed=702), GREEDY)
    engine.add_request("y", prompt, other_seed)
    results = run_to_completion(engine)
    assert len(alone) == 16
    assert results["x"].token_ids == alone
    assert results["y"].token_ids != alone
    assert results["greedy"].token_ids == qwen3.greedy(random_prompt(3, seed=702))
    assert_idle(engine)


def test_stop_token_and_max_tokens_finish_reasons(qwen3: Reference) -> None:
    prompt = random_prompt(24, seed=800)
    expected = qwen3.greedy(prompt)
    stop_at = next(i for i in range(2, NUM_NEW_TOKENS) if expected[i] not in expected[:i])
    stop = dataclasses.replace(GREEDY, stop_token_ids=(expected[stop_at],))
    short = dataclasses.replace(GREEDY, max_tokens=3)
    engine = qwen3.engine()
    engine.add_request("stop", prompt, stop)
    engine.add_request("short", prompt, short)
    results = run_to_completion(engine)

    assert results["stop"].token_ids == expected[: stop_at + 1]  # the stop token is output
    assert results["stop"].final.finish_reason is FinishReason.STOP
    assert [o.finished for o in results["stop"].outputs] == [False] * stop_at + [True]
    assert results["short"].token_ids == expected[:3]
    assert [o.finish_reason for o in results["short"].outputs] == [None, None, FinishReason.LENGTH]
    assert [o.num_output_tokens for o in results["short"].outputs] == [1, 2, 3]
    assert all(o.num_prompt_tokens == 24 for o in results["short"].outputs)
    assert_idle(engine)


def test_eos_stops_unless_ignored(qwen3: Reference) -> None:
    prompt = random_prompt(24, seed=801)
    expected = qwen3.greedy(prompt)
    eos_at = next(i for i in range(2, NUM_NEW_TOKENS) if expected[i] not in expected[:i])
    model = dataclasses.replace(
        ModelConfig.from_path(qwen3.path), eos_token_ids=(expected[eos_at],)
    )
    engine = qwen3.engine(model=model)
    engine.add_request("eos", prompt, dataclasses.replace(GREEDY, ignore_eos=False))
    engine.add_request("ignore", prompt, GREEDY)
    results = run_to_completion(engine)
    assert results["eos"].token_ids == expected[: eos_at + 1]
    assert results["eos"].final.finish_reason is FinishReason.STOP
    assert results["ignore"].token_ids == expected
    assert_idle(engine)


def test_context_limit_finishes_with_length(qwen3: Reference) -> None:
    prompt = random_prompt(MAX_LEN - 6, seed=802)
    engine = qwen3.engine()
    result = run_requests(engine, {"r": prompt})["r"]
    assert result.token_ids == qwen3.greedy(prompt, 6)
    assert result.final.finish_reason is FinishReason.LENGTH
    assert_idle(engine)


def test_abort_mid_generation_frees_blocks(qwen3: Reference) -> None:
    engine = qwen3.engine(num_kv_blocks=8)
    keep, drop = random_prompt(20, seed=900), random_prompt(40, seed=901)
    engine.add_request("keep", keep, GREEDY)
    engine.add_request("drop", drop, GREEDY)
    engine.add_request("queued", random_prompt(60, seed=902), GREEDY)  # does not fit yet
    for _ in range(3):
        engine.step()
    assert engine.num_free_blocks == 8 - 2 - 3
    assert [s.request_id for s in engine.scheduler.waiting] == ["queued"]
    assert engine.abort("queued")
    assert engine.abort("drop")
    assert engine.num_free_blocks == 8 - 2
    assert not engine.abort("drop") and not engine.abort("never-added")
    results = run_to_completion(engine)
    assert set(results) == {"keep"}
    assert engine.step() == []  # nothing left to do
    # Three steps ran before the abort; the rest of keep's tokens arrive afterwards.
    assert results["keep"].token_ids == qwen3.greedy(keep)[3:]
    assert_idle(engine)

    engine.add_request("held", keep, dataclasses.replace(GREEDY, max_tokens=1), hold_kv=True)
    run_to_completion(engine)
    assert engine.num_free_blocks == 8 - 2
    assert engine.abort("held")  # abort reaches held KV too
    assert_idle(engine)


def test_add_request_errors(qwen3: Reference) -> None:
    engine = qwen3.engine(num_kv_blocks=4)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(ValueError, match="the context holds 256"):
        engine.add_request("long", [1] * MAX_LEN, GREEDY)
    with pytest.raises(ValueError, match=r"integers in \[0, 256\)"):
        engine.add_request("oov", [1, VOCAB_SIZE], GREEDY)
    with pytest.raises(ValueError, match=r"integers in \[0, 256\)"):
        engine.add_request("negative", [-1, 2], GREEDY)
    with pytest.raises(ValueError, match="needs 5 KV blocks.*the pool has 4"):
        engine.add_request("big", [1] * 60, dataclasses.replace(GREEDY, max_tokens=10))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.add_request("stop", [1, 2], SamplingParams(stop=("x",)))
    engine.add_request("dup", [1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="'dup' is already in use"):
        engine.add_request("dup", [4, 5, 6], GREEDY)
    assert engine.scheduler.num_unfinished == 1  # the refused duplicate replaced nothing
    assert engine.abort("dup")
    assert_idle(engine)


# ---- concurrency and start-up --------------------------------------------------------------


def test_a_step_releases_its_lock_while_the_batch_computes(ref: Reference) -> None:
    """A decode worker's lock is free during the forward: another thread's reserve, add and
    abort go through meanwhile; an abort of a sequence of the batch in flight is applied at
    the step's end (no token for it, its blocks freed); every other token is unchanged."""
    engine = ref.engine()
    lock = threading.Lock()
    prompts = {f"r{i}": random_prompt(20 + i, seed=600 + i) for i in range(3)}
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, GREEDY)
    late = random_prompt(30, seed=610)
    seen: list[bool] = []

    def another_thread() -> None:
        with lock:
            assert engine.abort("r1")  # in the batch: deferred
            engine.add_request("late", late, GREEDY)
            engine.reserve("imported", random_prompt(40, seed=611), GREEDY)

    def on_layer_done(layer: int) -> None:  # inside the forward
        if layer == 0:
            seen.append(lock.locked())
            thread = threading.Thread(target=another_thread)
            thread.start()
            thread.join(10.0)
            assert not thread.is_alive(), "the step kept its lock during the forward"

    with lock:
        first = engine.step(on_layer_done, lock=lock)
        assert lock.locked()  # taken back before the step returned
    assert seen == [False]
    assert sorted(o.request_id for o in first) == ["r0", "r2"]
    results = {o.request_id: Result([*o.new_token_ids], [o]) for o in first}
    results = run_to_completion(engine, results)
    assert sorted(results) == ["late", "r0", "r2"]
    for request_id in ("r0", "r2"):
        assert results[request_id].token_ids == ref.greedy(prompts[request_id])
    assert results["late"].token_ids == ref.greedy(late)
    assert engine.cancel_reservation("imported")
    assert_idle(engine)


def test_warm_up_batches_write_the_scratch_block_only(ref: Reference) -> None:
    """ModelRunner.warm_up's batches (CUDA start-up) leave every block but the scratch
    block as it was: a warm-up can never corrupt cached KV."""
    engine = ref.engine()
    run_requests(engine, {"a": random_prompt(40, seed=700)})  # cached blocks with content
    runner = engine.runner
    assert runner.scratch_block is not None
    bits = engine.pool.cache.view(torch.int32)  # bit patterns: unused slots may hold NaNs
    before = bits.clone()
    for query, rows, width in [(0, 1, 2), (17, 0, 2), (17, 3, 4), (100, 5, 16), (0, 40, 16)]:
        runner._warm_batch(query, rows, width)
    others = torch.ones(engine.pool.cache.shape[2], dtype=torch.bool)
    others[runner.scratch_block] = False
    assert torch.equal(before[:, :, others], bits[:, :, others])
    assert not torch.equal(before[:, :, ~others], bits[:, :, ~others])
