"""The synthetic workload generators: token-id prompts of exact lengths, drawn from a seed
(the `Dataset` contract and what they generate: loadtest/workload.py).

    RandomDataset        input/output lengths uniform in [len * (1 - r), len * (1 + r)]
                         (vLLM's `random` dataset with `--random-range-ratio r`)
    SharedPrefixDataset  groups x prompts per group; every prompt of group g is
                         system_prompt[g] + question, the multi-tenant chat case (SGLang's
                         `generated-shared-prefix`); groups differ from their first token
    LengthMixDataset     a mix of length classes in exact proportions, e.g. long-prompt /
                         short-answer (prefill-heavy) against short-prompt / long-answer
                         (decode-heavy), the case where colocated prefill stalls decode
    MultiTurnDataset     conversations that grow: turn k's prompt is turn k-1's prompt, a
                         synthetic assistant answer of `answer_len` tokens, and a new user
                         message, so each turn's prompt is an exact prefix of the next

The assistant answers in `MultiTurnDataset` are placeholders fixed offline: the runner sends
each turn with the answers the server actually streamed (`Turn.new_tokens`), so the previous
prompt and its answer stay a cached prefix as in a real chat; a placeholder is sent only where
the previous turn failed. The user's own prompts, from a JSONL file: loadtest/jsonl_dataset.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from loadtest.workload import BenchRequest, Dataset, TokenRange, Turn, check_positive


def length_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [floor(len * (1 - r)), ceil(len * (1 + r))], at least 1, as vLLM's random
    (but 100 * 1.1 is 110 here, not 111: products are rounded to 9 decimals first)."""
    low = max(1, math.floor(round(length * (1 - range_ratio), 9)))
    high = max(low, math.ceil(round(length * (1 + range_ratio), 9)))
    return low, high


def _check_range_ratio(range_ratio: float) -> None:
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")


@dataclass(frozen=True)
class RandomDataset(Dataset):
    num_requests: int
    input_len: int
    output_len: int
    range_ratio: float = 0.0
    seed: int = 0
    token_range: TokenRange = field(default_factory=TokenRange)
    name = "random"

    def __post_init__(self) -> None:
        check_positive(
            num_requests=self.num_requests, input_len=self.input_len, output_len=self.output_len
        )
        _check_range_ratio(self.range_ratio)

    def generate(self) -> list[BenchRequest]:
        rng = np.random.default_rng(self.seed)
        in_low, in_high = length_bounds(self.input_len, self.range_ratio)
        out_low, out_high = length_bounds(self.output_len, self.range_ratio)
        input_lens = rng.integers(in_low, in_high + 1, size=self.num_requests)
        output_lens = rng.integers(out_low, out_high + 1, size=self.num_requests)
        return [
            BenchRequest(
                prompt_token_ids=self.token_range.draw(rng, int(num_in)),
                prompt_text=None,
                max_tokens=int(num_out),
            )
            for num_in, num_out in zip(input_lens, output_lens, strict=True)
        ]


@dataclass(frozen=True)
class SharedPrefixDataset(Dataset):
    """`num_groups` tenants, each with its own system prompt of `system_prompt_len` tokens,
    and `prompts_per_group` questions of `question_len` tokens appended to it.

    Groups' system prompts start with distinct tokens, so prompts of different groups share
    no prefix; prompts of one group share exactly their system prompt (and, by chance, the
    first tokens of their questions). With `shuffle`, tenants interleave in the send order;
    with `salt_per_tenant`, each request carries its tenant as cache salt (isolation).
    """

    num_groups: int
    prompts_per_group: int
    system_prompt_len: int
    question_len: int
    output_len: int
    shuffle: bool = True
    salt_per_tenant: bool = False
    seed: int = 0
    token_range: TokenRange = field(default_factory=TokenRange)
    name = "shared_prefix"

    def __post_init__(self) -> None:
        check_positive(
            num_groups=self.num_groups,
            prompts_per_group=self.prompts_per_group,
            system_prompt_len=self.system_prompt_len,
            question_len=self.question_len,
            output_len=self.output_len,
        )
        if self.num_groups > self.token_range.size:
            raise ValueError(
                f"{self.num_groups} groups need distinct first tokens but the token range has "
                f"{self.token_range.size}; widen the token range or use fewer groups"
            )

    def system_prompts(self) -> list[tuple[int, ...]]:
        """Each group's system prompt (the same draws `generate` makes)."""
        return self._draw()[0]

    def _draw(self) -> tuple[list[tuple[int, ...]], list[BenchRequest]]:
        rng = np.random.default_rng(self.seed)
        low = self.token_range.low
        first_tokens = low + rng.permutation(self.token_range.size)[: self.num_groups]
        systems = [
            (int(first), *self.token_range.draw(rng, self.system_prompt_len - 1))
            for first in first_tokens
        ]
        requests = []
        for group, system in enumerate(systems):
            tenant = f"tenant-{group}"
            for _ in range(self.prompts_per_group):
                requests.append(
                    BenchRequest(
                        prompt_token_ids=system + self.token_range.draw(rng, self.question_len),
                        prompt_text=None,
                        max_tokens=self.output_len,
                        tenant_id=tenant,
                        cache_salt=tenant if self.salt_per_tenant else None,
                    )
                )
        if self.shuffle:
            order = rng.permutation(len(requests))
            requests = [requests[i] for i in order]
        return systems, requests

    def generate(self) -> list[BenchRequest]:
        return self._draw()[1]


