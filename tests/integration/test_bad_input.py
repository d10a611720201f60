"""Bad input at both network APIs of a real cluster, and a flood larger than the KV pool.

One local Ray and one 1P1D cluster for the module (the shipped default model, byte-level,
on CPU) with small limits so every limit is reachable:

    context 256 tokens, 32 KV blocks of 16 per worker, at most 8 requests in flight,
    4 stop strings, 8 stop token ids, 64 KiB per request, a KV-transfer token this test knows

Every listed bad input gets its exact status and a message naming the field; a hypothesis
test sends random requests (structured, and raw bytes); KV-transfer gets malformed chunks
and garbage bytes with a valid token. After all of them the cluster still answers and every
worker's free blocks equal the start. The cases tried and crashes seen (UNKNOWN / INTERNAL
status, or the server no longer answering) are written to results/bad_input.json.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

ray = pytest.importorskip("ray")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from baton.client import BatonClient, build_request  # noqa: E402
from baton.config import parse_config  # noqa: E402
from baton.launcher import Cluster, launch  # noqa: E402
from kv_transfer.layout import KVLayout  # noqa: E402
from kv_transfer.wire import PROTOCOL_VERSION, TOKEN_METADATA_KEY, checksum  # noqa: E402
from protos import kv_transfer_pb2 as kvpb  # noqa: E402
from protos import kv_transfer_pb2_grpc as kvpb_grpc  # noqa: E402
from protos import serving_pb2 as pb  # noqa: E402

pytestmark = pytest.mark.timeout(300)

MAX_LEN = 256
NUM_BLOCKS = 32
MAX_IN_FLIGHT = 8
MAX_REQUEST_BYTES = 64 * 1024
KV_TOKEN = "bad-input-kv-token"
GENERATE = "/baton.v1.Serving/Generate"
RESULTS = Path(__file__).resolve().parents[2] / "results" / "bad_input.json"
OK_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
CRASH_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


class Tally:
    """Bad-input cases sent and crashes seen, by test; written at the end of the module."""

    def __init__(self) -> None:
        self.cases: Counter[str] = Counter()
        self.crashes: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()

    def record(self, group: str, code: grpc.StatusCode, server_answers: bool = True) -> None:
        self.cases[group] += 1
        self.codes[code.name] += 1
        if code in CRASH_CODES or not server_answers:
            self.crashes[group] += 1


TALLY = Tally()


# ---- the cluster --------------------------------------------------------------------------


def config() -> dict[str, Any]:
    return {
        "model": {"default": True},
        "engine": {
            "dtype": "float32",
            "device": "cpu",
            "block_size": 16,
            "num_kv_blocks": NUM_BLOCKS,
            "max_num_seqs": 8,
            "max_num_batched_tokens": 256,
            "max_model_len": MAX_LEN,
        },
        "cluster": {
            "router": {"load_poll_interval_s": 0.05},
            "kv_transfer": {"auth_token": KV_TOKEN, "lease_s": 5.0},
            "limits": {
                "max_request_bytes": MAX_REQUEST_BYTES,
                "max_in_flight": MAX_IN_FLIGHT,
                "max_stop_strings": 4,
                "max_stop_token_ids": 8,
                "request_timeout_s": 60.0,
            },
        },
    }


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    c = launch(parse_config(config()))
    yield c
    c.stop(grace_s=1.0)
    ray.shutdown()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "cases": sum(TALLY.cases.values()),
                "crashes": sum(TALLY.crashes.values()),
                "cases_by_test": dict(TALLY.cases),
                "crashes_by_test": dict(TALLY.crashes),
                "statuses": dict(TALLY.codes),
                "command": "python -m pytest tests/integration/test_bad_input.py -q",
            },
            indent=2,
        )
        + "\n"
    )


@pytest.fixture(scope="module")
def vocab_size() -> int:
    return parse_config(config()).prefill.model.vocab_size


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Iterator[BatonClient]:
    with BatonClient(cluster.address, timeout_s=30) as c:
        yield c


@pytest.fixture(scope="module")
def raw(cluster: Cluster) -> Iterator[Callable[..., grpc.Call]]:
    """Generate with the request as bytes, so invalid UTF-8 and unknown fields reach it."""
    channel = grpc.insecure_channel(cluster.address)
    call = channel.unary_stream(
        GENERATE, request_serializer=None, response_deserializer=pb.GenerateResponse.FromString
    )
    yield call
    channel.close()


def all_blocks_free(cluster: Cluster, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        loads = ray.get([a.load.remote() for a in cluster.actors], timeout=10)
        leases = ray.get([a.num_active_leases.remote() for a in cluster.decode_actors], timeout=10)
        in_flight = cluster.server.router.num_in_flight
        state = [(x.name, x.num_free_blocks, x.num_total_blocks, x.num_running) for x in loads]
        if (
            all(f == t == NUM_BLOCKS and r == 0 for _, f, t, r in state)
            and not any(leases)
            and in_flight == 0
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not back to start: {state}, leases {leases}, router {in_flight}")
        time.sleep(0.1)


def outcome(call: grpc.Call) -> tuple[grpc.StatusCode, str, list[pb.GenerateResponse]]:
    responses: list[pb.GenerateResponse] = []
    try:
        for r in call:
            responses.append(r)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", responses
    return grpc.StatusCode.OK, "", responses


def server_answers(client: BatonClient) -> bool:
    try:
        return client.health().serving
    except grpc.RpcError:
        return False


# ---- wire helpers: what protobuf's own encoder refuses to write --------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def len_field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def sampling_bytes(**fields: Any) -> bytes:
    return pb.Sampling(**fields).SerializeToString()


# ---- every listed case: exact status, the field named ------------------------------------

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def listed_cases(vocab: int) -> list[tuple[str, bytes, grpc.StatusCode, tuple[str, ...]]]:
    """(name, serialized request, status, words the message must hold)."""

    def req(prompt: Any = "hi", **kw: Any) -> bytes:
        return build_request(prompt, **kw).SerializeToString()

    def sampled(**s: Any) -> bytes:
        r = pb.GenerateRequest(text="hi")
        for k, v in s.items():
            setattr(r.sampling, k, v)
        return r.SerializeToString()

    empty_ids = pb.GenerateRequest()
    empty_ids.token_ids.SetInParent()
    empty_text = pb.GenerateRequest(text="")
    return [
        ("empty text", empty_text.SerializeToString(), INVALID, ("text", "empty")),
        ("no prompt", pb.GenerateRequest().SerializeToString(), INVALID, ("prompt",)),
        ("empty token ids", empty_ids.SerializeToString(), INVALID, ("token_ids.ids",)),
        ("prompt ids = context", req([1] * MAX_LEN), INVALID, ("prompt", "context")),
        ("prompt text > context", req("a" * (MAX_LEN + 10)), INVALID, ("prompt", "context")),
        ("max_tokens 0", sampled(max_tokens=0), INVALID, ("sampling.max_tokens",)),
        ("max_tokens negative", sampled(max_tokens=-3), INVALID, ("sampling.max_tokens",)),
        (
            "max_tokens above context",
            sampled(max_tokens=MAX_LEN + 1),
            INVALID,
            ("sampling.max_tokens", "context"),
        ),
        ("temperature < 0", sampled(temperature=-0.5), INVALID, ("sampling.temperature",)),
        ("temperature NaN", sampled(temperature=math.nan), INVALID, ("sampling.temperature",)),
        ("temperature inf", sampled(temperature=math.inf), INVALID, ("sampling.temperature",)),
        ("top_p 0", sampled(top_p=0.0), INVALID, ("sampling.top_p",)),
        ("top_p 1.5", sampled(top_p=1.5), INVALID, ("sampling.top_p",)),
        ("top_p negative", sampled(top_p=-0.1), INVALID, ("sampling.top_p",)),
        ("top_p NaN", sampled(top_p=math.nan), INVALID, ("sampling.top_p",)),
        ("top_k -2", sampled(top_k=-2), INVALID, ("sampling.top_k",)),
        ("min_p 2", sampled(min_p=2.0), INVALID, ("min_p",)),
        ("repetition_penalty 0", sampled(repetition_penalty=0.0), INVALID, ("repetition_penalty",)),
        ("presence_penalty 9", sampled(presence_penalty=9.0), INVALID, ("presence_penalty",)),
        ("seed negative", sampled(seed=-1), INVALID, ("sampling.seed",)),
        ("token id = vocab", req([1, vocab]), INVALID, ("token_ids.ids", str(vocab))),
        ("token id negative", req([1, -1]), INVALID, ("token_ids.ids", "-1")),
        ("token id huge", req([2**62]), INVALID, ("token_ids.ids",)),
        (
            "stop token id outside vocab",
            req(stop_token_ids=[vocab + 7]),
            INVALID,
            ("sampling.stop_token_ids",),
        ),
        (
            "invalid UTF-8 text",
            len_field(2, b"ab\xff\xfe"),
            INVALID,
            ("text", "UTF-8"),
        ),
        (
            "UTF-8 surrogate in text",
            len_field(2, b"x\xed\xa0\x80y"),
            INVALID,
            ("text", "UTF-8"),
        ),
        (
            "invalid UTF-8 stop string",
            len_field(2, b"hi") + len_field(4, len_field(10, b"\xc3(")),
            INVALID,
            ("sampling.stop", "UTF-8"),
        ),
        (
            "invalid UTF-8 request_id",
            len_field(1, b"\x80id") + len_field(2, b"hi"),
            INVALID,
            ("request_id", "UTF-8"),
        ),
        (
            "invalid UTF-8 cache_salt",
            len_field(2, b"hi") + len_field(5, b"\xf8\x88\x80\x80\x80"),
            INVALID,
            ("cache_salt", "UTF-8"),
        ),
        ("too many stop strings", req(stop=["a", "b", "c", "d", "e"]), INVALID, ("sampling.stop",)),
        ("empty stop string", req(stop=[""]), INVALID, ("stop",)),
        (
            "too many stop token ids",
            req(stop_token_ids=list(range(1, 10))),
            INVALID,
            ("sampling.stop_token_ids",),
        ),
        (
            "request above max_request_bytes",
            req("a" * (MAX_REQUEST_BYTES + 100)),
            EXHAUSTED,
            ("limits.max_request_bytes",),
        ),
        (
            "unknown top-level field",
            req() + varint(99 << 3 | 0) + varint(7),
            INVALID,
            ("unknown field", "#99"),
        ),
        (
            "unknown sampling field",
            len_field(2, b"hi")
            + len_field(4, sampling_bytes(max_tokens=2) + varint(50 << 3) + b"\x01"),
            INVALID,
            ("unknown field", "sampling.#50"),
        ),
        ("request_id with spaces", req(request_id="a b"), INVALID, ("request_id",)),
        ("request_id too long", req(request_id="x" * 500), INVALID, ("request_id",)),
        ("cache_salt too long", req(cache_salt="s" * 500), INVALID, ("cache_salt",)),
        ("garbage bytes", b"\xff\xff\xff\xff\x0f\x01", INVALID, ("GenerateRequest",)),
        ("truncated message", req()[:-1] + b"\x12\x10ab", INVALID, ("GenerateRequest",)),
    ]


def test_every_listed_bad_input_names_its_field(
    cluster: Cluster,
    client: BatonClient,
    raw: Callable[..., grpc.Call],
    vocab_size: int,
    requests_done: Callable,
) -> None:
    before = requests_done(client)  # an earlier test's request may still count
    failures = []
    for name, data, code, words in listed_cases(vocab_size):
        got, details, _ = outcome(raw(data, timeout=10))
        TALLY.record("listed", got)
        if got != code or not all(w in details for w in words):
            failures.append(f"{name}: {got.name} {details!r}, wanted {code.name} with {words}")
    assert not failures, "\n".join(failures)
    after = requests_done(client)
    assert after == before  # refused before any worker was touched
    r = client.generate("still serving", max_tokens=4, temperature=0.0, ignore_eos=True)
    assert r.usage.completion_tokens == 4
    all_blocks_free(cluster)


def test_duplicate_request_id_in_flight_is_refused(cluster: Cluster, client: BatonClient) -> None:
    call = client.stream(
        build_request([1, 2, 3], request_id="dup", max_tokens=200, ignore_eos=True)
    )
    next(iter(call))
    code, details, _ = outcome(client.stream(build_request("x", request_id="dup", max_tokens=2)))
    TALLY.record("listed", code)
    call.cancel()
    assert code is INVALID and "request_id" in details and "dup" in details
    all_blocks_free(cluster)
    # Once the first has ended, the id is free again.
    assert client.generate("x", request_id="dup", max_tokens=2).usage.completion_tokens == 2
    all_blocks_free(cluster)


# ---- random requests (hypothesis) ---------------------------------------------------------

FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-9, 2.0, -1.0, math.nan, math.inf, -math.inf]),
)
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def sane_requests(draw: st.DrawFn, vocab: int) -> bytes:
    """A request within every limit, mostly: these reach the workers (stop strings, seeds,
    penalties, salts), so the fuzzing covers the serving path too."""
    r = pb.GenerateRequest(cache_salt=draw(st.sampled_from(["", "a", "b"])))
    if draw(st.booleans()):
        r.text = draw(st.text(min_size=1, max_size=60))
    else:
        r.token_ids.ids.extend(draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=60)))
    s = r.sampling
    s.max_tokens = draw(st.integers(1, 6))
    s.temperature = draw(st.floats(0.0, 2.0))
    s.top_p = draw(st.floats(0.05, 1.0))
    s.top_k = draw(st.integers(-1, 20))
    s.min_p = draw(st.floats(0.0, 1.0))
    s.repetition_penalty = draw(st.floats(0.5, 2.0))
    s.presence_penalty = draw(st.floats(-2.0, 2.0))
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**63 - 1))
    s.stop.extend(draw(st.lists(st.text(min_size=1, max_size=4), max_size=4)))
    s.stop_token_ids.extend(draw(st.lists(st.integers(0, vocab - 1), max_size=4)))
    s.ignore_eos = draw(st.booleans())
    return r.SerializeToString()


@st.composite
def generate_requests(draw: st.DrawFn, vocab: int) -> bytes:
    """A GenerateRequest as bytes: random prompt (text, raw bytes that may not be UTF-8,
    token ids in and out of the vocabulary), random sampling, random stop lists; max_tokens
    small when in range, so valid requests finish quickly."""
    if draw(st.integers(0, 2)) == 0:
        return draw(sane_requests(vocab))
    r = pb.GenerateRequest()
    if draw(st.booleans()):
        r.request_id = draw(st.text(max_size=12))
    if draw(st.booleans()):
        r.cache_salt = draw(st.text(max_size=8))
    kind = draw(st.sampled_from(["text", "ids", "bytes", "none"]))
    if kind == "text":
        r.text = draw(st.text(max_size=300))
    elif kind == "ids":
        ids = draw(
            st.lists(
                st.one_of(st.integers(0, vocab - 1), INT64, st.integers(vocab - 2, vocab + 2)),
                max_size=300,
            )
        )
        r.token_ids.ids.extend(ids)
        if not ids:
            r.token_ids.SetInParent()
    s = r.sampling
    if draw(st.booleans()):
        s.max_tokens = draw(st.one_of(st.integers(-3, 6), INT32))
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if draw(st.booleans()):
            setattr(s, name, draw(FLOATS))
    for name in ("presence_penalty", "frequency_penalty"):
        if draw(st.integers(0, 3)) == 0:
            setattr(s, name, draw(FLOATS))
    if draw(st.booleans()):
        s.top_k = draw(st.one_of(st.integers(-3, 50), INT32))
    if draw(st.integers(0, 3)) == 0:
        s.seed = draw(INT64)
    s.stop.extend(draw(st.lists(st.text(max_size=6), max_size=6)))
    s.stop_token_ids.extend(
        draw(st.lists(st.one_of(st.integers(0, vocab + 3), INT64), max_size=10))
    )
    s.ignore_eos = draw(st.booleans())
    s.include_stop_str_in_output = draw(st.booleans())
    data = r.SerializeToString()
    if kind == "bytes":  # a text field that may hold invalid UTF-8 or surrogates
        text = draw(
            st.one_of(
                st.binary(max_size=64),
                st.sampled_from([b"\xed\xa0\x80", b"\xff", b"ok\xc3", b"\xf4\x90\x80\x80"]),
            )
        )
        data += len_field(2, text)
    if draw(st.integers(0, 9)) == 0:  # an unknown field
        data += varint(draw(st.integers(6, 500)) << 3) + varint(draw(st.integers(0, 2**20)))
    return data


def check_answer(call: grpc.Call, client: BatonClient, group: str) -> tuple[grpc.StatusCode, str]:
    code, details, responses = outcome(call)
    answers = True
    if code in CRASH_CODES or code not in OK_CODES:
        answers = server_answers(client)
    TALLY.record(group, code, answers)
    assert code in OK_CODES, (code, details)
    if code is grpc.StatusCode.OK:
        assert responses and responses[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    else:
        assert details
    return code, details


@settings(
    max_examples=900,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_requests_never_crash(
    data: st.DataObject,
    cluster: Cluster,
    client: BatonClient,
    raw: Callable[..., grpc.Call],
    vocab_size: int,
) -> None:
    request = data.draw(generate_requests(vocab_size))
    check_answer(raw(request, timeout=15), client, "hypothesis_structured")


@settings(max_examples=250, deadline=None, database=None)
@given(blob=st.binary(max_size=200))
def test_random_bytes_never_crash(
    blob: bytes, cluster: Cluster, client: BatonClient, raw: Callable[..., grpc.Call]
) -> None:
    check_answer(raw(blob, timeout=15), client, "hypothesis_bytes")


def test_after_random_requests_nothing_leaked(cluster: Cluster, client: BatonClient) -> None:
    all_blocks_free(cluster)
    r = client.generate([5, 6, 7], max_tokens=3, temperature=0.0, ignore_eos=True)
    assert r.usage.completion_tokens == 3
    stats = client.stats()
    assert stats.requests_in_flight == 0
    assert all(w.healthy for w in stats.workers)
    # Every worker stepped its engine, each step over at least one sequence.
    assert all(w.num_steps > 0 and w.step_rows >= w.num_steps > 0 and w.step_s > 0
               for w in stats.workers), stats.workers  # fmt: skip


def test_baton_status_prints_every_worker_with_its_step_means(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    from baton.cli import main

    assert main(["status", "--address", cluster.address]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(("disaggregated", "colocated")) and "serving" in lines[0]
    assert lines[1].split()[-3:] == ["steps", "ms/step", "rows/step"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert len(rows) == len(cluster.actors)
    for fields in rows.values():
        steps, ms, per_step = int(fields[-3]), float(fields[-2]), float(fields[-1])
        assert steps > 0 and ms > 0 and per_step >= 1.0, fields
    assert sum(TALLY.crashes.values()) == 0, TALLY.crashes


# ---- the KV-transfer API: malformed chunks with a valid token ----------------------------


def kv_stub(cluster: Cluster, client: BatonClient) -> tuple[grpc.Channel, Any, str]:
    (decode,) = [w for w in client.stats().workers if w.role == "decode"]
    channel = grpc.insecure_channel(decode.kv_address)
    return channel, kvpb_grpc.KVTransferStub(channel), decode.kv_address


def test_malformed_kv_chunks_at_the_decode_worker(cluster: Cluster, client: BatonClient) -> None:
    channel, stub, address = kv_stub(cluster, client)
    md = ((TOKEN_METADATA_KEY, KV_TOKEN),)
    raw_stream = channel.stream_unary(
        "/baton.v1.KVTransfer/StreamChunks",
        request_serializer=None,
        response_deserializer=kvpb.StreamSummary.FromString,
    )
    layout = decode_layout()
    prompt = list(range(1, 40))  # 3 blocks

    def reserve(rid: str) -> kvpb.ReserveResponse:
        return stub.Reserve(
            kvpb.ReserveRequest(
                request_id=rid,
                prompt_token_ids=prompt,
                sampling=kvpb.SamplingOptions(max_tokens=2, top_p=1.0, repetition_penalty=1.0),
                layout=layout.to_pb(),
                num_blocks=3,
                lease_ms=3000,
                protocol_version=PROTOCOL_VERSION,
            ),
            metadata=md,
            timeout=10,
        )

    def chunk(r: kvpb.ReserveResponse, rid: str, **kw: Any) -> bytes:
        n = kw.pop("num_blocks", 1)
        data = kw.pop("data", b"\1" * (n * layout.layer_block_bytes))
        c = kvpb.KVChunk(
            request_id=rid,
            epoch=r.epoch,
            layer_idx=0,
            first_block=0,
            num_blocks=n,
            dtype=layout.to_pb().dtype,
            data=data,
            checksum_kind=kvpb.CHECKSUM_XXH3_64,
            checksum=checksum(data),
        )
        for k, v in kw.items():
            setattr(c, k, v)
        return c.SerializeToString()

    cases: list[tuple[str, Callable[[kvpb.ReserveResponse, str], list[bytes]], set]] = [
        ("garbage bytes", lambda r, rid: [b"\xff\xff\xff\xff\xff"], {INVALID}),
        ("truncated chunk", lambda r, rid: [chunk(r, rid)[:-7]], {INVALID}),
        ("short data", lambda r, rid: [chunk(r, rid, data=b"\1" * 12)], {INVALID}),
        ("layer out of range", lambda r, rid: [chunk(r, rid, layer_idx=99)], {INVALID}),
        ("block out of range", lambda r, rid: [chunk(r, rid, first_block=40)], {INVALID}),
        ("wrong dtype", lambda r, rid: [chunk(r, rid, dtype=kvpb.DTYPE_BFLOAT16)], {INVALID}),
        (
            "bad checksum",
            lambda r, rid: [chunk(r, rid, checksum=12345)],
            {grpc.StatusCode.DATA_LOSS},
        ),
        ("wrong epoch", lambda r, rid: [chunk(r, rid, epoch=10**9)], {grpc.StatusCode.NOT_FOUND}),
        ("unknown request", lambda r, rid: [chunk(r, "nobody")], {grpc.StatusCode.NOT_FOUND}),
        ("empty stream-then-garbage", lambda r, rid: [chunk(r, rid), b"\x0a\xff"], {INVALID}),
    ]
    failures = []
    for i, (name, make, codes) in enumerate(cases):
        rid = f"bad-kv-{i}"
        r = reserve(rid)
        try:
            raw_stream(iter(make(r, rid)), metadata=md, timeout=10)
            got, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            got, details = e.code(), e.details() or ""
        TALLY.record("kv_transfer", got)
        if got not in codes or not details:
            failures.append(f"{name}: {got.name} {details!r}")
        stub.Abort(
            kvpb.AbortRequest(request_id=rid, epoch=r.epoch, reason="test"), metadata=md, timeout=10
        )
    assert stub.Health(kvpb.HealthRequest(), metadata=md, timeout=10) is not None
    channel.close()
    assert not failures, f"{address}:\n" + "\n".join(failures)
    all_blocks_free(cluster)
    r = client.generate(list(range(1, 40)), max_tokens=3, temperature=0.0, ignore_eos=True)
    assert r.usage.completion_tokens == 3
    all_blocks_free(cluster)


def decode_layout() -> KVLayout:
    """The decode worker's KV layout, from the same config it was built from."""
    cfg = parse_config(config()).decode
    m = cfg.model
    dtype = getattr(torch, cfg.dtype)
    return KVLayout(m.num_hidden_layers, cfg.block_size, m.num_key_value_heads, m.head_dim, dtype)


