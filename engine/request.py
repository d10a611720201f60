"""A request inside the engine and what a step reports for it.

`EngineRequest` holds a request's `Sequence` with its detokenizer and the text streamed so
far; `append_token` applies a sampled token and checks the stop conditions (stop token ids,
EOS, stop strings, `max_tokens`, the context length). `RequestOutput` is the streaming delta
a step returns for each request that got a token.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from engine.sampler import TokenLogprobs
from engine.sequence import FinishReason, Sequence
from engine.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprobs]


@dataclass
class EngineRequest:
    seq: Sequence
    detok: IncrementalDetokenizer | None
    hold_kv: bool  # keep the blocks when finished, for export (prefill side)
    text: str = ""

    def append_token(
        self, token: int, eos_token_ids: Collection[int], max_model_len: int
    ) -> tuple[str, FinishReason | None]:
        """Append a sampled token: (the new text, the finish reason if it ends the request).

        The caller finishes a request that ends here, then builds its `output`."""
        seq = self.seq
        seq.token_ids.append(token)
        params = seq.params
        new_text = self.detok.push(token) if self.detok is not None else ""
        reason: FinishReason | None = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids):
            reason = FinishReason.STOP
        elif params.stop and new_text:
            new_text, hit = self._apply_stop_strings(new_text)
            if hit:
                reason = FinishReason.STOP
        self.text += new_text
        if reason is None and (
            seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= max_model_len
        ):
            reason = FinishReason.LENGTH
        if reason is FinishReason.LENGTH and self.detok is not None:
            tail = self.detok.flush()  # a held-back incomplete character, if any
            new_text += tail
            self.text += tail
        return new_text, reason

    def _apply_stop_strings(self, new_text: str) -> tuple[str, bool]:
        """Cut new_text at the first stop string that ends in it."""
        params = self.seq.params
        window = max(len(s) for s in params.stop) - 1
        tail = self.text[-window:] if window else ""
        joined = tail + new_text
        best: int | None = None
        for stop in params.stop:
            idx = joined.find(stop)
            if idx != -1:
                end = idx + len(stop) if params.include_stop_str_in_output else idx
                best = end if best is None else min(best, end)
        if best is None:
            return new_text, False
        return joined[len(tail) : max(best, len(tail))], True

    def output(
        self,
        token: int,
        new_text: str,
        reason: FinishReason | None,
        logprobs: TokenLogprobs | None,
    ) -> RequestOutput:
        seq = self.seq
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[token],
            new_text=new_text,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
            logprobs=[] if logprobs is None else [logprobs],
        )
