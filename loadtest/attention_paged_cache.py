"""The paged KV cache the attention benchmark runs on, and what decode and prefill share.

Llama-3-8B attention shape: 32 q heads, 8 kv heads, head_dim 128, block_size 16, bf16.
Block tables are disjoint draws over a shuffled pool (block 0 left out, as the engine keeps
it for padding); caches are N(0, 1) drawn on the device. `rel_err` is the correctness check
every launch passes before it is timed; `summary_rows` picks the default launch's two
timings and the fastest variant for the summary table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loadtest.attention_timing import Env

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16


def random_tables(
    num_tables: int, batch: int, blocks_per_seq: int, gen: torch.Generator
) -> tuple[int, torch.Tensor]:
    """num_tables disjoint block tables [batch, blocks_per_seq] over a shuffled pool.

    Returns (num_blocks, tables [num_tables, batch, blocks_per_seq] int32). Block 0 is left
    out, as the engine keeps it for padding.
    """
    needed = num_tables * batch * blocks_per_seq
    ids = torch.randperm(needed, generator=gen) + 1
    return needed + 1, ids.view(num_tables, batch, blocks_per_seq).to(torch.int32)


def random_cache(env: Env, num_blocks: int, seed: int) -> torch.Tensor:
    """[2, num_blocks, BLOCK_SIZE, Hkv, D] of N(0, 1) in DTYPE, drawn on the device."""
    gen = torch.Generator(device=env.device).manual_seed(seed)
    shape = (2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return torch.randn(shape, generator=gen, device=env.device, dtype=DTYPE)


def gather(cache: torch.Tensor, table: torch.Tensor, seq_len: int) -> torch.Tensor:
    # cache: [num_blocks, BS, Hkv, D], table: [blocks] -> [seq_len, Hkv, D]
    return cache[table.long()].flatten(0, 1)[:seq_len]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


Row = tuple[bool, float, float, str]  # (is the default launch, seconds, rate, name)


def check_variant(
    report: Callable[[str], None],
    name: str,
    out: torch.Tensor,
    run: Callable[[], object],
    ref: torch.Tensor,
) -> float | None:
    """One launch variant, before it is timed: `out` poisoned, one run into it, compared with
    `ref`. Its relative error, or None (reported) when it fails to launch or is wrong."""
    out.fill_(float("nan"))
    try:
        run()
    except Exception as exc:  # e.g. OutOfResources for a shape the card cannot hold
        report(f"  {name}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
        return None
    err = rel_err(out, ref)
    if not err < 1e-2:
        report(f"  {name}: WRONG rel err {err:.2e}, not timed")
        return None
    return err


def summary_rows(rows: list[Row]) -> list[tuple[str, Row]]:
    """The default launch's timings (first, then its repeat) and the fastest variant."""
    picked = [("default", r) for r in rows if r[0]][:1]
    picked += [("repeat", r) for r in rows if r[0]][1:2]
    return [*picked, ("best", min(rows, key=lambda r: r[1]))]
