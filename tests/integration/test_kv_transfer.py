"""KV transfer between two tiny CPU engines over real gRPC on loopback.

Every test starts a decode engine behind the service and ends by checking that its free
block count is back where it started (and the prefill engine's too).
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing as mp
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.presets import preset
from engine.sampler import TokenLogprobs
from engine.sampling_params import SamplingParams
from kv_transfer.client import ClientConfig, KVTransferClient, RemoteReservation
from kv_transfer.ipc_plan import contiguous_runs, issue_copies, layer_digests, plan_copies
from kv_transfer.layer_stream import LayerStreamer, TransferStatus
from kv_transfer.layout import KVLayout
from kv_transfer.server import KVTransferServer, ServerConfig, TlsConfig, start_server
from kv_transfer.sink import EngineSink
from kv_transfer.transport import GrpcTransport, TransferError
from kv_transfer.wire import END_OF_STREAM, PROTOCOL_VERSION, checksum, encode_layer
from protos import kv_transfer_pb2 as pb

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:The given buffer is not writable"),
]

TOKEN = "test-token"
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [(7 * i + 3) % 250 for i in range(99)]  # 99 tokens: 7 blocks of 16, the last partial


def make_engine(num_kv_blocks: int = 64, max_num_batched_tokens: int = 2048) -> Engine:
    cfg = EngineConfig(
        model=preset("tiny"),
        num_kv_blocks=num_kv_blocks,
        max_model_len=1024,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    return Engine(cfg)  # same seed: same weights in every engine


def wait_until(pred: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


@dataclass
class Decode:
    engine: Engine
    sink: EngineSink
    server: KVTransferServer
    free_at_start: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def client(
        self, token: str = TOKEN, encode_ahead: int = 0, **kwargs: object
    ) -> KVTransferClient:
        config = ClientConfig(self.target, token, rpc_timeout_s=5.0, encode_ahead=encode_ahead)
        return KVTransferClient(config, **kwargs)

    def run_to_completion(self) -> dict[str, list[int]]:
        tokens: dict[str, list[int]] = {}
        deadline = time.monotonic() + 30
        while self.sink.outputs or self.engine.has_unfinished():
            assert time.monotonic() < deadline
            for out in self.sink.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        return tokens


def start_decode(num_kv_blocks: int = 64, **server_kwargs: object) -> Decode:
    engine = make_engine(num_kv_blocks)
    sink = EngineSink(engine)
    server = start_server(sink, ServerConfig(auth_token=TOKEN, **server_kwargs))
    return Decode(engine, sink, server, engine.num_free_blocks)


@pytest.fixture
def decode() -> Iterator[Decode]:
    d = start_decode()
    yield d
    try:
        assert wait_until(lambda: d.engine.num_free_blocks == d.free_at_start), (
            f"{d.free_at_start - d.engine.num_free_blocks} decode blocks leaked"
        )
        assert len(d.server.servicer.leases) == 0
    finally:
        d.server.stop()


@pytest.fixture
def prefill() -> Iterator[Engine]:
    engine = make_engine()
    free = engine.num_free_blocks
    yield engine
    assert engine.num_free_blocks == free, "prefill blocks leaked"


def prefill_held(engine: Engine, request_id: str, prompt: list[int]) -> tuple[list[int], int]:
    """Prefill a prompt with hold_kv; returns (held block ids, first token)."""
    engine.add_request(
        request_id, prompt, SamplingParams(max_tokens=1, temperature=0.0), hold_kv=True
    )
    first: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request_id:
                first.extend(out.new_token_ids)
    blocks, num_tokens = engine.held_blocks(request_id)
    assert num_tokens == len(prompt)
    return blocks, first[0]


def block_bytes(engine: Engine, block_ids: list[int]) -> bytes:
    """K and V of block_ids in every layer, as raw bytes."""
    pool = engine.pool
    return b"".join(
        pool.read_blocks(layer, block_ids).reshape(-1).view(torch.uint8).numpy().tobytes()
        for layer in range(pool.num_layers)
    )


def send_all(
    client: KVTransferClient, engine: Engine, r: RemoteReservation, local_blocks: list[int]
) -> None:
    session = GrpcTransport(client, engine.pool).open(r)
    for layer in range(engine.pool.num_layers):
        session.send_layer(layer, r.num_cached_blocks, local_blocks[r.num_cached_blocks :])
    session.finish(timeout_s=10)


def reference_tokens(prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return make_engine().generate(prompts, params)


# ---- exactness ---------------------------------------------------------------------------


@pytest.mark.parametrize("encode_ahead", [0, 2])  # on the request thread, an encoder thread
def test_round_trip_is_byte_identical_and_decodes_like_colocated(
    decode: Decode, prefill: Engine, encode_ahead: int
):
    blocks, first = prefill_held(prefill, "r1", PROMPT)
    layout = KVLayout.of_pool(prefill.pool)
    with decode.client(encode_ahead=encode_ahead) as client:
        r = client.reserve("r1", PROMPT, GREEDY, layout)
        assert r.num_cached_blocks == 0 and len(r.block_ids) == 7
        assert decode.engine.num_free_blocks == decode.free_at_start - 7
        send_all(client, prefill, r, blocks)
        assert block_bytes(decode.engine, list(r.block_ids)) == block_bytes(prefill, blocks)
        resp = client.commit(r, first)
        assert resp.num_bytes_received == 7 * 2 * layout.layer_block_bytes
    prefill.release("r1")
    assert decode.run_to_completion() == {"r1": reference_tokens([PROMPT])[0]}
    counters = decode.server.servicer.counters.snapshot()
    assert counters.transfers_committed == 1 and counters.transfers_failed == 0


@pytest.mark.parametrize("max_batched", [2048, 32])  # one step, and chunked prefill
def test_layer_streaming_decodes_like_colocated(decode: Decode, max_batched: int):
    prefill = make_engine(max_num_batched_tokens=max_batched)
    prompts = [PROMPT, PROMPT[:40], [5] * 17]
    with decode.client() as client:
        streamer = LayerStreamer(prefill, client, GrpcTransport(client, prefill.pool))
        for i, p in enumerate(prompts):
            streamer.add_request(f"s{i}", p, GREEDY)
        outcomes = []
        while streamer.num_in_flight:
            outcomes += streamer.step()
    assert [o.status for o in outcomes] == [TransferStatus.COMMITTED] * 3
    lbb = KVLayout.of_pool(prefill.pool).layer_block_bytes
    assert {o.request_id: o.record.num_bytes for o in outcomes} == {
        "s0": 7 * 2 * lbb,
        "s1": 3 * 2 * lbb,
        "s2": 2 * 2 * lbb,
    }
    got = decode.run_to_completion()
    assert [got[f"s{i}"] for i in range(3)] == reference_tokens(prompts)
    assert prefill.num_free_blocks == 64


def test_seeded_sampling_after_a_transfer_matches_colocated(decode: Decode):
    # The first token is drawn on the prefill side, the rest on the decode side: each draw
    # depends on (seed, position), so the whole output equals a colocated run's.
    prefill = make_engine()
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    prompts = [PROMPT, PROMPT[:40]]
    with decode.client() as client:
        streamer = LayerStreamer(prefill, client, GrpcTransport(client, prefill.pool))
        for i, p in enumerate(prompts):
            streamer.add_request(f"seeded{i}", p, seeded)
        while streamer.num_in_flight:
            streamer.step()
    got = decode.run_to_completion()
    want = reference_tokens(prompts, seeded)
    assert [got[f"seeded{i}"] for i in range(2)] == want
    assert want[0] != reference_tokens([PROMPT], dataclasses.replace(seeded, seed=43))[0]


def test_prefix_held_by_decode_side_is_not_sent(decode: Decode, prefill: Engine):
    # The decode side serves PROMPT once, so its first 6 full blocks are in its prefix cache.
    with decode.client() as client:
        streamer = LayerStreamer(prefill, client, GrpcTransport(client, prefill.pool))
        streamer.add_request("first", PROMPT, GREEDY)
        while streamer.num_in_flight:
            streamer.step()
        decode.run_to_completion()
        longer = PROMPT + [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # 109 tokens, 7 blocks
        r = streamer.add_request("second", longer, GREEDY)
        assert r.num_cached_blocks == 6
        outcomes = []
        while streamer.num_in_flight:
            outcomes += streamer.step()
    lbb = KVLayout.of_pool(prefill.pool).layer_block_bytes
    assert outcomes[0].status is TransferStatus.COMMITTED
    assert outcomes[0].record.num_bytes == 1 * 2 * lbb  # only the last block, both layers
    assert decode.run_to_completion()["second"] == reference_tokens([longer])[0]


def test_32_concurrent_transfers():
    decode = start_decode(num_kv_blocks=160)
    try:
        _run_32_concurrent(decode)
        assert decode.engine.num_free_blocks == 160
    finally:
        decode.server.stop()


def _run_32_concurrent(decode: Decode) -> None:
    prefill = make_engine(num_kv_blocks=128)
    prompts = [[(i * 13 + j) % 250 for j in range(20 + i)] for i in range(32)]
    held = {}
    for i, p in enumerate(prompts):
        prefill.add_request(f"c{i}", p, SamplingParams(max_tokens=1, temperature=0.0), hold_kv=True)
    firsts: dict[str, int] = {}
    while prefill.has_unfinished():
        for out in prefill.step():
            firsts[out.request_id] = out.new_token_ids[0]
    for i in range(32):
        held[f"c{i}"] = prefill.held_blocks(f"c{i}")[0]
    layout = KVLayout.of_pool(prefill.pool)
    errors: list[BaseException] = []
    barrier = threading.Barrier(32)

    def transfer(i: int) -> None:
        try:
            with decode.client() as client:
                r = client.reserve(f"c{i}", prompts[i], GREEDY, layout)
                barrier.wait(timeout=10)  # all 32 streams open together
                send_all(client, prefill, r, held[f"c{i}"])
                client.commit(r, firsts[f"c{i}"])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=transfer, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    for i in range(32):
        prefill.release(f"c{i}")
    assert prefill.num_free_blocks == 128
    got = decode.run_to_completion()
    assert [got[f"c{i}"] for i in range(32)] == reference_tokens(prompts)
    assert decode.server.servicer.counters.snapshot().transfers_committed == 32


# ---- failures free every block -----------------------------------------------------------


def raw_chunk(r: RemoteReservation, layout: KVLayout, layer: int, first: int, n: int) -> pb.KVChunk:
    data = bytes(range(256)) * (n * layout.layer_block_bytes // 256)
    return pb.KVChunk(
        request_id=r.request_id,
        epoch=r.epoch,
        layer_idx=layer,
        first_block=first,
        num_blocks=n,
        dtype=pb.DTYPE_FLOAT32,
        data=data,
        checksum_kind=pb.CHECKSUM_XXH3_64,
        checksum=checksum(data),
    )


def stream(client: KVTransferClient, *chunks: pb.KVChunk) -> pb.StreamSummary:
    """Stream hand-made chunks, serialized by protobuf itself (not by wire.encode_chunk)."""
    return client.stream(c.SerializeToString() for c in chunks)


def reserve_prompt(client: KVTransferClient, request_id: str = "x", lease_s: float = 0.0):
    layout = KVLayout.of_pool(make_engine(1).pool)
    return client.reserve(request_id, PROMPT, GREEDY, layout, lease_s=lease_s), layout


def expect_status(code: grpc.StatusCode, fn: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def test_corrupt_chunk_is_detected_and_frees_blocks(decode: Decode):
    with decode.client() as client:
        r, layout = reserve_prompt(client)
        good = raw_chunk(r, layout, 0, 0, 2)
        bad = pb.KVChunk()
        bad.CopyFrom(good)
        bad.data = good.data[:100] + bytes([good.data[100] ^ 1]) + good.data[101:]
        details = expect_status(grpc.StatusCode.DATA_LOSS, lambda: stream(client, good, bad))
        assert "checksum mismatch on layer 0" in details
        expect_status(grpc.StatusCode.NOT_FOUND, lambda: client.commit(r, 1))
    counters = decode.server.servicer.counters.snapshot()
    assert counters.chunks_rejected == 1 and counters.transfers_failed == 1


def test_unauthenticated_peer_is_refused(decode: Decode):
    layout = KVLayout.of_pool(decode.engine.pool)
    for token in ("wrong-token", ""):
        with decode.client(token=token) as client:
            expect_status(
                grpc.StatusCode.UNAUTHENTICATED,
                lambda client=client: client.reserve("u", PROMPT, GREEDY, layout),
            )
            expect_status(grpc.StatusCode.UNAUTHENTICATED, client.health)
            fake = RemoteReservation("u", 1, (0,), 0, 1.0)
            expect_status(
                grpc.StatusCode.UNAUTHENTICATED,
                lambda client=client, fake=fake: stream(client, raw_chunk(fake, layout, 0, 0, 1)),
            )
    assert decode.engine.num_free_blocks == decode.free_at_start
    with decode.client() as client:
        assert client.health().serving


@pytest.mark.parametrize("encode_ahead", [0, 1])
def test_abort_mid_stream_frees_blocks(decode: Decode, prefill: Engine, encode_ahead: int):
    blocks, _ = prefill_held(prefill, "a", PROMPT)
    with decode.client(encode_ahead=encode_ahead) as client:
        r = client.reserve("a", PROMPT, GREEDY, KVLayout.of_pool(prefill.pool))
        session = GrpcTransport(client, prefill.pool).open(r)
        session.send_layer(0, 0, blocks)  # layer 1 never comes
        (lease,) = decode.server.servicer.leases.active()
        assert wait_until(
            lambda: lease.num_bytes_received == 7 * KVLayout.of_pool(prefill.pool).layer_block_bytes
        )
        session.abort()
        with pytest.raises(TransferError):
            session.finish(timeout_s=5)
        assert wait_until(lambda: decode.engine.num_free_blocks == decode.free_at_start)
        expect_status(grpc.StatusCode.NOT_FOUND, lambda: client.commit(r, 1))
    prefill.release("a")


def test_abort_rpc_frees_blocks_and_is_idempotent(decode: Decode):
    with decode.client() as client:
        r, layout = reserve_prompt(client)
        stream(client, raw_chunk(r, layout, 0, 0, 3))
        assert decode.engine.num_free_blocks == decode.free_at_start - 7
        assert client.abort(r, "test") is True
        assert client.abort(r, "again") is False
        assert decode.engine.num_free_blocks == decode.free_at_start


def _killed_sender(target: str, r: RemoteReservation, sent: mp.Event) -> None:
    """Runs in a spawned process: streams one chunk, signals, then hangs mid-stream."""
    layout = KVLayout(2, 16, 2, 16, torch.float32)

    def chunks() -> Iterator[bytes]:
        yield raw_chunk(r, layout, 0, 0, 1).SerializeToString()
        sent.set()
        time.sleep(600)

    with KVTransferClient(ClientConfig(target, TOKEN, stream_timeout_s=600)) as client:
        client.stream(chunks())


def test_peer_killed_mid_stream_frees_blocks(decode: Decode):
    with decode.client() as client:
        r, _ = reserve_prompt(client, lease_s=30)  # long lease: the broken stream frees it
    ctx = mp.get_context("spawn")
    sent = ctx.Event()
    proc = ctx.Process(target=_killed_sender, args=(decode.target, r, sent), daemon=True)
    proc.start()
    try:
        assert sent.wait(30), "sender never streamed"
        (lease,) = decode.server.servicer.leases.active()
        assert wait_until(lambda: lease.num_bytes_received > 0)
        assert decode.engine.num_free_blocks == decode.free_at_start - 7
        proc.kill()
        proc.join(10)
        assert wait_until(lambda: decode.engine.num_free_blocks == decode.free_at_start, 10)
    finally:
        if proc.is_alive():
            proc.kill()
    assert decode.server.servicer.counters.snapshot().leases_expired == 0


def test_lease_expiry_frees_blocks(decode: Decode):
    with decode.client() as client:
        r, layout = reserve_prompt(client, lease_s=0.2)
        assert r.lease_s == pytest.approx(0.2)
        assert decode.engine.num_free_blocks == decode.free_at_start - 7
        assert wait_until(lambda: decode.engine.num_free_blocks == decode.free_at_start, 3)
        details = expect_status(
            grpc.StatusCode.NOT_FOUND, lambda: stream(client, raw_chunk(r, layout, 0, 0, 1))
        )
        assert "no active reservation" in details
    assert decode.server.servicer.counters.snapshot().leases_expired == 1


def test_reservation_refused_when_pool_full():
    d = start_decode(num_kv_blocks=8)
    try:
        with d.client() as client:
            r1, _ = reserve_prompt(client, "fits")  # 7 of 8 blocks
            details = expect_status(
                grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: reserve_prompt(client, "refused")
            )
            assert "free KV blocks" in details
            assert d.engine.num_free_blocks == 1
            client.abort(r1, "done")
        assert d.engine.num_free_blocks == 8
        assert d.server.servicer.counters.snapshot().reservations_refused == 1
    finally:
        d.server.stop()


# ---- malformed messages get a clear status -----------------------------------------------


def test_malformed_reserve_requests(decode: Decode):
    layout = KVLayout.of_pool(decode.engine.pool)
    bad_layout = KVLayout(2, 16, 2, 16, torch.bfloat16)
    with decode.client() as client:
        expect_status(
            grpc.StatusCode.INVALID_ARGUMENT, lambda: client.reserve("", PROMPT, GREEDY, layout)
        )
        details = expect_status(
            grpc.StatusCode.FAILED_PRECONDITION,
            lambda: client.reserve("m", PROMPT, GREEDY, bad_layout),
        )
        assert "layout differs" in details
        stub_call = client._stub.Reserve  # a hand-made request with inconsistent counts
        req = pb.ReserveRequest(
            request_id="m",
            prompt_token_ids=PROMPT,
            sampling=pb.SamplingOptions(max_tokens=4, top_p=1.0, repetition_penalty=1.0),
            layout=layout.to_pb(),
            num_blocks=3,
            protocol_version=PROTOCOL_VERSION,
        )
        md = client._metadata
        expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub_call(req, metadata=md))
        req.num_blocks = 7
        free = decode.engine.num_free_blocks
        for version in (0, 1, PROTOCOL_VERSION + 1):  # unset (an older sender), old, newer
            req.protocol_version = version
            details = expect_status(
                grpc.StatusCode.FAILED_PRECONDITION, lambda: stub_call(req, metadata=md)
            )
            assert f"sender v{version}" in details and "protocol differs" in details
        assert decode.engine.num_free_blocks == free
        req.protocol_version = PROTOCOL_VERSION
        req.sampling.max_tokens = 0  # SamplingParams refuses it
        assert "max_tokens" in expect_status(
            grpc.StatusCode.INVALID_ARGUMENT, lambda: stub_call(req, metadata=md)
        )
        req.ClearField("layout")
        expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub_call(req, metadata=md))
        expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda: client.reserve("m", [999_999], GREEDY, layout),  # outside the vocabulary
        )


@pytest.mark.parametrize(
    ("mutate", "code", "message"),
    [
        (lambda c: setattr(c, "data", c.data[:-4]), grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
        (lambda c: setattr(c, "layer_idx", 9), grpc.StatusCode.INVALID_ARGUMENT, "layer 9"),
        (lambda c: setattr(c, "first_block", 6), grpc.StatusCode.INVALID_ARGUMENT, "outside"),
        (
            lambda c: setattr(c, "dtype", pb.DTYPE_BFLOAT16),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dtype",
        ),
        (lambda c: setattr(c, "epoch", 999), grpc.StatusCode.NOT_FOUND, "epoch 999"),
        (lambda c: setattr(c, "checksum_kind", 0), grpc.StatusCode.DATA_LOSS, "not supported"),
    ],
)
def test_malformed_chunks_fail_the_transfer(decode: Decode, mutate, code, message):
    with decode.client() as client:
        r, layout = reserve_prompt(client)
        chunk = raw_chunk(r, layout, 0, 0, 2)
        mutate(chunk)
        assert message in expect_status(code, lambda: stream(client, chunk))
        if code is grpc.StatusCode.NOT_FOUND:  # never matched the lease: still reserved
            assert client.abort(r, "cleanup")


def test_oversized_chunk_is_refused(decode: Decode):
    with decode.client(max_send_message_bytes=64 * 2**20) as client:
        r, layout = reserve_prompt(client, lease_s=1.0)
        first = raw_chunk(r, layout, 0, 0, 1)
        huge = pb.KVChunk(request_id=r.request_id, epoch=r.epoch, data=b"\0" * (9 * 2**20))
        expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: stream(client, first, huge))
        # The broken stream frees the blocks if the first chunk reached the lease before gRPC
        # refused the second; otherwise the (short) lease does.
        assert wait_until(lambda: decode.engine.num_free_blocks == decode.free_at_start)


def test_failing_write_ends_the_stream_and_frees(decode: Decode, monkeypatch: pytest.MonkeyPatch):
    def broken(*args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(decode.sink, "write_blocks", broken)
    with decode.client() as client:
        r, layout = reserve_prompt(client)
        chunks = [raw_chunk(r, layout, layer, 0, 7) for layer in (0, 1)] * 3  # more than queued
        details = expect_status(grpc.StatusCode.INTERNAL, lambda: stream(client, *chunks))
        assert "disk on fire" in details
        assert decode.engine.num_free_blocks == decode.free_at_start


@pytest.mark.parametrize("encode_ahead", [0, 2])
def test_failing_encode_fails_the_transfer_and_frees(
    decode: Decode, prefill: Engine, monkeypatch: pytest.MonkeyPatch, encode_ahead: int
):
    import kv_transfer.transport as transport_module

    def encode_then_fail(*args: object, **kwargs: object) -> Iterator[object]:
        if args[3] == 1:  # layer 1
            raise RuntimeError("pool unreadable")
        yield from encode_layer(*args, **kwargs)

    monkeypatch.setattr(transport_module, "encode_layer", encode_then_fail)
    blocks, _ = prefill_held(prefill, "e", PROMPT)
    try:
        with decode.client(encode_ahead=encode_ahead) as client:
            r = client.reserve("e", PROMPT, GREEDY, KVLayout.of_pool(prefill.pool))
            session = GrpcTransport(client, prefill.pool).open(r)
            for layer in range(prefill.pool.num_layers):
                session.send_layer(layer, 0, blocks)
            with pytest.raises(TransferError):
                session.finish(timeout_s=10)
            # As LayerStreamer does after a failed finish: gRPC cancels the stream, but the
            # decode side may see it end normally (gRPC Python), so the sender aborts.
            client.abort(r, "encode failed")  # False if the stream's end freed it first
            assert wait_until(lambda: decode.engine.num_free_blocks == decode.free_at_start)
            expect_status(grpc.StatusCode.NOT_FOUND, lambda: client.commit(r, 1))
    finally:
        prefill.release("e")


def unmarked_stream(client: KVTransferClient, *messages: bytes) -> pb.StreamSummary:
    """A chunk stream that ends without END_OF_STREAM, as a stream of a sender that died
    between messages can look to the receiver."""
    return client._stream_chunks(iter(messages), timeout=10, metadata=client._metadata)


def test_stream_ending_without_its_end_marker_frees_blocks_at_once(decode: Decode):
    with decode.client() as client:
        r, layout = reserve_prompt(client, lease_s=60.0)  # expiry would come far too late
        chunks = [raw_chunk(r, layout, layer, 0, 7).SerializeToString() for layer in (0, 1)]
        assert "broke off" in expect_status(
            grpc.StatusCode.CANCELLED, lambda: unmarked_stream(client, *chunks)
        )
        assert decode.engine.num_free_blocks == decode.free_at_start
        expect_status(grpc.StatusCode.NOT_FOUND, lambda: client.commit(r, 1))
        assert decode.server.servicer.counters.snapshot().transfers_failed == 1


def test_message_after_the_end_marker_is_refused_and_frees_blocks(decode: Decode):
    with decode.client() as client:
        r, layout = reserve_prompt(client, lease_s=60.0)
        first, second = (raw_chunk(r, layout, layer, 0, 7).SerializeToString() for layer in (0, 1))
        assert "after the end" in expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda: unmarked_stream(client, first, END_OF_STREAM, second),
        )
        assert decode.engine.num_free_blocks == decode.free_at_start
        expect_status(grpc.StatusCode.NOT_FOUND, lambda: client.commit(r, 1))


def test_commit_before_every_block_arrived_is_refused(decode: Decode):
    with decode.client() as client:
        r, layout = reserve_prompt(client)
        stream(client, raw_chunk(r, layout, 0, 0, 7))  # layer 0 only
        assert "before every block" in expect_status(
            grpc.StatusCode.FAILED_PRECONDITION, lambda: client.commit(r, 1)
        )


def test_commit_carries_the_first_tokens_logprobs_and_refuses_malformed_ones(
    decode: Decode, prefill: Engine
):
    blocks, first = prefill_held(prefill, "lp", PROMPT)
    layout = KVLayout.of_pool(prefill.pool)
    good = TokenLogprobs(first, -0.25, ((first, -0.25), (7, -1.5)))
    with decode.client() as client:
        # Malformed: two top ids, one logprob. Refused, and the reservation freed.
        r = client.reserve("bad", PROMPT, GREEDY, layout)
        send_all(client, prefill, r, blocks)
        request = pb.CommitRequest(request_id=r.request_id, epoch=r.epoch, first_token_id=first,
                                   first_token_logprobs=pb.FirstTokenLogprobs(
                                       logprob=-0.25, top_token_ids=[1, 2], top_logprobs=[-1.0]))  # fmt: skip
        assert "2 top ids but 1 logprobs" in expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda: client._stub.Commit(request, timeout=5, metadata=client._metadata),  # fmt: skip
        )
        assert wait_until(lambda: decode.engine.num_free_blocks == decode.free_at_start)
        # Well formed: the decode engine's first output carries them.
        r = client.reserve("lp", PROMPT, GREEDY, layout)
        send_all(client, prefill, r, blocks)
        client.commit(r, first, first_token_logprobs=good)
    prefill.release("lp")
    [out] = decode.sink.outputs
    assert out.new_token_ids == [first] and out.logprobs == [good]
    decode.run_to_completion()


class MemmoveRuntime:
    """What cudaMemcpy2DAsync does, on host memory (the GPU path's copies, simulated)."""

    def memcpy_2d_async(self, dst, dst_pitch, src, src_pitch, width, height, stream) -> None:  # noqa: ANN001
        for row in range(height):
            ctypes.memmove(dst + row * dst_pitch, src + row * src_pitch, width)


def copy_like_the_gpu_path(prefill: Engine, decode: Decode, local: list[int], r) -> list[int]:  # noqa: ANN001
    """Copy local blocks into the reserved decode blocks with the GPU path's plan; returns
    the per-layer digests the GPU path would send."""
    src, dst = prefill.pool.cache, decode.engine.pool.cache
    layers = range(prefill.pool.num_layers)
    sent, remote = local[r.num_cached_blocks :], r.block_ids[r.num_cached_blocks :]
    copies = plan_copies(
        layers,
        contiguous_runs(sent, remote),
        src.shape[2],
        dst.shape[2],
        prefill.pool.layer_block_bytes // 2,
        max_pitch=2**31 - 1,
    )
    issue_copies(MemmoveRuntime(), copies, src.data_ptr(), dst.data_ptr(), stream=0)
    return layer_digests(src, layers, sent, r.num_cached_blocks).tolist()


def test_copy_path_commit_checks_digests_then_decodes_like_colocated(
    decode: Decode, prefill: Engine
):
    """The decode side of the same-host GPU path on CPU pools: Commit with per-layer
    digests instead of streamed chunks; a wrong digest fails the transfer and frees."""
    layout = KVLayout.of_pool(prefill.pool)
    layers = list(range(layout.num_layers))
    blocks, first = prefill_held(prefill, "g", PROMPT)
    with decode.client() as client:
        r = client.reserve("g", PROMPT, GREEDY, layout, transport=pb.TRANSPORT_CUDA_IPC)
        digests = copy_like_the_gpu_path(prefill, decode, blocks, r)
        assert block_bytes(decode.engine, list(r.block_ids)) == block_bytes(prefill, blocks)
        resp = client.commit(r, first, layers, digests)
        assert resp.num_bytes_received == 7 * 2 * layout.layer_block_bytes
        bad = client.reserve("bad", PROMPT, GREEDY, layout, transport=pb.TRANSPORT_CUDA_IPC)
        digests = copy_like_the_gpu_path(prefill, decode, blocks, bad)
        digests[1] += 1
        assert "digest mismatch on layers [1]" in expect_status(
            grpc.StatusCode.DATA_LOSS, lambda: client.commit(bad, first, layers, digests)
        )
        partial = client.reserve("partial", PROMPT, GREEDY, layout)
        digests = copy_like_the_gpu_path(prefill, decode, blocks, partial)
        assert "covered layers [0]" in expect_status(
            grpc.StatusCode.DATA_LOSS, lambda: client.commit(partial, first, [0], digests)
        )
    prefill.release("g")
    assert decode.run_to_completion() == {"g": reference_tokens([PROMPT])[0]}


def test_gpu_path_refused_on_cpu_pool(decode: Decode):
    with decode.client() as client:
        layout = KVLayout.of_pool(decode.engine.pool)
        assert "not on a GPU" in expect_status(
            grpc.StatusCode.FAILED_PRECONDITION,
            lambda: client.open_pool(decode.server.servicer.config.host_id, layout),
        )
        assert "another host" in expect_status(
            grpc.StatusCode.FAILED_PRECONDITION, lambda: client.open_pool("elsewhere/0", layout)
        )


def test_encode_layer_matches_pool(prefill: Engine):
    blocks, _ = prefill_held(prefill, "e", PROMPT)
    chunks = list(encode_layer(prefill.pool, "e", 1, 1, blocks, 0, max_chunk_bytes=3 * 4096))
    assert [(c.first_block, c.num_blocks) for c in chunks] == [(0, 3), (3, 3), (6, 1)]
    for c in chunks:
        ids = blocks[c.first_block : c.first_block + c.num_blocks]
        kv = prefill.pool.read_blocks(1, ids)  # [2, n, bs, Hkv, D]: K of all n, then V
        data = kv.reshape(-1).view(torch.uint8).numpy().tobytes()
        expected = pb.KVChunk(
            request_id="e",
            epoch=1,
            layer_idx=1,
            first_block=c.first_block,
            num_blocks=c.num_blocks,
            dtype=pb.DTYPE_FLOAT32,
            checksum_kind=pb.CHECKSUM_XXH3_64,
            checksum=checksum(data),
            data=data,
        )
        assert c.message == expected.SerializeToString()  # protobuf's own bytes, exactly
        assert c.num_data_bytes == len(data) == c.num_blocks * 4096
    prefill.release("e")


# ---- TLS ----------------------------------------------------------------------------------


def test_tls_round_trip(tmp_path: Path, prefill: Engine):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    d = start_decode(tls=TlsConfig(cert.read_bytes(), key.read_bytes()))
    try:
        blocks, first = prefill_held(prefill, "t", PROMPT)
        cfg = ClientConfig(d.target, TOKEN, tls_root_certs_pem=cert.read_bytes())
        with KVTransferClient(cfg) as client:
            r = client.reserve("t", PROMPT, GREEDY, KVLayout.of_pool(prefill.pool))
            send_all(client, prefill, r, blocks)
            client.commit(r, first)
        prefill.release("t")
        assert d.run_to_completion() == {"t": reference_tokens([PROMPT])[0]}
        with d.client() as plain:  # a plaintext peer cannot talk to a TLS server
            expect_status(grpc.StatusCode.UNAVAILABLE, plain.health)
        assert d.engine.num_free_blocks == d.free_at_start
    finally:
        d.server.stop()


def test_a_cancelled_commit_still_ends_the_transfer(decode: Decode, prefill: Engine):
    """A Commit whose call is cancelled (its channel closed under it) still yields an
    outcome (FAILED), aborts the reservation, and leaves no block held on either side."""
    with decode.client() as client:
        streamer = LayerStreamer(prefill, client, GrpcTransport(client, prefill.pool))

        def cancelled_commit(*args: object) -> Future:
            future: Future = Future()
            future.cancel()
            return future

        client.commit_future = cancelled_commit  # type: ignore[method-assign]
        streamer.add_request("c", PROMPT, GREEDY)
        outcomes = []
        while streamer.num_in_flight:
            outcomes += streamer.step()
        (outcome,) = outcomes
        assert outcome.status is TransferStatus.FAILED and "CANCELLED" in outcome.detail
        streamer.close()  # waits for the abort sent on the streamer's own thread
    assert prefill.num_free_blocks == 64
    assert wait_until(lambda: decode.engine.num_free_blocks == decode.free_at_start)
