"""Paged attention kernels on one GPU, each figure against a ceiling measured in this run.

    python loadtest/attention_bench.py --log results/attention.log

Llama-3-8B attention shape: 32 q heads, 8 kv heads, head_dim 128, block_size 16, bf16.

  ceilings  device-to-device copy of 2 GiB (bytes read + written) and a bf16 8192^3 matmul
  decode    batch 1 and 64 at context 1024, batch 64 at 4096: GB/s of K/V (+ q, out) bytes
            over the copy bandwidth. Each timing replays a CUDA graph of several launches
            over rotating block tables whose blocks together exceed L2, so batch 1 is not
            timed out of the cache.
  prefill   one 2048-token sequence with 0 and with 1024 cached tokens: TFLOP/s (visible
            query-key pairs only) against torch SDPA flash on the same shapes and the matmul.

Every launch configuration is first checked against an fp32 torch reference (decode) or
SDPA (prefill) on fresh random data; a variant that fails is reported and not timed.
The default row is the launch the kernels choose by themselves; the others are the sweep
from which that choice is tuned. A short table is printed last.

`--smoke` runs every code path at tiny sizes on CPU under TRITON_INTERPRET (timings there
mean nothing); it exists to catch script errors before a GPU run.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.triton_attention_config import (  # noqa: E402
    DecodeConfig,
    PrefillConfig,
    choose_decode_config,
    choose_prefill_config,
)
from engine.triton_decode_attention import paged_decode_attention  # noqa: E402
from engine.triton_prefill_attention import paged_prefill_attention, prefill_flops  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
ROTATION_BYTES = 256 * 2**20  # K/V touched per graph replay, >> 50-60 MB of L2


class Report:
    """Lines go to stdout and, as they come, to the log file (a killed run keeps its log)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self._file.write(line + "\n")
        self._file.flush()


@dataclass
class Env:
    device: torch.device
    smoke: bool

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# ---- timing ----------------------------------------------------------------------------------


def time_s(env: Env, fn: Callable[[], object], repeat: int = 30, warmup: int = 3) -> float:
    """Median seconds of one call, CUDA events around each call, after warm-up."""
    for _ in range(warmup):
        fn()
    env.sync()
    times = []
    for _ in range(repeat if not env.smoke else 1):
        if env.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_graph_s(env: Env, fns: list[Callable[[], object]], replays: int = 20) -> float:
    """Median seconds per launch of a CUDA graph holding one launch of each fn in turn."""
    if env.device.type != "cuda":
        return time_s(env, lambda: [fn() for fn in fns]) / len(fns)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return time_s(env, graph.replay, repeat=replays) / len(fns)


# ---- ceilings --------------------------------------------------------------------------------


def copy_bandwidth_gbs(env: Env) -> float:
    numel = (2**31 if not env.smoke else 2**20) // 2  # 2 GiB of bf16
    src = torch.randn(numel, dtype=DTYPE, device=env.device)
    dst = torch.empty_like(src)
    t = time_s(env, lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / t / 1e9


def matmul_tflops(env: Env) -> float:
    n = 8192 if not env.smoke else 256
    a = torch.randn(n, n, dtype=DTYPE, device=env.device)
    b = torch.randn(n, n, dtype=DTYPE, device=env.device)
    t = time_s(env, lambda: a @ b)
    return 2 * n**3 / t / 1e12


# ---- paged cache -----------------------------------------------------------------------------


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


def summary_rows(rows: list[Row]) -> list[tuple[str, Row]]:
    """The default launch's timings (first, then its repeat) and the fastest variant."""
    picked = [("default", r) for r in rows if r[0]][:1]
    picked += [("repeat", r) for r in rows if r[0]][1:2]
    return [*picked, ("best", min(rows, key=lambda r: r[1]))]


# ---- decode ----------------------------------------------------------------------------------


def decode_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, ctx: int
) -> torch.Tensor:
    """fp32 decode attention for equal context lengths. q: [B, Hq, D] -> [B, Hq, D]."""
    batch = q.shape[0]
    k = k_cache[tables.long()].flatten(1, 2)[:, :ctx].float()  # [B, ctx, Hkv, D]
    v = v_cache[tables.long()].flatten(1, 2)[:, :ctx].float()
    qg = q.float().view(batch, NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS, HEAD_DIM)
    scores = torch.einsum("bhgd,bnhd->bhgn", qg, k) * HEAD_DIM**-0.5
    out = torch.einsum("bhgn,bnhd->bhgd", scores.softmax(-1), v)
    return out.reshape(batch, NUM_HEADS, HEAD_DIM)


