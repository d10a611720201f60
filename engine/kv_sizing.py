"""How many KV blocks the engine's pool gets: a fixed count, a byte budget, or on CUDA what
the GPU has left after the weights and the peak activations of a full step (measured by
running one)."""

from __future__ import annotations

import logging

import torch

from engine.attention import AttentionMetadata, make_backend
from engine.config import EngineConfig
from engine.kv_pool import KVPool, block_bytes
from engine.model import LlamaForCausalLM

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 256 * 2**20


def num_kv_blocks(
    cfg: EngineConfig, model: LlamaForCausalLM, dtype: torch.dtype, device: torch.device
) -> int:
    """Blocks for the pool, not counting the scratch block the engine adds beyond them."""
    per_block = block_bytes(cfg.model, cfg.block_size, dtype)
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    if cfg.kv_cache_memory_bytes is not None:
        budget = cfg.kv_cache_memory_bytes
    elif device.type == "cuda":
        budget = _profile_free_gpu_bytes(cfg, model, dtype, device)
    else:
        budget = DEFAULT_CPU_KV_BYTES
    num_blocks = budget // per_block - 1  # minus the scratch block
    if num_blocks < cfg.max_blocks_per_seq:
        log.warning(
            "KV pool of %d blocks holds less than one max-length sequence (%d blocks)",
            num_blocks,
            cfg.max_blocks_per_seq,
        )
    if num_blocks <= 0:
        raise ValueError(
            f"no room for the KV pool: budget {budget} bytes, {per_block} bytes per block"
        )
    return int(num_blocks)


@torch.inference_mode()
def _profile_free_gpu_bytes(
    cfg: EngineConfig, model: LlamaForCausalLM, dtype: torch.dtype, device: torch.device
) -> int:
    """GPU bytes left for KV after weights and the peak activations of a full step."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    tokens = cfg.max_num_batched_tokens
    probe_blocks = (tokens + cfg.block_size - 1) // cfg.block_size + 1
    probe_pool = KVPool(cfg.model, probe_blocks, cfg.block_size, dtype, device)
    backend = make_backend(probe_pool, cfg.model.num_attention_heads, cfg.model.head_dim)
    n = min(tokens, cfg.resolved_max_model_len)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, dtype=torch.long, device=device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        block_tables=torch.arange(probe_blocks, dtype=torch.int32, device=device)[None],
        num_prefill_seqs=1,
        num_prefill_tokens=n,
        max_query_len=n,
        query_lens_cpu=[n],
        seq_lens_cpu=[n],
    )
    ids = torch.zeros(n, dtype=torch.long, device=device)
    hidden = model(ids, torch.arange(n, device=device), backend, meta)
    rows = min(cfg.max_num_seqs, n)
    model.compute_logits(hidden[:rows])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - probe_pool.num_bytes
    del probe_pool, backend, hidden
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    # Memory outside torch's allocator (CUDA context, NCCL, other processes).
    free, _ = torch.cuda.mem_get_info(device)
    non_torch = total - free - torch.cuda.memory_reserved(device)
    budget = int(total * cfg.gpu_memory_utilization) - peak - non_torch
    log.info(
        "GPU memory: total %.1f GiB, weights+activations peak %.1f GiB, other %.1f GiB, "
        "KV budget %.1f GiB",
        total / 2**30,
        peak / 2**30,
        non_torch / 2**30,
        budget / 2**30,
    )
    return budget
