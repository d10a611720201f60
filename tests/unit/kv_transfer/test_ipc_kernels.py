"""The GPU path's kernel and session on CPU pools, under Triton's interpreter.

The interpreter must be chosen before triton is first imported (TRITON_INTERPRET=1), so a
plain test run runs this file once more in a subprocess with it set
(`test_kernels_under_the_interpreter`); in that subprocess (or in a run started with
TRITON_INTERPRET=1 or BATON_TRITON_INTERPRET=1) the tests below run in process.

What is checked, against the torch reference `layer_digests_torch` and plain indexing:
the copy of fragmented, shuffled block lists lands exactly and touches nothing else; the
digest of what was read equals the reference for the sent table positions, in one launch
over a range of layers; chunked and masked half-blocks; the session's event order, one
launch per send, the block-id tensor built once per block list, finish and abort.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("BATON_TRITON_INTERPRET") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kv_transfer import ipc_kernels  # noqa: E402
from kv_transfer.ipc_plan import layer_digests_torch  # noqa: E402
from kv_transfer.transport import TransferError  # noqa: E402

IN_INTERPRETER = isinstance(ipc_kernels._blocks_kernel, InterpretedFunction)
REPO = Path(__file__).resolve().parents[3]
interpreted = pytest.mark.skipif(
    not IN_INTERPRETER, reason="runs in test_kernels_under_the_interpreter's subprocess"
)
pytestmark = pytest.mark.timeout(120)


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the interpreter run")
@pytest.mark.timeout(600)
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "not test_kernels_under_the_interpreter"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary


def random_pool(num_layers: int, num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype,
                seed: int) -> torch.Tensor:  # fmt: skip
    """[L, 2, N, *block_shape] with random 16-bit words (any bit pattern, NaNs included)."""
    cache = torch.empty(num_layers, 2, num_blocks, *block_shape, dtype=dtype)
    cache.view(torch.int16).random_(
        -(2**15), 2**15 - 1, generator=torch.Generator().manual_seed(seed)
    )
    return cache


def ids_tensor(src: list[int], dst: list[int]) -> torch.Tensor:
    return torch.tensor([src, dst], dtype=torch.int32)


def run_kernel(src, dst, src_ids, dst_ids, layers, first_index, digest=True):  # noqa: ANN001, ANN201
    digests = torch.zeros(src.shape[0], dtype=torch.int64) if digest else None
    ipc_kernels.launch_blocks(
        src.view(torch.int16),
        None if dst is None else dst.view(torch.int16),
        ids_tensor(src_ids, dst_ids),
        digests,
        layers,
        first_index,
        src.shape[2],
        src.shape[2] if dst is None else dst.shape[2],
        ipc_kernels.half_block_words(src),
    )
    return digests


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_copy_of_shuffled_fragmented_blocks_is_exact_and_digests_match(dtype: torch.dtype):
    rng = random.Random(3)
    src = random_pool(4, 24, (4, 2, 8), dtype, seed=1)  # half-block: 64 (or 128) words
    dst = random_pool(4, 17, (4, 2, 8), dtype, seed=2)
    before = dst.clone()
    src_ids = rng.sample(range(24), 9)  # shuffled: no two neighbours contiguous, mostly
    dst_ids = rng.sample(range(17), 9)
    layers = range(1, 4)
    digests = run_kernel(src, dst, src_ids, dst_ids, layers, first_index=5)
    expected = before.clone()
    expected[1:4, :, dst_ids] = src[1:4, :, src_ids]
    assert torch.equal(dst.view(torch.int16), expected.view(torch.int16))  # nothing else moved
    want = layer_digests_torch(src, layers, src_ids, 5)
    assert digests[1:].tolist() == want.tolist() and digests[0] == 0
    # ... and the receiver's recomputation over what landed, at the same table positions:
    assert layer_digests_torch(dst, layers, dst_ids, 5).tolist() == want.tolist()


@interpreted
def test_digest_only_launch_equals_the_reference_and_sees_a_swap():
    cache = random_pool(3, 12, (2, 1, 8), torch.bfloat16, seed=4)
    ids = [11, 3, 4, 0, 7]
    digests = run_kernel(cache, None, ids, ids, range(3), first_index=2)
    assert digests.tolist() == layer_digests_torch(cache, range(3), ids, 2).tolist()
    swapped = run_kernel(cache, None, [3, 11, 4, 0, 7], [0] * 5, range(3), first_index=2)
    assert (swapped != digests).all()
    one_layer = run_kernel(cache, None, ids, ids, range(2, 3), first_index=2)
    assert one_layer.tolist() == [0, 0, digests[2].item()]


@interpreted
@pytest.mark.parametrize(
    ("block_shape", "max_block_words"),
    [
        ((1, 5, 8), 16),  # 40 words: chunks of 16, 16, 8 (masked tail)
        ((2, 3, 8), 16),  # 48 words: three whole chunks
        ((16, 2, 16), 16),  # 512 words: 32 chunks
        ((2, 3, 8), 4096),  # 48 words in one 64-word chunk, masked
    ],
)
def test_half_blocks_in_several_chunks_and_with_a_masked_tail(
    block_shape: tuple[int, ...], max_block_words: int, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(ipc_kernels, "MAX_BLOCK_WORDS", max_block_words)
    src = random_pool(2, 6, block_shape, torch.bfloat16, seed=5)
    dst = torch.zeros(2, 2, 5, *block_shape, dtype=torch.bfloat16)
    digests = run_kernel(src, dst, [5, 0, 2], [4, 1, 0], range(2), first_index=0)
    assert torch.equal(
        dst[:, :, [4, 1, 0]].view(torch.int16), src[:, :, [5, 0, 2]].view(torch.int16)
    )
    assert torch.equal(dst[:, :, [2, 3]], torch.zeros_like(dst[:, :, [2, 3]]))
    assert digests.tolist() == layer_digests_torch(src, range(2), [5, 0, 2], 0).tolist()


@interpreted
def test_extreme_words_sum_exactly():
    src = torch.full((1, 2, 3, 16, 2, 128), -(2**15), dtype=torch.int16).view(torch.bfloat16)
    digests = run_kernel(src, None, [2, 0], [0, 0], range(1), first_index=7)
    assert digests.tolist() == layer_digests_torch(src, range(1), [2, 0], 7).tolist()
    assert digests.item() == -(2**15) * 4096 * (15 + 16 + 17 + 18)


@interpreted
def test_a_refused_direct_launch_falls_back_to_tritons_launch(monkeypatch):  # noqa: ANN001
    """Another Triton's launcher may take other arguments: the copy still happens, through
    Triton's own launch path, and the direct path is not tried again."""
    src = random_pool(2, 6, (2, 2, 8), torch.bfloat16, seed=8)
    dst = torch.zeros_like(src)
    half_words = ipc_kernels.half_block_words(src)

    class OtherTriton:
        function = packed_metadata = None

        def run(self, *args: object) -> None:
            raise TypeError("run() takes 9 positional arguments")

    key = (-1, half_words, half_words, True, False)  # CPU ids; BLOCK = the half-block here
    monkeypatch.setitem(ipc_kernels._compiled, key, OtherTriton())
    monkeypatch.setattr(ipc_kernels, "_direct_launch_ok", lambda *args: True)
    monkeypatch.setattr(ipc_kernels, "_direct_launch", [True])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: FakeStream("compute", []))
    ids = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)
    ipc_kernels.launch_blocks(src.view(torch.int16), dst.view(torch.int16), ids, None, range(2),
                              0, 6, 6, half_words)  # fmt: skip
    assert torch.equal(dst[:, :, [0, 5]].view(torch.int16), src[:, :, [4, 1]].view(torch.int16))
    assert ipc_kernels._direct_launch == [False] and not ipc_kernels._compiled


