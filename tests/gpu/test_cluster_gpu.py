"""On the GPU machine with two GPUs: gpu-1p1d.yaml (llama3-8b shape, random bf16 weights)
gives the same greedy tokens, and the same logprobs with the same two best alternatives per
token, as a colocated replica, through the whole cluster.

Runs `loadtest/cluster_ttft_bench.py` on a few short requests; it exits non-zero when any
request's tokens differ or a logprob differs by more than its tolerance. Skipped without two CUDA devices or without Ray.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
    pytest.mark.timeout(900),
]
pytest.importorskip("ray")


def test_1p1d_equals_colocated_on_gpu() -> None:
    from loadtest.cluster_ttft_bench import main

    argv = ["--config", "cluster_configs/gpu-1p1d.yaml", "--num-requests", "4", "--warmup", "1"]
    argv += ["--prompt-tokens", "512", "--max-tokens", "16", "--logprobs", "2"]
    assert main(argv) == 0