@dataclass(frozen=True)
class LengthClass:
    """One class of a length mix: `weight` is its share of the requests."""

    name: str
    weight: float
    input_len: int
    output_len: int
    range_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"length class {self.name!r}: weight must be > 0, got {self.weight}")
        check_positive(input_len=self.input_len, output_len=self.output_len)
        _check_range_ratio(self.range_ratio)


def prefill_decode_mix(
    long_prompt_fraction: float = 0.5,
    long_input_len: int = 1024,
    short_output_len: int = 16,
    short_input_len: int = 32,
    long_output_len: int = 256,
) -> tuple[LengthClass, LengthClass]:
    """Long-prompt/short-answer against short-prompt/long-answer, the two classes that fight
    over one GPU in colocated serving."""
    if not 0 < long_prompt_fraction < 1:
        raise ValueError(f"long_prompt_fraction must be in (0, 1), got {long_prompt_fraction}")
    return (
        LengthClass("long-prompt", long_prompt_fraction, long_input_len, short_output_len),
        LengthClass("long-answer", 1 - long_prompt_fraction, short_input_len, long_output_len),
    )


def split_counts(num_items: int, weights: list[float]) -> list[int]:
    """Integer counts summing to `num_items` in proportion to `weights` (largest remainder;
    ties go to the earlier class)."""
    total = sum(weights)
    shares = [num_items * w / total for w in weights]
    counts = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[: num_items - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class LengthMixDataset(Dataset):
    """`num_requests` split over `classes` in exact proportions (largest remainder), shuffled;
    each request's `category` is its class's name."""

    num_requests: int
    classes: tuple[LengthClass, ...] = field(default_factory=prefill_decode_mix)
    seed: int = 0
    token_range: TokenRange = field(default_factory=TokenRange)
    name = "length_mix"

    def __post_init__(self) -> None:
        check_positive(num_requests=self.num_requests)
        if not self.classes:
            raise ValueError("a length mix needs at least one class")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"length class names must be unique, got {names}")

    def generate(self) -> list[BenchRequest]:
        rng = np.random.default_rng(self.seed)
        counts = split_counts(self.num_requests, [c.weight for c in self.classes])
        requests = []
        for cls, count in zip(self.classes, counts, strict=True):
            in_low, in_high = length_bounds(cls.input_len, cls.range_ratio)
            out_low, out_high = length_bounds(cls.output_len, cls.range_ratio)
            for _ in range(count):
                requests.append(
                    BenchRequest(
                        prompt_token_ids=self.token_range.draw(
                            rng, int(rng.integers(in_low, in_high + 1))
                        ),
                        prompt_text=None,
                        max_tokens=int(rng.integers(out_low, out_high + 1)),
                        category=cls.name,
                    )
                )
        order = rng.permutation(len(requests))
        return [requests[i] for i in order]


@dataclass(frozen=True)
class MultiTurnDataset(Dataset):
    """`num_conversations` chats of `num_turns` turns each.

    Turn k's prompt = system prompt + (user_0, answer_0, ..., user_k); every user message has
    `user_len` tokens and `max_tokens` is `answer_len`. The answers written here are
    placeholders of `answer_len` random tokens: the runner replaces them with what the server
    actually answered (`Turn.new_tokens`), so turn k reuses the KV of turn k-1's prompt and
    answer as a real chat does; the placeholders stay only where turn k-1 failed. Requests
    are ordered turn by turn (all first turns, then all second turns, ...); the runner holds
    each turn until the conversation's previous turn has finished.
    """

    num_conversations: int
    num_turns: int
    user_len: int
    answer_len: int
    system_prompt_len: int = 0
    seed: int = 0
    token_range: TokenRange = field(default_factory=TokenRange)
    name = "multi_turn"

    def __post_init__(self) -> None:
        check_positive(
            num_conversations=self.num_conversations,
            num_turns=self.num_turns,
            user_len=self.user_len,
            answer_len=self.answer_len,
        )
        if self.system_prompt_len < 0:
            raise ValueError(f"system_prompt_len must be >= 0, got {self.system_prompt_len}")

    def generate(self) -> list[BenchRequest]:
        rng = np.random.default_rng(self.seed)
        system = self.token_range.draw(rng, self.system_prompt_len)
        by_turn: list[list[BenchRequest]] = [[] for _ in range(self.num_turns)]
        for conversation in range(self.num_conversations):
            history = system
            for index in range(self.num_turns):
                prompt = history + self.token_range.draw(rng, self.user_len)
                by_turn[index].append(
                    BenchRequest(
                        prompt_token_ids=prompt,
                        prompt_text=None,
                        max_tokens=self.answer_len,
                        turn=Turn(conversation, index, self.num_turns, self.user_len),
                    )
                )
                history = prompt + self.token_range.draw(rng, self.answer_len)
        return [request for turn in by_turn for request in turn]
