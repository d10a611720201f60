"""GPU part of the KV-transfer benchmark (2 GPUs of one host): `kv_transfer_bench --gpu`.

In order, each part guarded so that a failure still leaves the others' figures:

  1. correctness  tests/gpu/test_kv_transfer_gpu.py in a subprocess (exact bytes through the
                  IPC mapping with shuffled block lists, both copy modes, digests on both
                  sides, abort, free-block counts, a tiny engine streaming layer-wise)
  2. copy         llama3-8b-shaped KV of 1k and 4k tokens, prefill pool cuda:0 -> decode pool
                  cuda:1 (another process, a bare PoolSink), trials alternating with a plain
                  cuda:0 -> cuda:1 copy of the same number of bytes (torch `copy_`, the
                  baseline). Path time: first send to `finish` returned (bytes landed and
                  digests on the host); Commit's round trip is reported beside it. Variants:
                  copy mode (kernel: one launch per send; memcpy: one copy-engine copy per
                  run of blocks), local block ids contiguous ("runs") or shuffled (one run
                  per block), whole request or layer by layer. Figures
                  kv.gpu_path_vs_peer_copy_{1k,4k} (kernel, contiguous, whole; target
                  >= 0.8) and _shuffled; kv.gpu_path_send_host_us_{1k,4k}: host time of one
                  send_layer call (kernel, shuffled), with every variant's breakdown (host
                  time of open and finish too). A trial's time is the median of REPS
                  requests moved back to back (reserved before, committed after), the
                  baselines likewise. Two extra figures, for diagnosis, NOT the per-request
                  figure: kv.gpu_kernel_vs_copy_engine_{1k,4k}, GPU time only (CUDA events,
                  the stream kept busy so no host time is inside): the copy kernel against a
                  cudaMemcpyAsync of the same bytes pushed by cuda:0 (the ceiling of the
                  per-request figure whatever the host does); kv.gpu_path_pipelined_vs_
                  peer_copy_{1k,4k}: REPS requests in flight (all opened and sent, then all
                  finished) against REPS plain copy_ calls issued back to back, then synced.
  3. streaming    the real engine (llama3-8b preset, bf16, dummy weights) on cuda:0 prefills
                  2048 tokens in one step, first alone (the prefill time), then with
                  `LayerStreamer` over the IPC transport; the engine's own allocator hands
                  out the block ids (after the warm-ups: descending, one run per block).
                  Figure kv.exposed_fraction_2k = (streamed step + tail - prefill alone) /
                  prefill alone, the tail being the end of the step to Commit's answer
                  (target <= 0.1); beside it the step slowdown, the tail, host time per
                  send_layer, launches and runs per layer, and the same in memcpy mode.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.kv_pool import KVPool
from engine.presets import preset
from engine.sampling_params import SamplingParams
from kv_transfer.client import ClientConfig, KVTransferClient
from kv_transfer.cuda_ipc import CopyMode, CudaIpcTransport
from kv_transfer.ipc_plan import contiguous_runs
from kv_transfer.layout import KVLayout
from kv_transfer.server import ServerConfig, start_server
from kv_transfer.sink import PoolSink

log = logging.getLogger("kv_transfer_bench")
TOKEN = "bench-token"
BS = 16
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
DECODE_BLOCKS = 1200  # 2.4 GiB of llama3-8b KV on cuda:1
LOCAL_BLOCKS = 300
REPS = 4  # requests per trial of each copy variant (4 x 4k fit the decode pool), median
TIME_BUDGET_S = 300.0  # no new part starts after this: the whole run stays under 6 minutes
REPO = Path(__file__).resolve().parents[1]
PARTS_ENV = "BATON_KV_BENCH_GPU_PARTS"  # e.g. "copy": only those parts (tests, copy, streaming)
PARTS = ("tests", "copy", "streaming")


def parts_from_env() -> tuple[str, ...]:
    value = os.environ.get(PARTS_ENV, ",".join(PARTS))
    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"{PARTS_ENV}={value!r}: a comma-separated subset of {', '.join(PARTS)}")
    return parts


def make_pool(num_blocks: int, device: str, fill: bool) -> KVPool:
    pool = KVPool(preset("llama3-8b"), num_blocks, BS, torch.bfloat16, torch.device(device))
    if fill:
        gen = torch.Generator(device=device).manual_seed(0)
        pool.cache.view(torch.int16).random_(-(2**15), 2**15 - 1, generator=gen)
    return pool


def _decode_process(num_blocks: int, ready: mp.Queue, stop: mp.Event) -> None:
    torch.cuda.set_device(1)
    sink = PoolSink(make_pool(num_blocks, "cuda:1", False), release_on_commit=True)
    server = start_server(sink, ServerConfig(auth_token=TOKEN))
    ready.put(server.port)
    stop.wait(900)
    server.stop()


def run_gpu_tests(out_dir: Path, timeout_s: float) -> dict:
    """The GPU test file in a subprocess; its output goes to out_dir/kv_transfer_gpu_tests.log."""
    cmd = [sys.executable, "-m", "pytest", str(REPO / "tests/gpu/test_kv_transfer_gpu.py"), "-q",
           "-p", "no:cacheprovider", "-rA", f"--junitxml={out_dir / 'kv_transfer_gpu_tests.xml'}"]  # fmt: skip
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, rc = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {timeout_s:.0f} s", -1
    (out_dir / "kv_transfer_gpu_tests.log").write_text(output)
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    log.info("gpu tests: rc %d in %.0f s: %s", rc, time.perf_counter() - t0, summary)
    passed = rc == 0 and "passed" in summary and "skipped" not in summary
    return {
        "name": "kv.gpu_tests",
        "value": float(passed),
        "unit": "all passed",
        "summary": summary,
    }


def _synced_s(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    return time.perf_counter() - t0


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


def _median_us(xs: list[float]) -> float:
    return statistics.median(xs) * 1e6


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
        plain = _synced_s(lambda: [dst.copy_(src) for _ in range(REPS)])
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
            _synced_s(lambda: dst.copy_(src))
            pull_copy()
            for name, (mode, order, per_layer) in variants.items():
                paths(f"w{label}{warm}{name}", mode, orders[order], per_layer, check=warm == 0)
        for trial in range(trials):  # alternating, the baselines first in every round
            # A trial's time is the median of REPS back-to-back runs, baselines alike.
            times["plain"].append(statistics.median(_synced_s(lambda: dst.copy_(src))
                                                    for _ in range(REPS)))  # fmt: skip
            times["pull"].append(statistics.median(_synced_s(pull_copy) for _ in range(REPS)))
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
               "host_us_per_send": round(_median_us(send_s[name]), 1),
               "host_us_open": round(_median_us(open_s[name]), 1),
               "us_finish": round(_median_us(finish_s[name]), 1),
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


def exposed_figure(client: KVTransferClient, trials: int) -> dict:
    from engine.config import EngineConfig
    from engine.engine import Engine
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
    t0 = time.perf_counter()
    engine = Engine(cfg)
    log.info("engine ready in %.1f s", time.perf_counter() - t0)
    prompt = [(i * 31) % 120000 + 5 for i in range(2048)]
    one = SamplingParams(max_tokens=1, temperature=0.0)
    transport = CudaIpcTransport.connect(client, engine.pool, CopyMode.KERNEL)
    streamer = LayerStreamer(engine, client, transport)
    sends: list[tuple[float, tuple[int, ...], tuple[int, ...]]] = []  # (host s, local, remote)
    tail_parts: dict[str, list[float]] = {"finish": [], "commit": []}  # the tail's two waits
    open_session, commit_future = transport.open, client.commit_future

    def timed(fn, part: str):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            s0 = time.perf_counter()
            result = fn(*args, **kwargs)
            tail_parts[part].append(time.perf_counter() - s0)
            return result

        return call

    def timed_open(reservation):  # noqa: ANN001, ANN202 - records each send_layer call
        session = open_session(reservation)
        send = session.send_layer

        def send_layer(layer: int, first: int, ids) -> None:  # noqa: ANN001
            s0 = time.perf_counter()
            send(layer, first, ids)
            remote = reservation.block_ids[first : first + len(ids)]
            sends.append((time.perf_counter() - s0, tuple(ids), tuple(remote)))

        session.send_layer = send_layer
        session.finish = timed(session.finish, "finish")
        return session

    def timed_commit(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - sent to answered
        s0 = time.perf_counter()
        future = commit_future(*args, **kwargs)
        future.add_done_callback(lambda _: tail_parts["commit"].append(time.perf_counter() - s0))
        return future

    transport.open = timed_open
    client.commit_future = timed_commit  # the streamer's client: restored below

    def plain(request_id: str) -> float:
        engine.add_request(request_id, prompt, one, hold_kv=True)
        elapsed = _synced_s(engine.step)
        engine.release(request_id)
        return elapsed

    def streamed(request_id: str) -> tuple[float, float, int, int]:
        streamer.add_request(request_id, prompt, GREEDY)
        torch.cuda.synchronize(0)
        t0 = time.perf_counter()
        (outcome,) = streamer.step()
        step_s = time.perf_counter() - t0 - outcome.record.exposed_s
        assert outcome.status is TransferStatus.COMMITTED, outcome.detail
        return step_s, outcome.record.exposed_s, outcome.record.num_bytes, outcome.record.num_chunks

    def trials_of(mode: CopyMode, warmups: int) -> dict:
        transport.copy_mode = mode
        for warm in range(warmups):
            plain(f"wp{mode.value}{warm}")
            streamed(f"ws{mode.value}{warm}")
        del sends[:]
        for part in tail_parts.values():
            del part[:]
        prefill, step, tail, launches = [], [], [], []
        for trial in range(trials):  # alternating
            prefill.append(plain(f"p{mode.value}{trial}"))
            s, e, num_bytes, num_chunks = streamed(f"s{mode.value}{trial}")
            step.append(s)
            tail.append(e)
            launches.append(num_chunks / engine.pool.num_layers)
        runs = [len(contiguous_runs(local, remote)) for _, local, remote in sends]
        prefill_s, step_s, tail_s = (statistics.median(x) for x in (prefill, step, tail))
        log.info("2k prefill, %s: alone %s s; streamed step %s s; tail %s s (finish %s ms, "
                 "commit %s ms); send_layer host median %.1f us; runs per layer %s", mode.value,
                 [round(x, 4) for x in prefill], [round(x, 4) for x in step],
                 [round(x, 5) for x in tail], [round(x * 1e3, 2) for x in tail_parts["finish"]],
                 [round(x * 1e3, 2) for x in tail_parts["commit"]],
                 _median_us([h for h, _, _ in sends]), sorted(set(runs)))  # fmt: skip
        return {
            "value": (step_s + tail_s - prefill_s) / prefill_s,
            "prefill_s": prefill_s,
            "streamed_step_s": step_s,
            "tail_s": tail_s,
            "step_slowdown_fraction": (step_s - prefill_s) / prefill_s,
            "tail_fraction": tail_s / prefill_s,
            "tail_finish_ms": statistics.median(tail_parts["finish"]) * 1e3,
            "tail_commit_ms": statistics.median(tail_parts["commit"]) * 1e3,
            "send_host_us_median": _median_us([h for h, _, _ in sends]),
            "launches_or_copies_per_layer": statistics.median(launches),
            "runs_per_layer": statistics.median(runs),
            "bytes": num_bytes,
        }

    health_s = []
    for _ in range(10):  # a bare gRPC round trip, to compare the Commit with
        s0 = time.perf_counter()
        client.health()
        health_s.append(time.perf_counter() - s0)
    try:
        kernel = trials_of(CopyMode.KERNEL, warmups=2)
        try:  # the fallback, for comparison: its failure keeps the kernel's figure
            memcpy = trials_of(CopyMode.MEMCPY, warmups=1)
        except Exception as e:
            log.exception("streaming in memcpy mode failed")
            memcpy = {"failed": repr(e)}
    finally:
        transport.close()
        del client.commit_future
    assert engine.num_free_blocks == 600
    return {
        "name": "kv.exposed_fraction_2k",
        "unit": "ratio",
        "target": "<= 0.1",
        "how": "(streamed step + tail to Commit's answer - prefill alone) / prefill alone",
        **kernel,
        "health_rpc_ms": statistics.median(health_s) * 1e3,
        "memcpy_mode": memcpy,
    }


def run_gpu(trials: int, out_dir: Path) -> list[dict]:
    start_s = time.perf_counter()
    assert torch.cuda.device_count() >= 2, "the GPU part needs two GPUs"
    parts_wanted = parts_from_env()
    log.info("GPU parts: %s (%s)", ", ".join(parts_wanted), PARTS_ENV)
    results = [run_gpu_tests(out_dir, timeout_s=150)] if "tests" in parts_wanted else []
    torch.cuda.set_device(0)
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_decode_process, args=(DECODE_BLOCKS, ready, stop), daemon=True)
    proc.start()
    try:
        client = KVTransferClient(ClientConfig(f"127.0.0.1:{ready.get(timeout=120)}", TOKEN))
        parts = [
            ("copy", lambda: copy_figures(client, make_pool(LOCAL_BLOCKS, "cuda:0", True), trials)),
            ("streaming", lambda: [exposed_figure(client, trials)]),
        ]  # fmt: skip
        for name, part in parts:
            if name not in parts_wanted:
                continue
            if time.perf_counter() - start_s > TIME_BUDGET_S:
                log.error("skipping the %s part: over the time budget", name)
                continue
            try:
                results += part()
            except Exception:  # keep the other parts' figures
                log.exception("the %s part failed", name)
                results.append({"name": f"kv.gpu_{name}_failed", "value": 1.0, "unit": "flag"})
        client.close()
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    log.info("GPU part took %.0f s", time.perf_counter() - start_s)
    return results
