"""Turns one step's logits into one token per row, with vLLM's sampling semantics.

A batch row goes through these stages in order (rows skip the stages they do not use):

    raw logits [B, V] (any float dtype)
      ├─ logprobs: log_softmax of the RAW logits in float32, before anything below
      ├─ penalties (rows with any penalty)
      │    repetition on prompt + output tokens: logit > 0 → logit / p, else logit * p
      │    frequency, presence on output tokens:  logit -= f * count + r * (count > 0)
      ├─ greedy rows (temperature 0): argmax of the penalised logits
      └─ sampled rows: / temperature → top-k → top-p → min-p → softmax → draw

Costs: the all-greedy batch without penalties or logprobs is one argmax on the device and one
`.tolist()`. Otherwise the masks are batched tensor ops over the rows that need them (top-k and
top-p share one sort of [S, V]); the host work per row is building small parameter lists, plus
O(prompt + output tokens) for rows with penalties. Draws are an exponential race
(argmax of probs / q, q ~ Exp(1)), batched over unseeded rows with the default generator; a
seeded row draws q from its own generator alone, reseeded by the engine for every token from
(seed, output position) (`token_seed`), so its tokens depend only on its seed, their positions
and their logits: never on the rest of the batch, nor on which engine samples them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float  # logprob of the chosen token, from the raw logits
    top: tuple[tuple[int, float], ...]  # the params.logprobs best (token_id, logprob), best first


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs about one row of logits."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # tokens generated so far (penalties use these)
    generator: torch.Generator | None  # per-request generator when params.seed is set

    def __post_init__(self) -> None:
        assert (self.generator is None) == (self.params.seed is None), (
            "a SamplingRow carries a generator exactly when its params set a seed"
        )


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where params.logprobs is None


def token_seed(seed: int, index: int) -> int:
    """The seed of a seeded request's draw for its output token `index` (splitmix64 of the
    pair): the token depends on the seed, its position and its logits only, so it is the same
    whichever engine samples it (prefill worker, decode worker after a transfer, colocated)
    and after a preemption recomputes it."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for one seeded request; it must live on the device the logits live on."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition, frequency and presence penalties; returns a new float32 tensor.

    logits: [P, V]; rows: the P rows' token histories and params. Token counts are built with
    one scatter_add over the padded histories (padding adds 0 to token 0).
    """
    num_rows, vocab_size = logits.shape
    assert num_rows == len(rows)
    device = logits.device
    output_counts = _token_counts([r.output_token_ids for r in rows], vocab_size, device)
    prompt_counts = _token_counts([r.prompt_token_ids for r in rows], vocab_size, device)
    # [P, 1] each
    repetition = _column([r.params.repetition_penalty for r in rows], device)
    frequency = _column([r.params.frequency_penalty for r in rows], device)
    presence = _column([r.params.presence_penalty for r in rows], device)

    logits = logits.float()
    seen = (prompt_counts + output_counts) > 0  # [P, V]
    scale = torch.where(seen, repetition, 1.0)  # [P, V]
    logits = torch.where(logits > 0, logits / scale, logits * scale)
    return logits - frequency * output_counts - presence * (output_counts > 0)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Masks tokens outside each row's top-k, then outside its top-p nucleus, with -inf.

    logits: [S, V] float32; top_k: [S] int64 in [1, V] (V disables it); top_p: [S] in (0, 1].
    Top-k keeps every token tied with the k-th value. Top-p keeps the smallest prefix of the
    sorted survivors whose probability reaches top_p (always the best token). One sort.
    """
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # [S, V] each
    kth_value = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))  # [S, 1]
    drop_sorted = sorted_logits < kth_value
    sorted_logits = sorted_logits.masked_fill(drop_sorted, float("-inf"))

    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability ranked above each
    # Rows with top_p == 1 skip the test: rounding can push mass_before to 1.0 in the tail.
    nucleus_on = (top_p < 1.0).unsqueeze(1)  # [S, 1]
    drop_sorted = drop_sorted | (nucleus_on & (mass_before >= top_p.unsqueeze(1)))

    drop = torch.empty_like(drop_sorted).scatter_(1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Masks tokens whose probability is below min_p times the row's best probability.

    logits: [S, V] float32; min_p: [S] in [0, 1] (0 keeps everything).
    """
    probs = logits.softmax(dim=-1)  # [S, V]
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [S, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


class Sampler:
    """Picks the next token of every row; see the module docstring for the stages."""

    def __init__(self, default_generator: torch.Generator) -> None:
        self.default_generator = default_generator  # draws for sampled rows without a seed

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        # logits: [B, V], B == len(rows)
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (
            f"logits {tuple(logits.shape)} do not match {len(rows)} rows"
        )
        if all(
            r.params.greedy and not r.params.has_penalties and r.params.logprobs is None
            for r in rows
        ):
            # Hot path: one argmax on the device, one transfer.
            token_ids = logits.argmax(dim=-1).tolist()
            return SamplerOutput(token_ids=token_ids, logprobs=[None] * len(rows))

        token_ids_t = self._next_tokens(logits, rows)  # [B] int64
        token_ids = token_ids_t.tolist()
        return SamplerOutput(
            token_ids=token_ids, logprobs=_logprobs(logits, token_ids_t, token_ids, rows)
        )

    def _next_tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        device = logits.device
        logits = logits.float()  # may alias the caller's tensor: nothing below writes into it

        penalised = [i for i, r in enumerate(rows) if r.params.has_penalties]
        if penalised:
            idx = torch.tensor(penalised, device=device)
            penalised_logits = apply_penalties(logits[idx], [rows[i] for i in penalised])
            logits = logits.index_copy(0, idx, penalised_logits)

        token_ids = torch.empty(len(rows), dtype=torch.int64, device=device)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if greedy:
            idx = torch.tensor(greedy, device=device)
            token_ids[idx] = logits[idx].argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            idx = torch.tensor(sampled, device=device)
            token_ids[idx] = self._sample(logits[idx], [rows[i] for i in sampled])
        return token_ids

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        # logits: [S, V] float32, penalised; returns [S] int64
        device = logits.device
        vocab_size = logits.shape[1]
        logits = logits / _column([r.params.temperature for r in rows], device)

        if any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in rows):
            top_k = [
                min(r.params.top_k, vocab_size) if r.params.top_k > 0 else vocab_size for r in rows
            ]
            top_p = [r.params.top_p for r in rows]
            logits = apply_top_k_top_p(
                logits,
                torch.tensor(top_k, dtype=torch.int64, device=device),
                torch.tensor(top_p, dtype=torch.float32, device=device),
            )
        if any(r.params.min_p > 0.0 for r in rows):
            min_p = [r.params.min_p for r in rows]
            logits = apply_min_p(logits, torch.tensor(min_p, dtype=torch.float32, device=device))
        probs = logits.softmax(dim=-1)  # [S, V]

        # Exponential race: argmax(probs / q) with q ~ Exp(1) is a draw from probs.
        q = torch.empty_like(probs)  # [S, V]
        if all(r.generator is None for r in rows):
            _check_device(self.default_generator, device)
            q.exponential_(generator=self.default_generator)
        else:
            for i, row in enumerate(rows):
                generator = row.generator if row.generator is not None else self.default_generator
                _check_device(generator, device)
                q[i].exponential_(generator=generator)
        # q == 0 would turn a masked token's 0 / 0 into NaN, which argmax would pick.
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return probs.div_(q).argmax(dim=-1)


def _logprobs(
    logits: torch.Tensor,
    token_ids_t: torch.Tensor,
    token_ids: Sequence[int],
    rows: Sequence[SamplingRow],
) -> list[TokenLogprobs | None]:
    # logits: [B, V] raw; token_ids_t: [B] chosen tokens, on the device; token_ids: the same
    wanted = [(i, r.params.logprobs) for i, r in enumerate(rows) if r.params.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(rows)
    if not wanted:
        return result
    idx = torch.tensor([i for i, _ in wanted], device=logits.device)
    logprobs = torch.log_softmax(logits[idx].float(), dim=-1)  # [L, V]
    chosen = logprobs.gather(1, token_ids_t[idx].unsqueeze(1)).squeeze(1).tolist()  # [L]
    num_top = min(max(n for _, n in wanted), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(num_top, dim=-1)  # [L, num_top] each, best first
    top_values_l, top_ids_l = top_values.tolist(), top_ids.tolist()
    for j, (i, n) in enumerate(wanted):
        top = tuple(zip(top_ids_l[j][:n], top_values_l[j][:n], strict=True))
        result[i] = TokenLogprobs(token_id=token_ids[i], logprob=chosen[j], top=top)
    return result


def _token_counts(
    token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[len(token_lists), vocab_size] float32 counts of each token id per list."""
    width = max((len(tokens) for tokens in token_lists), default=0)
    ids = [list(tokens) + [0] * (width - len(tokens)) for tokens in token_lists]
    ones = [[1.0] * len(tokens) + [0.0] * (width - len(tokens)) for tokens in token_lists]
    counts = torch.zeros(len(token_lists), vocab_size, dtype=torch.float32, device=device)
    if width == 0:
        return counts
    return counts.scatter_add_(
        1,
        torch.tensor(ids, dtype=torch.int64, device=device),
        torch.tensor(ones, dtype=torch.float32, device=device),
    )


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """[len(values), 1] float32, to broadcast one value per row over the vocabulary."""
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _check_device(generator: torch.Generator, device: torch.device) -> None:
    assert generator.device.type == device.type, (
        f"generator on {generator.device} cannot draw for logits on {device}"
    )
