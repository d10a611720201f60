"""GPU part of the KV-transfer benchmark (2 GPUs of one host): `kv_transfer_bench --gpu`.

In order, each part guarded so that a failure still leaves the others' figures:

  1. correctness  tests/gpu/test_kv_transfer_gpu.py in a subprocess (exact bytes through the
                  IPC mapping, digests, free-block counts, a tiny engine streaming layer-wise)
  2. copy         llama3-8b-shaped KV of 1k and 4k tokens, prefill pool cuda:0 -> decode pool
                  cuda:1 (another process, a bare PoolSink), trials alternating with a plain
                  cuda:0 -> cuda:1 copy of the same number of bytes (torch `copy_`, the
                  baseline). Path time: first send to `finish` returned (bytes landed and
                  digests ready); Commit's round trip is reported beside it. Whole request
                  (one pitched copy per run of blocks) and layer by layer (one per layer).
                  Figures kv.gpu_path_vs_peer_copy_{1k,4k} (whole request; target >= 0.8).
  3. streaming    the real engine (llama3-8b preset, bf16, dummy weights) on cuda:0 prefills
                  2048 tokens in one step, first alone (the prefill time), then with
                  `LayerStreamer` over the IPC transport. Exposed time: end of the prefill
                  step to Commit's answer. Figure kv.exposed_fraction_2k (target <= 0.1).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
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
from kv_transfer.cuda_ipc import CudaIpcTransport
from kv_transfer.server import ServerConfig, start_server
from kv_transfer.sink import PoolSink
from kv_transfer.wire import KVLayout

log = logging.getLogger("kv_transfer_bench")
TOKEN = "bench-token"
BS = 16
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
DECODE_BLOCKS = 1200  # 2.4 GiB of llama3-8b KV on cuda:1
LOCAL_BLOCKS = 300
TIME_BUDGET_S = 300.0  # no new part starts after this: the whole run stays under 6 minutes
REPO = Path(__file__).resolve().parents[1]


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

    transport = CudaIpcTransport.connect(client, pool)  # mapped once, reused by every trial
    log.info(
        "IPC transport: remote %s %s, max pitch %d, runtime %s",
        tuple(transport.remote.shape), transport.remote.device, transport.max_pitch,
        cuda_runtime().path,
    )  # fmt: skip
    return [f for tokens in (1024, 4096) for f in size_figures(client, transport, tokens, trials)]


def size_figures(
    client: KVTransferClient, transport: CudaIpcTransport, tokens: int, trials: int
) -> list[dict]:
    """Path and baselines for one request of `tokens` tokens, trials alternating."""
    from kv_transfer.cuda_runtime import cuda_runtime

    pool = transport.pool
    layout = KVLayout.of_pool(pool)
    label = f"{tokens // 1024}k"
    n = tokens // BS
    ids = list(range(5, 5 + n))  # not at the pool's start: offsets matter
    num_bytes = n * pool.layer_block_bytes * pool.num_layers
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:1")
    pull = torch.cuda.Stream("cuda:1")

    def pull_copy() -> None:  # the same copy issued by cuda:1 (how the path copies)
        with torch.cuda.device(1):
            cuda_runtime().memcpy_2d_async(
                dst.data_ptr(), 0, src.data_ptr(), 0, num_bytes, 1, pull.cuda_stream
            )
        pull.synchronize()

    def path(request_id: str, per_layer: bool, check: bool) -> tuple[float, float]:
        r = client.reserve(request_id, [1] * tokens, GREEDY, layout,
                           transport=transport.rpc_transport)  # fmt: skip
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
        assert sent.num_bytes == num_bytes
        if check:  # exact bytes, read back through the mapping
            torch.cuda.synchronize(1)
            landed = transport.remote.index_select(2, torch.tensor(r.block_ids, device="cuda:1"))
            want = pool.cache.index_select(2, torch.tensor(ids, device="cuda:0"))
            assert torch.equal(landed.to("cuda:0").view(torch.int16), want.view(torch.int16))
        client.commit(r, 1, list(range(pool.num_layers)), list(sent.layer_digests))
        return t1 - t0, time.perf_counter() - t1

    times: dict[str, list[float]] = {"plain": [], "pull": [], "whole": [], "per_layer": [],
                                     "commit": []}  # fmt: skip
    for warm in range(2):
        _synced_s(lambda: dst.copy_(src))
        pull_copy()
        for per_layer in (False, True):
            path(f"w{label}{warm}{per_layer}", per_layer, check=warm == 0)
    for trial in range(trials):  # alternating, the baseline first in every round
        times["plain"].append(_synced_s(lambda: dst.copy_(src)))
        times["pull"].append(_synced_s(pull_copy))
        for mode, per_layer in (("whole", False), ("per_layer", True)):
            copy_s, commit_s = path(f"{mode}{label}{trial}", per_layer, check=False)
            times[mode].append(copy_s)
            times["commit"].append(commit_s)
    gbps = {k: num_bytes / statistics.median(v) / 1e9 for k, v in times.items() if k != "commit"}
    ratios = [p / w for p, w in zip(times["plain"], times["whole"], strict=True)]
    log.info("%s (%d bytes): GB/s %s; commit median %.2f ms; whole/plain per trial %s",
             label, num_bytes, {k: round(v, 1) for k, v in gbps.items()},
             statistics.median(times["commit"]) * 1e3, [round(x, 3) for x in ratios])  # fmt: skip
    return [
        {"name": f"kv.peer_copy_gbps_{label}", "value": gbps["plain"], "unit": "GB/s",
         "bytes": num_bytes, "how": "torch copy_ cuda:0 -> cuda:1 (pushed by cuda:0)"},
        {"name": f"kv.peer_copy_pull_gbps_{label}", "value": gbps["pull"], "unit": "GB/s",
         "how": "cudaMemcpyAsync issued on cuda:1 (pulled, as the path does)"},
        {"name": f"kv.gpu_path_gbps_{label}_whole", "value": gbps["whole"], "unit": "GB/s",
         "commit_ms": statistics.median(times["commit"]) * 1e3},
        {"name": f"kv.gpu_path_gbps_{label}_per_layer", "value": gbps["per_layer"],
         "unit": "GB/s"},
        {"name": f"kv.gpu_path_vs_peer_copy_{label}", "value": statistics.median(ratios),
         "unit": "ratio", "target": ">= 0.8", "trial_ratios": ratios},
        {"name": f"kv.gpu_path_per_layer_vs_peer_copy_{label}",
         "value": gbps["per_layer"] / gbps["plain"], "unit": "ratio"},
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
    streamer = LayerStreamer(engine, client, CudaIpcTransport.connect(client, engine.pool))

    def plain(request_id: str) -> float:
        engine.add_request(request_id, prompt, one, hold_kv=True)
        elapsed = _synced_s(engine.step)
        engine.release(request_id)
        return elapsed

    def streamed(request_id: str) -> tuple[float, float, int]:
        streamer.add_request(request_id, prompt, GREEDY)
        torch.cuda.synchronize(0)
        t0 = time.perf_counter()
        (outcome,) = streamer.step()
        step_s = time.perf_counter() - t0 - outcome.record.exposed_s
        assert outcome.status is TransferStatus.COMMITTED, outcome.detail
        return step_s, outcome.record.exposed_s, outcome.record.num_bytes

    for warm in range(2):
        plain(f"wp{warm}")
        streamed(f"ws{warm}")
    prefill, step, exposed = [], [], []
    for trial in range(trials):  # alternating
        prefill.append(plain(f"p{trial}"))
        s, e, num_bytes = streamed(f"s{trial}")
        step.append(s)
        exposed.append(e)
    assert engine.num_free_blocks == 600
    prefill_s, step_s, exposed_s = (statistics.median(x) for x in (prefill, step, exposed))
    log.info("2k prefill: alone %s s; streamed step %s s; exposed %s s",
             [round(x, 4) for x in prefill], [round(x, 4) for x in step],
             [round(x, 5) for x in exposed])  # fmt: skip
    return {
        "name": "kv.exposed_fraction_2k",
        "value": exposed_s / prefill_s,
        "unit": "ratio",
        "target": "<= 0.1",
        "prefill_s": prefill_s,
        "exposed_s": exposed_s,
        "streamed_step_s": step_s,
        "step_slowdown_fraction": (step_s - prefill_s) / prefill_s,
        "bytes": num_bytes,
    }


def run_gpu(trials: int, out_dir: Path) -> list[dict]:
    start_s = time.perf_counter()
    assert torch.cuda.device_count() >= 2, "the GPU part needs two GPUs"
    results = [run_gpu_tests(out_dir, timeout_s=150)]
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
