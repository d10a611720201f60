"""What the parts of the KV-transfer benchmark share (kv_transfer_bench.py's CPU part and
the GPU parts, kv_transfer_bench_gpu*.py): the llama3-8b-shaped KV pool both processes hold
(block size BS, optionally filled with random bytes), the greedy sampling of the requests
they move, and the GPU parts' two host-side timers (a call between syncs of cuda:0 and
cuda:1; a median in microseconds).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from engine.kv_pool import KVPool
from engine.presets import preset
from engine.sampling_params import SamplingParams

BS = 16
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


def make_pool(num_blocks: int, device: str, fill: bool) -> KVPool:
    pool = KVPool(preset("llama3-8b"), num_blocks, BS, torch.bfloat16, torch.device(device))
    if fill:
        gen = torch.Generator(device=device).manual_seed(0)
        pool.cache.view(torch.int16).random_(-(2**15), 2**15 - 1, generator=gen)
    return pool


def synced_s(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    return time.perf_counter() - t0


def median_us(xs: list[float]) -> float:
    return statistics.median(xs) * 1e6
