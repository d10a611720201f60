"""The router's estimate of what each worker holds in its prefix cache.

Workers do not ship their cache contents (a GPU pool holds ~10^5 blocks); the router
remembers instead the block hashes of the prompts it sent to each worker, with the same
chained hash the engine uses (`engine.block_manager.block_hashes_for`), in LRU order and
bounded by the worker's pool size. A match is the number of leading full blocks of a prompt
found there. It is an estimate: the worker may have evicted blocks since (a miss costs only
a recompute), and blocks computed for another router are not seen.

Cost: one blake2b per 16-token block per request, and dictionary lookups.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from engine.block_manager import block_hashes_for


def prompt_block_hashes(prompt: Sequence[int], block_size: int, cache_salt: str) -> list[bytes]:
    """Hashes of the blocks a prefix-cache hit can cover (never the prompt's last token)."""
    return block_hashes_for(prompt, block_size, cache_salt, limit_tokens=len(prompt) - 1)


class PrefixIndex:
    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match_blocks(self, hashes: Sequence[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[bytes]) -> None:
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
