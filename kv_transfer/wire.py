"""Wire format of the KV-transfer service: chunks and checksums.

A chunk carries K then V of a run of blocks of one layer, in the order of the request's
block table:

    data: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]   C order, raw bytes

It travels as a serialized `KVChunk` whose payload is the last field (`data` has the highest
field number, so any protobuf serializer writes it last too). What one 4 MiB chunk costs:

    sender    one xxh3 pass over the pool's bytes (zero-copy views of each run of blocks) and
              one copy, pool -> message bytes (`bytes.join` of the header and those views)
    receiver  `split_chunk` walks the few header fields and views the payload in place
              (no protobuf copy of 4 MiB), one xxh3 pass, then `torch.frombuffer` over the
              view and one copy into the reserved pool slices

so each side adds one memcpy and one hash to what a bare gRPC byte stream pays. (gRPC itself
copies a message once into its own buffers on each side, bare or not.)

Checksum: xxh3_64 (xxhash), about 20 GB/s on one core; zlib's crc32 runs at 1 to 4 GB/s
depending on the build and would be a visible share. It guards against corruption and
framing bugs, not against an attacker (the shared token and TLS do that).

The pool's layout and its blocks as bytes: kv_transfer/layout.py; the sampling options sent
with Reserve: kv_transfer/sampling_options.py; why a chunk is refused:
kv_transfer/chunk_error.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import xxhash
from google.protobuf.message import DecodeError

from engine.kv_pool import KVPool
from kv_transfer.chunk_error import ChunkError, ChunkErrorKind
from kv_transfer.layout import KVLayout, dtype_to_pb, kv_buffers
from protos import kv_transfer_pb2 as pb

# torch.frombuffer warns (once) that the received bytes are read-only; the receiver only
# reads them (the copy into the pool copies out of the view), so the warning says nothing.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

DEFAULT_CHUNK_BYTES = 4 * 2**20
TOKEN_METADATA_KEY = "x-baton-kv-token"  # gRPC metadata key of the shared token
# What a sender and a receiver must agree on beyond the layout, sent with every Reserve: 2
# since chunk streams end with END_OF_STREAM (a version-1 sender's streams would read as
# broken off). Both tiers run one Baton version; a mismatch is refused at Reserve.
PROTOCOL_VERSION = 2
# The sender ends every chunk stream with one empty message. A stream whose request iterator
# ends without it broke off: gRPC Python can end a cancelled or dead peer's stream on the
# server as if it had finished, so the receiver must not take a plain end as the sender's.
END_OF_STREAM = b""
DATA_FIELD_NUMBER = pb.KVChunk.DESCRIPTOR.fields_by_name["data"].number
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


def checksum(data: bytes | memoryview) -> int:
    """xxh3_64 of the bytes, as an unsigned 64-bit integer."""
    return xxhash.xxh3_64_intdigest(data)


def checksum_of(buffers: Sequence[bytes | memoryview]) -> int:
    """xxh3_64 of the buffers' bytes one after the other, without joining them."""
    if len(buffers) == 1:
        return xxhash.xxh3_64_intdigest(buffers[0])
    h = xxhash.xxh3_64()
    for buf in buffers:
        h.update(buf)
    return h.intdigest()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it); raises IndexError past the end."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise ValueError("varint longer than 10 bytes")


_DATA_TAG = _varint(DATA_FIELD_NUMBER << 3 | _WIRE_LEN)


@dataclass(frozen=True)
class EncodedChunk:
    """One serialized `KVChunk`, ready to hand to gRPC as is."""

    message: bytes
    layer_idx: int
    first_block: int  # index into the request's block table
    num_blocks: int
    num_data_bytes: int


@dataclass(frozen=True)
class ReceivedChunk:
    """A received `KVChunk`: every field but data parsed, data a view into the message."""

    header: pb.KVChunk  # data left empty
    data: memoryview  # read-only, keeps the message alive


@dataclass(frozen=True)
class DecodedChunk:
    layer_idx: int
    first_block: int  # index into the request's block table
    kv: torch.Tensor  # [2, n, block_size, Hkv, D], a read-only view of the message bytes

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[1]


def encode_chunk(header: pb.KVChunk, buffers: Sequence[bytes | memoryview]) -> bytes:
    """Serialize `header` (data unset) with the buffers' bytes as its data field.

    The result equals `header.SerializeToString()` with data set to the joined buffers (data
    has the highest field number); the buffers' bytes are copied once, straight into it.
    """
    assert not header.data, "the payload goes in buffers"
    num_bytes = sum(len(b) for b in buffers)
    head = header.SerializeToString() + _DATA_TAG + _varint(num_bytes)
    return b"".join([head, *buffers])


