"""GPU part of the KV-transfer benchmark (2 GPUs of one host): `kv_transfer_bench --gpu`.

This file runs the parts and holds the first; the decode side is a bare PoolSink behind a
KV-transfer server in a spawned process on cuda:1. In order, each part guarded so that a
failure still leaves the others' figures:

  1. correctness  tests/gpu/test_kv_transfer_gpu.py in a subprocess (exact bytes through the
                  IPC mapping with shuffled block lists, both copy modes, digests on both
                  sides, abort, free-block counts, a tiny engine streaming layer-wise)
  2. copy         the IPC path cuda:0 -> cuda:1 against a plain peer copy of the same bytes,
                  1k and 4k tokens of llama3-8b KV (kv_transfer_bench_gpu_copy.py)
  3. streaming    the exposed fraction of layer-wise streaming from a real 2k-token prefill
                  (kv_transfer_bench_gpu_streaming.py)

What the parts share (the pool, the timers) is in kv_transfer_bench_gpu_common.py.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from kv_transfer.client import ClientConfig, KVTransferClient
from kv_transfer.server import ServerConfig, start_server
from kv_transfer.sink import PoolSink
from loadtest.kv_transfer_bench_gpu_common import make_pool
from loadtest.kv_transfer_bench_gpu_copy import copy_figures
from loadtest.kv_transfer_bench_gpu_streaming import exposed_figure

log = logging.getLogger("kv_transfer_bench")
TOKEN = "bench-token"
DECODE_BLOCKS = 1200  # 2.4 GiB of llama3-8b KV on cuda:1
LOCAL_BLOCKS = 300
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
