"""Wire format of the KV-transfer service: layouts, chunks, checksums, sampling options.

A chunk carries K then V of a run of blocks of one layer, exactly as `KVPool.read_blocks`
returns them:

    data: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]   C order, raw bytes

so the receiver views the bytes as a tensor and `index_copy_`s them into its pool: one
chunk-sized view, no staging of the whole request.

Checksum: xxh3_64 (xxhash). It hashes at about 20 GB/s on one core, an order of magnitude
above what a Python gRPC stream moves (1 to 2 GB/s), so integrity costs a few percent of a
transfer; zlib's crc32 runs at 1 to 4 GB/s depending on the build and would be a visible
share. It guards against corruption and framing bugs, not against an attacker (the shared
token and TLS do that).
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import xxhash

from engine.kv_pool import KVPool
from engine.sampling_params import SamplingParams
from protos import kv_transfer_pb2 as pb

# torch.frombuffer warns (once) that protobuf's bytes are read-only; the receiver only reads
# them (index_copy_ copies out of the view), so the warning carries no information here.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

DEFAULT_CHUNK_BYTES = 4 * 2**20
TOKEN_METADATA_KEY = "x-baton-kv-token"  # gRPC metadata key of the shared token

_DTYPE_TO_PB = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float16: pb.DTYPE_FLOAT16,
}
_PB_TO_DTYPE = {v: k for k, v in _DTYPE_TO_PB.items()}


def dtype_to_pb(dtype: torch.dtype) -> int:
    if dtype not in _DTYPE_TO_PB:
        raise ValueError(f"KV dtype {dtype} cannot be transferred; use float32, bfloat16, float16")
    return _DTYPE_TO_PB[dtype]


def dtype_from_pb(value: int) -> torch.dtype:
    if value not in _PB_TO_DTYPE:
        raise ChunkError(ChunkErrorKind.BAD_LAYOUT, f"unknown dtype enum {value}")
    return _PB_TO_DTYPE[value]


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """(start, length) of the runs of consecutive ids, in order."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def read_kv(pool: KVPool, layer_idx: int, block_ids: Sequence[int]) -> torch.Tensor:
    """`pool.read_blocks`, but one slice copy per run of consecutive blocks: on CPU a slice
    copy runs at memcpy speed, an index_select several times slower."""
    runs = block_runs(block_ids)
    if len(runs) != 1:
        return pool.read_blocks(layer_idx, block_ids)
    start, n = runs[0]
    return pool.cache[layer_idx, :, start : start + n].contiguous()  # [2, n, bs, Hkv, D]


def write_kv(pool: KVPool, layer_idx: int, block_ids: Sequence[int], kv: torch.Tensor) -> None:
    """`pool.write_blocks` for kv [2, n, bs, Hkv, D], one slice copy per run and half."""
    expected = (2, len(block_ids), *pool.block_shape)
    if tuple(kv.shape) != expected or kv.dtype != pool.dtype:
        raise ValueError(f"KV data {tuple(kv.shape)} {kv.dtype}, expected {expected} {pool.dtype}")
    if max(block_ids) >= pool.num_blocks or min(block_ids) < 0:
        raise ValueError(f"block ids out of range [0, {pool.num_blocks})")
    i = 0
    for start, n in block_runs(block_ids):
        for half in (0, 1):
            pool.cache[layer_idx, half, start : start + n].copy_(kv[half, i : i + n])
        i += n