def split_chunk(message: bytes) -> ReceivedChunk:
    """Parse a serialized KVChunk, viewing its data field in place instead of copying it.

    Walks the message's top-level fields (a handful of small ones and data, usually last);
    everything but data is parsed by protobuf. As in protobuf, the last data field wins.
    Raises ChunkError(BAD_MESSAGE) on bytes that are not a KVChunk.
    """
    buf = memoryview(message).toreadonly()
    header_parts: list[memoryview] = []
    data = buf[0:0]
    pos, end = 0, len(buf)
    try:
        while pos < end:
            start = pos
            key, pos = _read_varint(buf, pos)
            wire_type = key & 7
            if wire_type == _WIRE_VARINT:
                _, pos = _read_varint(buf, pos)
            elif wire_type == _WIRE_I64:
                pos += 8
            elif wire_type == _WIRE_I32:
                pos += 4
            elif wire_type == _WIRE_LEN:
                length, pos = _read_varint(buf, pos)
                if key >> 3 == DATA_FIELD_NUMBER:
                    data = buf[pos : pos + length]
                    pos += length
                    if pos > end:
                        raise IndexError
                    continue
                pos += length
            else:
                raise ValueError(f"wire type {wire_type}")
            if pos > end:
                raise IndexError
            header_parts.append(buf[start:pos])
        header = pb.KVChunk.FromString(b"".join(header_parts))
    except (IndexError, ValueError, DecodeError) as e:
        raise ChunkError(ChunkErrorKind.BAD_MESSAGE, f"not a KVChunk message: {e!r}") from None
    return ReceivedChunk(header, data)


def encode_layer(
    pool: KVPool,
    request_id: str,
    epoch: int,
    layer_idx: int,
    block_ids: Sequence[int],
    first_block: int,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[EncodedChunk]:
    """Chunks of one layer's blocks `block_ids`, which sit at `first_block` onwards in the
    request's block table. Each chunk costs one hash pass and one copy of its bytes."""
    layout = KVLayout.of_pool(pool)
    step = layout.blocks_per_chunk(max_chunk_bytes)
    dtype = dtype_to_pb(pool.dtype)
    for start in range(0, len(block_ids), step):
        ids = block_ids[start : start + step]
        buffers = kv_buffers(pool, layer_idx, ids)
        header = pb.KVChunk(
            request_id=request_id,
            epoch=epoch,
            layer_idx=layer_idx,
            first_block=first_block + start,
            num_blocks=len(ids),
            dtype=dtype,
            checksum_kind=pb.CHECKSUM_XXH3_64,
            checksum=checksum_of(buffers),
        )
        yield EncodedChunk(
            encode_chunk(header, buffers),
            layer_idx,
            first_block + start,
            len(ids),
            len(ids) * layout.layer_block_bytes,
        )


def decode_chunk(
    chunk: ReceivedChunk, layout: KVLayout, num_table_blocks: int, first_sendable: int
) -> DecodedChunk:
    """Check a chunk against its reservation and view its bytes as a tensor.

    num_table_blocks: length of the request's block table; first_sendable: leading blocks
    the receiver already holds (its prefix-cache hits), which must not be sent.
    """
    h = chunk.header
    if h.dtype != dtype_to_pb(layout.dtype):
        raise ChunkError(
            ChunkErrorKind.BAD_LAYOUT,
            f"chunk dtype {pb.DType.Name(h.dtype)} differs from the pool's {layout.dtype}",
        )
    if h.layer_idx >= layout.num_layers:
        raise ChunkError(
            ChunkErrorKind.BAD_RANGE,
            f"layer {h.layer_idx} out of range [0, {layout.num_layers})",
        )
    end = h.first_block + h.num_blocks
    if h.num_blocks == 0 or h.first_block < first_sendable or end > num_table_blocks:
        raise ChunkError(
            ChunkErrorKind.BAD_RANGE,
            f"blocks [{h.first_block}, {end}) outside the reserved range "
            f"[{first_sendable}, {num_table_blocks})",
        )
    expected = h.num_blocks * layout.layer_block_bytes
    if len(chunk.data) != expected:
        raise ChunkError(
            ChunkErrorKind.BAD_SIZE,
            f"chunk holds {len(chunk.data)} bytes; {h.num_blocks} blocks need {expected}",
        )
    if h.checksum_kind != pb.CHECKSUM_XXH3_64:
        raise ChunkError(
            ChunkErrorKind.BAD_CHECKSUM,
            f"checksum kind {pb.ChecksumKind.Name(h.checksum_kind)} is not supported",
        )
    if checksum(chunk.data) != h.checksum:
        raise ChunkError(
            ChunkErrorKind.BAD_CHECKSUM,
            f"checksum mismatch on layer {h.layer_idx} blocks [{h.first_block}, {end})",
        )
    kv = torch.frombuffer(chunk.data, dtype=layout.dtype).view(
        2, h.num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim
    )
    return DecodedChunk(h.layer_idx, h.first_block, kv)