def test_garbage_at_kv_unary_rpcs_is_invalid_argument(
    cluster: Cluster, client: BatonClient
) -> None:
    channel, stub, _ = kv_stub(cluster, client)
    md = ((TOKEN_METADATA_KEY, KV_TOKEN),)
    got = {}
    for method in ("Reserve", "Commit", "Abort"):
        call = channel.unary_unary(f"/baton.v1.KVTransfer/{method}", request_serializer=None)
        try:
            call(b"\xff\xff\xff\xff", metadata=md, timeout=10)
            got[method] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            got[method] = e.code()
        TALLY.record("kv_transfer_unary_garbage", got[method])
    assert stub.Health(kvpb.HealthRequest(), metadata=md, timeout=10).serving  # still serving
    channel.close()
    all_blocks_free(cluster)
    assert got == dict.fromkeys(got, INVALID), got


# ---- pressure: a flood larger than the KV pool -------------------------------------------


def worker_rss_mb(cluster: Cluster) -> dict[str, float]:
    def getpid(_self: object) -> int:
        return os.getpid()

    pids = ray.get([a.__ray_call__.remote(getpid) for a in cluster.actors], timeout=30)
    out = {}
    for i, pid in enumerate(pids):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out[f"worker-{i}"] = int(line.split()[1]) / 1024.0
    return out


