"""The same-host GPU path between two GPUs: exact bytes, digest check, no leaked blocks.

The decode side (a bare pool behind the service) runs in a spawned process on GPU 1; this
process is the prefill side on GPU 0 and opens the decode pool through CUDA IPC.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterator

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
NUM_BLOCKS = 64


def _decode_main(ready: mp.Queue, stop: mp.Event) -> None:
    from engine.kv_pool import KVPool
    from engine.presets import preset
    from kv_transfer.server import ServerConfig, start_server
    from kv_transfer.sink import PoolSink

    torch.cuda.set_device(1)
    pool = KVPool(preset("tiny"), NUM_BLOCKS, 16, torch.bfloat16, torch.device("cuda:1"))
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


def _setup(port: int):  # noqa: ANN202
    from engine.kv_pool import KVPool
    from engine.presets import preset
    from kv_transfer.client import ClientConfig, KVTransferClient
    from kv_transfer.cuda_ipc import CopyMode, CudaIpcTransport

    torch.cuda.set_device(0)
    pool = KVPool(preset("tiny"), NUM_BLOCKS, 16, torch.bfloat16, torch.device("cuda:0"))
    pool.cache.view(torch.int16).random_(-(2**15), 2**15 - 1)
    client = KVTransferClient(ClientConfig(f"127.0.0.1:{port}", TOKEN))
    return pool, client, CudaIpcTransport, CopyMode


@pytest.mark.parametrize("mode", ["memcpy"])  # "kernel" broke the CUDA context on H200
@pytest.mark.parametrize("per_layer", [False, True])
def test_ipc_copy_is_byte_identical(decode_port: int, mode: str, per_layer: bool):
    from engine.sampling_params import SamplingParams
    from kv_transfer.wire import KVLayout

    pool, client, CudaIpcTransport, CopyMode = _setup(decode_port)
    transport = CudaIpcTransport.connect(client, pool, CopyMode(mode))
    local = [3, 4, 5, 9, 10, 20, 21]  # three runs on the prefill side
    prompt = [1] * (len(local) * 16 - 5)
    free_before = client.health().num_free_blocks
    r = client.reserve("r", prompt, SamplingParams(max_tokens=2), KVLayout.of_pool(pool))
    session = transport.open(r)
    if per_layer:
        for layer in range(pool.num_layers):
            session.send_layer(layer, 0, local)
    else:
        session.send_all_layers(0, local)
    sent = session.finish(30)
    assert sent.num_bytes == len(local) * pool.layer_block_bytes * pool.num_layers
    dst = torch.tensor(r.block_ids, device="cuda:1")
    landed = transport.remote.index_select(2, dst).to("cuda:0")
    expected = pool.cache.index_select(2, torch.tensor(local, device="cuda:0"))
    assert torch.equal(landed.view(torch.int16), expected.view(torch.int16))
    client.commit(r, 1, list(range(pool.num_layers)), list(sent.layer_digests))
    assert client.health().num_free_blocks == free_before
    assert client.health().num_active_reservations == 0
    client.close()


def test_digest_mismatch_is_refused_and_frees(decode_port: int):
    from engine.sampling_params import SamplingParams
    from kv_transfer.wire import KVLayout

    pool, client, CudaIpcTransport, CopyMode = _setup(decode_port)
    transport = CudaIpcTransport.connect(client, pool)
    free_before = client.health().num_free_blocks
    r = client.reserve("bad", [1] * 40, SamplingParams(max_tokens=2), KVLayout.of_pool(pool))
    session = transport.open(r)
    session.send_all_layers(0, [0, 1, 2])
    sent = session.finish(30)
    transport.remote[1, 0, r.block_ids[1]].view(torch.int16)[0, 0, 0] += 1  # corrupt one word
    torch.cuda.synchronize(1)
    with pytest.raises(grpc.RpcError) as info:
        client.commit(r, 1, list(range(pool.num_layers)), list(sent.layer_digests))
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert "layers [1]" in info.value.details()
    deadline = time.monotonic() + 5
    while client.health().num_free_blocks != free_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.health().num_free_blocks == free_before
    client.close()
