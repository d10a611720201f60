"""Validation of a Generate request, before any worker is touched.

Every check names the field it failed on, and maps to a gRPC status:

    INVALID_ARGUMENT     undecodable bytes or invalid UTF-8 (field named), unknown fields,
                         empty prompt, token ids outside the vocabulary, prompt not shorter
                         than the context, max_tokens 0 / negative / above the context,
                         temperature < 0, top_p outside (0, 1], top_k < -1, stop lists too
                         long, a bad request_id, any other SamplingParams error
    RESOURCE_EXHAUSTED   request larger than limits.max_request_bytes (refused by the
                         deserializer before parsing; gRPC's receive limit is a multiple)

Duplicate request ids and the in-flight limit are checked by the router, which owns the
table of requests in flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from baton.config import Limits
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from protos import serving_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


class RequestError(Exception):
    """A request refused with a gRPC status; the message names the field."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class UndecodableRequest:
    """What the deserializer hands over instead of raising (grpc would say only INTERNAL)."""

    message: str
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class ValidatedRequest:
    request_id: str  # empty: the router names it
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    cache_salt: str


# ---- wire-level checks --------------------------------------------------------------------


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise DecodeError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def find_bad_utf8(data: bytes, desc: Descriptor, prefix: str = "") -> str | None:
    """Dotted name of the first string field (recursing into messages) whose bytes are not
    valid UTF-8, or None. Walks the wire format with the message's descriptor."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(data, pos)
            continue
        if wire_type == 1:
            pos += 8
            continue
        if wire_type == 5:
            pos += 4
            continue
        if wire_type != 2:
            raise DecodeError(f"unsupported wire type {wire_type}")
        length, pos = _read_varint(data, pos)
        value, pos = data[pos : pos + length], pos + length
        field = desc.fields_by_number.get(number)
        if field is None:
            continue
        name = f"{prefix}{field.name}"
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            bad = find_bad_utf8(value, field.message_type, f"{name}.")
            if bad:
                return bad
    return None


def deserialize_generate(
    data: bytes, max_bytes: int | None = None
) -> pb.GenerateRequest | UndecodableRequest:
    """GenerateRequest.FromString that never raises: grpc would turn that into INTERNAL.

    max_bytes: larger requests are refused (RESOURCE_EXHAUSTED) before they are parsed."""
    if max_bytes is not None and len(data) > max_bytes:
        return UndecodableRequest(
            f"request is {len(data)} bytes; limits.max_request_bytes is {max_bytes}",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as e:
        try:
            bad = find_bad_utf8(data, pb.GenerateRequest.DESCRIPTOR)
        except DecodeError:
            bad = None
        if bad:
            return UndecodableRequest(f"{bad}: invalid UTF-8 in a string field")
        return UndecodableRequest(f"request is not a valid baton.v1.GenerateRequest: {e}")


def unknown_field_names(msg: object, prefix: str = "") -> list[str]:
    """Paths of fields this server does not know (a newer client, or a typo'd JSON key
    that a lenient encoder kept), recursing into set submessages."""
    found = [f"{prefix}#{f.field_number}" for f in UnknownFieldSet(msg)]
    for field, value in msg.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated:
            found += unknown_field_names(value, f"{prefix}{field.name}.")
    return found


# ---- field checks -------------------------------------------------------------------------


def _fail(message: str) -> RequestError:
    return RequestError(INVALID, message)


def _check_request_id(rid: str, limits: Limits) -> None:
    if len(rid) > limits.max_request_id_chars:
        raise _fail(f"request_id has {len(rid)} characters; at most {limits.max_request_id_chars}")
    if rid and not all(c.isprintable() and not c.isspace() for c in rid):
        raise _fail("request_id must be printable characters without spaces")


def _prompt(
    req: pb.GenerateRequest, tokenizer: Tokenizer, vocab_size: int, max_model_len: int
) -> tuple[int, ...]:
    which = req.WhichOneof("prompt")
    if which is None:
        raise _fail("prompt is missing: set text or token_ids")
    if which == "text":
        if not req.text:
            raise _fail("text is empty: the prompt needs at least one token")
        ids = tuple(tokenizer.encode(req.text))
        if not ids:
            raise _fail("text encodes to no tokens")
    else:
        ids = tuple(req.token_ids.ids)
        if not ids:
            raise _fail("token_ids.ids is empty: the prompt needs at least one token")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise _fail(f"token_ids.ids holds {bad}, outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise _fail(
            f"prompt has {len(ids)} tokens; the context holds {max_model_len} and at least "
            "one must be left to generate"
        )
    return ids


def _sampling(
    s: pb.Sampling, limits: Limits, vocab_size: int, max_model_len: int
) -> SamplingParams:
    max_tokens = s.max_tokens if s.HasField("max_tokens") else limits.default_max_tokens
    if max_tokens <= 0:
        raise _fail(f"sampling.max_tokens must be >= 1, got {max_tokens}")
    if max_tokens > max_model_len:
        raise _fail(f"sampling.max_tokens {max_tokens} is above the context ({max_model_len})")
    temperature = s.temperature if s.HasField("temperature") else 1.0
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise _fail(f"sampling.temperature must be a finite number >= 0, got {temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise _fail(f"sampling.top_p must be in (0, 1], got {top_p}")
    top_k = s.top_k if s.HasField("top_k") else -1
    if top_k < -1:
        raise _fail(f"sampling.top_k must be -1 (off), 0 (off) or >= 1, got {top_k}")
    if len(s.stop) > limits.max_stop_strings:
        raise _fail(f"sampling.stop holds {len(s.stop)} strings; at most {limits.max_stop_strings}")
    if len(s.stop_token_ids) > limits.max_stop_token_ids:
        raise _fail(
            f"sampling.stop_token_ids holds {len(s.stop_token_ids)} ids; "
            f"at most {limits.max_stop_token_ids}"
        )
    bad = next((t for t in s.stop_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise _fail(
            f"sampling.stop_token_ids holds {bad}, outside the vocabulary [0, {vocab_size})"
        )
    if s.HasField("seed") and s.seed < 0:
        raise _fail(f"sampling.seed must be >= 0, got {s.seed}")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=s.min_p if s.HasField("min_p") else 0.0,
            repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
            presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else 0.0,
            frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else 0.0,
            seed=s.seed if s.HasField("seed") else None,
            stop_token_ids=tuple(s.stop_token_ids),
            stop=tuple(s.stop),
            include_stop_str_in_output=s.include_stop_str_in_output,
            ignore_eos=s.ignore_eos,
            logprobs=s.logprobs if s.HasField("logprobs") else None,
        )
    except ValueError as e:
        raise _fail(f"sampling: {e}") from e


def validate(
    req: pb.GenerateRequest | UndecodableRequest,
    limits: Limits,
    tokenizer: Tokenizer,
    vocab_size: int,
    max_model_len: int,
) -> ValidatedRequest:
    """Raises RequestError; returns a request every worker will accept."""
    if isinstance(req, UndecodableRequest):
        raise RequestError(req.code, req.message)
    unknown = unknown_field_names(req)
    if unknown:
        raise _fail(f"unknown field(s) {', '.join(unknown)}: this server speaks baton.v1")
    _check_request_id(req.request_id, limits)
    if len(req.cache_salt) > limits.max_request_id_chars:
        raise _fail(
            f"cache_salt has {len(req.cache_salt)} characters; at most {limits.max_request_id_chars}"
        )
    prompt = _prompt(req, tokenizer, vocab_size, max_model_len)
    params = _sampling(req.sampling, limits, vocab_size, max_model_len)
    return ValidatedRequest(req.request_id, prompt, params, req.cache_salt)
