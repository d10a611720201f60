"""The same-host GPU path between two GPUs: exact bytes, digest check, no leaked blocks.

The decode side (a bare pool behind the service) runs in a spawned process on cuda:1; this
process is the prefill side on cuda:0 and maps the decode pool once through CUDA IPC into
cuda:0's context (one transport for the module: the mapping is not reopened per transfer).
Every test checks the bytes that landed in the decode pool (read back through the mapping
by a cuda:0 kernel) against the prefill pool, commits (the decode process recomputes the
digests over its own pool: an independent check of where the bytes went), and that the
decode side's free-block count is back where it started. Block lists are shuffled and
fragmented on purpose: the kernel path must not care.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
    ),
]

TOKEN = "gpu-test-token"
BS = 16
NUM_DECODE_BLOCKS = 64
NUM_LOCAL_BLOCKS = 80


def _decode_main(ready: mp.Queue, stop: mp.Event) -> None:
    from engine.kv_pool import KVPool
    from engine.presets import preset
    from kv_transfer.server import ServerConfig, start_server
    from kv_transfer.sink import PoolSink

    torch.cuda.set_device(1)
    pool = KVPool(preset("tiny"), NUM_DECODE_BLOCKS, BS, torch.bfloat16, torch.device("cuda:1"))
    pool.cache.zero_()
    sink = PoolSink(pool, release_on_commit=True)
    server = start_server(sink, ServerConfig(auth_token=TOKEN))
    ready.put(server.port)
    stop.wait(600)
    server.stop()


@pytest.fixture(scope="module")
def decode_port() -> Iterator[int]:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_decode_main, args=(ready, stop), daemon=True)
    proc.start()
    try:
        yield ready.get(timeout=120)
    finally:
        stop.set()
        proc.join(20)
        if proc.is_alive():
            proc.kill()


@dataclass
class Prefill:
    pool: object  # engine.kv_pool.KVPool on cuda:0, random words
    client: object  # kv_transfer.client.KVTransferClient
    transport: object  # kv_transfer.cuda_ipc.CudaIpcTransport

    @property
    def num_free_remote(self) -> int:
        return self.client.health().num_free_blocks


@pytest.fixture(scope="module")
def prefill(decode_port: int) -> Iterator[Prefill]:
    from engine.kv_pool import KVPool
    from engine.presets import preset
    from kv_transfer.client import ClientConfig, KVTransferClient
    from kv_transfer.cuda_ipc import CudaIpcTransport

    torch.cuda.set_device(0)
    pool = KVPool(preset("tiny"), NUM_LOCAL_BLOCKS, BS, torch.bfloat16, torch.device("cuda:0"))
    pool.cache.view(torch.int16).random_(-(2**15), 2**15 - 1)
    client = KVTransferClient(ClientConfig(f"127.0.0.1:{decode_port}", TOKEN))
    transport = CudaIpcTransport.connect(client, pool)
    assert transport.remote.device_index == 1 and transport.remote.num_blocks == NUM_DECODE_BLOCKS
    yield Prefill(pool, client, transport)
    transport.close()
    client.close()


def read_remote(transport: object, remote: Sequence[int]) -> torch.Tensor:
    """Blocks `remote` of the decode pool, every layer, read through the mapping by a kernel
    on cuda:0: [L, 2, n, bs, Hkv, D] on cuda:0."""
    from kv_transfer.ipc_kernels import gather_blocks

    t = transport
    out = gather_blocks(
        t.remote_words, t.remote.shape, t.remote.dtype, remote, torch.device("cuda:0")
    )
    torch.cuda.synchronize(0)
    return out


def landed_equals_sent(
    p: Prefill, layers: range, local: Sequence[int], remote: Sequence[int]
) -> bool:
    """The decode pool's blocks `remote` hold exactly the prefill pool's blocks `local`."""
    sl = slice(layers.start, layers.stop)
    got = read_remote(p.transport, remote)[sl]
    want = p.pool.cache[sl].index_select(2, torch.tensor(list(local), device="cuda:0"))
    return torch.equal(got.view(torch.int16), want.view(torch.int16))


def make_holes(p: Prefill) -> list[object]:
    """Reserve four one-block requests and abort the 1st and 3rd: later reservations get a
    block table with gaps. Returns the two still held (abort them at the end)."""
    from engine.sampling_params import SamplingParams
    from kv_transfer.layout import KVLayout

    layout = KVLayout.of_pool(p.pool)
    rs = [
        p.client.reserve(f"hole{i}", [1] * BS, SamplingParams(max_tokens=1), layout)
        for i in range(4)
    ]
    p.client.abort(rs[0], "hole")
    p.client.abort(rs[2], "hole")
    return [rs[1], rs[3]]


@pytest.mark.parametrize("mode", ["kernel", "memcpy"])
@pytest.mark.parametrize("order", ["runs", "shuffled"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_ipc_copy_is_byte_identical(prefill: Prefill, per_layer: bool, order: str, mode: str):
    from engine.sampling_params import SamplingParams
    from kv_transfer.cuda_ipc import CopyMode
    from kv_transfer.ipc_plan import layer_digests_torch
    from kv_transfer.layout import KVLayout

    p = prefill
    free_before = p.num_free_remote
    held = make_holes(p)
    local = list(range(3, 33)) + [40, 41, 50] + list(range(60, 79))  # runs on both sides differ
    if order == "shuffled":
        random.Random(len(local)).shuffle(local)
    prompt = [1] * (len(local) * BS - 5)
    r = p.client.reserve("r", prompt, SamplingParams(max_tokens=2), KVLayout.of_pool(p.pool))
    assert len(r.block_ids) == len(local)
    p.transport.copy_mode = CopyMode(mode)
    try:
        session = p.transport.open(r)
        if per_layer:
            for layer in range(p.pool.num_layers):
                session.send_layer(layer, 0, local)
        else:
            session.send_all_layers(0, local)
        sent = session.finish(30)
    finally:
        p.transport.copy_mode = CopyMode.KERNEL
    sends = p.pool.num_layers if per_layer else 1
    assert sent.num_chunks == sends if mode == "kernel" else sent.num_chunks > sends
    from kv_transfer import ipc_kernels

    assert ipc_kernels._compiled  # later launches went straight to the compiled kernel
    assert sent.num_bytes == len(local) * p.pool.layer_block_bytes * p.pool.num_layers
    assert landed_equals_sent(p, range(p.pool.num_layers), local, r.block_ids)
    # The sender's kernel digests equal the torch reference over its own pool ...
    want = layer_digests_torch(p.pool.cache, range(p.pool.num_layers), local, 0)
    assert list(sent.layer_digests) == want.tolist()
    # ... and the decode process's recomputation over its pool (Commit refuses otherwise).
    p.client.commit(r, 1, list(range(p.pool.num_layers)), list(sent.layer_digests))
    for h in held:
        p.client.abort(h, "done")
    assert p.num_free_remote == free_before == NUM_DECODE_BLOCKS
    assert p.client.health().num_active_reservations == 0


def test_digest_kernel_equals_the_reference_on_the_gpu(prefill: Prefill):
    from kv_transfer import ipc_kernels
    from kv_transfer.ipc_plan import layer_digests, layer_digests_torch

    cache = prefill.pool.cache
    ids = random.Random(1).sample(range(NUM_LOCAL_BLOCKS), 37)
    for layers, first in ((range(prefill.pool.num_layers), 0), (range(1, 2), 11)):
        want = layer_digests_torch(cache, layers, ids, first).tolist()
        for _ in range(2):  # Triton's launch path first, then the cached kernel launched directly
            got = layer_digests(cache, layers, ids, first)  # one launch on cuda:0
            assert got.device == cache.device and got.tolist() == want
    assert any(key[0] == 0 and not key[3] for key in ipc_kernels._compiled)  # digest-only, cuda:0


def test_blocks_sent_in_pieces_and_prefix_skipped(prefill: Prefill):
    """Chunked-prefill shape: each layer's blocks come in two sends, starting past block 0."""
    from engine.sampling_params import SamplingParams
    from kv_transfer.layout import KVLayout

    p = prefill
    local = [10, 11, 12, 20, 21]
    r = p.client.reserve("pieces", [2] * (5 * BS), SamplingParams(max_tokens=2),
                         KVLayout.of_pool(p.pool))  # fmt: skip
    session = p.transport.open(r)
    for layer in range(p.pool.num_layers):
        session.send_layer(layer, 0, local[:2])
    for layer in range(p.pool.num_layers):
        session.send_layer(layer, 2, local[2:])
    sent = session.finish(30)
    assert landed_equals_sent(p, range(p.pool.num_layers), local, r.block_ids)
    p.client.commit(r, 1, list(range(p.pool.num_layers)), list(sent.layer_digests))
    assert p.num_free_remote == NUM_DECODE_BLOCKS


