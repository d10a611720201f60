"""The user's own prompts as a workload: a JSONL file, one JSON object per line,
{"prompt": str} or {"prompt_token_ids": [int]}, plus "max_tokens", and optionally "tenant",
"cache_salt", "category"; every mistake is a ValueError naming the file and line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loadtest.workload import BenchRequest, Dataset, check_positive

JSONL_KEYS = frozenset(
    {"prompt", "prompt_token_ids", "max_tokens", "tenant", "cache_salt", "category"}
)


@dataclass(frozen=True)
class JsonlDataset(Dataset):
    """The user's prompts, one JSON object per line (blank lines skipped). `max_tokens` on a
    line wins over `default_max_tokens`; a line without either is an error."""

    path: str
    default_max_tokens: int | None = None
    name = "jsonl"

    def __post_init__(self) -> None:
        if self.default_max_tokens is not None:
            check_positive(default_max_tokens=self.default_max_tokens)

    def generate(self) -> list[BenchRequest]:
        path = Path(self.path)
        if not path.is_file():
            raise ValueError(f"{path}: no such file; give a JSONL file of prompts")
        requests = []
        with path.open(encoding="utf-8") as lines:
            for lineno, line in enumerate(lines, start=1):
                if line.strip():
                    requests.append(self._parse_line(line, f"{path}:{lineno}"))
        if not requests:
            raise ValueError(f"{path}: no prompts (the file is empty)")
        return requests

    def _parse_line(self, line: str, where: str) -> BenchRequest:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - JSONL_KEYS)
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {unknown}; allowed keys are {sorted(JSONL_KEYS)}"
            )
        text, ids = obj.get("prompt"), obj.get("prompt_token_ids")
        if (text is None) == (ids is None):
            raise ValueError(f"{where}: give exactly one of 'prompt' (text) and 'prompt_token_ids'")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{where}: 'prompt' must be a string")
        if ids is not None and not (
            isinstance(ids, list)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
        ):
            raise ValueError(f"{where}: 'prompt_token_ids' must be a list of integers")
        max_tokens = obj.get("max_tokens", self.default_max_tokens)
        if max_tokens is None:
            raise ValueError(f"{where}: no 'max_tokens'; add it to the line or pass a default")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise ValueError(f"{where}: 'max_tokens' must be an integer")
        for key in ("tenant", "cache_salt", "category"):
            if key in obj and not isinstance(obj[key], str):
                raise ValueError(f"{where}: {key!r} must be a string")
        try:
            return BenchRequest(
                prompt_token_ids=None if ids is None else tuple(ids),
                prompt_text=text,
                max_tokens=max_tokens,
                tenant_id=obj.get("tenant"),
                cache_salt=obj.get("cache_salt"),
                category=obj.get("category", "default"),
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
