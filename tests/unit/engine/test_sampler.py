from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingRow,
    TokenLogprobs,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    make_generator,
)
from engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


def row(
    params: SamplingParams,
    prompt: tuple[int, ...] = (),
    output: tuple[int, ...] = (),
) -> SamplingRow:
    generator = None if params.seed is None else make_generator(params.seed, CPU)
    return SamplingRow(
        params=params, prompt_token_ids=prompt, output_token_ids=output, generator=generator
    )


def sampler(seed: int = 0) -> Sampler:
    return Sampler(make_generator(seed, CPU))


def random_logits(num_rows: int, vocab_size: int, seed: int) -> torch.Tensor:
    return torch.randn(num_rows, vocab_size, generator=make_generator(seed, CPU))


GREEDY = SamplingParams(temperature=0.0)


# --- greedy ---------------------------------------------------------------------------------


def test_greedy_hot_path_is_argmax_and_draws_nothing() -> None:
    logits = random_logits(5, 50, seed=1).to(torch.bfloat16)
    s = sampler()
    state_before = s.default_generator.get_state()

    out = s(logits, [row(GREEDY) for _ in range(5)])

    assert out == SamplerOutput(
        token_ids=logits.float().argmax(dim=-1).tolist(), logprobs=[None] * 5
    )
    assert torch.equal(s.default_generator.get_state(), state_before)


def test_greedy_rows_in_general_path_equal_argmax() -> None:
    # A sampled row and a logprobs row force the general path; greedy rows stay argmax.
    logits = random_logits(4, 50, seed=2)
    rows = [
        row(GREEDY),
        row(SamplingParams(temperature=1.0, seed=3)),
        row(SamplingParams(temperature=0.0, logprobs=2)),
        row(GREEDY),
    ]
    out = sampler()(logits, rows)
    expected = logits.argmax(dim=-1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 3)] == [expected[0], expected[2], expected[3]]
    assert out.logprobs[0] is None and out.logprobs[1] is None and out.logprobs[3] is None


def test_batch_size_must_match_rows() -> None:
    with pytest.raises(AssertionError):
        sampler()(torch.zeros(3, 10), [row(GREEDY), row(GREEDY)])


def test_seed_requires_generator() -> None:
    with pytest.raises(AssertionError):
        SamplingRow(
            params=SamplingParams(seed=1), prompt_token_ids=(), output_token_ids=(), generator=None
        )


# --- penalties ------------------------------------------------------------------------------

# V = 6; every value is exact in float32 so the penalised logits compare exactly.
RAW = [2.0, -1.0, 0.5, 3.0, -2.0, 0.75]


def test_penalties_exact_logits() -> None:
    logits = torch.tensor([RAW, RAW, RAW])
    rows = [
        # prompt {0, 1}; output 3 twice, 2 once
        row(
            SamplingParams(
                temperature=0.0,
                repetition_penalty=2.0,
                frequency_penalty=0.5,
                presence_penalty=0.25,
            ),
            prompt=(0, 1),
            output=(3, 3, 2),
        ),
        # repetition only: prompt tokens count too, output tokens 4 and 5
        row(SamplingParams(repetition_penalty=4.0), prompt=(3,), output=(4, 5, 5)),
        # no penalties: unchanged
        row(SamplingParams(), prompt=(0, 1, 2), output=(3,)),
    ]

    penalised = apply_penalties(logits, rows)

    expected = torch.tensor(
        [
            # 0: 2/2; 1: -1*2; 2: 0.5/2 - 0.5 - 0.25; 3: 3/2 - 0.5*2 - 0.25; 4, 5 untouched
            [1.0, -2.0, -0.5, 0.25, -2.0, 0.75],
            # 3: 3/4; 4: -2*4; 5: 0.75/4
            [2.0, -1.0, 0.5, 0.75, -8.0, 0.1875],
            RAW,
        ]
    )
    assert torch.equal(penalised, expected)


def test_penalties_move_greedy_argmax_and_leave_input_alone() -> None:
    logits = torch.tensor([RAW, RAW])
    before = logits.clone()
    rows = [
        row(
            SamplingParams(
                temperature=0.0,
                repetition_penalty=2.0,
                frequency_penalty=0.5,
                presence_penalty=0.25,
            ),
            prompt=(0, 1),
            output=(3, 3, 2),
        ),
        row(GREEDY, prompt=(0, 1), output=(3, 3, 2)),
    ]
    out = sampler()(logits, rows)
    assert out.token_ids == [0, 3]
    assert torch.equal(logits, before)


# --- top-k / top-p / min-p ------------------------------------------------------------------

# Probabilities 0.5, 0.3, 0.15, 0.05 (token order shuffled to exercise the sort).
PROBS = [0.15, 0.5, 0.05, 0.3]
LOGITS = [math.log(p) for p in PROBS]
NEG_INF = float("-inf")


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(r != NEG_INF).flatten().tolist() for r in logits]


def test_top_k_top_p_masks() -> None:
    logits = torch.tensor([LOGITS] * 5)
    top_k = torch.tensor([2, 4, 4, 4, 3])
    top_p = torch.tensor([1.0, 0.7, 0.85, 1e-6, 0.9])
    masked = apply_top_k_top_p(logits, top_k, top_p)
    assert kept(masked) == [
        [1, 3],  # top-2
        [1, 3],  # 0.5 < 0.7, 0.5 + 0.3 reaches it
        [0, 1, 3],  # 0.8 < 0.85, 0.95 reaches it
        [1],  # only the best
        [0, 1, 3],  # top-3 first, then the nucleus of the renormalised survivors
    ]
    assert torch.equal(masked[0][[1, 3]], logits[0][[1, 3]])


