"""The parts of the same-host GPU path that run without a GPU.

The copy plan is executed here by a fake CUDA runtime that does what cudaMemcpy2DAsync
does (row r: `width` bytes from src + r * src_pitch to dst + r * dst_pitch) with memmove on
CPU pools, through the same pointer arithmetic as on the GPU (`issue_copies`).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from kv_transfer.cuda_ipc import (
    PitchedCopy,
    contiguous_runs,
    host_id,
    issue_copies,
    layer_digests,
    plan_copies,
)
from kv_transfer.cuda_runtime import find_cudart

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


# ---- the session's stream ordering, with torch.cuda replaced by recording fakes ----------


class FakeEvent:
    def __init__(self, log: list[str]) -> None:
        self.log, self.name = log, f"e{sum(1 for x in log if x.startswith('new'))}"
        log.append(f"new {self.name}")

    def record(self, stream: FakeStream) -> None:
        self.log.append(f"record {self.name} on {stream.name}")

    def query(self) -> bool:
        self.log.append(f"query {self.name}")
        return True

    def synchronize(self) -> None:
        self.log.append(f"sync {self.name}")


class FakeStream:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log, self.cuda_stream = name, log, 7

    def wait_event(self, event: FakeEvent) -> None:
        self.log.append(f"{self.name} waits {event.name}")


class LoggingRuntime(MemmoveRuntime):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def memcpy_2d_async(self, dst, dst_pitch, src, src_pitch, width, height, stream) -> None:  # noqa: ANN001
        self.log.append(f"copy {width}x{height}")
        super().memcpy_2d_async(dst, dst_pitch, src, src_pitch, width, height, stream)


@pytest.fixture
def fake_session(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A CudaIpcTransport over two CPU pools whose torch.cuda calls are recorded."""
    import contextlib

    from engine.kv_pool import KVPool
    from engine.presets import preset
    from kv_transfer.client import RemoteReservation
    from kv_transfer.cuda_ipc import CudaIpcTransport

    log: list[str] = []
    monkeypatch.setattr(torch.cuda, "Event", lambda: FakeEvent(log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: FakeStream("compute", log))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    local = KVPool(preset("tiny"), 12, 4, torch.bfloat16, torch.device("cpu"))
    local.cache.view(torch.int16).random_(-(2**15), 2**15 - 1)
    remote = torch.zeros(2, 2, 9, 4, 2, 16, dtype=torch.bfloat16)
    t = object.__new__(CudaIpcTransport)  # __init__ needs CUDA; set what it would
    t.pool, t.remote, t.runtime = local, remote, LoggingRuntime(log)
    t.local_device = t.remote_device = torch.device("cpu")
    t.half_block_bytes, t.max_pitch = local.layer_block_bytes // 2, 2**31 - 1
    t.copy_stream, t.digest_stream = FakeStream("copy", log), FakeStream("digest", log)
    reservation = RemoteReservation("r", 1, (8, 2, 3, 4, 0), 0, 10.0)
    return t, t.open(reservation), log


def test_session_copies_after_the_compute_and_finishes_after_both_streams(fake_session):  # noqa: ANN001
    t, session, log = fake_session
    local = [5, 6, 7, 1, 2]  # runs (5,8,1) (6,2,2) (1,4,1) (2,0,1): dst 8,2,3,4,0
    for layer in range(2):
        session.send_layer(layer, 0, local)
    sent = session.finish(5.0)
    half = t.half_block_bytes
    assert log[:8] == [
        "new e0",
        "record e0 on compute",  # after the layer's compute, on the caller's stream
        "copy waits e0",  # the copies wait for it ...
        f"copy {half}x2",  # one pitched copy per run: K and V of the layer
        f"copy {2 * half}x2",
        f"copy {half}x2",
        f"copy {half}x2",
        "digest waits e0",  # ... and so does the digest
    ]
    assert log[-6:] == ["new e2", "new e3", "record e2 on copy", "record e3 on digest",
                        "query e2", "query e3"]  # fmt: skip
    landed, sent_kv = t.remote[:, :, [8, 2, 3, 4, 0]], t.pool.cache[:, :, local]
    assert torch.equal(landed.view(torch.int16), sent_kv.view(torch.int16))  # NaN bit patterns
    assert sent.num_bytes == 5 * t.pool.layer_block_bytes * 2 and sent.num_chunks == 8
    # What the decode side recomputes over what landed, in table order from index 0.
    assert (
        list(sent.layer_digests) == layer_digests(t.remote, range(2), [8, 2, 3, 4, 0], 0).tolist()
    )


def test_session_abort_waits_for_queued_copies(fake_session):  # noqa: ANN001
    from kv_transfer.transport import TransferError

    t, session, log = fake_session
    session.send_all_layers(0, [5, 6])
    session.abort()
    assert log[-2:] == ["sync e1", "sync e2"] and "record e1 on copy" in log
    with pytest.raises(TransferError):
        session.send_layer(0, 2, [7])
