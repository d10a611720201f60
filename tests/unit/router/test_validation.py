"""Every request field is checked before any worker is touched; messages name the field."""

from __future__ import annotations

import grpc
import pytest

from baton.config import Limits
from engine.tokenizer import ByteTokenizer
from protos import serving_pb2 as pb
from router.validation import (
    RequestError,
    UndecodableRequest,
    deserialize_generate,
    find_bad_utf8,
    validate,
)

VOCAB = 320
MAX_LEN = 64
LIMITS = Limits(max_stop_strings=2, max_stop_token_ids=2, default_max_tokens=7)


def check(req: pb.GenerateRequest | UndecodableRequest):  # noqa: ANN201
    return validate(req, LIMITS, ByteTokenizer(), VOCAB, MAX_LEN)


def text(s: str = "hi", **sampling: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=s, sampling=pb.Sampling(**sampling))


def ids(values: list[int], **sampling: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=values), sampling=pb.Sampling(**sampling))


def test_valid_text_request_gets_defaults() -> None:
    v = check(text("hi"))
    assert v.prompt_token_ids == (256, 104, 105)
    p = v.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (7, 1.0, 1.0, -1, None)


def test_valid_token_ids_and_sampling() -> None:
    v = check(
        ids([1, 2, 319], max_tokens=5, temperature=0.0, top_p=0.5, top_k=3, seed=9, stop=["x"])
    )
    assert v.prompt_token_ids == (1, 2, 319)
    assert (v.params.max_tokens, v.params.top_k, v.params.seed, v.params.stop) == (5, 3, 9, ("x",))


@pytest.mark.parametrize(
    ("req", "needle"),
    [
        (pb.GenerateRequest(), "prompt is missing"),
        (text(""), "text is empty"),
        (ids([]), "token_ids.ids is empty"),
        (ids([1, VOCAB]), f"token_ids.ids holds {VOCAB}"),
        (ids([-1]), "token_ids.ids holds -1"),
        (ids([1] * MAX_LEN), "context holds 64"),
        (text(max_tokens=0), "sampling.max_tokens must be >= 1, got 0"),
        (text(max_tokens=-3), "sampling.max_tokens must be >= 1, got -3"),
        (text(max_tokens=MAX_LEN + 1), "sampling.max_tokens 65 is above the context"),
        (text(temperature=-0.1), "sampling.temperature"),
        (text(temperature=float("nan")), "sampling.temperature"),
        (text(top_p=0.0), "sampling.top_p"),
        (text(top_p=1.01), "sampling.top_p"),
        (text(top_k=-2), "sampling.top_k"),
        (text(stop=["a", "b", "c"]), "sampling.stop holds 3 strings; at most 2"),
        (text(stop_token_ids=[1, 2, 3]), "sampling.stop_token_ids holds 3"),
        (text(stop_token_ids=[VOCAB]), "sampling.stop_token_ids holds 320"),
        (text(seed=-1), "sampling.seed"),
        (text(min_p=2.0), "sampling: min_p"),
        (text(stop=[""]), "sampling: stop strings"),
        (pb.GenerateRequest(request_id="a b", text="x"), "request_id must be printable"),
        (pb.GenerateRequest(request_id="x" * 200, text="x"), "request_id has 200 characters"),
    ],
)
def test_invalid_fields_are_named(req: pb.GenerateRequest, needle: str) -> None:
    with pytest.raises(RequestError) as err:
        check(req)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.message


def test_unknown_fields_are_refused_with_their_numbers() -> None:
    data = text("hi").SerializeToString() + bytes([0xF8, 0x01, 0x05])  # field 31, varint 5
    sampling_unknown = pb.Sampling(max_tokens=2).SerializeToString() + bytes([0xA0, 0x06, 0x01])
    nested = (
        pb.GenerateRequest(text="hi").SerializeToString()
        + bytes([0x22, len(sampling_unknown)])
        + sampling_unknown
    )
    with pytest.raises(RequestError, match="unknown field.*#31"):
        check(deserialize_generate(data))
    with pytest.raises(RequestError, match=r"sampling\.#100"):
        check(deserialize_generate(nested))


def test_invalid_utf8_names_the_field() -> None:
    good = text("ab", stop=["cd"]).SerializeToString()
    in_text = good.replace(b"ab", b"\xff\xfe")
    in_stop = good.replace(b"cd", b"c\xc3")
    got = deserialize_generate(in_text)
    assert got == UndecodableRequest("text: invalid UTF-8 in a string field")
    assert deserialize_generate(in_stop) == UndecodableRequest(
        "sampling.stop: invalid UTF-8 in a string field"
    )
    with pytest.raises(RequestError, match="^text: invalid UTF-8"):
        check(got)
    assert find_bad_utf8(good, pb.GenerateRequest.DESCRIPTOR) is None


def test_garbage_bytes_are_invalid_argument_not_internal() -> None:
    got = deserialize_generate(b"\x0a\xff\xff\xff")
    assert isinstance(got, UndecodableRequest)
    with pytest.raises(RequestError) as err:
        check(got)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
