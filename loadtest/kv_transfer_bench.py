"""KV-transfer benchmark: each path against a baseline measured in the same run.

  --cpu   gRPC path moving 256 MB of llama3-8b-shaped KV (bf16) over loopback, against a
          bare gRPC byte stream of the same bytes in 4 MiB messages (same process, same
          message size). Figure: kv.grpc_vs_bare_stream.
  --gpu   (2 GPUs) same-host CUDA IPC path, llama3-8b shape, 1k and 4k tokens, against a
          plain GPU0 -> GPU1 copy of the same bytes; copy modes kernel and memcpy, whole
          request at once and layer by layer. Figures: kv.gpu_path_vs_peer_copy_{1k,4k}.
          Then a 2k-token prefill on GPU0 (random bf16 weights) with layer-wise streaming
          to GPU1: exposed time / prefill time. Figure: kv.exposed_fraction_2k.

The decode side runs in a spawned process (a PoolSink: a bare pool, no model). Prints a
short table last; writes results to --out and a log to --log.

    python -m loadtest.kv_transfer_bench --cpu --out results/kv_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import statistics
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

from engine.kv_pool import KVPool
from engine.presets import preset
from engine.sampling_params import SamplingParams
from kv_transfer.client import ClientConfig, KVTransferClient
from kv_transfer.server import ServerConfig, start_server
from kv_transfer.sink import PoolSink
from kv_transfer.transport import GrpcTransport
from kv_transfer.wire import DEFAULT_CHUNK_BYTES, KVLayout, checksum_of, kv_buffers

log = logging.getLogger("kv_transfer_bench")
TOKEN = "bench-token"
BS = 16
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


def make_pool(num_blocks: int, device: str, fill: bool) -> KVPool:
    pool = KVPool(preset("llama3-8b"), num_blocks, BS, torch.bfloat16, torch.device(device))
    if fill:
        gen = torch.Generator(device=device).manual_seed(0)
        pool.cache.view(torch.int16).random_(-(2**15), 2**15 - 1, generator=gen)
    return pool


# ---- CPU: gRPC path vs a bare byte stream -----------------------------------------------
#
# Both run between this process (sender) and one receiver process, over loopback, with the
# same message size and limits, alternating trial by trial:
#   bare  raw bytes (no serializer), the very bytes the path sends, prebuilt as one bytes
#         object per 4 MiB message; client streaming; the server only counts the bytes
#   path  Reserve, the layer chunks (read from the pool, hashed, serialized), Commit; the
#         receiver checks every chunk and copies it into its pool


def _bare_server(max_message_bytes: int, received: list[int]) -> tuple[grpc.Server, int]:
    def sink(request_iterator, context):  # noqa: ANN001, ANN202
        for message in request_iterator:
            received[0] += len(message)
        return b""

    handler = grpc.method_handlers_generic_handler(
        "bench.Bare", {"Sink": grpc.stream_unary_rpc_method_handler(sink)}
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _cpu_receiver(num_blocks: int, conn) -> None:  # noqa: ANN001
    """The receiving process: a KV-transfer server over a bare pool and a bare byte sink.

    Commands on `conn`: ("digests", request_id) -> per-layer xxh3 of the committed blocks;
    ("release", request_id) -> free blocks after releasing; ("bare_bytes", None) -> bytes
    the bare sink received since the last ask; ("stop", None).
    """
    torch.set_num_threads(1)
    pool = make_pool(num_blocks, "cpu", fill=False)
    sink = PoolSink(pool)
    config = ServerConfig(auth_token=TOKEN)
    kv_server = start_server(sink, config)
    received = [0]
    bare_server, bare_port = _bare_server(config.max_message_bytes, received)
    conn.send((kv_server.port, bare_port))
    while True:
        cmd, arg = conn.recv()
        if cmd == "digests":
            blocks = sink.committed[arg]
            conn.send([layer_digest(pool, layer, blocks) for layer in range(pool.num_layers)])
        elif cmd == "release":
            sink.release(arg)
            conn.send(sink.num_free_blocks)
        elif cmd == "bare_bytes":
            conn.send(received[0])
            received[0] = 0
        else:
            break
    kv_server.stop()
    bare_server.stop(0)


def layer_digest(pool: KVPool, layer_idx: int, block_ids: list[int]) -> int:
    return checksum_of(kv_buffers(pool, layer_idx, block_ids))


def run_cpu(total_mb: int, trials: int) -> list[dict]:
    # One intra-op thread in both processes: with 2 cores, torch's parallel copies fight
    # gRPC's threads (a 4 MiB slice copy took 15 ms with 2 threads, 0.6 ms with 1).
    torch.set_num_threads(1)
    layer_block_bytes = KVLayout.of_pool(make_pool(1, "cpu", False)).layer_block_bytes
    num_blocks = total_mb * 2**20 // (layer_block_bytes * 32)
    src = make_pool(num_blocks + 1, "cpu", True)
    ids = list(range(1, num_blocks + 1))  # block 0 left out: the run starts mid-pool
    layout = KVLayout.of_pool(src)
    step = layout.blocks_per_chunk(DEFAULT_CHUNK_BYTES)
    payloads = [  # the path's chunk data, prebuilt: what the bare stream sends
        b"".join(kv_buffers(src, layer, ids[i : i + step]))
        for layer in range(src.num_layers)
        for i in range(0, len(ids), step)
    ]
    num_bytes = sum(len(p) for p in payloads)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_cpu_receiver, args=(num_blocks + 1, child_conn), daemon=True)
    proc.start()
    try:
        kv_port, bare_port = conn.recv()
        client = KVTransferClient(ClientConfig(f"127.0.0.1:{kv_port}", TOKEN))
        transport = GrpcTransport(client, src)
        limit = ServerConfig(auth_token=TOKEN).max_message_bytes
        channel = grpc.insecure_channel(
            f"127.0.0.1:{bare_port}",
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
            ],
        )
        bare_call = channel.stream_unary("/bench.Bare/Sink")
        prompt = [1] * (num_blocks * BS)

        def bare_s() -> float:
            t0 = time.perf_counter()
            bare_call(iter(payloads), timeout=120)
            elapsed = time.perf_counter() - t0
            conn.send(("bare_bytes", None))
            assert conn.recv() == num_bytes
            return elapsed

        def path_s(request_id: str, check: bool = False) -> float:
            t0 = time.perf_counter()
            r = client.reserve(request_id, prompt, GREEDY, layout)
            session = transport.open(r)
            session.send_all_layers(0, ids)
            sent = session.finish(120)
            client.commit(r, 1)
            elapsed = time.perf_counter() - t0
            assert sent.num_bytes == num_bytes
            if check:  # the bytes that landed are the bytes sent, layer by layer
                conn.send(("digests", request_id))
                expected = [layer_digest(src, layer, ids) for layer in range(src.num_layers)]
                assert conn.recv() == expected, "transferred KV differs"
            conn.send(("release", request_id))
            assert conn.recv() == num_blocks + 1, "receiver leaked blocks"
            return elapsed

        bare_s()  # warm-up: connections, thread pools, page faults
        path_s("warm-up", check=True)
        bare_times, path_times = [], []
        for trial in range(trials):  # alternate, and alternate which goes first
            if trial % 2 == 0:
                bare_times.append(bare_s())
                path_times.append(path_s(f"r{trial}"))
            else:
                path_times.append(path_s(f"r{trial}"))
                bare_times.append(bare_s())
        client.close()
        channel.close()
        conn.send(("stop", None))
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
    ratios = [b / p for b, p in zip(bare_times, path_times, strict=True)]
    log.info("cpu: bytes %d, bare s %s, path s %s", num_bytes, bare_times, path_times)
    log.info("cpu: per-trial ratios %s", [round(r, 3) for r in ratios])
    return [
        {
            "name": "kv.grpc_path_gbps",
            "value": num_bytes / statistics.median(path_times) / 1e9,
            "unit": "GB/s",
            "bytes": num_bytes,
            "trials_s": path_times,
        },
        {
            "name": "kv.bare_grpc_stream_gbps",
            "value": num_bytes / statistics.median(bare_times) / 1e9,
            "unit": "GB/s",
            "trials_s": bare_times,
        },
        {
            "name": "kv.grpc_vs_bare_stream",
            "value": statistics.median(ratios),
            "unit": "ratio",
            "target": ">= 0.75",
            "trial_ratios": ratios,
        },
    ]


# ---- GPU: same-host path vs a plain peer copy -------------------------------------------


def _decode_process(device: int, num_blocks: int, ready: mp.Queue, stop: mp.Event) -> None:
    torch.cuda.set_device(device)
    sink = PoolSink(make_pool(num_blocks, f"cuda:{device}", False), release_on_commit=True)
    server = start_server(sink, ServerConfig(auth_token=TOKEN))
    ready.put(server.port)
    stop.wait(900)
    server.stop()


def peer_copy_s(num_bytes: int, trials: int) -> list[float]:
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:1")
    times = []
    for trial in range(trials + 2):
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        if trial >= 2:
            times.append(time.perf_counter() - t0)
    return times


def ipc_path_s(
    client: KVTransferClient, pool: KVPool, mode, tokens: int, per_layer: bool, trials: int
):  # noqa: ANN001, ANN201
    from kv_transfer.cuda_ipc import CudaIpcTransport

    transport = CudaIpcTransport.connect(client, pool, mode)
    n = tokens // BS
    ids = list(range(n))
    copy_times, total_times = [], []
    for trial in range(trials + 2):
        r = client.reserve(
            f"{mode.value}-{tokens}-{per_layer}-{trial}",
            [1] * tokens,
            GREEDY,
            KVLayout.of_pool(pool),
            transport=transport.rpc_transport,
        )
        torch.cuda.synchronize(0)
        t0 = time.perf_counter()
        session = transport.open(r)
        if per_layer:
            for layer in range(pool.num_layers):
                session.send_layer(layer, 0, ids)
        else:
            session.send_all_layers(0, ids)
        sent = session.finish(30)
        t1 = time.perf_counter()
        if trial == 0:  # exact bytes
            dst = torch.tensor(r.block_ids, device="cuda:1")
            landed = transport.remote.index_select(2, dst).to("cuda:0")
            assert torch.equal(landed.view(torch.int16), pool.cache[:, :, :n].view(torch.int16))
        client.commit(r, 1, list(range(pool.num_layers)), list(sent.layer_digests))
        t2 = time.perf_counter()
        if trial >= 2:
            copy_times.append(t1 - t0)
            total_times.append(t2 - t0)
    return copy_times, total_times, sent.num_bytes


def exposed_fraction(client: KVTransferClient, trials: int) -> dict:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from kv_transfer.cuda_ipc import CudaIpcTransport
    from kv_transfer.layer_stream import LayerStreamer, TransferStatus

    cfg = EngineConfig(
        model=preset("llama3-8b"),
        dtype="bfloat16",
        device="cuda:0",
        num_kv_blocks=600,
        max_num_batched_tokens=2048,
        max_model_len=4096,
        enforce_eager=True,
        enable_prefix_caching=False,
    )
    engine = Engine(cfg)
    prompt = [(i * 31) % 120000 + 5 for i in range(2047)]
    one = SamplingParams(max_tokens=1, temperature=0.0)
    prefill_times = []
    for trial in range(trials + 2):
        engine.add_request(f"p{trial}", prompt, one, hold_kv=True)
        torch.cuda.synchronize(0)
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize(0)
        if trial >= 2:
            prefill_times.append(time.perf_counter() - t0)
        engine.release(f"p{trial}")
    streamer = LayerStreamer(engine, client, CudaIpcTransport.connect(client, engine.pool))
    exposed, streamed_step = [], []
    for trial in range(trials + 1):
        streamer.add_request(f"s{trial}", prompt, GREEDY)
        torch.cuda.synchronize(0)
        t0 = time.perf_counter()
        (outcome,) = streamer.step()
        step_s = time.perf_counter() - t0
        assert outcome.status is TransferStatus.COMMITTED, outcome.detail
        if trial >= 1:
            exposed.append(outcome.record.exposed_s)
            streamed_step.append(step_s)
    prefill_s = statistics.median(prefill_times)
    return {
        "prefill_s": prefill_s,
        "exposed_s": statistics.median(exposed),
        "streamed_step_s": statistics.median(streamed_step),
        "fraction": statistics.median(exposed) / prefill_s,
        "bytes": outcome.record.num_bytes,
    }


def run_gpu(trials: int) -> list[dict]:
    from kv_transfer.cuda_ipc import CopyMode

    assert torch.cuda.device_count() >= 2, "the GPU part needs two GPUs"
    torch.cuda.set_device(0)
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_decode_process, args=(1, 1200, ready, stop), daemon=True)
    proc.start()
    results: list[dict] = []
    try:
        port = ready.get(timeout=180)
        client = KVTransferClient(ClientConfig(f"127.0.0.1:{port}", TOKEN))
        pool = make_pool(300, "cuda:0", True)
        for tokens in (1024, 4096):
            label = f"{tokens // 1024}k"
            num_bytes = tokens // BS * pool.layer_block_bytes * pool.num_layers
            base = num_bytes / statistics.median(peer_copy_s(num_bytes, trials)) / 1e9
            results.append({"name": f"kv.peer_copy_gbps_{label}", "value": base, "unit": "GB/s"})
            best = 0.0
            for mode in (CopyMode.MEMCPY,):  # KERNEL: illegal address on H200, see cuda_ipc
                for per_layer in (False, True):
                    copy_t, total_t, nb = ipc_path_s(client, pool, mode, tokens, per_layer, trials)
                    assert nb == num_bytes
                    gbps = nb / statistics.median(copy_t) / 1e9
                    e2e = nb / statistics.median(total_t) / 1e9
                    how = f"{mode.value}_{'per_layer' if per_layer else 'whole'}"
                    log.info("%s %s: copy %.1f GB/s, with commit %.1f GB/s", label, how, gbps, e2e)
                    results.append(
                        {
                            "name": f"kv.gpu_path_gbps_{label}_{how}",
                            "value": gbps,
                            "unit": "GB/s",
                            "with_commit_gbps": e2e,
                        }
                    )
                    best = max(best, gbps)
            results.append(
                {
                    "name": f"kv.gpu_path_vs_peer_copy_{label}",
                    "value": best / base,
                    "unit": "ratio",
                    "target": ">= 0.8",
                }
            )
        try:
            ex = exposed_fraction(client, trials)
            results.append(
                {
                    "name": "kv.exposed_fraction_2k",
                    "value": ex["fraction"],
                    "unit": "ratio",
                    "target": "<= 0.1",
                    **{k: v for k, v in ex.items() if k != "fraction"},
                }
            )
        except Exception:  # keep the copy figures if the engine part fails
            log.exception("exposed-fraction part failed")
        client.close()
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--cpu-mb", type=int, default=256)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--out", default="results/kv_transfer_bench.json")
    parser.add_argument("--log", default="results/kv_transfer_bench.log")
    args = parser.parse_args()
    if not (args.cpu or args.gpu):
        parser.error("pick --cpu and/or --gpu")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        handlers=[logging.FileHandler(args.log), logging.StreamHandler(sys.stderr)],
    )
    results: list[dict] = []
    if args.cpu:
        results += run_cpu(args.cpu_mb, args.trials)
    if args.gpu:
        results += run_gpu(args.trials)
    device = torch.cuda.get_device_name(0) if args.gpu else "CPU"
    for r in results:
        r["device"] = device
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n{'figure':<44} {'value':>10}  unit   target")
    for r in results:
        print(f"{r['name']:<44} {r['value']:>10.3f}  {r['unit']:<6} {r.get('target', '')}")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