def decode_candidates(default: DecodeConfig, batch: int, env: Env) -> list[DecodeConfig]:
    if env.smoke:
        return [default, DecodeConfig(block_n=16, num_warps=4, num_stages=1, num_splits=3)]
    if batch == 1:
        shapes = [
            (64, 4, 3, 8),
            (64, 4, 3, 16),
            (32, 4, 3, 32),
            (32, 4, 2, 16),
            (16, 4, 2, 64),
            (128, 8, 2, 8),
        ]
    else:
        shapes = [
            (64, 4, 3, 1),
            (64, 4, 2, 1),
            (64, 4, 4, 1),
            (32, 4, 4, 1),
            (32, 2, 3, 1),
            (128, 4, 2, 1),
            (128, 8, 3, 1),
            (64, 8, 3, 1),
            (64, 4, 3, 2),
            (32, 4, 4, 2),
        ]
    configs = [default]
    for n, w, s, sp in shapes:
        config = DecodeConfig(block_n=n, num_warps=w, num_stages=s, num_splits=sp)
        if config not in configs:
            configs.append(config)
    return [*configs, default]  # the default again, last: its two timings show the spread


def bench_decode(env: Env, report: Report, batch: int, ctx: int, copy_gbs: float) -> list[str]:
    gen = torch.Generator().manual_seed(batch * 100003 + ctx)
    blocks_per_seq = ctx // BLOCK_SIZE
    itemsize = torch.tensor([], dtype=DTYPE).element_size()
    kv_bytes = batch * ctx * NUM_KV_HEADS * HEAD_DIM * 2 * itemsize
    qo_bytes = 2 * batch * NUM_HEADS * HEAD_DIM * itemsize
    num_tables = max(1, min(64, math.ceil(ROTATION_BYTES / kv_bytes))) if not env.smoke else 2
    num_launches = max(num_tables, 8) if not env.smoke else 2
    num_blocks, tables = random_tables(num_tables, batch, blocks_per_seq, gen)
    cache = random_cache(env, num_blocks, seed=batch + ctx)
    k_cache, v_cache = cache[0], cache[1]
    tables = tables.to(env.device)
    q = torch.randn((batch, NUM_HEADS, HEAD_DIM), generator=gen).to(dtype=DTYPE, device=env.device)
    ctx_lens = torch.full((batch,), ctx, dtype=torch.int32, device=env.device)
    out = torch.empty_like(q)
    ref = decode_reference(q, k_cache, v_cache, tables[0], ctx)
    scale = HEAD_DIM**-0.5

    default = choose_decode_config(
        batch, NUM_KV_HEADS, blocks_per_seq, BLOCK_SIZE, HEAD_DIM, DTYPE, env.device
    )
    report(
        f"decode B={batch} ctx={ctx}: KV {kv_bytes / 1e6:.1f} MB per launch, "
        f"{num_tables} rotating tables, {num_launches} launches per graph; default {default}"
    )
    title = f"decode B={batch} ctx={ctx}"
    rows: list[Row] = []
    for config in decode_candidates(default, batch, env):
        name = (
            f"n{config.block_n} w{config.num_warps} s{config.num_stages} split{config.num_splits}"
        )
        out.fill_(float("nan"))
        try:
            paged_decode_attention(
                q, k_cache, v_cache, tables[0], ctx_lens, scale, out=out, config=config
            )
        except Exception as exc:  # e.g. OutOfResources for a shape the card cannot hold
            report(f"  {name}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
            continue
        err = rel_err(out, ref)
        if not err < 1e-2:
            report(f"  {name}: WRONG rel err {err:.2e}, not timed")
            continue

        def launch(i: int, config: DecodeConfig = config) -> Callable[[], object]:
            table = tables[i % num_tables]
            return lambda: paged_decode_attention(
                q, k_cache, v_cache, table, ctx_lens, scale, out=out, config=config
            )

        t = time_graph_s(env, [launch(i) for i in range(num_launches)])
        gbs = (kv_bytes + qo_bytes) / t / 1e9
        tag = " (default)" if config == default else ""
        report(
            f"  {name}{tag}: {t * 1e6:8.2f} us  {gbs:7.1f} GB/s  {gbs / copy_gbs:5.1%} of copy  "
            f"rel err {err:.1e}"
        )
        rows.append((config == default, t, gbs, name))
    if not rows:
        return [f"{title}: every variant failed (see log)"]
    lines = []
    for label, row in summary_rows(rows):
        lines.append(
            f"decode B={batch:<3d} ctx={ctx:<5d} {label:7s} {row[3]:<22s} "
            f"{row[1] * 1e6:8.1f} us {row[2]:7.0f} GB/s {row[2] / copy_gbs:6.1%} of copy"
        )
    return lines


# ---- prefill ---------------------------------------------------------------------------------


def prefill_candidates(default: PrefillConfig, env: Env) -> list[PrefillConfig]:
    if env.smoke:
        return [PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)]
    configs = [default]
    for m, n, w, s in [
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 64, 4, 3),
        (64, 64, 4, 3),
        (128, 32, 8, 4),
        (64, 32, 4, 4),
        (128, 64, 4, 4),
    ]:
        config = PrefillConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)
        if config not in configs:
            configs.append(config)
    return [*configs, default]  # the default again, last: its two timings show the spread


