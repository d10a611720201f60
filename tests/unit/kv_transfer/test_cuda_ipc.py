"""The parts of the same-host GPU path that run without a GPU."""

from __future__ import annotations

import pytest
import torch

from kv_transfer.cuda_ipc import contiguous_runs, host_id, layer_digests

pytestmark = pytest.mark.timeout(30)


def test_contiguous_runs():
    assert contiguous_runs([3, 4, 5, 9, 10], [0, 1, 2, 3, 4]) == [(3, 0, 3), (9, 3, 2)]
    assert contiguous_runs([1, 2], [5, 7]) == [(1, 5, 1), (2, 7, 1)]
    assert contiguous_runs([], []) == []


def test_layer_digests_sum_16_bit_words():
    cache = torch.zeros(2, 2, 4, 1, 1, 2, dtype=torch.bfloat16)  # [L, 2, blocks, bs, H, D]
    cache.view(torch.int16)[1, 0, 2] = torch.tensor([[[3, -1]]], dtype=torch.int16)
    assert layer_digests(cache, [2, 3]) == [0, 2]
    assert layer_digests(cache, [0]) == [0, 0]


def test_host_id_is_stable():
    assert host_id() == host_id() and "/" in host_id()
