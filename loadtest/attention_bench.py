"""Paged attention kernels on one GPU, each figure against a ceiling measured in this run.

    python loadtest/attention_bench.py --log results/attention.log

Llama-3-8B attention shape: 32 q heads, 8 kv heads, head_dim 128, block_size 16, bf16
(attention_paged_cache.py). A run, in order:

  ceilings  device-to-device copy of 2 GiB (bytes read + written) and a bf16 8192^3 matmul,
            measured here
  decode    batch 1 and 64 at context 1024, batch 64 at 4096: GB/s over the copy bandwidth
            (attention_decode_bench.py)
  prefill   one 2048-token sequence with 0 and with 1024 cached tokens: TFLOP/s against
            torch SDPA flash and the matmul (attention_prefill_bench.py)

Every launch configuration is first checked against a reference on fresh random data; a
variant that fails is reported and not timed. Timing and the log are in attention_timing.py.
A short table is printed last.

`--smoke` runs every code path at tiny sizes on CPU under TRITON_INTERPRET (timings there
mean nothing); it exists to catch script errors before a GPU run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The kernels' modules are imported below, after TRITON_INTERPRET is set for --smoke.
from loadtest.attention_decode_bench import bench_decode  # noqa: E402
from loadtest.attention_paged_cache import DTYPE  # noqa: E402
from loadtest.attention_prefill_bench import bench_prefill  # noqa: E402
from loadtest.attention_timing import Env, Report, time_s  # noqa: E402

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
