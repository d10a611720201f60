"""KV-transfer benchmark: each path against a baseline measured in the same run.

  --cpu   the gRPC path moving 256 MB of llama3-8b-shaped KV (bf16) from this process to a
          receiver process over loopback, against a bare gRPC byte stream of the very same
          bytes between the same two processes (raw bytes, no serializer, 4 MiB messages,
          the same message-size limits, client streaming, a server that only counts),
          trials alternating. Figure: kv.grpc_vs_bare_stream (median of per-trial ratios).
          With --keep-freed-memory both processes first apply kv_transfer.allocator's malloc
          settings (both sides of the comparison alike).
  --gpu   2 GPUs of one host: the GPU tests, then the same-host CUDA IPC path against a
          plain cuda:0 -> cuda:1 copy, then layer-wise streaming from a real 2k-token
          prefill (see kv_transfer_bench_gpu.py).

Prints a short table last; writes kv_transfer_{cpu,gpu}.json (figures, date, commit,
command, device) and .log to --out-dir.

    python -m loadtest.kv_transfer_bench --cpu --trials 9 --out-dir results
    python -m loadtest.kv_transfer_bench --cpu --keep-freed-memory --out-dir results
    python -m loadtest.kv_transfer_bench --gpu --out-dir $OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import statistics
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

from engine.kv_pool import KVPool
from kv_transfer.allocator import keep_freed_memory
from kv_transfer.client import ClientConfig, KVTransferClient
from kv_transfer.layout import KVLayout, kv_buffers
from kv_transfer.server import ServerConfig, start_server
from kv_transfer.sink import PoolSink
from kv_transfer.transport import GrpcTransport
from kv_transfer.wire import DEFAULT_CHUNK_BYTES, checksum_of
from loadtest.bench_log import log_to
from loadtest.figures import current_commit
from loadtest.kv_transfer_bench_gpu_common import BS, GREEDY, make_pool

log = logging.getLogger("kv_transfer_bench")
TOKEN = "bench-token"


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


def _cpu_receiver(num_blocks: int, keep_memory: bool, conn) -> None:  # noqa: ANN001
    """The receiving process: a KV-transfer server over a bare pool and a bare byte sink.

    Commands on `conn`: ("digests", request_id) -> per-layer xxh3 of the committed blocks;
    ("release", request_id) -> free blocks after releasing; ("bare_bytes", None) -> bytes
    the bare sink received since the last ask; ("usage", None) -> `process_usage()`;
    ("stop", None).
    """
    if keep_memory:
        assert keep_freed_memory()
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
        elif cmd == "usage":
            conn.send(process_usage())
        else:
            break
    kv_server.stop()
    bare_server.stop(0)


def process_usage() -> tuple[float, int]:
    """(CPU seconds, minor page faults) of this process so far, every thread; CPU is user
    plus system time."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime, u.ru_minflt


SIDES = ("sender", "receiver")


def layer_digest(pool: KVPool, layer_idx: int, block_ids: list[int]) -> int:
    return checksum_of(kv_buffers(pool, layer_idx, block_ids))