@interpreted
def test_gather_blocks_reads_a_pool_by_address():
    src = random_pool(3, 8, (2, 2, 8), torch.bfloat16, seed=6)
    got = ipc_kernels.gather_blocks(src.view(torch.int16), src.shape, src.dtype, [6, 1, 3],
                                    torch.device("cpu"))  # fmt: skip
    assert torch.equal(got.view(torch.int16), src[:, :, [6, 1, 3]].view(torch.int16))


# ---- the session, with the CUDA runtime replaced by a recording fake --------------------


class FakeStream:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log, self.cuda_stream = name, log, 7


STREAMS = {7: "send", 9: "compute"}  # raw handles: the send stream, the caller's stream


class MemmoveRuntime:
    """The CUDA runtime calls of the path, on host memory, logged; events are handles 1, 2,
    ... (logged as e1, e2, ...)."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.num_events = 0

    def memcpy_2d_async(self, dst, dst_pitch, src, src_pitch, width, height, stream) -> None:  # noqa: ANN001
        assert stream == 7
        for row in range(height):
            ctypes.memmove(dst + row * dst_pitch, src + row * src_pitch, width)
        self.log.append(f"copy {width}x{height}")

    def memcpy_async(self, dst: int, src: int, num_bytes: int, stream: int) -> None:
        ctypes.memmove(dst, src, num_bytes)
        self.log.append(f"memcpy {num_bytes} B on {STREAMS[stream]}")

    def event_create(self) -> int:
        self.num_events += 1
        return self.num_events

    def event_destroy(self, event: int) -> None:
        pass

    def event_record(self, event: int, stream: int) -> None:
        self.log.append(f"record e{event} on {STREAMS[stream]}")

    def stream_wait_event(self, stream: int, event: int) -> None:
        self.log.append(f"{STREAMS[stream]} waits e{event}")

    def event_query(self, event: int) -> bool:
        self.log.append(f"query e{event}")
        return True

    def event_synchronize(self, event: int) -> None:
        self.log.append(f"sync e{event}")


class InterpretedLauncher:
    """A compiled kernel's launcher as `DirectLaunch` calls it, run by the interpreter: the
    plain-int pointers are mapped back onto the tensors they point into, so the direct
    path's argument order and addresses are checked by what lands."""

    function = packed_metadata = None

    def __init__(self, log: list[str], tensors: list[torch.Tensor]) -> None:
        self.log, self.tensors = log, tensors

    def _at(self, address: int, dtype: torch.dtype) -> torch.Tensor:
        for t in self.tensors:
            flat = t.reshape(-1).view(dtype)
            offset = address - flat.data_ptr()
            if 0 <= offset < flat.numel() * flat.element_size():
                assert offset % flat.element_size() == 0
                return flat[offset // flat.element_size() :]
        raise AssertionError(f"address {address:#x} in no known tensor")

    def run(self, gx, gy, gz, stream, function, metadata, hooks_md, enter, exit_, src, dst,  # noqa: ANN001
            ids, digests, num_ids, ids_stride, first_row, src_nb, dst_nb, first_index, half_words,
            block, copy, digest) -> None:  # fmt: skip
        assert stream == 7 and function is None and (hooks_md, enter, exit_) == (None,) * 3
        assert all(isinstance(a, int) for a in (src, dst, ids, digests))  # no data_ptr() calls
        layers = range(first_row // 2, first_row // 2 + gy // 2)
        self.log.append(f"launch {'copy' if copy else 'digest'} layers {list(layers)}")
        ipc_kernels._blocks_kernel[(gx, gy, gz)](
            self._at(src, torch.int16), self._at(dst, torch.int16), self._at(ids, torch.int32),
            self._at(digests, torch.int64), num_ids, ids_stride, first_row, src_nb, dst_nb,
            first_index, HALF_WORDS=half_words, BLOCK=block, COPY=copy, DIGEST=digest,
        )  # fmt: skip


@pytest.fixture
def make_session(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """make(mode, direct) -> a CudaIpcTransport over two CPU pools (the remote one as if
    mapped) whose CUDA calls and launches are logged, the remote pool, an open session and
    the log. direct: the launches go through DirectLaunch (a compiled kernel as if cached),
    else through launch_blocks (Triton's path, as a first launch)."""
    from engine.kv_pool import KVPool
    from engine.presets import preset
    from kv_transfer.client import RemoteReservation
    from kv_transfer.cuda_ipc import CudaIpcTransport
    from kv_transfer.ipc_handle import RemotePool
    from kv_transfer.ipc_slots import SlotPool

    log: list[str] = []
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    launch = ipc_kernels.launch_blocks

    def logged_launch(src, dst, ids, digests, layers, *args) -> None:  # noqa: ANN001
        log.append(f"launch {'copy' if dst is not None else 'digest'} layers {list(layers)}")
        launch(src, dst, ids, digests, layers, *args)

    monkeypatch.setattr(ipc_kernels, "launch_blocks", logged_launch)

    def make(mode: str, direct: bool = False):  # noqa: ANN202
        from kv_transfer.cuda_ipc import CopyMode

        local = KVPool(preset("tiny"), 12, 4, torch.bfloat16, torch.device("cpu"))
        local.cache.view(torch.int16).random_(-(2**15), 2**15 - 1)
        remote = torch.zeros(2, 2, 9, 4, 2, 16, dtype=torch.bfloat16)
        t = object.__new__(CudaIpcTransport)  # __init__ needs CUDA; set what it would
        t.pool, t.runtime, t.copy_mode = local, MemmoveRuntime(log), CopyMode(mode)
        t.remote = RemotePool(0, remote.data_ptr(), tuple(remote.shape), remote.dtype, 1)
        t.local_device, t.device_index = torch.device("cpu"), -1
        t.half_block_bytes, t.max_pitch = local.layer_block_bytes // 2, 2**31 - 1
        t.local_words, t.remote_words = local.cache.view(torch.int16), remote.view(torch.int16)
        t.stream, t._closed = FakeStream("send", log), False
        t.stream_raw = 7
        t.current_raw_stream = lambda index: 9
        half_words = t.half_block_bytes // 2
        t.copy_launch = ipc_kernels.DirectLaunch(t.local_words, t.remote_words, 12, 9,
                                                 half_words, True, -1, 7)  # fmt: skip
        t.digest_launch = ipc_kernels.DirectLaunch(t.local_words, None, 12, 12, half_words,
                                                   True, -1, 7)  # fmt: skip
        t.slots = SlotPool(t.runtime, t.local_device, local.num_layers, num_ready=1)  # e1, e2
        slot = t.slots._free[0]
        slot.device.fill_(-7)  # what a previous session may have left: open must zero it
        slot.host.fill_(-7)
        if direct:
            launcher = InterpretedLauncher(log, [local.cache, remote, slot.device])
            monkeypatch.setattr(ipc_kernels, "_direct_launch", [True])
            monkeypatch.setattr(ipc_kernels, "_current_device", lambda: -1)
            monkeypatch.setattr(ipc_kernels, "_no_launch_hooks", lambda: True)
            block = min(1 << (half_words - 1).bit_length(), ipc_kernels.MAX_BLOCK_WORDS)
            for copy in (True, False):
                key = (-1, half_words, block, copy, True)
                monkeypatch.setitem(ipc_kernels._compiled, key, launcher)
        reservation = RemoteReservation("r", 1, (8, 2, 3, 4, 0), 0, 10.0)
        created = len(log)
        session = t.open(reservation)
        assert log[created:] == []  # open only stages the decode ids (host memory)
        return t, remote, session, log

    return make


@interpreted
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("mode", ["kernel", "memcpy"])
def test_session_sends_after_the_compute_one_launch_per_layer(make_session, mode: str,  # noqa: ANN001
                                                              direct: bool):  # fmt: skip
    t, remote, session, log = make_session(mode, direct)
    opened = len(log)
    local = [5, 6, 7, 1, 2]  # dst 8, 2, 3, 4, 0: runs (5,8,1) (6,2,2) (1,4,1) (2,0,1)
    for layer in range(2):
        session.send_layer(layer, 0, list(local))  # a fresh list per layer, as the streamer
    sent = session.finish(5.0)
    log = log[opened:]
    half = t.half_block_bytes
    queued = [f"copy {half}x2", f"copy {2 * half}x2", f"copy {half}x2", f"copy {half}x2",
              "launch digest layers [0]"] if mode == "memcpy" else ["launch copy layers [0]"]  # fmt: skip
    assert log[: 3 + len(queued)] == [
        "memcpy 56 B on send",  # the slot (ids 2 x 5, digests 2 x 2 words): once for both
        # layers, on the send stream
        "record e1 on compute",  # after the layer's compute, on the caller's stream
        "send waits e1",  # the send stream waits for it, then:
        *queued,  # kernel: one launch; memcpy: one pitched copy per run + a digest launch
    ]
    assert log[3 + len(queued) : 5 + len(queued)] == ["record e1 on compute", "send waits e1"]
    assert log[-3:] == ["memcpy 16 B on send", "record e2 on send", "query e2"]  # digests down
    landed, sent_kv = remote[:, :, [8, 2, 3, 4, 0]], t.pool.cache[:, :, local]
    assert torch.equal(landed.view(torch.int16), sent_kv.view(torch.int16))  # NaN bit patterns
    assert sent.num_bytes == 5 * t.pool.layer_block_bytes * 2
    assert sent.num_chunks == (2 if mode == "kernel" else 2 * 5)
    # What the decode side recomputes over what landed, in table order from index 0.
    assert (
        list(sent.layer_digests)
        == layer_digests_torch(remote, range(2), [8, 2, 3, 4, 0], 0).tolist()
    )
    assert len(t.slots._free) == 1  # the slot went back


@interpreted
@pytest.mark.parametrize("direct", [False, True])
def test_session_whole_request_in_pieces_and_bad_ids(make_session, direct: bool):  # noqa: ANN001
    t, remote, session, log = make_session("kernel", direct)
    session.send_all_layers(0, [5, 6])
    session.send_all_layers(2, [11, 0, 9])
    # The second block list: its 3 columns of the local row only.
    assert log[-4:] == ["memcpy 12 B on send", "record e1 on compute", "send waits e1",
                        "launch copy layers [0, 1]"]  # fmt: skip
    with pytest.raises(ValueError, match="beyond the reservation"):
        session.send_all_layers(4, [1, 2])
    with pytest.raises(ValueError, match="local block ids out of range"):
        session.send_layer(0, 4, [12])
    with pytest.raises(ValueError, match="local block ids out of range"):
        session.send_layer(0, 4, [-1])
    with pytest.raises(ValueError, match="local block ids out of range"):
        session.send_layer(0, 4, [2**40])
    with pytest.raises(ValueError, match="table index 1 sent from blocks 6 and 7"):
        session.send_layer(0, 1, [7])
    session.send_layer(1, 1, [6, 11])  # the same blocks again at their indices: allowed
    sent = session.finish(5.0)
    assert torch.equal(remote[:, :, [8, 2, 3, 4, 0]].view(torch.int16),
                       t.pool.cache[:, :, [5, 6, 11, 0, 9]].view(torch.int16))  # fmt: skip
    want = layer_digests_torch(remote, range(2), [8, 2, 3, 4, 0], 0)
    want[1] += layer_digests_torch(remote, range(1, 2), [2, 3], 1)[0]  # sent twice: added twice
    assert list(sent.layer_digests) == want.tolist()
    # The slot goes to the next session, whose first copy zeroes the digests this one left.
    slot = t.slots._free[-1]
    again = t.open(RemoteReservation_("r2", (1, 5, 6)))
    again.send_all_layers(
        1, [3, 4]
    )  # the first copy: words 1 .. 10 (2 x 3 ids, 2 x 2 digest words)
    assert log[-4:] == ["memcpy 36 B on send", "record e1 on compute", "send waits e1",
                        "launch copy layers [0, 1]"]  # fmt: skip
    assert again._slot is slot
    want = layer_digests_torch(t.pool.cache, range(2), [3, 4], 1).tolist()
    assert list(again.finish(5.0).layer_digests) == want
    assert torch.equal(remote[:, :, [5, 6]].view(torch.int16),
                       t.pool.cache[:, :, [3, 4]].view(torch.int16))  # fmt: skip
    with pytest.raises(TransferError):
        again.finish(5.0)


def RemoteReservation_(request_id: str, block_ids: tuple[int, ...]):  # noqa: ANN201, N802
    from kv_transfer.client import RemoteReservation

    return RemoteReservation(request_id, 1, block_ids, 0, 10.0)


@interpreted
def test_session_with_nothing_sent_finishes_with_zero_digests_and_no_cuda_call(make_session):  # noqa: ANN001
    _, _, session, log = make_session("kernel")
    opened = len(log)
    sent = session.finish(5.0)
    assert sent.num_bytes == sent.num_chunks == 0 and sent.layer_digests == (0, 0)
    assert log[opened:] == []  # nothing was queued: nothing to wait for


@interpreted
def test_bad_decode_ids_fail_the_open_and_keep_the_slot(make_session):  # noqa: ANN001
    t, _, session, log = make_session("kernel")
    session.abort()
    logged = len(log)
    for bad in ((1, 9), (-1,), (2**33,)):  # the decode pool has 9 blocks
        with pytest.raises(ValueError, match="decode block ids out of range"):
            t.open(RemoteReservation_("bad", bad))
    assert log[logged:] == [] and len(t.slots._free) == 1 and t.slots.num_slots == 1


@interpreted
def test_session_abort_waits_for_queued_launches(make_session):  # noqa: ANN001
    t, _, session, log = make_session("kernel")
    session.send_all_layers(0, [5, 6])
    session.abort()
    assert log[-2:] == ["record e2 on send", "sync e2"]
    assert len(t.slots._free) == 1
    with pytest.raises(TransferError):
        session.send_layer(0, 2, [7])
    session.abort()  # again: nothing more to wait for
    assert log[-1] == "sync e2" and len(t.slots._free) == 1
