"""The parts of the same-host GPU path that run without a GPU (and without triton).

The copy-engine plan is executed here by a fake CUDA runtime that does what
cudaMemcpy2DAsync does (row r: `width` bytes from src + r * src_pitch to dst + r * dst_pitch)
with memmove on CPU pools, through the same pointer arithmetic as on the GPU
(`issue_copies`). The kernel and the session run in test_ipc_kernels.py (interpreter).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from kv_transfer.cuda_ipc import COPY_MODE_ENV, CopyMode, copy_mode_from_env, layer_digests
from kv_transfer.cuda_runtime import find_cudart
from kv_transfer.ipc_handle import GpuPathUnavailable, host_id, ipc_handle_bytes, open_pool
from kv_transfer.ipc_plan import (
    PitchedCopy,
    contiguous_runs,
    issue_copies,
    layer_digests_torch,
    plan_copies,
)

pytestmark = pytest.mark.timeout(30)


class MemmoveRuntime:
    """cudaMemcpy2DAsync on host memory; records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []  # (width, height)

    def memcpy_2d_async(self, dst, dst_pitch, src, src_pitch, width, height, stream) -> None:  # noqa: ANN001
        assert width <= dst_pitch and width <= src_pitch and stream == 7
        for row in range(height):
            ctypes.memmove(dst + row * dst_pitch, src + row * src_pitch, width)
        self.calls.append((width, height))


def pool(num_layers: int, num_blocks: int, seed: int) -> torch.Tensor:
    """[L, 2, N, bs=2, Hkv=1, D=4] bf16 with distinct random words."""
    cache = torch.empty(num_layers, 2, num_blocks, 2, 1, 4, dtype=torch.bfloat16)
    cache.view(torch.int16).random_(
        -(2**15), 2**15 - 1, generator=torch.Generator().manual_seed(seed)
    )
    return cache


def run_plan(layers: range, src_ids: list[int], dst_ids: list[int], max_pitch: int):  # noqa: ANN201
    local, remote = pool(4, 12, 0), pool(4, 9, 1)
    before = remote.clone()
    half = local[0, 0, 0].numel() * local.element_size()
    runs = contiguous_runs(src_ids, dst_ids)
    copies = plan_copies(layers, runs, 12, 9, half, max_pitch)
    runtime = MemmoveRuntime()
    issue_copies(runtime, copies, local.data_ptr(), remote.data_ptr(), stream=7)
    expected = before.clone()
    for s, d in zip(src_ids, dst_ids, strict=True):
        expected[layers.start : layers.stop, :, d] = local[layers.start : layers.stop, :, s]
    assert torch.equal(remote.view(torch.int16), expected.view(torch.int16))
    return copies, runtime.calls


def test_contiguous_runs():
    assert contiguous_runs([3, 4, 5, 9, 10], [0, 1, 2, 3, 4]) == [(3, 0, 3), (9, 3, 2)]
    assert contiguous_runs([1, 2], [5, 7]) == [(1, 5, 1), (2, 7, 1)]
    assert contiguous_runs([], []) == []


def test_one_pitched_copy_per_run_moves_every_layer_exactly():
    # Runs split where either side breaks: (2, 0, 3), (5, 6, 2) [dst jumps], (10, 8, 1).
    copies, calls = run_plan(range(4), [2, 3, 4, 5, 6, 10], [0, 1, 2, 6, 7, 8], 2**31 - 1)
    half = 2 * 1 * 4 * 2  # bs * Hkv * D * 2 bytes
    assert calls == [(3 * half, 8), (2 * half, 8), (1 * half, 8)]  # 4 layers x (K, V) rows
    assert copies[0] == PitchedCopy(2 * half, 12 * half, 0, 9 * half, 3 * half, 8)


def test_one_layer_is_two_rows_starting_at_that_layer():
    copies, calls = run_plan(range(2, 3), [7, 8, 9], [3, 4, 5], 2**31 - 1)
    half = 16
    assert calls == [(3 * half, 2)]
    assert copies[0].src_offset == 2 * 2 * 12 * half + 7 * half  # row (layer 2, K)
    assert copies[0].dst_offset == 2 * 2 * 9 * half + 3 * half


def test_pitch_over_the_device_limit_falls_back_to_one_copy_per_row():
    copies, calls = run_plan(range(1, 4), [0, 1, 5], [8, 2, 3], max_pitch=100)  # pitches 192, 144
    assert calls == [(16, 1)] * 6 + [(16, 1)] * 6 + [(16, 1)] * 6  # 3 runs x 6 (layer, half) rows
    assert len(copies) == 18