def run_cpu(
    total_mb: int, trials: int, keep_memory: bool = False, encode_ahead: int = 0
) -> list[dict]:
    if keep_memory:
        assert keep_freed_memory(), "--keep-freed-memory needs glibc"
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
    proc = ctx.Process(
        target=_cpu_receiver, args=(num_blocks + 1, keep_memory, child_conn), daemon=True
    )
    proc.start()
    try:
        kv_port, bare_port = conn.recv()
        client = KVTransferClient(
            ClientConfig(f"127.0.0.1:{kv_port}", TOKEN, encode_ahead=encode_ahead)
        )
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

        def usage() -> dict[str, tuple[float, int]]:
            conn.send(("usage", None))
            return {"sender": process_usage(), "receiver": conn.recv()}

        def record_usage(kind: str, before: dict[str, tuple[float, int]]) -> None:
            after = usage()
            for side in SIDES:
                cpu_s[kind][side].append(after[side][0] - before[side][0])
                faults[kind][side].append(after[side][1] - before[side][1])

        def bare_s() -> float:
            before = usage()
            t0 = time.perf_counter()
            bare_call(iter(payloads), timeout=120)
            elapsed = time.perf_counter() - t0
            record_usage("bare", before)
            conn.send(("bare_bytes", None))
            assert conn.recv() == num_bytes
            return elapsed

        def path_s(request_id: str, check: bool = False) -> float:
            before = usage()
            t0 = time.perf_counter()
            r = client.reserve(request_id, prompt, GREEDY, layout)
            session = transport.open(r)
            session.send_all_layers(0, ids)
            sent = session.finish(120)
            client.commit(r, 1)
            elapsed = time.perf_counter() - t0
            record_usage("path", before)
            assert sent.num_bytes == num_bytes
            if check:  # the bytes that landed are the bytes sent, layer by layer
                conn.send(("digests", request_id))
                expected = [layer_digest(src, layer, ids) for layer in range(src.num_layers)]
                assert conn.recv() == expected, "transferred KV differs"
            conn.send(("release", request_id))
            assert conn.recv() == num_blocks + 1, "receiver leaked blocks"
            return elapsed

        # per trial: cpu_s[kind][side], faults[kind][side] (kind: bare or path)
        cpu_s: dict[str, dict[str, list[float]]] = {}
        faults: dict[str, dict[str, list[int]]] = {}

        def reset_usage() -> None:
            for kind in ("bare", "path"):
                cpu_s[kind] = {side: [] for side in SIDES}
                faults[kind] = {side: [] for side in SIDES}

        reset_usage()
        bare_s()  # warm-up: connections, thread pools, page faults
        path_s("warm-up", check=True)
        reset_usage()
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
    log.info("cpu: CPU seconds per process and trial %s", cpu_s)
    log.info("cpu: minor page faults per process and trial %s", faults)
    gb = num_bytes / 1e9
    both_cpu_s = {
        kind: [s + r for s, r in zip(v["sender"], v["receiver"], strict=True)]
        for kind, v in cpu_s.items()
    }
    cpu_per_gb = {kind: statistics.median(v) / gb for kind, v in both_cpu_s.items()}
    per_side = [
        {
            "name": f"kv.{name}_{side}_{what}_per_gb",
            "value": statistics.median(table[kind][side]) / gb,
            "unit": unit,
            "trials": table[kind][side],
        }
        for kind, name in (("path", "grpc_path"), ("bare", "bare_grpc_stream"))
        for what, unit, table in (
            ("cpu_s", "CPU-s/GB", cpu_s),
            ("page_faults", "faults/GB", faults),
        )
        for side in SIDES
    ]
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
        {
            "name": "kv.grpc_path_cpu_s_per_gb",
            "value": cpu_per_gb["path"],
            "unit": "CPU-s/GB",
            "note": "CPU time of sender and receiver processes together, median trial",
        },
        {
            "name": "kv.bare_grpc_stream_cpu_s_per_gb",
            "value": cpu_per_gb["bare"],
            "unit": "CPU-s/GB",
        },
        *per_side,  # medians per process; trials raw (seconds, faults)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--cpu-mb", type=int, default=256)
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="--cpu: apply kv_transfer.allocator's malloc settings in both processes",
    )
    parser.add_argument(
        "--encode-ahead",
        type=int,
        default=ClientConfig.encode_ahead,
        help="--cpu: chunk messages the sender encodes ahead of gRPC (ClientConfig.encode_ahead)",
    )
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    args = parser.parse_args()
    if args.cpu == args.gpu:
        parser.error("pick one of --cpu and --gpu")
    kind = "gpu" if args.gpu else "cpu"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out, log_path = (
        args.out_dir / f"kv_transfer_{kind}.json",
        args.out_dir / f"kv_transfer_{kind}.log",
    )
    log_to(log_path)
    run = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": current_commit(),
        "command": "python -m loadtest.kv_transfer_bench " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
    }
    if args.gpu:
        from loadtest.kv_transfer_bench_gpu import run_gpu

        run["device"] = " + ".join(
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        )
        results = run_gpu(args.trials, args.out_dir)
    else:
        run["device"] = f"CPU, {len(os.sched_getaffinity(0))} of {os.cpu_count()} cores"
        run["malloc"] = "kv_transfer.allocator settings" if args.keep_freed_memory else "default"
        run["encode_ahead"] = args.encode_ahead
        results = run_cpu(args.cpu_mb, args.trials, args.keep_freed_memory, args.encode_ahead)
    log.info("run %s", run)
    out.write_text(json.dumps({"run": run, "results": results}, indent=2))
    print(f"\n{'figure':<44} {'value':>10}  unit   target")
    for r in results:
        print(f"{r['name']:<44} {r['value']:>10.3f}  {r['unit']:<6} {r.get('target', '')}")
    print(f"\nwrote {out} and {log_path}")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