def test_flood_larger_than_the_pool_finishes_or_is_refused(
    cluster: Cluster, client: BatonClient
) -> None:
    """40 requests of 200 prompt + 48 output tokens (16 blocks each) at once against 32-block
    pools and an in-flight cap of 8: the first 8 queue / preempt and finish, the rest get
    RESOURCE_EXHAUSTED naming the limit; RSS stays bounded and every block comes back."""
    rss_before = worker_rss_mb(cluster)
    num = 40
    barrier = threading.Barrier(num)

    def one(i: int) -> tuple[grpc.StatusCode, str, int]:
        prompt = [(7 * i + 3 * j) % 250 + 1 for j in range(200)]
        barrier.wait(30)
        code, details, responses = outcome(
            client.stream(
                build_request(prompt, max_tokens=48, temperature=0.0, ignore_eos=True),
                timeout_s=120,
            )
        )
        return code, details, sum(len(r.token_ids) for r in responses)

    with ThreadPoolExecutor(num) as pool:
        results = list(pool.map(one, range(num)))
    for code, _, _ in results:
        TALLY.record("flood", code)
    codes = Counter(code for code, _, _ in results)
    assert set(codes) <= {grpc.StatusCode.OK, EXHAUSTED}, results
    assert codes[grpc.StatusCode.OK] >= MAX_IN_FLIGHT // 2, codes
    assert codes[EXHAUSTED] >= 1, codes
    for code, details, n in results:
        if code is grpc.StatusCode.OK:
            assert n == 48
        else:
            assert "max_in_flight" in details
    all_blocks_free(cluster, timeout_s=60)
    # A second wave that respects the cap: all finish.
    with ThreadPoolExecutor(MAX_IN_FLIGHT) as pool:
        again = list(pool.map(one_capped(client), range(MAX_IN_FLIGHT)))
    assert again == [48] * MAX_IN_FLIGHT
    all_blocks_free(cluster, timeout_s=60)
    rss_after = worker_rss_mb(cluster)
    growth = {k: rss_after[k] - rss_before[k] for k in rss_before}
    assert all(g < 256 for g in growth.values()), growth  # the KV pool is preallocated