def test_sessions_in_flight_together_each_in_its_own_slot(prefill: Prefill):
    """Three sessions open and sent before any finishes (each has its own slot: ids, digests
    and events), finished in reverse order: every one lands exactly and commits."""
    from engine.sampling_params import SamplingParams
    from kv_transfer.layout import KVLayout

    p = prefill
    layout = KVLayout.of_pool(p.pool)
    locals_ = [[7, 3, 60], list(range(20, 28)), [79, 0]]
    rs = [p.client.reserve(f"together{i}", [3] * (len(ids) * BS - 5), SamplingParams(max_tokens=2),
                           layout) for i, ids in enumerate(locals_)]  # fmt: skip
    assert [len(r.block_ids) for r in rs] == [len(ids) for ids in locals_]
    sessions = [p.transport.open(r) for r in rs]
    for session, ids in zip(sessions, locals_, strict=True):
        session.send_all_layers(0, ids)
    sents = [session.finish(30) for session in reversed(sessions)][::-1]
    assert p.transport.slots.num_slots >= 3
    for r, ids, sent in zip(rs, locals_, sents, strict=True):
        assert landed_equals_sent(p, range(p.pool.num_layers), ids, r.block_ids)
        p.client.commit(r, 1, list(range(p.pool.num_layers)), list(sent.layer_digests))
    assert p.num_free_remote == NUM_DECODE_BLOCKS


