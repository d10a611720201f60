"""Block ownership and the prefix cache.

Every block of the pool is in exactly one of three places:

    referenced      ref_count > 0, in the block tables of ref_count sequences
    free, uncached  ref_count == 0, holds nothing reusable      (_free_uncached, FIFO)
    free, cached    ref_count == 0, full block with a hash      (_free_cached, LRU order)

A full block that has been computed is registered under a hash chained over its parent
block's hash, its tokens and the request's cache salt (so tenants with different salts never
share). A later request whose prompt hashes to the same chain reuses the block after
confirming the tokens match. Allocation takes uncached blocks first, then evicts the least
recently freed cached block. Freeing a sequence returns its blocks tail first, so the tail of
a prompt is evicted before its (more shareable) head.

All operations are O(1) per block.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from engine.sequence import Sequence

_ROOT = b"baton-prefix-v1"


def hash_block(parent: bytes | None, tokens: Seq[int], cache_salt: str) -> bytes:
    """Chained block hash, stable across processes (the router compares them too)."""
    h = hashlib.blake2b(digest_size=16)
    if parent is None:
        h.update(_ROOT)
        h.update(cache_salt.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    else:
        h.update(parent)
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


def block_hashes_for(
    token_ids: Seq[int], block_size: int, cache_salt: str, limit_tokens: int | None = None
) -> list[bytes]:
    """Hashes of the full blocks of token_ids[:limit_tokens]."""
    n = len(token_ids) if limit_tokens is None else min(limit_tokens, len(token_ids))
    hashes: list[bytes] = []
    parent: bytes | None = None
    for i in range(n // block_size):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], cache_salt)
        hashes.append(parent)
    return hashes


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens looked up at admission
    hit_tokens: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free_uncached: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[bytes, int] = {}
        self._block_hash: dict[int, bytes] = {}
        self._block_tokens: dict[int, tuple[int, ...]] = {}
        self.stats = PrefixCacheStats()

    # ---- counts ------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (uncached ones plus evictable cached ones)."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ---- prefix cache ------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold a prefix of seq's tokens, without taking references.

        At least one token is always left to compute (its logits produce the next token), so
        only blocks entirely within token_ids[:-1] can hit.
        """
        if not self.enable_prefix_caching:
            return []
        limit = seq.num_tokens - 1
        self._extend_hashes(seq, limit // self.block_size)
        hits: list[int] = []
        for i, h in enumerate(seq.block_hashes[: limit // self.block_size]):
            block = self._hash_to_block.get(h)
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            if block is None or self._block_tokens[block] != tokens:
                break
            hits.append(block)
        return hits

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        """Extend seq.block_hashes to cover its first num_blocks full blocks."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            seq.block_hashes.append(hash_block(parent, tokens, seq.cache_salt))

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register seq's full, computed blocks in the prefix cache (idempotent)."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        self._extend_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block = seq.block_table[i]
            if block in self._block_hash:
                continue
            h = seq.block_hashes[i]
            if h in self._hash_to_block:
                continue  # another sequence computed the same block first; keep theirs
            self._hash_to_block[h] = block
            self._block_hash[block] = h
            self._block_tokens[block] = tuple(
                seq.token_ids[i * self.block_size : (i + 1) * self.block_size]
            )
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    # ---- allocation --------------------------------------------------------------------

    def _take_free_block(self) -> int:
        if self._free_uncached:
            return self._free_uncached.popleft()
        block, _ = self._free_cached.popitem(last=False)  # least recently freed
        del self._hash_to_block[self._block_hash.pop(block)]
        del self._block_tokens[block]
        self.stats.evictions += 1
        return block

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self._free_cached.pop(block)
        self.ref_counts[block] += 1

    def admit(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give a waiting sequence its prefix hits plus blocks for num_new_tokens more.

        Sets num_computed_tokens to the cached length. All or nothing: returns False and
        changes nothing if the pool cannot hold it now.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        hits = self.match_prefix(seq)
        num_cached = len(hits) * self.block_size
        num_new_tokens = min(num_new_tokens, seq.num_tokens - num_cached)
        needed = self.blocks_for(num_cached + num_new_tokens) - len(hits)
        hits_now_free = sum(1 for b in hits if self.ref_counts[b] == 0)
        if needed + hits_now_free > self.num_free_blocks:
            return False
        for block in hits:
            self._ref(block)
        seq.block_table = list(hits)
        for _ in range(needed):
            block = self._take_free_block()
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        seq.num_computed_tokens = num_cached
        seq.num_registered_blocks = len(hits)
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = num_cached
            self.stats.queried_tokens += seq.num_prompt_tokens
            self.stats.hit_tokens += num_cached
        return True

    def grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make seq's block table cover num_new_tokens more tokens. All or nothing."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            block = self._take_free_block()
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def free(self, seq: Sequence) -> None:
        """Drop seq's references, tail first; blocks reaching zero become free."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                if block in self._block_hash:
                    self._free_cached[block] = None
                else:
                    self._free_uncached.append(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def check_idle(self) -> None:
        """Invariant when no sequence holds blocks: every block is free (cached or not)."""
        assert all(c == 0 for c in self.ref_counts), "blocks still referenced"
        assert self.num_free_blocks == self.num_blocks, (
            f"{self.num_blocks - self.num_free_blocks} blocks leaked"
        )
