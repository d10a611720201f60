"""What a benchmark workload is made of: `BenchRequest`s (a prompt, how many tokens to
generate, labels), their place in a conversation (`Turn`), the `TokenRange` synthetic prompts
are drawn from, and the `Dataset` contract every generator follows.

Every generator is a frozen config dataclass, validated at construction, whose `generate()`
returns the same list of `BenchRequest`s for the same fields. Synthetic prompts are token ids
drawn uniformly from a `TokenRange`, so their lengths are exact (no tokenize/detokenize round
trip, which changes lengths); a JSONL file of the user's own prompts may carry text instead.
The generators: loadtest/datasets.py (synthetic), loadtest/jsonl_dataset.py (the user's file).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Turn:
    """Where a request sits in a conversation; turn `index` is sent after turn `index - 1`
    of the same conversation has finished."""

    conversation_id: int
    index: int
    num_turns: int
    # The last `new_tokens` prompt tokens are this turn's own message. When > 0, the runner
    # sends turn `index` as (the prompt it sent for turn index - 1) + (the tokens the server
    # answered) + those tokens, so the conversation's history is the model's real answers.
    new_tokens: int = 0

    def __post_init__(self) -> None:
        assert 0 <= self.index < self.num_turns, self
        assert self.new_tokens >= 0, self


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: a prompt (token ids or text, exactly one), how many tokens
    to generate, and labels the report groups by."""

    prompt_token_ids: tuple[int, ...] | None
    prompt_text: str | None
    max_tokens: int
    tenant_id: str | None = None
    cache_salt: str | None = None
    category: str = "default"
    turn: Turn | None = None

    def __post_init__(self) -> None:
        if (self.prompt_token_ids is None) == (self.prompt_text is None):
            raise ValueError("a request needs exactly one of prompt_token_ids and prompt_text")
        if self.prompt_token_ids is not None:
            if not self.prompt_token_ids:
                raise ValueError("prompt_token_ids is empty; a prompt needs at least one token")
            if min(self.prompt_token_ids) < 0:
                raise ValueError("prompt_token_ids must be >= 0")
        if self.prompt_text is not None and not self.prompt_text:
            raise ValueError("prompt_text is empty; a prompt needs at least one character")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def prompt_len(self) -> int | None:
        """Prompt tokens, where known before sending (token-id prompts)."""
        return None if self.prompt_token_ids is None else len(self.prompt_token_ids)


@dataclass(frozen=True)
class TokenRange:
    """Synthetic token ids are drawn uniformly from [low, high). The default fits every
    tokenizer Baton serves (the byte tokenizer's 256 byte ids); widen it for a real vocabulary."""

    low: int = 0
    high: int = 256

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"token range needs 0 <= low < high, got [{self.low}, {self.high})")

    @property
    def size(self) -> int:
        return self.high - self.low

    def draw(self, rng: np.random.Generator, num_tokens: int) -> tuple[int, ...]:
        return tuple(rng.integers(self.low, self.high, size=num_tokens).tolist())


class Dataset(ABC):
    """A workload generator: `generate()` is a pure function of the dataclass's fields."""

    name: str

    @abstractmethod
    def generate(self) -> list[BenchRequest]: ...

    def describe(self) -> dict[str, Any]:
        """The generator's settings, for the results file."""
        assert hasattr(self, "__dataclass_fields__"), type(self)
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]


def check_positive(**values: int) -> None:
    """ValueError naming the first value below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
