"""A request's `SamplingParams` as the KV-transfer proto's `SamplingOptions` (sent with
Reserve) and back; unset optional fields travel as a `has_` flag and a zero."""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from protos import kv_transfer_pb2 as pb


def sampling_to_pb(params: SamplingParams) -> pb.SamplingOptions:
    return pb.SamplingOptions(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        has_seed=params.seed is not None,
        seed=params.seed or 0,
        ignore_eos=params.ignore_eos,
        stop_token_ids=list(params.stop_token_ids),
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        stop=list(params.stop),
        include_stop_str_in_output=params.include_stop_str_in_output,
        has_logprobs=params.logprobs is not None,
        logprobs=params.logprobs or 0,
    )


def sampling_from_pb(msg: pb.SamplingOptions) -> SamplingParams:
    """Raises ValueError (from SamplingParams) for out-of-range values."""
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p,
        min_p=msg.min_p,
        repetition_penalty=msg.repetition_penalty,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        seed=msg.seed if msg.has_seed else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        stop=tuple(msg.stop),
        include_stop_str_in_output=msg.include_stop_str_in_output,
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.has_logprobs else None,
    )
