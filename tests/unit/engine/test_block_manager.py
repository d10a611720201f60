"""BlockManager: exact block ids, ref counts, free-list order, prefix-cache hits and evictions.

Blocks hold 4 tokens throughout. "Computing" a sequence is simulated by setting
num_computed_tokens and calling cache_computed_blocks, as Scheduler.advance does.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import pytest

import engine.block_manager as block_manager
from engine.block_manager import BlockManager, block_hashes_for, hash_block
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BLOCK_SIZE = 4


def make_seq(tokens: Seq[int], salt: str = "", request_id: str = "r") -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams(), cache_salt=salt)


def admit_and_compute(bm: BlockManager, seq: Sequence) -> None:
    """Admit seq for its whole prompt and mark every token computed (and cached)."""
    assert bm.admit(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_computed_blocks(seq)


def free_uncached(bm: BlockManager) -> list[int]:
    return list(bm._free_uncached)


def free_cached(bm: BlockManager) -> list[int]:
    """Cached free blocks, least recently freed (next to be evicted) first."""
    return list(bm._free_cached)


# ---- allocator -----------------------------------------------------------------------------


def test_blocks_are_handed_out_in_order_and_freed_tail_first() -> None:
    bm = BlockManager(8, BLOCK_SIZE, enable_prefix_caching=False)
    a, b = make_seq(range(10), request_id="a"), make_seq(range(5), request_id="b")
    assert bm.admit(a, 10)
    assert bm.admit(b, 5)
    assert a.block_table == [0, 1, 2]
    assert b.block_table == [3, 4]
    assert bm.ref_counts == [1, 1, 1, 1, 1, 0, 0, 0]
    assert bm.num_free_blocks == 3
    assert a.num_computed_tokens == 0 and a.num_cached_tokens == 0

    bm.free(a)
    assert a.block_table == [] and a.num_computed_tokens == 0
    assert free_uncached(bm) == [5, 6, 7, 2, 1, 0]  # a's tail went back first
    assert bm.ref_counts == [0, 0, 0, 1, 1, 0, 0, 0]

    c = make_seq(range(16), request_id="c")
    assert bm.admit(c, 16)
    assert c.block_table == [5, 6, 7, 2]
    assert free_uncached(bm) == [1, 0]

    bm.free(b)
    bm.free(c)
    assert free_uncached(bm) == [1, 0, 4, 3, 2, 7, 6, 5]
    bm.check_idle()


def test_admit_allocates_only_the_requested_chunk() -> None:
    bm = BlockManager(8, BLOCK_SIZE, enable_prefix_caching=True)
    seq = make_seq(range(30))
    assert bm.admit(seq, 9)  # a 9-token first chunk needs 3 blocks, not the prompt's 8
    assert seq.block_table == [0, 1, 2]
    bm.free(seq)
    bm.check_idle()


def test_admit_is_all_or_nothing_when_the_pool_is_short() -> None:
    bm = BlockManager(4, BLOCK_SIZE, enable_prefix_caching=True)
    a, b = make_seq(range(12), request_id="a"), make_seq(range(100, 108), request_id="b")
    assert bm.admit(a, 12)
    assert a.block_table == [0, 1, 2]
    stats_before = (bm.stats.queried_tokens, bm.stats.hit_tokens, bm.stats.evictions)

    assert not bm.admit(b, 8)  # needs 2 blocks, 1 is free
    assert b.block_table == []
    assert b.num_computed_tokens == 0 and b.num_cached_tokens == 0
    assert bm.ref_counts == [1, 1, 1, 0]
    assert free_uncached(bm) == [3]
    assert (bm.stats.queried_tokens, bm.stats.hit_tokens, bm.stats.evictions) == stats_before

    assert bm.admit(b, 4)  # its first 4-token chunk fits
    assert b.block_table == [3]
    bm.free(a)
    bm.free(b)
    bm.check_idle()


def test_admit_counts_a_hit_on_a_free_cached_block_as_taking_a_free_block() -> None:
    bm = BlockManager(3, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_seq(range(8), request_id="a")
    admit_and_compute(bm, a)
    bm.free(a)  # blocks 0 and 1 are free and cached
    filler = make_seq(range(100, 104), request_id="filler")
    assert bm.admit(filler, 4)
    assert filler.block_table == [2]
    # b hits block 0 (free, so reviving it uses one of the 2 free blocks) and needs 2 more
    # blocks for its 5 new tokens: 3 > 2, refused without touching the cache.
    b = make_seq([*range(4), 50, 51, 52, 53, 54], request_id="b")
    assert not bm.admit(b, 9)
    assert b.block_table == []
    assert free_cached(bm) == [1, 0]
    assert bm.stats.evictions == 0
    bm.free(filler)
    assert bm.admit(b, 9)
    assert b.block_table == [0, 2, 1]  # hit, then uncached block 2, then evicted block 1
    assert bm.stats.evictions == 1
    bm.free(b)
    bm.check_idle()


def test_grow_is_all_or_nothing_and_free_within_a_block() -> None:
    bm = BlockManager(4, BLOCK_SIZE, enable_prefix_caching=False)
    a, b = make_seq(range(6), request_id="a"), make_seq(range(4), request_id="b")
    assert bm.admit(a, 6)
    assert bm.admit(b, 4)
    a.num_computed_tokens = 6
    assert a.block_table == [0, 1]
    assert bm.grow(a, 2)  # positions 6, 7 fit in block 1
    assert a.block_table == [0, 1]
    assert not bm.grow(a, 7)  # positions 6..12 need 2 more blocks; 1 is free
    assert a.block_table == [0, 1]
    assert bm.num_free_blocks == 1
    assert bm.grow(a, 3)  # positions 6..8
    assert a.block_table == [0, 1, 3]
    assert bm.num_free_blocks == 0
    bm.free(a)
    bm.free(b)
    bm.check_idle()


def test_shared_blocks_are_ref_counted() -> None:
    bm = BlockManager(8, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_seq(range(9), request_id="a")
    admit_and_compute(bm, a)
    b = make_seq([*range(8), 77, 78], request_id="b")
    assert bm.admit(b, b.num_tokens)
    assert a.block_table == [0, 1, 2]
    assert b.block_table == [0, 1, 3]
    assert bm.ref_counts[:4] == [2, 2, 1, 1]
    bm.free(a)
    assert bm.ref_counts[:4] == [1, 1, 0, 1]
    assert free_cached(bm) == []  # blocks 0, 1 are still b's
    assert free_uncached(bm) == [4, 5, 6, 7, 2]
    bm.free(b)
    assert free_cached(bm) == [1, 0]
    bm.check_idle()


def test_check_idle_catches_held_blocks() -> None:
    bm = BlockManager(4, BLOCK_SIZE, enable_prefix_caching=True)
    seq = make_seq(range(5))
    assert bm.admit(seq, 5)
    with pytest.raises(AssertionError, match="still referenced"):
        bm.check_idle()
    bm.free(seq)
    bm.check_idle()


# ---- hash chain ----------------------------------------------------------------------------


def test_hash_chain_is_deterministic_and_covers_full_blocks_only() -> None:
    tokens = list(range(14))
    hashes = block_hashes_for(tokens, BLOCK_SIZE, "")
    assert len(hashes) == 3  # 14 tokens: 3 full blocks, the partial one is not hashed
    assert hashes == block_hashes_for(list(tokens), BLOCK_SIZE, "")
    assert len(set(hashes)) == 3
    assert all(isinstance(h, bytes) and len(h) == 16 for h in hashes)
    assert hashes[0] == hash_block(None, tokens[0:4], "")
    assert hashes[1] == hash_block(hashes[0], tokens[4:8], "")
    assert block_hashes_for(tokens, BLOCK_SIZE, "", limit_tokens=9) == hashes[:2]


def test_hash_chain_changes_from_the_first_changed_block_on() -> None:
    tokens = list(range(16))
    base = block_hashes_for(tokens, BLOCK_SIZE, "")
    first_changed = block_hashes_for([99, *tokens[1:]], BLOCK_SIZE, "")
    assert all(h != b for h, b in zip(first_changed, base, strict=True))
    third_changed = block_hashes_for([*tokens[:9], 99, *tokens[10:]], BLOCK_SIZE, "")
    assert third_changed[:2] == base[:2]
    assert third_changed[2] != base[2] and third_changed[3] != base[3]
    # Identical tokens in block 1 still hash differently under a different block 0.
    assert hash_block(base[0], tokens[4:8], "") != hash_block(first_changed[0], tokens[4:8], "")


def test_hash_chain_depends_on_the_cache_salt() -> None:
    tokens = list(range(8))
    tenant_a = block_hashes_for(tokens, BLOCK_SIZE, "tenant-a")
    tenant_b = block_hashes_for(tokens, BLOCK_SIZE, "tenant-b")
    assert tenant_a == block_hashes_for(tokens, BLOCK_SIZE, "tenant-a")
    assert all(a != b for a, b in zip(tenant_a, tenant_b, strict=True))
    assert block_hashes_for(tokens, BLOCK_SIZE, "") != tenant_a


def test_hash_separates_token_boundaries() -> None:
    assert hash_block(None, [1, 23], "") != hash_block(None, [12, 3], "")


# ---- prefix cache --------------------------------------------------------------------------


def test_prefix_hit_reuses_blocks_and_counts_tokens() -> None:
    bm = BlockManager(16, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_seq(range(10), request_id="a")
    admit_and_compute(bm, a)
    assert bm.num_cached_blocks == 2  # blocks 0, 1 are full; block 2 holds 2 tokens
    assert a.num_registered_blocks == 2
    bm.free(a)
    assert free_cached(bm) == [1, 0]
    assert free_uncached(bm)[-1] == 2

    b = make_seq([*range(8), 40, 41, 42], request_id="b")
    assert bm.admit(b, b.num_tokens)
    assert b.block_table == [0, 1, 3]
    assert b.num_computed_tokens == 8
    assert b.num_cached_tokens == 8
    assert bm.ref_counts[:4] == [1, 1, 0, 1]
    assert free_cached(bm) == []
    assert bm.stats.queried_tokens == 10 + 11
    assert bm.stats.hit_tokens == 8
    assert bm.stats.hit_rate == pytest.approx(8 / 21)
    bm.free(b)
    bm.check_idle()


def test_other_cache_salt_gets_no_hit() -> None:
    bm = BlockManager(16, BLOCK_SIZE, enable_prefix_caching=True)
    prompt = list(range(12))
    a = make_seq(prompt, salt="tenant-a", request_id="a")
    admit_and_compute(bm, a)
    bm.free(a)

    b = make_seq(prompt, salt="tenant-b", request_id="b")
    assert bm.match_prefix(b) == []
    assert bm.admit(b, b.num_tokens)
    assert b.num_cached_tokens == 0 and b.num_computed_tokens == 0
    assert b.block_table == [3, 4, 5]
    assert bm.stats.hit_tokens == 0
    bm.free(b)

    c = make_seq(prompt, salt="tenant-a", request_id="c")
    assert bm.match_prefix(c) == [0, 1]  # the same tenant does hit
    bm.check_idle()


def test_hash_collision_is_caught_by_comparing_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    # A degenerate hash: every block of every prompt collides.
    monkeypatch.setattr(block_manager, "hash_block", lambda parent, tokens, salt: b"collide")
    bm = BlockManager(16, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_seq(range(9), request_id="a")
    admit_and_compute(bm, a)
    assert bm.num_cached_blocks == 1  # block 1 collided with block 0 and was not registered
    bm.free(a)

    other = make_seq(range(100, 109), request_id="other")
    assert bm.match_prefix(other) == []  # same hash as block 0, different tokens
    assert bm.admit(other, other.num_tokens)
    assert other.num_cached_tokens == 0 and 0 not in other.block_table
    bm.free(other)

    same_head = make_seq([*range(4), 100, 101, 102, 103, 104], request_id="same_head")
    assert bm.match_prefix(same_head) == [0]  # block 0 matches; block 1's tokens do not
    bm.check_idle()


def test_hash_collision_on_a_forged_table_entry() -> None:
    bm = BlockManager(8, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_seq(range(8), request_id="a")
    admit_and_compute(bm, a)
    bm.free(a)
    b = make_seq(range(50, 59), request_id="b")
    bm._extend_hashes(b, 2)
    bm._hash_to_block[b.block_hashes[0]] = 0  # b's first hash now names a's block 0
    assert bm.match_prefix(b) == []
    del bm._hash_to_block[b.block_hashes[0]]
    bm.check_idle()


def test_fully_cached_block_aligned_prompt_recomputes_its_last_block() -> None:
    bm = BlockManager(8, BLOCK_SIZE, enable_prefix_caching=True)
    prompt = list(range(8))
    a = make_seq(prompt, request_id="a")
    admit_and_compute(bm, a)
    bm.free(a)
    assert free_cached(bm) == [1, 0]

    b = make_seq(prompt, request_id="b")
    assert bm.match_prefix(b) == [0]  # block 1 would leave nothing to compute
    assert bm.admit(b, b.num_tokens)
    assert b.block_table == [0, 2]
    assert b.num_computed_tokens == 4 and b.num_cached_tokens == 4
    b.num_computed_tokens = 8
    bm.cache_computed_blocks(b)
    assert bm.num_cached_blocks == 2  # block 2 duplicates cached block 1: not registered
    bm.free(b)
    assert free_cached(bm) == [1, 0]
    assert free_uncached(bm)[-1] == 2

    one_token = make_seq([5], request_id="one")
    assert bm.match_prefix(one_token) == []
    bm.check_idle()


def test_lru_eviction_order_and_counter() -> None:
    bm = BlockManager(4, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_seq(range(8), request_id="a")
    admit_and_compute(bm, a)
    bm.free(a)
    b = make_seq(range(100, 108), request_id="b")
    admit_and_compute(bm, b)
    assert b.block_table == [2, 3]
    bm.free(b)
    assert free_uncached(bm) == []
    assert free_cached(bm) == [1, 0, 3, 2]  # least recently freed first, tails first
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 4

    c = make_seq(range(200, 204), request_id="c")
    assert bm.admit(c, 4)
    assert c.block_table == [1]  # a's tail is evicted first
    assert bm.stats.evictions == 1
    assert bm.num_cached_blocks == 3
    assert free_cached(bm) == [0, 3, 2]

    # a's head still hits; its evicted tail is recomputed in a fresh block.
    a_again = make_seq(range(9), request_id="a_again")
    assert bm.match_prefix(a_again) == [0]
    assert bm.admit(a_again, a_again.num_tokens)
    assert a_again.block_table == [0, 3, 2]  # hit, then b's tail, then b's head evicted
    assert bm.stats.evictions == 3
    assert bm.num_cached_blocks == 1
    bm.free(c)
    bm.free(a_again)
    bm.check_idle()


def test_a_hit_block_freed_again_becomes_most_recent() -> None:
    bm = BlockManager(4, BLOCK_SIZE, enable_prefix_caching=True)
    for i, base in enumerate((0, 100)):
        seq = make_seq(range(base, base + 4), request_id=f"s{i}")
        admit_and_compute(bm, seq)
        bm.free(seq)
    assert free_cached(bm) == [0, 1]
    reuse = make_seq([0, 1, 2, 3, 9], request_id="reuse")
    assert bm.admit(reuse, 5)
    assert reuse.block_table == [0, 2]
    bm.free(reuse)
    assert free_cached(bm) == [1, 0]
    assert free_uncached(bm) == [3, 2]
    bm.check_idle()


def test_hit_counters_skip_readmission_after_preemption() -> None:
    bm = BlockManager(8, BLOCK_SIZE, enable_prefix_caching=True)
    seq = make_seq(range(10))
    admit_and_compute(bm, seq)
    assert (bm.stats.queried_tokens, bm.stats.hit_tokens) == (10, 0)
    bm.free(seq)  # preempted
    seq.num_preemptions = 1
    assert bm.admit(seq, seq.num_tokens)
    assert seq.num_computed_tokens == 8
    assert seq.num_cached_tokens == 0  # what it had at first admission
    assert (bm.stats.queried_tokens, bm.stats.hit_tokens) == (10, 0)
    bm.free(seq)
    bm.check_idle()


def test_prefix_caching_off_registers_and_hits_nothing() -> None:
    bm = BlockManager(8, BLOCK_SIZE, enable_prefix_caching=False)
    a = make_seq(range(8), request_id="a")
    admit_and_compute(bm, a)
    assert bm.num_cached_blocks == 0
    bm.free(a)
    assert free_cached(bm) == []
    b = make_seq(range(9), request_id="b")
    assert bm.admit(b, 9)
    assert b.num_computed_tokens == 0
    assert b.block_table == [2, 3, 4]
    bm.free(b)
    bm.check_idle()