def corrupt_one_word(transport: object, layer: int, remote_block: int) -> None:
    """Add 1 to the first K word of one decode block, through the mapping."""
    from kv_transfer.ipc_kernels import launch_blocks

    t = transport
    block = read_remote(t, [remote_block])  # [L, 2, 1, bs, Hkv, D]
    block[layer, 0].view(torch.int16).view(-1)[0] += 1
    ids = torch.tensor([[0], [remote_block]], dtype=torch.int32, device="cuda:0")
    launch_blocks(block.view(torch.int16), t.remote_words, ids, None, range(layer, layer + 1), 0,
                  1, t.remote.num_blocks, t.half_block_bytes // 2)  # fmt: skip
    torch.cuda.synchronize(0)


def test_digest_mismatch_is_refused_and_frees(prefill: Prefill):
    from engine.sampling_params import SamplingParams
    from kv_transfer.layout import KVLayout

    p = prefill
    r = p.client.reserve("bad", [1] * 40, SamplingParams(max_tokens=2), KVLayout.of_pool(p.pool))
    session = p.transport.open(r)
    session.send_all_layers(0, [0, 1, 2])
    sent = session.finish(30)
    corrupt_one_word(p.transport, layer=1, remote_block=r.block_ids[1])
    with pytest.raises(grpc.RpcError) as info:
        p.client.commit(r, 1, list(range(p.pool.num_layers)), list(sent.layer_digests))
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert "layers [1]" in info.value.details()
    deadline = time.monotonic() + 5
    while p.num_free_remote != NUM_DECODE_BLOCKS and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.num_free_remote == NUM_DECODE_BLOCKS


def test_abort_waits_for_queued_copies_and_frees(prefill: Prefill):
    from engine.sampling_params import SamplingParams
    from kv_transfer.layout import KVLayout
    from kv_transfer.transport import TransferError

    p = prefill
    local = list(range(0, 40))
    r = p.client.reserve("ab", [1] * (40 * BS), SamplingParams(max_tokens=2),
                         KVLayout.of_pool(p.pool))  # fmt: skip
    session = p.transport.open(r)
    session.send_layer(0, 0, local)
    session.abort()
    assert p.transport.stream.query()  # nothing of the session still in flight
    assert landed_equals_sent(p, range(1), local, r.block_ids)  # layer 0 landed whole
    with pytest.raises(TransferError):
        session.send_layer(1, 0, local)
    assert p.client.abort(r, "test")
    assert p.num_free_remote == NUM_DECODE_BLOCKS


def test_layer_streaming_from_a_real_engine(prefill: Prefill):
    """A tiny engine on cuda:0 prefills three prompts in 32-token steps (chunked prefill:
    blocks leave layer by layer as they become final) and streams them to cuda:1, through a
    second transport (a second mapping of the same decode pool in this process)."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.presets import preset
    from engine.sampling_params import SamplingParams
    from kv_transfer.cuda_ipc import CudaIpcTransport
    from kv_transfer.layer_stream import LayerStreamer, TransferStatus

    p = prefill
    engine = Engine(
        EngineConfig(
            model=preset("tiny"),
            dtype="bfloat16",
            device="cuda:0",
            num_kv_blocks=64,
            max_model_len=1024,
            max_num_batched_tokens=32,
            enforce_eager=True,
        )
    )
    transport = CudaIpcTransport.connect(p.client, engine.pool)
    sends: dict[str, list[tuple[int, tuple[int, ...], tuple[int, ...]]]] = {}
    open_session = transport.open

    def recording_open(reservation):  # noqa: ANN001, ANN202
        session = open_session(reservation)
        send = session.send_layer
        log = sends.setdefault(reservation.request_id, [])

        def send_layer(layer: int, first: int, ids: Sequence[int]) -> None:
            log.append((layer, tuple(ids), tuple(reservation.block_ids[first : first + len(ids)])))
            send(layer, first, ids)

        session.send_layer = send_layer
        return session

    transport.open = recording_open
    streamer = LayerStreamer(engine, p.client, transport)
    prompts = [[(7 * i + 3) % 250 for i in range(99)], [5] * 40, [9] * 17]
    for i, prompt in enumerate(prompts):
        streamer.add_request(f"s{i}", prompt, SamplingParams(max_tokens=4, temperature=0.0))
    num_bytes = {}
    while streamer.num_in_flight:
        for outcome in streamer.step():
            assert outcome.status is TransferStatus.COMMITTED, outcome.detail
            num_bytes[outcome.request_id] = outcome.record.num_bytes
            # Its local blocks were released in this step and nothing ran since: they still
            # hold what was sent, as do its decode blocks (freed at commit, not reused yet).
            torch.cuda.synchronize(0)
            for layer, local, remote in sends[outcome.request_id]:
                got = read_remote(transport, remote)[layer]
                want = engine.pool.cache[layer].index_select(
                    1, torch.tensor(local, device="cuda:0")
                )
                assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    lbb = engine.pool.layer_block_bytes
    assert num_bytes == {"s0": 7 * 2 * lbb, "s1": 3 * 2 * lbb, "s2": 2 * 2 * lbb}
    assert {rid: sum(len(local) for _, local, _ in log) for rid, log in sends.items()} == {
        "s0": 7 * 2, "s1": 3 * 2, "s2": 2 * 2,
    }  # fmt: skip
    assert engine.num_free_blocks == 64
    assert p.num_free_remote == NUM_DECODE_BLOCKS
    # The engine's transport opened the decode pool's handle a second time in this process
    # (the driver counts references): closing it leaves the module's mapping working.
    transport.close()
    assert p.transport.remote.base == transport.remote.base
    test_blocks_sent_in_pieces_and_prefix_skipped(p)
