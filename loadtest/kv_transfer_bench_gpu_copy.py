"""Part 2 of the GPU KV-transfer benchmark (`kv_transfer_bench --gpu`, copy): the same-host
CUDA IPC path against a plain peer copy.

  llama3-8b-shaped KV of 1k and 4k tokens, prefill pool cuda:0 -> decode pool cuda:1 (another
  process, a bare PoolSink), trials alternating with a plain cuda:0 -> cuda:1 copy of the same
  number of bytes (torch `copy_`, the baseline). Path time: first send to `finish` returned
  (bytes landed and digests on the host); Commit's round trip is reported beside it. Variants:
  copy mode (kernel: one launch per send; memcpy: one copy-engine copy per run of blocks),
  local block ids contiguous ("runs") or shuffled (one run per block), whole request or layer
  by layer. Figures kv.gpu_path_vs_peer_copy_{1k,4k} (kernel, contiguous, whole; target
  >= 0.8) and _shuffled; kv.gpu_path_send_host_us_{1k,4k}: host time of one send_layer call
  (kernel, shuffled), with every variant's breakdown (host time of open and finish too). A
  trial's time is the median of REPS requests moved back to back (reserved before, committed
  after), the baselines likewise. Two extra figures, for diagnosis, NOT the per-request
  figure: kv.gpu_kernel_vs_copy_engine_{1k,4k}, GPU time only (CUDA events, the stream kept
  busy so no host time is inside): the copy kernel against a cudaMemcpyAsync of the same bytes
  pushed by cuda:0 (the ceiling of the per-request figure whatever the host does);
  kv.gpu_path_pipelined_vs_peer_copy_{1k,4k}: REPS requests in flight (all opened and sent,
  then all finished) against REPS plain copy_ calls issued back to back, then synced.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Callable

import torch

from engine.kv_pool import KVPool
from kv_transfer.client import KVTransferClient
from kv_transfer.cuda_ipc import CopyMode, CudaIpcTransport
from kv_transfer.ipc_plan import contiguous_runs
from kv_transfer.layout import KVLayout
from loadtest.kv_transfer_bench_gpu_common import BS, GREEDY, median_us, synced_s

log = logging.getLogger("kv_transfer_bench")
REPS = 4  # requests per trial of each copy variant (4 x 4k fit the decode pool), median


def copy_figures(client: KVTransferClient, pool: KVPool, trials: int) -> list[dict]:
    from kv_transfer.cuda_runtime import cuda_runtime

    transport = CudaIpcTransport.connect(client, pool, CopyMode.KERNEL)  # mapped once
    log.info("IPC transport: remote %s on cuda:%d mapped at %#x, max pitch %d, runtime %s",
             transport.remote.shape, transport.remote.device_index, transport.remote.address,
             transport.max_pitch, cuda_runtime().path)  # fmt: skip
    try:
        return [
            f for tokens in (1024, 4096) for f in size_figures(client, transport, tokens, trials)
        ]
    finally:
        transport.close()


def size_figures(
    client: KVTransferClient, transport: CudaIpcTransport, tokens: int, trials: int
) -> list[dict]:
    """Path variants and baselines for one request of `tokens` tokens, trials alternating."""
    from kv_transfer.cuda_runtime import cuda_runtime
    from kv_transfer.ipc_kernels import gather_blocks

    pool = transport.pool
    layout = KVLayout.of_pool(pool)
    label = f"{tokens // 1024}k"
    n = tokens // BS
    orders = {
        "runs": list(range(5, 5 + n)),  # not at the pool's start: offsets matter
        "shuffled": random.Random(tokens).sample(range(pool.num_blocks), n),
    }
    num_bytes = n * pool.layer_block_bytes * pool.num_layers
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:1")
    pull = torch.cuda.Stream("cuda:1")

    def pull_copy() -> None:  # the same copy issued by cuda:1 (a pulled copy)
        with torch.cuda.device(1):
            cuda_runtime().memcpy_2d_async(
                dst.data_ptr(), 0, src.data_ptr(), 0, num_bytes, 1, pull.cuda_stream
            )
        pull.synchronize()

    def paths(name: str, mode: CopyMode, ids: list[int], per_layer: bool, check: bool
              ) -> list[tuple[float, float, list[float], int, int, float, float]]:  # fmt: skip
        """REPS requests reserved first, then moved back to back (the GPU stays busy, as
        in serving: an idle H200 drops its SM clock, which a copy-engine copy does not
        mind and a copy kernel does), then committed. Per request: (first send to finish,
        Commit, host s per send call, launches, runs, open s, finish s)."""
        transport.copy_mode = mode
        rs = [client.reserve(f"{name}.{k}", [1] * tokens, GREEDY, layout,
                             transport=transport.rpc_transport) for k in range(REPS)]  # fmt: skip
        torch.cuda.synchronize(0)
        moved = []
        for r in rs:
            t0 = time.perf_counter()
            session = transport.open(r)
            opened_s = time.perf_counter()
            send_s = []
            for layer in range(pool.num_layers) if per_layer else [None]:
                s0 = time.perf_counter()
                if layer is None:
                    session.send_all_layers(0, ids)
                else:
                    session.send_layer(layer, 0, ids)
                send_s.append(time.perf_counter() - s0)
            f0 = time.perf_counter()
            sent = session.finish(30)
            t1 = time.perf_counter()
            moved.append((t1 - t0, send_s, sent, opened_s - t0, t1 - f0))
        out = []
        for r, (copy_s, send_s, sent, open_s, finish_s) in zip(rs, moved, strict=True):
            assert sent.num_bytes == num_bytes
            if check:  # exact bytes, read back through the mapping by a cuda:0 kernel
                landed = gather_blocks(transport.remote_words, transport.remote.shape,
                                       pool.dtype, r.block_ids, torch.device("cuda:0"))  # fmt: skip
                want = pool.cache.index_select(2, torch.tensor(ids, device="cuda:0"))
                assert torch.equal(landed.view(torch.int16), want.view(torch.int16)), r
            c0 = time.perf_counter()
            client.commit(r, 1, list(range(pool.num_layers)), list(sent.layer_digests))
            runs = len(contiguous_runs(ids, r.block_ids))
            out.append((copy_s, time.perf_counter() - c0, send_s, sent.num_chunks, runs, open_s,
                        finish_s))  # fmt: skip
        return out

    def gpu_times(ids: list[int]) -> tuple[float, float]:
        """GPU seconds of one whole-request copy kernel and of one cudaMemcpyAsync of as many
        bytes pushed by cuda:0 (copy engine), medians of REPS each: CUDA events on the send
        stream, kept busy by the same work queued just before, so no host time is inside."""
        stream = transport.stream
        r = client.reserve(f"gpu{label}.{len(kernel_gpu_s)}", [1] * tokens, GREEDY, layout,
                           transport=transport.rpc_transport)  # fmt: skip
        session = transport.open(r)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed(issue: Callable[[], object]) -> float:
            issue()
            start.record(stream)
            issue()
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        def engine_copy() -> None:
            cuda_runtime().memcpy_2d_async(dst.data_ptr(), 0, src.data_ptr(), 0, num_bytes, 1,
                                           stream.cuda_stream)  # fmt: skip

        try:
            kernel = statistics.median(
                timed(lambda: session.send_all_layers(0, ids)) for _ in range(REPS)
            )
            engine = statistics.median(timed(engine_copy) for _ in range(REPS))
        finally:
            session.abort()
            client.abort(r, "timing only")
        return kernel, engine

    def pipelined(ids: list[int]) -> tuple[float, float]:
        """(REPS plain copy_ calls back to back then synced, REPS requests all opened and
        sent then all finished), seconds; the requests are committed (digests checked)."""
        rs = [client.reserve(f"pipe{label}.{len(pipe_s)}.{k}", [1] * tokens, GREEDY, layout,
                             transport=transport.rpc_transport) for k in range(REPS)]  # fmt: skip
        torch.cuda.synchronize(0)
        t0 = time.perf_counter()
        sessions = []
        for r in rs:
            sessions.append(transport.open(r))
            sessions[-1].send_all_layers(0, ids)
        sents = [session.finish(30) for session in sessions]
        path = time.perf_counter() - t0
        for r, sent in zip(rs, sents, strict=True):
            client.commit(r, 1, list(range(pool.num_layers)), list(sent.layer_digests))
        plain = synced_s(lambda: [dst.copy_(src) for _ in range(REPS)])
        return plain, path

    variants = {
        f"{mode.value}_{order}_{'per_layer' if per_layer else 'whole'}": (mode, order, per_layer)
        for mode in CopyMode
        for order in orders
        for per_layer in (False, True)
    }
    times: dict[str, list[float]] = {k: [] for k in ("plain", "pull", *variants)}
    commit_s: list[float] = []
    send_s: dict[str, list[float]] = {k: [] for k in variants}
    counts: dict[str, tuple[float, int]] = {}  # launches or copies per send call, runs
    open_s: dict[str, list[float]] = {k: [] for k in variants}
    finish_s: dict[str, list[float]] = {k: [] for k in variants}
    kernel_gpu_s: list[tuple[float, float]] = []  # (kernel, copy engine) per trial
    pipe_s: list[tuple[float, float]] = []  # (plain, path) per trial
    try:
        for warm in range(2):
            synced_s(lambda: dst.copy_(src))
            pull_copy()
            for name, (mode, order, per_layer) in variants.items():
                paths(f"w{label}{warm}{name}", mode, orders[order], per_layer, check=warm == 0)
        for trial in range(trials):  # alternating, the baselines first in every round
            # A trial's time is the median of REPS back-to-back runs, baselines alike.
            times["plain"].append(statistics.median(synced_s(lambda: dst.copy_(src))
                                                    for _ in range(REPS)))  # fmt: skip
            times["pull"].append(statistics.median(synced_s(pull_copy) for _ in range(REPS)))
            for name, (mode, order, per_layer) in variants.items():
                reps = paths(f"{name}{label}{trial}", mode, orders[order], per_layer, False)
                times[name].append(statistics.median(copy_s for copy_s, *_ in reps))
                for _, c_s, sends, launches, runs, o_s, f_s in reps:
                    send_s[name] += sends
                    open_s[name].append(o_s)
                    finish_s[name].append(f_s)
                    counts[name] = (launches / len(sends), runs)
                    if name == "kernel_runs_whole":
                        commit_s.append(c_s)
            transport.copy_mode = CopyMode.KERNEL
            try:  # the extra figures: their failure keeps the ones above
                kernel_gpu_s.append(gpu_times(orders["runs"]))
                pipe_s.append(pipelined(orders["runs"]))
            except Exception:
                log.exception("%s: an extra figure failed (trial %d)", label, trial)
    finally:
        transport.copy_mode = CopyMode.KERNEL
    gbps = {k: num_bytes / statistics.median(v) / 1e9 for k, v in times.items()}

    def ratio(name: str) -> float:  # median of per-trial ratios to the plain copy
        return statistics.median(p / w for p, w in zip(times["plain"], times[name], strict=True))

    breakdown = {
        name: {"gbps": round(gbps[name], 1), "vs_peer_copy": round(ratio(name), 3),
               "host_us_per_send": round(median_us(send_s[name]), 1),
               "host_us_open": round(median_us(open_s[name]), 1),
               "us_finish": round(median_us(finish_s[name]), 1),
               "launches_or_copies_per_send": counts[name][0],
               "runs": counts[name][1]}
        for name in variants
    }  # fmt: skip
    log.info("%s (%d bytes): plain %.1f GB/s, pulled %.1f GB/s; commit median %.2f ms",
             label, num_bytes, gbps["plain"], gbps["pull"], statistics.median(commit_s) * 1e3)  # fmt: skip
    for name, b in breakdown.items():
        log.info("  %-26s %s", name, b)
    extra = []
    if kernel_gpu_s:
        kernel_s, engine_s = (statistics.median(x) for x in zip(*kernel_gpu_s, strict=True))
        log.info("%s GPU time only: copy kernel %.1f us (%.1f GB/s), copy engine %.1f us "
                 "(%.1f GB/s)", label, kernel_s * 1e6, num_bytes / kernel_s / 1e9,
                 engine_s * 1e6, num_bytes / engine_s / 1e9)  # fmt: skip
        extra.append(
            {"name": f"kv.gpu_kernel_vs_copy_engine_{label}",
             "value": statistics.median(e / k for k, e in kernel_gpu_s), "unit": "ratio",
             "how": "GPU time only (CUDA events, stream kept busy): whole-request copy kernel "
                    "vs cudaMemcpyAsync of the same bytes pushed by cuda:0; diagnosis, not a "
                    "target", "kernel_us": kernel_s * 1e6, "copy_engine_us": engine_s * 1e6}
        )  # fmt: skip
    if pipe_s:
        pipe_ratios = [p / w for p, w in pipe_s]
        log.info("%s pipelined (%d in flight): per-trial ratios %s", label, REPS,
                 [round(x, 3) for x in pipe_ratios])  # fmt: skip
        extra.append(
            {"name": f"kv.gpu_path_pipelined_vs_peer_copy_{label}",
             "value": statistics.median(pipe_ratios), "unit": "ratio",
             "how": f"{REPS} requests in flight (opened and sent, then finished) vs {REPS} "
                    "plain copy_ back to back then synced; extra figure, not the per-request "
                    "one", "trial_ratios": pipe_ratios}
        )  # fmt: skip
    return [
        {"name": f"kv.peer_copy_gbps_{label}", "value": gbps["plain"], "unit": "GB/s",
         "bytes": num_bytes, "how": "torch copy_ cuda:0 -> cuda:1 (pushed by cuda:0)"},
        {"name": f"kv.peer_copy_pull_gbps_{label}", "value": gbps["pull"], "unit": "GB/s",
         "how": "cudaMemcpyAsync issued on cuda:1 (pulled)"},
        {"name": f"kv.gpu_path_gbps_{label}_whole", "value": gbps["kernel_runs_whole"],
         "unit": "GB/s", "commit_ms": statistics.median(commit_s) * 1e3},
        {"name": f"kv.gpu_path_gbps_{label}_per_layer", "value": gbps["kernel_runs_per_layer"],
         "unit": "GB/s"},
        {"name": f"kv.gpu_path_vs_peer_copy_{label}", "value": ratio("kernel_runs_whole"),
         "unit": "ratio", "target": ">= 0.8",
         "trial_ratios": [p / w for p, w in zip(times["plain"], times["kernel_runs_whole"],
                                                strict=True)]},
        {"name": f"kv.gpu_path_per_layer_vs_peer_copy_{label}",
         "value": ratio("kernel_runs_per_layer"), "unit": "ratio"},
        {"name": f"kv.gpu_path_vs_peer_copy_{label}_shuffled",
         "value": ratio("kernel_shuffled_whole"), "unit": "ratio", "target": ">= 0.8"},
        {"name": f"kv.gpu_path_per_layer_vs_peer_copy_{label}_shuffled",
         "value": ratio("kernel_shuffled_per_layer"), "unit": "ratio"},
        *extra,
        {"name": f"kv.gpu_path_send_host_us_{label}",
         "value": breakdown["kernel_shuffled_per_layer"]["host_us_per_send"], "unit": "us",
         "how": "median host time of one send_layer call (kernel mode, shuffled ids)",
         "variants": breakdown},
    ]  # fmt: skip
