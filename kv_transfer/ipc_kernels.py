"""The same-host GPU path's one kernel: move and digest a request's KV blocks in one launch.

The pool, read as 16-bit words (bf16 or fp16 elements; fp32 counts as two words each):

    pool: [L, 2 (K, V), N, bs, Hkv, D]  ==  rows [2L] x blocks [N] x HALF_WORDS words
    row (layer l, half h) = 2l + h;  half-block (row, b) = HALF_WORDS contiguous words

`launch_blocks` sends the blocks `src_ids[i] -> dst_ids[i]` (i = 0 .. n-1, at table
indices first_index + i) of the layers in a range. One program moves one BLOCK-word chunk
of one half-block:

    grid = (n, 2 * num_layers, HALF_WORDS / BLOCK)      program (i, r, c):
        words = src[2 * first_layer + r, src_ids[i], c*BLOCK : (c+1)*BLOCK]
        dst[2 * first_layer + r, dst_ids[i], same words] = words          (COPY)
        digests[first_layer + r // 2] += (2 * (first_index + i) + r % 2 + 1) * sum(words)

so a fragmented block table costs the same single launch as a contiguous one, and the
digest of what was read comes out of the same pass. The digest is the one Commit carries
(see cuda_ipc.py): per layer, the sum over sent blocks i and halves h of
(2i + h + 1) * (sum of the half-block's 16-bit words), in int64 arithmetic modulo 2**64, so
the order of the atomic adds does not matter and both sides wrap identically. A chunk's
word sum is exact in int32 (BLOCK * 2**15 < 2**31 for BLOCK <= 2**16).

`dst` may be memory that no torch tensor describes (the decode pool mapped through CUDA
IPC): Triton takes any object with `data_ptr()` and `dtype` as a pointer argument
(`DeviceWords`). Cost: one read of the sent bytes and, with COPY, one write (over NVLink
when dst is the peer GPU's); one int64 atomic per program.

Launch: the first launch per (device, mode) goes through Triton's JIT; later ones call that
CompiledKernel's launcher directly (`launch_blocks`: ~8 us of host time instead of ~30).
This stays valid because the kernel is compiled without value or alignment specialization
of its integers and id/digest pointers, and `_direct_launch_ok` checks the rest (pools
16-byte aligned, the launching device current, no launch hooks set). The launcher's
signature is Triton's internal (3.6 here): if a direct call is refused (TypeError,
AttributeError, as another Triton version may), the process logs it once and uses Triton's
own launch path from then on. `DirectLaunch` is that direct path with the pools, stream and
shape bound once (the GPU path's sends): pointers go in as plain ints, so neither Python
(`data_ptr()`, tensor views) nor the launcher (one cuPointerGetAttribute per pointer object)
looks at them per call.

The torch reference of the digest is ipc_plan.layer_digests_torch (also the CPU path);
`ipc_plan.layer_digests` picks `cuda_layer_digests` for CUDA pools. Triton is imported only
here, and this module only where a pool is on a GPU. CPU tests run the kernel under
Triton's interpreter (TRITON_INTERPRET=1 set before triton is first imported).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

MAX_BLOCK_WORDS = 4096  # words per program: 8 KB, 64 B per thread at 4 warps


@dataclass(frozen=True)
class DeviceWords:
    """A device address that Triton takes as an int16 pointer argument: memory without a
    torch tensor (an IPC mapping). Triton's launcher reads `data_ptr()` and `dtype` only."""

    address: int
    dtype: torch.dtype = torch.int16

    def data_ptr(self) -> int:
        return self.address