def bench_prefill(env: Env, report: Report, ctx: int, matmul: float) -> list[str]:
    q_len = 2048 if not env.smoke else 48
    ctx = ctx if not env.smoke else ctx // 32
    seq_len = ctx + q_len
    gen = torch.Generator().manual_seed(7 + ctx)
    blocks = math.ceil(seq_len / BLOCK_SIZE)
    num_blocks, tables = random_tables(1, 1, blocks, gen)
    table = tables[0].to(env.device)  # [1, blocks]
    cache = random_cache(env, num_blocks, seed=ctx)
    k_cache, v_cache = cache[0], cache[1]
    q = torch.randn((q_len, NUM_HEADS, HEAD_DIM), generator=gen).to(dtype=DTYPE, device=env.device)
    qsl = torch.tensor([0, q_len], dtype=torch.int32, device=env.device)
    lens = torch.tensor([seq_len], dtype=torch.int32, device=env.device)
    scale = HEAD_DIM**-0.5
    flops = prefill_flops([q_len], [seq_len], NUM_HEADS, HEAD_DIM)

    # SDPA on the same data, K/V contiguous with heads repeated: [1, Hq, L, D].
    group = NUM_HEADS // NUM_KV_HEADS
    k = gather(k_cache, table[0], seq_len).repeat_interleave(group, 1).transpose(0, 1)[None]
    v = gather(v_cache, table[0], seq_len).repeat_interleave(group, 1).transpose(0, 1)[None]
    qs = q.transpose(0, 1)[None]  # [1, Hq, q_len, D]
    if ctx == 0:

        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale)
    else:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q_len, seq_len)

        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)

    backend = "default"
    if env.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_plain = sdpa

        def sdpa() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa_plain()

        backend = "flash"
    ref = sdpa()[0].transpose(0, 1)  # [q_len, Hq, D]
    t_sdpa = time_s(env, sdpa)
    sdpa_tflops = flops / t_sdpa / 1e12
    report(
        f"prefill q={q_len} ctx={ctx}: {flops / 1e12:.3f} TFLOP; SDPA ({backend}) "
        f"{t_sdpa * 1e3:.3f} ms {sdpa_tflops:.1f} TFLOP/s ({sdpa_tflops / matmul:.1%} of matmul)"
    )

    default = choose_prefill_config(q_len, HEAD_DIM, DTYPE)
    out = torch.empty_like(q)
    title = f"prefill q={q_len} ctx={ctx}"
    rows: list[Row] = []
    for config in prefill_candidates(default, env):
        name = f"m{config.block_m} n{config.block_n} w{config.num_warps} s{config.num_stages}"
        out.fill_(float("nan"))

        def run(config: PrefillConfig = config) -> torch.Tensor:
            return paged_prefill_attention(
                q, k_cache, v_cache, table, qsl, lens, q_len, scale, out=out, config=config
            )

        try:
            run()
        except Exception as exc:  # e.g. OutOfResources for a shape the card cannot hold
            report(f"  {name}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
            continue
        err = rel_err(out, ref)
        if not err < 1e-2:
            report(f"  {name}: WRONG rel err vs SDPA {err:.2e}, not timed")
            continue
        t = time_s(env, run)
        tflops = flops / t / 1e12
        tag = " (default)" if config == default else ""
        report(
            f"  {name}{tag}: {t * 1e3:7.3f} ms {tflops:6.1f} TFLOP/s  {tflops / sdpa_tflops:5.1%} "
            f"of SDPA  {tflops / matmul:5.1%} of matmul  rel err vs SDPA {err:.1e}"
        )
        rows.append((config == default, t, tflops, name))
    if not rows:
        return [f"{title}: every variant failed (see log)"]
    lines = [
        f"prefill q={q_len} ctx={ctx:<5d} SDPA-{backend:14s} {t_sdpa * 1e3:8.3f} ms "
        f"{sdpa_tflops:6.1f} TFLOP/s {sdpa_tflops / matmul:6.1%} of matmul"
    ]
    for label, row in summary_rows(rows):
        lines.append(
            f"prefill q={q_len} ctx={ctx:<5d} {label:7s} {row[3]:<14s} {row[1] * 1e3:8.3f} ms "
            f"{row[2]:6.1f} TFLOP/s {row[2] / matmul:6.1%} of matmul "
            f"{row[2] / sdpa_tflops:6.1%} of SDPA"
        )
    return lines


# ---- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, required=True, help="where the full log is written")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET"
    )
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("attention_bench needs CUDA (or --smoke for a CPU interpreter run)")
    env = Env(device=torch.device("cuda" if not args.smoke else "cpu"), smoke=args.smoke)
    report = Report(args.log)
    import triton

    card = torch.cuda.get_device_name() if env.device.type == "cuda" else "cpu (interpreter)"
    report(f"card: {card}; torch {torch.__version__}; triton {triton.__version__}")
    copy_gbs = copy_bandwidth_gbs(env)
    matmul = matmul_tflops(env)
    report(
        f"copy bandwidth (read + written): {copy_gbs:.0f} GB/s; bf16 matmul 8192^3: {matmul:.0f} TFLOP/s"
    )

    table = [
        f"card: {card}",
        f"ceilings: copy {copy_gbs:.0f} GB/s, bf16 matmul {matmul:.0f} TFLOP/s",
    ]
    for batch, ctx in [(1, 1024), (64, 1024), (64, 4096)]:
        if env.smoke:
            ctx //= 32
            batch = min(batch, 3)
        table += bench_decode(env, report, batch, ctx, copy_gbs)
        env.sync()
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    for ctx in (0, 1024):
        table += bench_prefill(env, report, ctx, matmul)
    report()
    report("==== summary ====")
    for line in table:
        report(line)


if __name__ == "__main__":
    main()