def test_top_k_keeps_ties_with_kth_value() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    masked = apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert kept(masked) == [[1, 2, 3]]


def test_min_p_mask() -> None:
    logits = torch.tensor([LOGITS] * 3)
    # thresholds: 0.2 * 0.5 = 0.1; 0.7 * 0.5 = 0.35; 0
    masked = apply_min_p(logits, torch.tensor([0.2, 0.7, 0.0]))
    assert kept(masked) == [[0, 1, 3], [1], [0, 1, 2, 3]]


def test_top_k_1_equals_greedy_for_sampled_rows() -> None:
    logits = random_logits(8, 100, seed=4) * 0.1  # flat, so a real draw would stray
    rows = [row(SamplingParams(temperature=1.5, top_k=1, seed=i)) for i in range(8)]
    assert sampler()(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_keeps_only_the_max() -> None:
    logits = torch.tensor([LOGITS] * 500)
    rows = [row(SamplingParams(temperature=1.0, top_p=1e-6)) for _ in range(500)]
    assert sampler(seed=5)(logits, rows).token_ids == [1] * 500


def test_min_p_draws_only_allowed_tokens() -> None:
    logits = torch.tensor([LOGITS] * 2000)
    rows = [row(SamplingParams(temperature=1.0, min_p=0.2)) for _ in range(2000)]
    assert set(sampler(seed=6)(logits, rows).token_ids) == {0, 1, 3}


# --- reproducibility ------------------------------------------------------------------------


def seeded_sequence(seed: int, position: int, batch_size: int, steps: int) -> list[int]:
    """Tokens drawn for a seeded row at `position` of a batch of unseeded and other rows."""
    target = SamplingParams(temperature=0.8, top_p=0.95, seed=seed)
    generator = make_generator(seed, CPU)
    s = sampler(seed=100 + batch_size)
    tokens: list[int] = []
    for step in range(steps):
        rows = [
            row(SamplingParams(temperature=1.0, seed=1000 + i)) if i % 2 else row(SamplingParams())
            for i in range(batch_size)
        ]
        rows[position] = SamplingRow(
            params=target, prompt_token_ids=(), output_token_ids=tuple(tokens), generator=generator
        )
        logits = random_logits(batch_size, 64, seed=10_000 + step * 7 + batch_size)
        logits[position] = random_logits(1, 64, seed=step)[0]
        tokens.append(s(logits, rows).token_ids[position])
    return tokens


def test_same_seed_same_tokens_across_batches() -> None:
    alone = seeded_sequence(seed=42, position=0, batch_size=1, steps=20)
    assert seeded_sequence(seed=42, position=2, batch_size=5, steps=20) == alone
    assert seeded_sequence(seed=42, position=0, batch_size=3, steps=20) == alone
    assert seeded_sequence(seed=42, position=6, batch_size=7, steps=20) == alone


def test_different_seeds_differ() -> None:
    a = seeded_sequence(seed=42, position=0, batch_size=1, steps=20)
    b = seeded_sequence(seed=43, position=0, batch_size=1, steps=20)
    assert a != b


# --- logprobs -------------------------------------------------------------------------------


def test_logprobs_come_from_raw_logits() -> None:
    logits = random_logits(3, 30, seed=7)
    rows = [
        # penalties and temperature must not change the reported logprobs
        row(
            SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=5, seed=8),
            prompt=(1, 2, 3),
            output=(4,),
        ),
        row(SamplingParams(temperature=0.0, logprobs=0)),
        row(SamplingParams(temperature=0.0)),
    ]
    out = sampler()(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)

    first = out.logprobs[0]
    assert isinstance(first, TokenLogprobs)
    assert first.token_id == out.token_ids[0]
    assert first.logprob == raw[0, first.token_id].item()
    assert len(first.top) == 5
    assert [t for t, _ in first.top] == raw[0].topk(5).indices.tolist()
    values = [v for _, v in first.top]
    assert values == sorted(values, reverse=True)
    assert values == raw[0].topk(5).values.tolist()

    second = out.logprobs[1]
    assert isinstance(second, TokenLogprobs)
    assert second.token_id == out.token_ids[1] == logits[1].argmax().item()
    assert second.logprob == raw[1].max().item()
    assert second.top == ()

    assert out.logprobs[2] is None


# --- distribution ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_seeded_draws_follow_softmax(temperature: float) -> None:
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0]])
    generator = make_generator(9, CPU)
    params = SamplingParams(temperature=temperature, seed=9)
    s = sampler()
    counts: Counter[int] = Counter()
    for _ in range(4000):
        rows = [
            SamplingRow(
                params=params, prompt_token_ids=(), output_token_ids=(), generator=generator
            )
        ]
        counts[s(logits, rows).token_ids[0]] += 1
    expected = (logits[0] / temperature).softmax(dim=-1).tolist()
    for token, p in enumerate(expected):
        assert counts[token] / 4000 == pytest.approx(p, abs=0.03)


def test_unseeded_batched_draws_follow_softmax() -> None:
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0]] * 4000)
    rows = [row(SamplingParams(temperature=1.0)) for _ in range(4000)]
    counts = Counter(sampler(seed=10)(logits, rows).token_ids)
    for token, p in enumerate(logits[0].softmax(dim=-1).tolist()):
        assert counts[token] / 4000 == pytest.approx(p, abs=0.03)
