from __future__ import annotations

import pytest
import torch

from engine.kv_pool import KVPool
from engine.presets import preset
from engine.sampling_params import SamplingParams
from kv_transfer.chunk_error import ChunkError, ChunkErrorKind
from kv_transfer.layout import KVLayout
from kv_transfer.sampling_options import sampling_from_pb, sampling_to_pb
from kv_transfer.wire import checksum, checksum_of, decode_chunk, encode_layer, split_chunk
from protos import kv_transfer_pb2 as pb

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.filterwarnings("ignore:The given buffer is not writable"),
]


@pytest.fixture
def pool() -> KVPool:
    p = KVPool(
        preset("tiny"), num_blocks=8, block_size=4, dtype=torch.bfloat16, device=torch.device("cpu")
    )
    p.cache.copy_(torch.randn(p.cache.shape, generator=torch.Generator().manual_seed(0)))
    return p


def test_layout_round_trips_through_proto(pool: KVPool):
    layout = KVLayout.of_pool(pool)
    assert layout == KVLayout(2, 4, 2, 16, torch.bfloat16)
    assert KVLayout.from_pb(layout.to_pb()) == layout
    assert layout.layer_block_bytes == 2 * 4 * 2 * 16 * 2 == 512


def test_encode_then_decode_is_exact(pool: KVPool):
    layout = KVLayout.of_pool(pool)
    chunks = list(encode_layer(pool, "r", 3, 1, [5, 2, 7], first_block=1, max_chunk_bytes=1024))
    assert [(c.first_block, c.num_blocks, c.num_data_bytes) for c in chunks] == [
        (1, 2, 1024),
        (3, 1, 512),
    ]
    received = [split_chunk(c.message) for c in chunks]
    assert [(r.header.epoch, r.header.layer_idx, r.header.data) for r in received] == [
        (3, 1, b""),
        (3, 1, b""),
    ]
    got = [decode_chunk(r, layout, num_table_blocks=4, first_sendable=1) for r in received]
    assert torch.equal(got[0].kv, pool.read_blocks(1, [5, 2]))
    assert torch.equal(got[1].kv, pool.read_blocks(1, [7]))
    assert got[0].kv.shape == (2, 2, 4, 2, 16)


def test_encoded_chunk_is_protobufs_own_serialization(pool: KVPool):
    (chunk,) = encode_layer(pool, "req", 9, 0, [3, 4, 6], first_block=2)  # runs [3, 4], [6]
    data = pool.read_blocks(0, [3, 4, 6]).reshape(-1).view(torch.uint8).numpy().tobytes()
    expected = pb.KVChunk(
        request_id="req", epoch=9, layer_idx=0, first_block=2, num_blocks=3,
        dtype=pb.DTYPE_BFLOAT16, checksum_kind=pb.CHECKSUM_XXH3_64, checksum=checksum(data),
        data=data,
    )  # fmt: skip
    assert chunk.message == expected.SerializeToString()
    assert chunk.message.endswith(data)  # the payload is the tail: the receiver views it


def test_split_views_the_payload_in_place():
    data = bytes(range(256)) * 4
    message = pb.KVChunk(request_id="r", layer_idx=1, data=data, checksum=5).SerializeToString()
    got = split_chunk(message)
    assert got.header == pb.KVChunk(request_id="r", layer_idx=1, checksum=5)
    assert got.data.obj is message and got.data.readonly and bytes(got.data) == data
    # Fields in any order, data not last, data twice (the last wins, as in protobuf).
    reordered = (
        pb.KVChunk(data=b"old").SerializeToString()
        + pb.KVChunk(checksum=7).SerializeToString()
        + pb.KVChunk(data=b"new").SerializeToString()
        + pb.KVChunk(request_id="q").SerializeToString()
    )
    got = split_chunk(reordered)
    assert got.header == pb.KVChunk(checksum=7, request_id="q") and bytes(got.data) == b"new"
    assert bytes(split_chunk(b"").data) == b"" and split_chunk(b"").header == pb.KVChunk()


@pytest.mark.parametrize(
    "message",
    [
        b"\x7a\x05abc",  # data runs past the end
        b"\x7a",  # length missing
        b"\x08",  # varint missing
        b"\x0b",  # wire type 3 (group): not in proto3
        b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # varint over 10 bytes
        b"\x0a\x02\xff\xfe",  # request_id is not UTF-8: protobuf refuses the header
    ],
)
def test_split_rejects_malformed_messages(message: bytes):
    with pytest.raises(ChunkError) as info:
        split_chunk(message)
    assert info.value.kind is ChunkErrorKind.BAD_MESSAGE


def test_checksum_is_xxh3_64():
    assert checksum(b"") == 0x2D06800538D394C2
    assert checksum(b"baton") != checksum(b"batoN")
    assert checksum_of([b"bat", memoryview(b"on")]) == checksum(b"baton")


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("data", b"\0" * 511, ChunkErrorKind.BAD_SIZE),
        ("checksum", 1, ChunkErrorKind.BAD_CHECKSUM),
        ("checksum_kind", pb.CHECKSUM_UNSPECIFIED, ChunkErrorKind.BAD_CHECKSUM),
        ("layer_idx", 2, ChunkErrorKind.BAD_RANGE),
        ("first_block", 0, ChunkErrorKind.BAD_RANGE),  # block 0 is the receiver's prefix hit
        ("first_block", 3, ChunkErrorKind.BAD_RANGE),  # runs past the table
        ("num_blocks", 0, ChunkErrorKind.BAD_RANGE),
        ("dtype", pb.DTYPE_FLOAT32, ChunkErrorKind.BAD_LAYOUT),
    ],
)
def test_decode_rejects(pool: KVPool, field: str, value: object, kind: ChunkErrorKind):
    layout = KVLayout.of_pool(pool)
    (encoded,) = encode_layer(pool, "r", 1, 0, [4], first_block=1)
    decode_chunk(split_chunk(encoded.message), layout, num_table_blocks=3, first_sendable=1)
    chunk = pb.KVChunk.FromString(encoded.message)
    setattr(chunk, field, value)
    with pytest.raises(ChunkError) as info:
        received = split_chunk(chunk.SerializeToString())
        decode_chunk(received, layout, num_table_blocks=3, first_sendable=1)
    assert info.value.kind is kind


def test_sampling_params_round_trip():
    params = SamplingParams(
        max_tokens=7, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
        presence_penalty=0.3, frequency_penalty=-0.2, seed=123, stop_token_ids=(3, 4),
        stop=("END",), include_stop_str_in_output=True, ignore_eos=True, logprobs=2,
    )  # fmt: skip
    assert sampling_from_pb(sampling_to_pb(params)) == params
    assert sampling_from_pb(sampling_to_pb(SamplingParams())) == SamplingParams()
