"""How the attention benchmark measures and reports: where it runs, timed calls and graphs.

`Env` is the device and whether this is a `--smoke` run (one timing instead of thirty);
`Report` writes each line to stdout and the log as it comes. `time_s` times one call with
CUDA events after warm-up; `time_graph_s` times a CUDA graph of several launches, per
launch (on CPU it times the launches in a plain loop).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loadtest.engine_bench_roofline import cuda_time_s


class Report:
    """Lines go to stdout and, as they come, to the log file (a killed run keeps its log)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self._file.write(line + "\n")
        self._file.flush()


@dataclass
class Env:
    device: torch.device
    smoke: bool

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# ---- timing ----------------------------------------------------------------------------------


def time_s(env: Env, fn: Callable[[], object], repeat: int = 30, warmup: int = 3) -> float:
    """Median seconds of one call after warm-up: CUDA events around each call on a GPU
    (engine_bench_roofline.cuda_time_s), the wall clock under the CPU interpreter."""
    if env.device.type == "cuda":
        return cuda_time_s(fn, repeat if not env.smoke else 1, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat if not env.smoke else 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_graph_s(env: Env, fns: list[Callable[[], object]], replays: int = 20) -> float:
    """Median seconds per launch of a CUDA graph holding one launch of each fn in turn."""
    if env.device.type != "cuda":
        return time_s(env, lambda: [fn() for fn in fns]) / len(fns)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return time_s(env, graph.replay, repeat=replays) / len(fns)
