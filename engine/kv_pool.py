"""The paged KV pool: one preallocated tensor per worker, addressed by block id.

Layout, one allocation for the whole model:

    cache: [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]

so the K (or V) rows of one block of one layer are contiguous: a block is the unit of
allocation, of prefix sharing and of transfer (`read_blocks` / `write_blocks` move whole
blocks of one layer, which is what the KV-transfer service streams). Token t of a sequence
lives in block `block_table[t // block_size]` at offset `t % block_size`; its flat "slot" is
`block_id * block_size + offset`.

The pool never grows: its size is fixed at start-up from a block count or a byte budget.
Ownership of blocks is tracked by `BlockManager`, not here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from engine.config import ModelConfig

log = logging.getLogger(__name__)


def dtype_from_name(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def block_bytes(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block across all layers."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return model.kv_bytes_per_token(elem) * block_size


class KVPool:
    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_layers = model.num_hidden_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = model.num_key_value_heads
        self.head_dim = model.head_dim
        self.dtype = dtype
        self.device = device
        # Never zero-filled on purpose: every slot is written before it is read.
        self.cache = torch.empty(
            (self.num_layers, 2, num_blocks, block_size, self.num_kv_heads, self.head_dim),
            dtype=dtype,
            device=device,
        )
        log.info(
            "KV pool: %d blocks x %d tokens = %d tokens, %.1f MiB on %s",
            num_blocks,
            block_size,
            self.capacity_tokens,
            self.num_bytes / 2**20,
            device,
        )

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.cache.numel() * self.cache.element_size()

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """Shape of the K (or V) rows of one block of one layer."""
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def layer_block_bytes(self) -> int:
        """Bytes of K and V of one block of one layer: the unit the transfer service moves."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.cache.element_size()

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each [num_blocks, block_size, Hkv, D]; views."""
        return self.cache[layer_idx, 0], self.cache[layer_idx, 1]

    def _index(self, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(block_ids, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_blocks):
            raise ValueError(f"block ids out of range [0, {self.num_blocks})")
        return ids.to(self.device)

    def read_blocks(self, layer_idx: int, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Copy out K and V of `block_ids` in one layer: [2, n, block_size, Hkv, D]."""
        return self.cache[layer_idx].index_select(1, self._index(block_ids))

    def write_blocks(
        self, layer_idx: int, block_ids: Sequence[int] | torch.Tensor, data: torch.Tensor
    ) -> None:
        """Write K and V of `block_ids` in one layer from data [2, n, block_size, Hkv, D]."""
        ids = self._index(block_ids)
        expected = (2, ids.numel(), *self.block_shape)
        if tuple(data.shape) != expected:
            raise ValueError(f"KV data has shape {tuple(data.shape)}, expected {expected}")
        self.cache[layer_idx].index_copy_(1, ids, data.to(device=self.device, dtype=self.dtype))