def test_layer_digests_weight_each_half_block_by_its_table_position():
    cache = torch.zeros(2, 2, 4, 1, 1, 2, dtype=torch.bfloat16)  # [L, 2, blocks, bs, H, D]
    words = cache.view(torch.int16)
    words[1, 0, 2] = torch.tensor([[[3, -1]]], dtype=torch.int16)  # layer 1, K of block 2
    words[1, 1, 3] = torch.tensor([[[5, 0]]], dtype=torch.int16)  # layer 1, V of block 3
    # blocks [2, 3] at table indices 4, 5: K of index 4 weighs 2*4+0+1 = 9, V of 5: 2*5+1+1 = 12
    assert layer_digests(cache, range(2), [2, 3], first_index=4).tolist() == [0, 9 * 2 + 12 * 5]
    # [3, 2] at indices 0, 1: V of block 3 weighs 2*0+1+1 = 2, K of block 2 weighs 2*1+0+1 = 3
    assert layer_digests(cache, range(1, 2), [3, 2], first_index=0).tolist() == [2 * 5 + 3 * 2]
    assert layer_digests(cache, range(2), [0], first_index=0).tolist() == [0, 0]


def test_layer_digests_see_swapped_blocks_and_split_sends_add_up():
    cache = pool(3, 10, 2)
    whole = layer_digests(cache, range(3), [1, 2, 3, 7], first_index=2)
    swapped = layer_digests(cache, range(3), [1, 3, 2, 7], first_index=2)
    assert (whole != swapped).all()
    parts = layer_digests(cache, range(3), [1, 2], 2) + layer_digests(cache, range(3), [3, 7], 4)
    assert torch.equal(parts, whole)  # sending a layer in pieces gives the receiver's digest
    per_layer = torch.cat(
        [layer_digests(cache, range(i, i + 1), [1, 2, 3, 7], 2) for i in range(3)]
    )
    assert torch.equal(per_layer, whole)


def test_find_cudart_prefers_the_library_torch_mapped(tmp_path):  # noqa: ANN001
    maps = [
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6",
        "7f02-7f03 r-xp 00000000 08:01 2 /opt/venv/nvidia/cu13/lib/libcudart.so.13",
        "",
    ]
    (tmp_path / "libcudart.so.12").write_bytes(b"")
    assert find_cudart(maps, [str(tmp_path)]) == "/opt/venv/nvidia/cu13/lib/libcudart.so.13"
    assert find_cudart(maps[:1], [str(tmp_path)]) == str(tmp_path / "libcudart.so.12")
    assert find_cudart(maps[:1], []) is None


def test_host_id_is_stable():
    assert host_id() == host_id() and "/" in host_id()


def test_reference_digest_of_a_fragmented_shuffled_table_is_the_per_block_sum():
    cache = pool(3, 10, 3)
    ids = [7, 2, 9, 0, 5]  # descending, shuffled: one run per block
    words = cache.view(torch.int16).flatten(3).to(torch.int64)  # [L, 2, N, words]
    want = [
        sum((2 * (4 + i) + h + 1) * int(words[layer, h, b].sum()) for i, b in enumerate(ids)
            for h in range(2))
        for layer in range(1, 3)
    ]  # fmt: skip
    assert layer_digests(cache, range(1, 3), ids, first_index=4).tolist() == want
    assert layer_digests_torch(cache, range(1, 3), ids, 4).tolist() == want


# ---- opening the decode pool's handle ---------------------------------------------------


def test_ipc_handle_bytes_reads_every_torch_format():
    raw = bytes(range(64))
    assert ipc_handle_bytes(raw) == raw  # torch < 2.5: the bare cudaIpcMemHandle_t
    assert ipc_handle_bytes(b"\x02c" + raw) == raw  # version 2, a cudaMalloc segment
    assert ipc_handle_bytes(b"\x03c" + raw) == raw  # torch 2.13 writes version 3
    with pytest.raises(GpuPathUnavailable, match="expandable_segments"):
        ipc_handle_bytes(b"\x02e" + raw + b"more")


class OpeningRuntime:
    def __init__(self) -> None:
        self.opened: list[bytes] = []

    def ipc_open_mem_handle(self, handle: bytes) -> int:
        self.opened.append(handle)
        return 0x7F00_0000_0000