# Integers and the id / digest pointers are not specialized on (values, alignment): one
# compiled variant per (COPY, DIGEST, HALF_WORDS, BLOCK), which `launch_blocks` can then
# launch directly. The pools' pointers are (16-byte vectors): they are always aligned.
@triton.jit(
    do_not_specialize=["num_ids", "ids_stride", "first_row", "src_num_blocks", "dst_num_blocks",
                       "first_index"],
    do_not_specialize_on_alignment=["ids_ptr", "digests_ptr"],
)  # fmt: skip
def _blocks_kernel(
    src_ptr,  # *i16, pool rows x src_num_blocks x HALF_WORDS
    dst_ptr,  # *i16, pool rows x dst_num_blocks x HALF_WORDS (unused without COPY)
    ids_ptr,  # *i32 [2, num_ids], rows ids_stride apart: source ids, destination ids
    digests_ptr,  # *i64 [num_layers], by absolute layer (unused without DIGEST)
    num_ids,
    ids_stride,
    first_row,  # 2 * first layer of the range
    src_num_blocks,
    dst_num_blocks,
    first_index,  # table index of ids[:, 0]
    HALF_WORDS: tl.constexpr,
    BLOCK: tl.constexpr,
    COPY: tl.constexpr,
    DIGEST: tl.constexpr,
):
    i = tl.program_id(0)
    r = tl.program_id(1)
    c = tl.program_id(2)
    row = (first_row + r).to(tl.int64)
    words = tl.arange(0, BLOCK)
    src_block = tl.load(ids_ptr + i).to(tl.int64)
    src_start = tl.multiple_of((row * src_num_blocks + src_block) * HALF_WORDS + c * BLOCK, 8)
    if HALF_WORDS % BLOCK == 0:  # no tail: unmasked 16-byte vectors
        x = tl.load(src_ptr + src_start + words)
    else:
        x = tl.load(src_ptr + src_start + words, mask=c * BLOCK + words < HALF_WORDS, other=0)
    if COPY:
        dst_block = tl.load(ids_ptr + ids_stride + i).to(tl.int64)
        dst_start = tl.multiple_of((row * dst_num_blocks + dst_block) * HALF_WORDS + c * BLOCK, 8)
        if HALF_WORDS % BLOCK == 0:
            tl.store(dst_ptr + dst_start + words, x)
        else:
            tl.store(dst_ptr + dst_start + words, x, mask=c * BLOCK + words < HALF_WORDS)
    if DIGEST:
        part = tl.sum(x.to(tl.int32), axis=0).to(tl.int64)
        weight = (2 * (first_index + i) + r % 2 + 1).to(tl.int64)
        tl.atomic_add(digests_ptr + row // 2, part * weight, sem="relaxed")


def half_block_words(cache: torch.Tensor) -> int:
    """16-bit words in the K (or V) rows of one block of one layer."""
    return cache[0, 0, 0].numel() * cache.element_size() // 2


# (device, HALF_WORDS, BLOCK, COPY, DIGEST) -> the CompiledKernel the first launch built.
# Triton's own launch path (argument binding, specialization, cache lookup) costs ~30 us a
# call; launching the compiled kernel directly costs ~8 (H200 host), which is most of a
# layer's send.
_compiled: dict[tuple[int, int, int, bool, bool], Any] = {}
_direct_launch = [True]  # False once a direct call failed: Triton's launch path only


def launch_blocks(
    src: torch.Tensor | DeviceWords,
    dst: torch.Tensor | DeviceWords | None,
    ids: torch.Tensor,
    digests: torch.Tensor | None,
    layers: range,
    first_index: int,
    src_num_blocks: int,
    dst_num_blocks: int,
    half_words: int,
    stream: torch.cuda.Stream | None = None,
) -> None:
    """One launch, on `stream` (else the current stream): copy (dst given) and/or digest
    (digests given) the blocks ids[0] (sources) -> ids[1] (destinations) of `layers`.

    src, dst: pools as int16 words (tensors viewed as int16, or DeviceWords), 16-byte
    aligned; ids: int32 [2, n] on the device, contiguous rows (any row stride); digests:
    int64 [>= layers.stop], by layer. The caller checked every id against its pool: the
    kernel trusts them. Call with the launching device current.
    """
    num_ids = ids.shape[1]
    if num_ids == 0 or len(layers) == 0:
        return
    assert dst is not None or digests is not None
    assert half_words % 8 == 0, "half-blocks of whole 16-byte vectors"
    assert ids.stride(1) == 1 and max(src_num_blocks, dst_num_blocks) < 2**31
    # (plain int arithmetic: triton.next_power_of_2 and cdiv cost ~4 us a call)
    block = min(1 << (half_words - 1).bit_length(), MAX_BLOCK_WORDS)
    grid = (num_ids, 2 * len(layers), -(-half_words // block))
    args = (src, src if dst is None else dst, ids, ids if digests is None else digests, num_ids,
            ids.stride(0), 2 * layers.start, src_num_blocks, dst_num_blocks, first_index)  # fmt: skip
    constants = (half_words, block, dst is not None, digests is not None)
    key = (ids.device.index if ids.is_cuda else -1, *constants)
    compiled = _compiled.get(key) if _direct_launch[0] else None
    if compiled is not None and _direct_launch_ok(src, dst, key[0]):
        raw_stream = (
            stream.cuda_stream if stream is not None else torch.cuda.current_stream().cuda_stream
        )
        if _run_direct(compiled, grid, raw_stream, (*args, *constants)):
            return
    with contextlib.nullcontext() if stream is None else torch.cuda.stream(stream):
        compiled = _blocks_kernel[grid](*args, HALF_WORDS=half_words, BLOCK=block,
                                        COPY=dst is not None, DIGEST=digests is not None,
                                        num_warps=4)  # fmt: skip
    if _direct_launch[0] and ids.is_cuda and _direct_launch_ok(src, dst, ids.device.index):
        _compiled[key] = compiled  # built for aligned pools: what the direct path checks


def _run_direct(compiled: Any, grid: tuple[int, int, int], stream: int, args: tuple) -> bool:
    """Launch `compiled` through its launcher; False (logged once, direct launches off from
    then on) if this Triton's launcher refused the call before launching."""
    try:
        run = compiled.run  # first: it loads the module that `function` names
        run(*grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *args)
        return True
    except (TypeError, AttributeError) as e:  # refused before launching: not this Triton's
        log.warning("direct launch of the KV copy kernel refused (%r): Triton %s's own "
                    "launch path from now on", e, triton.__version__)  # fmt: skip
        _direct_launch[0] = False
        _compiled.clear()
        return False


_RUNTIME_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None)  # Triton >= 3.4


def _no_launch_hooks() -> bool:
    """Triton >= 3.4 (knobs) and no launch hooks set (chains, empty by default)."""
    knobs = _RUNTIME_KNOBS
    if knobs is None:
        return False
    hooks = (knobs.launch_enter_hook, knobs.launch_exit_hook)
    return all(h is None or not getattr(h, "calls", True) for h in hooks)


def _current_device() -> int:
    get = getattr(torch._C, "_cuda_getDevice", None)  # torch.cuda.current_device, minus checks
    return get() if get is not None else torch.cuda.current_device()


def _direct_launch_ok(
    src: torch.Tensor | DeviceWords, dst: torch.Tensor | DeviceWords | None, device: int
) -> bool:
    """The direct launch skips Triton's checks: the compiled variant must fit (pools 16-byte
    aligned), its module belongs to `device`'s context, and no launch hooks are set."""
    return (
        _no_launch_hooks()
        and src.data_ptr() % 16 == 0
        and (dst is None or dst.data_ptr() % 16 == 0)
        and torch.cuda.current_device() == device
    )


class DirectLaunch:
    """`launch_blocks`'s direct path with everything fixed per (pools, mode, stream) bound
    once: a call passes the id rows and digests as device addresses (plain ints).

    Call it as launch_blocks would be called (same argument meanings, ids int32 rows
    `ids_stride` words apart at `ids_address`, digests int64 at `digests_address`); it
    returns False without launching when the direct path is not available (no compiled
    variant yet on this device, another device current, launch hooks set, or this Triton
    refused a direct call): then call `launch_blocks` with tensors, whose first launch
    compiles the variant that later calls here find. Cost: ~5 us of host time (a tuple and
    the launcher's own argument parsing), none of it per block.
    """

    def __init__(
        self,
        src: torch.Tensor | DeviceWords,
        dst: torch.Tensor | DeviceWords | None,
        src_num_blocks: int,
        dst_num_blocks: int,
        half_words: int,
        digest: bool,
        device: int,
        stream: int,
    ) -> None:
        assert dst is not None or digest
        assert half_words % 8 == 0 and max(src_num_blocks, dst_num_blocks) < 2**31
        block = min(1 << (half_words - 1).bit_length(), MAX_BLOCK_WORDS)
        self._chunks = -(-half_words // block)
        src_address = src.data_ptr()
        dst_address = src_address if dst is None else dst.data_ptr()
        self._aligned = src_address % 16 == 0 and dst_address % 16 == 0
        self._pools = (src_address, dst_address)
        self._sizes = (src_num_blocks, dst_num_blocks)
        self._constants = (half_words, block, dst is not None, digest)
        self._key = (device, *self._constants)
        self._device = device
        self._stream = stream

    def __call__(
        self,
        ids_address: int,
        ids_stride: int,
        num_ids: int,
        digests_address: int,
        layers: range,
        first_index: int,
    ) -> bool:
        if num_ids == 0 or len(layers) == 0:
            return True
        compiled = _compiled.get(self._key) if _direct_launch[0] else None
        if (
            compiled is None
            or not self._aligned
            or not _no_launch_hooks()
            or _current_device() != self._device
        ):
            return False
        grid = (num_ids, 2 * len(layers), self._chunks)
        src_address, dst_address = self._pools
        args = (src_address, dst_address, ids_address, digests_address, num_ids, ids_stride,
                2 * layers.start, *self._sizes, first_index, *self._constants)  # fmt: skip
        return _run_direct(compiled, grid, self._stream, args)


def cuda_layer_digests(
    cache: torch.Tensor, layers: range, block_ids: Sequence[int], first_index: int
) -> torch.Tensor:
    """ipc_plan.layer_digests_torch's values for a CUDA pool: one launch on the current
    stream, reading the blocks in place (no gather): int64 [len(layers)]."""
    assert cache.is_contiguous()
    num_blocks = cache.shape[2]
    if not all(0 <= b < num_blocks for b in block_ids):
        raise ValueError(f"block ids out of range [0, {num_blocks})")
    out = torch.zeros(layers.stop, dtype=torch.int64, device=cache.device)
    ids = torch.tensor([list(block_ids)], dtype=torch.int32, device=cache.device)  # [1, n]
    words = cache.view(torch.int16)
    launch_blocks(words, None, ids, out, layers, first_index, num_blocks, num_blocks,
                  half_block_words(cache))  # fmt: skip
    return out[layers.start :]


def gather_blocks(
    src: torch.Tensor | DeviceWords,
    src_shape: Sequence[int],
    dtype: torch.dtype,
    block_ids: Sequence[int],
    device: torch.device,
) -> torch.Tensor:
    """Blocks block_ids of every layer of a pool of shape src_shape (e.g. the decode pool
    through its mapping), copied into a new [L, 2, n, bs, Hkv, D] tensor on `device`: one
    launch on the current stream. For checks (tests, the benchmark), not the hot path."""
    num_layers, _, num_blocks, *block_shape = src_shape
    n = len(block_ids)
    out = torch.empty(num_layers, 2, n, *block_shape, dtype=dtype, device=device)
    ids = torch.tensor([list(block_ids), list(range(n))], dtype=torch.int32, device=device)
    launch_blocks(src, out.view(torch.int16), ids, None, range(num_layers), 0, num_blocks, n,
                  half_block_words(out))  # fmt: skip
    return out