def one_capped(client: BatonClient) -> Callable[[int], int]:
    def run(i: int) -> int:
        prompt = [(11 * i + j) % 250 + 1 for j in range(200)]
        r = client.generate(prompt, max_tokens=48, temperature=0.0, ignore_eos=True, timeout_s=120)
        return r.usage.completion_tokens

    return run


def test_struct_helpers_match_protobuf() -> None:
    """The hand-written wire helpers above write what protobuf writes."""
    assert len_field(2, b"hi") == pb.GenerateRequest(text="hi").SerializeToString()
    assert varint(300) == b"\xac\x02"
    assert struct.pack("<d", 1.0)  # doubles go through protobuf itself


def test_baton_generate_prints_logprobs(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    from baton.cli import main

    args = ["generate", "--address", cluster.address, "--prompt", "hi", "--max-tokens", "3",
            "--temperature", "0", "--ignore-eos", "--logprobs", "2"]  # fmt: skip
    assert main(args) == 0
    rows = [line.split("\t") for line in capsys.readouterr().err.splitlines()]
    assert len(rows) == 3
    for token, logprob, top in rows:
        best = [pair.split(":") for pair in top.split()]
        assert len(best) == 2 and best[0][0] == token  # greedy: the chosen is the best
        assert float(logprob) <= 0.0 and float(best[0][1]) == float(logprob)