def checksum(data: bytes | memoryview) -> int:
    """xxh3_64 of the bytes, as an unsigned 64-bit integer."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class KVLayout:
    """Shape of a worker's KV pool as far as a transfer is concerned."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of_pool(cls, pool: KVPool) -> KVLayout:
        return cls(pool.num_layers, pool.block_size, pool.num_kv_heads, pool.head_dim, pool.dtype)

    @classmethod
    def from_pb(cls, msg: pb.KVLayout) -> KVLayout:
        return cls(
            msg.num_layers, msg.block_size, msg.num_kv_heads, msg.head_dim, dtype_from_pb(msg.dtype)
        )

    def to_pb(self) -> pb.KVLayout:
        return pb.KVLayout(
            num_layers=self.num_layers,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=dtype_to_pb(self.dtype),
        )

    @property
    def element_size(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size()

    @property
    def layer_block_bytes(self) -> int:
        """K and V of one block of one layer."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    def blocks_per_chunk(self, max_chunk_bytes: int) -> int:
        return max(1, max_chunk_bytes // self.layer_block_bytes)


class ChunkErrorKind(enum.Enum):
    BAD_LAYOUT = "bad_layout"  # dtype or layout differs from the reservation's
    BAD_RANGE = "bad_range"  # layer or block range outside what was reserved
    BAD_SIZE = "bad_size"  # data length differs from num_blocks * layer_block_bytes
    BAD_CHECKSUM = "bad_checksum"
    UNKNOWN_RESERVATION = "unknown_reservation"  # no such request, wrong epoch, or expired


class ChunkError(Exception):
    """A chunk that must be rejected; the transfer it belongs to fails."""

    def __init__(self, kind: ChunkErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class DecodedChunk:
    layer_idx: int
    first_block: int  # index into the request's block table
    kv: torch.Tensor  # [2, n, block_size, Hkv, D], a read-only view of the message bytes

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[1]


def encode_layer(
    pool: KVPool,
    request_id: str,
    epoch: int,
    layer_idx: int,
    block_ids: Sequence[int],
    first_block: int,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[pb.KVChunk]:
    """Chunks of one layer's blocks `block_ids`, which sit at `first_block` onwards in the
    request's block table. Each chunk is one gather (`read_blocks`) and one copy into bytes.
    """
    layout = KVLayout.of_pool(pool)
    step = layout.blocks_per_chunk(max_chunk_bytes)
    dtype = dtype_to_pb(pool.dtype)
    for start in range(0, len(block_ids), step):
        ids = block_ids[start : start + step]
        kv = read_kv(pool, layer_idx, ids)  # [2, n, bs, Hkv, D]
        data = kv.cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        yield pb.KVChunk(
            request_id=request_id,
            epoch=epoch,
            layer_idx=layer_idx,
            first_block=first_block + start,
            num_blocks=len(ids),
            dtype=dtype,
            data=data,
            checksum_kind=pb.CHECKSUM_XXH3_64,
            checksum=checksum(data),
        )


def decode_chunk(
    chunk: pb.KVChunk, layout: KVLayout, num_table_blocks: int, first_sendable: int
) -> DecodedChunk:
    """Check a chunk against its reservation and view its bytes as a tensor.

    num_table_blocks: length of the request's block table; first_sendable: leading blocks
    the receiver already holds (its prefix-cache hits), which must not be sent.
    """
    if chunk.dtype != dtype_to_pb(layout.dtype):
        raise ChunkError(
            ChunkErrorKind.BAD_LAYOUT,
            f"chunk dtype {pb.DType.Name(chunk.dtype)} differs from the pool's {layout.dtype}",
        )
    if chunk.layer_idx >= layout.num_layers:
        raise ChunkError(
            ChunkErrorKind.BAD_RANGE,
            f"layer {chunk.layer_idx} out of range [0, {layout.num_layers})",
        )
    end = chunk.first_block + chunk.num_blocks
    if chunk.num_blocks == 0 or chunk.first_block < first_sendable or end > num_table_blocks:
        raise ChunkError(
            ChunkErrorKind.BAD_RANGE,
            f"blocks [{chunk.first_block}, {end}) outside the reserved range "
            f"[{first_sendable}, {num_table_blocks})",
        )
    expected = chunk.num_blocks * layout.layer_block_bytes
    if len(chunk.data) != expected:
        raise ChunkError(
            ChunkErrorKind.BAD_SIZE,
            f"chunk holds {len(chunk.data)} bytes; {chunk.num_blocks} blocks need {expected}",
        )
    if chunk.checksum_kind != pb.CHECKSUM_XXH3_64:
        raise ChunkError(
            ChunkErrorKind.BAD_CHECKSUM,
            f"checksum kind {pb.ChecksumKind.Name(chunk.checksum_kind)} is not supported",
        )
    if checksum(chunk.data) != chunk.checksum:
        raise ChunkError(
            ChunkErrorKind.BAD_CHECKSUM,
            f"checksum mismatch on layer {chunk.layer_idx} blocks [{chunk.first_block}, {end})",
        )
    kv = torch.frombuffer(chunk.data, dtype=layout.dtype).view(
        2, chunk.num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim
    )
    return DecodedChunk(chunk.layer_idx, chunk.first_block, kv)


def sampling_to_pb(params: SamplingParams) -> pb.SamplingOptions:
    return pb.SamplingOptions(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        has_seed=params.seed is not None,
        seed=params.seed or 0,
        ignore_eos=params.ignore_eos,
        stop_token_ids=list(params.stop_token_ids),
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        stop=list(params.stop),
        include_stop_str_in_output=params.include_stop_str_in_output,
        has_logprobs=params.logprobs is not None,
        logprobs=params.logprobs or 0,
    )


def sampling_from_pb(msg: pb.SamplingOptions) -> SamplingParams:
    """Raises ValueError (from SamplingParams) for out-of-range values."""
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p,
        min_p=msg.min_p,
        repetition_penalty=msg.repetition_penalty,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        seed=msg.seed if msg.has_seed else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        stop=tuple(msg.stop),
        include_stop_str_in_output=msg.include_stop_str_in_output,
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.has_logprobs else None,
    )
