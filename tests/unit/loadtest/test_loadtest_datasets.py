"""Dataset generators: exact lengths, exact shared prefixes, repeatability, JSONL errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.datasets import (
    LengthClass,
    LengthMixDataset,
    MultiTurnDataset,
    RandomDataset,
    SharedPrefixDataset,
    length_bounds,
    split_counts,
)
from loadtest.jsonl_dataset import JsonlDataset
from loadtest.workload import BenchRequest, TokenRange, Turn


def ids(request: BenchRequest) -> tuple[int, ...]:
    assert request.prompt_token_ids is not None
    return request.prompt_token_ids


def test_random_dataset_exact_lengths_and_token_range() -> None:
    requests = RandomDataset(
        20, input_len=37, output_len=5, seed=1, token_range=TokenRange(10, 20)
    ).generate()
    assert len(requests) == 20
    assert {len(ids(r)) for r in requests} == {37}
    assert {r.max_tokens for r in requests} == {5}
    assert all(10 <= t < 20 for r in requests for t in ids(r))
    assert RandomDataset(20, 37, 5, seed=1, token_range=TokenRange(10, 20)).generate() == requests
    assert RandomDataset(20, 37, 5, seed=2, token_range=TokenRange(10, 20)).generate() != requests


def test_length_bounds_match_vllm_range_ratio() -> None:
    assert length_bounds(100, 0.1) == (90, 110)
    assert length_bounds(10, 0.25) == (7, 13)  # floor(7.5), ceil(12.5)
    assert length_bounds(1, 0.5) == (1, 2)  # never below one token
    assert length_bounds(64, 0.0) == (64, 64)


def test_random_dataset_range_ratio_covers_the_inclusive_bounds() -> None:
    requests = RandomDataset(400, input_len=10, output_len=4, range_ratio=0.25, seed=0).generate()
    assert {len(ids(r)) for r in requests} == set(range(7, 14))
    assert {r.max_tokens for r in requests} == {3, 4, 5}


def test_shared_prefix_prompts_share_exactly_their_groups_system_prompt() -> None:
    dataset = SharedPrefixDataset(
        num_groups=3,
        prompts_per_group=4,
        system_prompt_len=20,
        question_len=6,
        output_len=8,
        seed=5,
    )
    requests = dataset.generate()
    systems = dataset.system_prompts()
    assert len(requests) == 12
    assert [len(s) for s in systems] == [20, 20, 20]
    assert len({s[0] for s in systems}) == 3  # groups share no prefix at all
    for request in requests:
        group = int(request.tenant_id.removeprefix("tenant-"))  # type: ignore[union-attr]
        assert len(ids(request)) == 26
        assert ids(request)[:20] == systems[group]
        assert request.max_tokens == 8
        assert request.cache_salt is None
    assert sorted(r.tenant_id for r in requests) == sorted(
        f"tenant-{g}" for g in range(3) for _ in range(4)
    )
    # Shuffled: tenants interleave; unshuffled: group by group.
    assert [r.tenant_id for r in requests] != sorted(r.tenant_id for r in requests)  # type: ignore[type-var]
    ordered = SharedPrefixDataset(3, 4, 20, 6, 8, shuffle=False, seed=5).generate()
    assert [r.tenant_id for r in ordered] == [f"tenant-{g}" for g in range(3) for _ in range(4)]
    assert sorted(ids(r) for r in ordered) == sorted(ids(r) for r in requests)


def test_shared_prefix_salt_per_tenant_and_too_many_groups() -> None:
    requests = SharedPrefixDataset(2, 2, 4, 2, 1, salt_per_tenant=True).generate()
    assert all(r.cache_salt == r.tenant_id for r in requests)
    with pytest.raises(ValueError, match="widen the token range"):
        SharedPrefixDataset(5, 1, 4, 2, 1, token_range=TokenRange(0, 4))


def test_split_counts_is_exact_largest_remainder() -> None:
    assert split_counts(7, [0.5, 0.5]) == [4, 3]
    assert split_counts(10, [1, 1, 1]) == [4, 3, 3]
    assert split_counts(10, [0.25, 0.75]) == [3, 7]  # 2.5 / 7.5: the tie goes to the first
    assert split_counts(0, [1, 2]) == [0, 0]


def test_length_mix_has_exact_proportions_and_lengths() -> None:
    classes = (
        LengthClass("long-prompt", 0.25, input_len=100, output_len=2),
        LengthClass("long-answer", 0.75, input_len=3, output_len=50),
    )
    requests = LengthMixDataset(8, classes, seed=4).generate()
    by_class = {c.name: [r for r in requests if r.category == c.name] for c in classes}
    assert len(by_class["long-prompt"]) == 2
    assert len(by_class["long-answer"]) == 6
    assert all(len(ids(r)) == 100 and r.max_tokens == 2 for r in by_class["long-prompt"])
    assert all(len(ids(r)) == 3 and r.max_tokens == 50 for r in by_class["long-answer"])
    default = LengthMixDataset(10).generate()
    assert sorted({r.category for r in default}) == ["long-answer", "long-prompt"]
    with pytest.raises(ValueError, match="unique"):
        LengthMixDataset(4, (classes[0], classes[0]))


def test_multi_turn_conversations_grow_by_exact_prefixes() -> None:
    dataset = MultiTurnDataset(
        num_conversations=2, num_turns=3, user_len=5, answer_len=4, system_prompt_len=7, seed=2
    )
    requests = dataset.generate()
    assert [(r.turn.conversation_id, r.turn.index) for r in requests] == [  # type: ignore[union-attr]
        (0, 0),
        (1, 0),
        (0, 1),
        (1, 1),
        (0, 2),
        (1, 2),
    ]
    for conversation in range(2):
        turns = [r for r in requests if r.turn.conversation_id == conversation]  # type: ignore[union-attr]
        assert [len(ids(r)) for r in turns] == [7 + 5, 7 + 5 + 4 + 5, 7 + 5 + 4 + 5 + 4 + 5]
        for before, after in zip(turns, turns[1:], strict=False):
            assert ids(after)[: len(ids(before))] == ids(before)
        assert all(r.max_tokens == 4 and r.turn.num_turns == 3 for r in turns)  # type: ignore[union-attr]
    # One system prompt for every conversation; the users' messages differ.
    assert ids(requests[0])[:7] == ids(requests[1])[:7]
    assert ids(requests[0])[7:] != ids(requests[1])[7:]


def test_bench_request_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        BenchRequest(prompt_token_ids=(1,), prompt_text="a", max_tokens=1)
    with pytest.raises(ValueError, match="exactly one"):
        BenchRequest(prompt_token_ids=None, prompt_text=None, max_tokens=1)
    with pytest.raises(ValueError, match="empty"):
        BenchRequest(prompt_token_ids=(), prompt_text=None, max_tokens=1)
    with pytest.raises(ValueError, match="max_tokens"):
        BenchRequest(prompt_token_ids=(1,), prompt_text=None, max_tokens=0)
    assert BenchRequest((1, 2), None, 3, turn=Turn(0, 1, 2)).prompt_len == 2
    assert BenchRequest(None, "hi", 3).prompt_len is None


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_dataset_reads_text_and_token_prompts(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "prompts.jsonl",
        [
            json.dumps({"prompt": "Hello there", "max_tokens": 8, "tenant": "acme"}),
            "",
            json.dumps({"prompt_token_ids": [5, 6, 7], "cache_salt": "s", "category": "code"}),
        ],
    )
    requests = JsonlDataset(str(path), default_max_tokens=16).generate()
    assert requests == [
        BenchRequest(None, "Hello there", 8, tenant_id="acme"),
        BenchRequest((5, 6, 7), None, 16, cache_salt="s", category="code"),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"prompt": "a", "max_tokens": 1, "temperature": 0}',
            r":2: unknown keys \['temperature'\]",
        ),
        ('{"prompt": "a", "max_tokens": 1', ":2: not valid JSON"),
        ('["a"]', ":2: expected a JSON object"),
        ('{"prompt": "a", "prompt_token_ids": [1], "max_tokens": 1}', ":2: give exactly one"),
        ('{"max_tokens": 1}', ":2: give exactly one"),
        ('{"prompt": "a"}', ":2: no 'max_tokens'"),
        ('{"prompt_token_ids": [1, "x"], "max_tokens": 1}', ":2: 'prompt_token_ids' must be"),
        ('{"prompt": "a", "max_tokens": 0}', ":2: max_tokens must be >= 1"),
        ('{"prompt": "a", "max_tokens": 1, "tenant": 3}', ":2: 'tenant' must be a string"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "p.jsonl", ['{"prompt": "ok", "max_tokens": 1}', line])
    with pytest.raises(ValueError, match=message):
        JsonlDataset(str(path)).generate()


def test_jsonl_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        JsonlDataset(str(tmp_path / "absent.jsonl")).generate()
    with pytest.raises(ValueError, match="empty"):
        JsonlDataset(str(write_lines(tmp_path / "e.jsonl", [""]))).generate()


def test_describe_names_the_generator_and_its_settings() -> None:
    described = SharedPrefixDataset(2, 3, 4, 5, 6, seed=1).describe()
    assert described["name"] == "shared_prefix"
    assert described["num_groups"] == 2
    assert described["token_range"] == {"low": 0, "high": 256}
    json.dumps(LengthMixDataset(4).describe())  # serialisable as is
