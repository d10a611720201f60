from __future__ import annotations

import pytest
import torch

from engine.kv_pool import KVPool
from engine.presets import preset
from engine.sampling_params import SamplingParams
from kv_transfer.wire import (
    ChunkError,
    ChunkErrorKind,
    KVLayout,
    checksum,
    decode_chunk,
    encode_layer,
    sampling_from_pb,
    sampling_to_pb,
)
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
    assert [(c.first_block, c.num_blocks, c.epoch, c.layer_idx) for c in chunks] == [
        (1, 2, 3, 1),
        (3, 1, 3, 1),
    ]
    got = [decode_chunk(c, layout, num_table_blocks=4, first_sendable=1) for c in chunks]
    assert torch.equal(got[0].kv, pool.read_blocks(1, [5, 2]))
    assert torch.equal(got[1].kv, pool.read_blocks(1, [7]))
    assert got[0].kv.shape == (2, 2, 4, 2, 16)


def test_checksum_is_xxh3_64():
    assert checksum(b"") == 0x2D06800538D394C2
    assert checksum(b"baton") != checksum(b"batoN")


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
    (chunk,) = encode_layer(pool, "r", 1, 0, [4], first_block=1)
    decode_chunk(chunk, layout, num_table_blocks=3, first_sendable=1)  # valid as made
    setattr(chunk, field, value)
    with pytest.raises(ChunkError) as info:
        decode_chunk(chunk, layout, num_table_blocks=3, first_sendable=1)
    assert info.value.kind is kind


def test_sampling_params_round_trip():
    params = SamplingParams(
        max_tokens=7, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
        presence_penalty=0.3, frequency_penalty=-0.2, seed=123, stop_token_ids=(3, 4),
        stop=("END",), include_stop_str_in_output=True, ignore_eos=True, logprobs=2,
    )  # fmt: skip
    assert sampling_from_pb(sampling_to_pb(params)) == params
    assert sampling_from_pb(sampling_to_pb(SamplingParams())) == SamplingParams()