def pool_handle(**changes: object):  # noqa: ANN201
    from kv_transfer.layout import dtype_to_pb
    from protos import kv_transfer_pb2 as pb

    shape = [2, 2, 9, 4, 2, 16]
    fields = dict(
        size=shape, stride=[2 * 9 * 4 * 2 * 16, 9 * 4 * 2 * 16, 4 * 2 * 16, 2 * 16, 16, 1],
        storage_offset=0, dtype=dtype_to_pb(torch.bfloat16), device_index=1,
        storage_handle=b"\x02c" + bytes(64), storage_size_bytes=2 * 2 * 2 * 9 * 4 * 2 * 16 + 512,
        storage_offset_bytes=512, storage_class="UntypedStorage",
    )  # fmt: skip
    fields.update(changes)
    return pb.PoolHandle(**fields)


def test_open_pool_maps_on_the_local_device_and_adds_the_storage_offset(monkeypatch):  # noqa: ANN001
    import contextlib

    devices: list[object] = []
    monkeypatch.setattr(
        torch.cuda, "device", lambda d: devices.append(d) or contextlib.nullcontext()
    )
    runtime = OpeningRuntime()
    remote = open_pool(pool_handle(), runtime, torch.device("cuda:0"))
    assert devices == [torch.device("cuda:0")] and runtime.opened == [bytes(64)]
    assert remote.base == 0x7F00_0000_0000 and remote.address == remote.base + 512
    assert remote.shape == (2, 2, 9, 4, 2, 16) and remote.num_blocks == 9
    assert remote.dtype == torch.bfloat16 and remote.device_index == 1
    with pytest.raises(GpuPathUnavailable, match="contiguous"):
        open_pool(pool_handle(stride=[1] * 6), runtime, torch.device("cuda:0"))
    with pytest.raises(GpuPathUnavailable, match="smaller"):
        open_pool(pool_handle(storage_size_bytes=100), runtime, torch.device("cuda:0"))
    with pytest.raises(GpuPathUnavailable, match="storage class"):
        open_pool(pool_handle(storage_class="Pickled"), runtime, torch.device("cuda:0"))


def test_copy_mode_from_env(monkeypatch):  # noqa: ANN001
    monkeypatch.delenv(COPY_MODE_ENV, raising=False)
    assert copy_mode_from_env() is CopyMode.KERNEL
    monkeypatch.setenv(COPY_MODE_ENV, "memcpy")
    assert copy_mode_from_env() is CopyMode.MEMCPY
    monkeypatch.setenv(COPY_MODE_ENV, "dma")
    with pytest.raises(ValueError, match="'kernel' or 'memcpy'"):
        copy_mode_from_env()


class EventRuntime:
    """Hands out event handles (ints); records nothing else."""

    def __init__(self) -> None:
        self.created: list[int] = []
        self.destroyed: list[int] = []

    def event_create(self) -> int:
        self.created.append(100 + len(self.created))
        return self.created[-1]

    def event_destroy(self, event: int) -> None:
        self.destroyed.append(event)


def test_session_slots_are_reused_grow_for_large_sessions_and_are_all_kept():
    from kv_transfer.ipc_slots import SlotPool

    runtime = EventRuntime()
    slots = SlotPool(runtime, torch.device("cpu"), num_layers=4, num_ready=1)
    first = slots.take(10)
    assert first.capacity == SlotPool.MIN_CAPACITY and first.host_words.dtype == np.int32
    assert first.device.numel() == first.host.numel() == 2 * SlotPool.MIN_CAPACITY + 2 * 4
    assert first.device_address == first.device.data_ptr() and (first.ready, first.done) == (
        100,
        101,
    )
    # The int64 view of the host twin starts where the int32 words do: digests of a session
    # of n blocks are int64 words n .. n + L (int32 words 2n .. 2n + 2L).
    assert first.host_i64.ctypes.data == first.host_address
    second = slots.take(10)  # none free: a new one
    assert second is not first and slots.num_slots == 2
    slots.give_back(first)
    assert slots.take(3) is first  # reused for any session that fits
    big = slots.take(SlotPool.MIN_CAPACITY + 1)  # a larger slot, kept like the others
    assert big.capacity == SlotPool.MIN_CAPACITY + 1 and slots.num_slots == 3
    slots.give_back(big)
    slots.give_back(second)
    assert slots.take(SlotPool.MIN_CAPACITY + 1) is big  # only the large one fits
    assert slots.take(5) is second
    slots.close()
    assert sorted(runtime.destroyed) == list(range(100, 106))
