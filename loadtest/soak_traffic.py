"""The soak run's traffic: what each request asks for, and what the client does to it.

Prompts of mixed lengths (short / medium / long text, shares in `MIX`), mixed output
lengths, every request with a random deadline (uniform in [--deadline-min-s,
--deadline-max-s]); --cancel-fraction of them are cancelled by the client at a random time
(uniform in [0, --cancel-max-s]).
`build_workload` draws the requests and their `Plan`s from one seed; `SoakTarget` sends
each request with its plan's deadline and a timer that cancels the call.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from loadtest.targets import GrpcTarget, GrpcTargetConfig, StreamChunk, chunks_from_call
from loadtest.workload import BenchRequest

# (share, prompt tokens range, output tokens range): short chat, medium, long documents.
MIX = (
    (0.5, (8, 64), (8, 64)),
    (0.35, (100, 300), (32, 128)),
    (0.15, (400, 700), (64, 200)),
)
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "baton",
    "relays",
    "key",
    "value",
    "caches",
    "between",
    "prefill",
    "and",
    "decode",
    "workers",
    "under",
    "load",
    "with",
    "deadlines",
    "cancellations",
    "and",
    "mixed",
    "lengths",
]


@dataclass(frozen=True)
class Plan:
    """What the client does to one request: its deadline and, maybe, when it cancels."""

    deadline_s: float
    cancel_after_s: float | None


def _text(rng: random.Random, num_bytes: int) -> str:
    words: list[str] = []
    size = 0
    while size < num_bytes:
        w = rng.choice(WORDS)
        words.append(w)
        size += len(w) + 1
    return " ".join(words)[:num_bytes]


def build_workload(
    num: int,
    seed: int,
    cancel_fraction: float,
    deadline_s: tuple[float, float],
    cancel_max_s: float,
) -> tuple[list[BenchRequest], list[Plan]]:
    rng = random.Random(seed)
    shares = [m[0] for m in MIX]
    requests, plans = [], []
    for _ in range(num):
        index = rng.choices(range(len(MIX)), shares)[0]
        _, (p_lo, p_hi), (o_lo, o_hi) = MIX[index]
        category = ("short", "medium", "long")[index]
        requests.append(
            BenchRequest(
                prompt_token_ids=None,
                prompt_text=_text(rng, rng.randint(p_lo, p_hi)),  # byte tokenizer: 1 token/byte
                max_tokens=rng.randint(o_lo, o_hi),
                category=category,
            )
        )
        cancel = rng.uniform(0.0, cancel_max_s) if rng.random() < cancel_fraction else None
        plans.append(Plan(rng.uniform(*deadline_s), cancel))
    return requests, plans


class SoakTarget(GrpcTarget):
    """A `GrpcTarget` that applies each request's `Plan`: its own deadline, and a timer that
    cancels the call (the server then aborts the request on every worker)."""

    def __init__(self, config: GrpcTargetConfig, plans: list[Plan], prefix: str) -> None:
        super().__init__(config)
        self.plans = plans
        self.prefix = prefix

    def stream(
        self, request: BenchRequest, request_id: str, timeout_s: float
    ) -> Iterator[StreamChunk]:
        plan = self.plans[int(request_id.removeprefix(f"{self.prefix}-"))]
        call = self.start_call(request, request_id, min(timeout_s, plan.deadline_s))
        timer = None
        if plan.cancel_after_s is not None:
            timer = threading.Timer(plan.cancel_after_s, call.cancel)
            timer.daemon = True
            timer.start()
        try:
            yield from chunks_from_call(call)
        finally:
            if timer is not None:
                timer.cancel()
