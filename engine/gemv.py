"""Matrix-vector products for batch-1 decode: a Triton GEMV where it beats cuBLAS, per shape.

Why: at batch 1 a decode step is ~15 GB of weight reads through five products per layer
(qkv, o, gate_up, down) plus the logits. Measured on an H100 (loadtest/decode_profile.py,
2026-11-27), cuBLAS reads the large ones at ~0.9 of the copy bandwidth but the 4096 x 4096
o_proj at 0.43 and the 6144 x 4096 qkv at 0.75 (split-K kernels plus a reduce launch), about
0.7 ms of a 6.8 ms step above the floor. A plain GEMV — each program owns `BLOCK_N` output
rows, streams its rows of W once in `BLOCK_K` slices and keeps per-lane fp32 partial sums,
reduced once at the end — keeps enough bytes in flight on every SM without a second kernel.

Which one runs is measured, not assumed: `tune(model)` times cuBLAS and a few launch shapes
for every distinct weight shape once at start-up (CUDA only) and stores the winner on the
layer; `DecodeLinear` uses it for single-row inputs and cuBLAS otherwise. The first engine
on a host to time a shape records the winner for the others (engine/gemv_choices.py), so
engines of one host do not differ in the last bit by timing noise. Arithmetic: fp32
accumulation of bf16 products, one rounding of the sum (as cuBLAS), in a different order, so
results may differ from cuBLAS in the last bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.gemv_choices import Choice, HostChoices, ShapeKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int


CANDIDATES = (
    GemvConfig(4, 1024, 4),
    GemvConfig(8, 512, 4),
    GemvConfig(8, 1024, 8),
    GemvConfig(16, 512, 8),
)


def _kernel():  # compiled lazily: triton exists only where CUDA does
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        n,
        k,
        w_stride,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < k
            x = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + rows[:, None].to(tl.int64) * w_stride + cols[None, :],
                mask=rmask[:, None] & cmask[None, :],
                other=0.0,
            )
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)

    return gemv_kernel


_GEMV = None


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig
) -> torch.Tensor:
    """x: [1, K], weight: [N, K] (row-major), bias: [N] or None -> [1, N] in x's dtype."""
    global _GEMV
    if _GEMV is None:
        _GEMV = _kernel()
    n, k = weight.shape
    assert x.shape == (1, k) and x.stride(-1) == 1 and weight.stride(-1) == 1
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    grid = ((n + config.block_n - 1) // config.block_n,)
    _GEMV[grid](
        x,
        weight,
        weight if bias is None else bias,
        out,
        n,
        k,
        weight.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
    )
    return out


class DecodeLinear(nn.Linear):
    """nn.Linear whose single-row products may run the tuned GEMV (see `tune`)."""

    gemv_config: GemvConfig | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv_config is not None and x.dim() == 2 and x.shape[0] == 1:
            return gemv(x, self.weight, self.bias, self.gemv_config)
        return F.linear(x, self.weight, self.bias)


def _time_us(fn, repeat: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / repeat


def choose(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[GemvConfig | None, dict]:
    """The fastest of cuBLAS (None) and the candidates for a [1, K] x [N, K]^T product."""
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    timings = {"cublas": _time_us(lambda: F.linear(x, weight, bias))}
    best, best_us = None, timings["cublas"]
    ref = F.linear(x, weight, bias).float()
    for cfg in CANDIDATES:
        out = gemv(x, weight, bias, cfg).float()
        # A wrong kernel must never win: same products, only the summation order differs.
        if not torch.allclose(out, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
            log.warning("gemv %s disagrees with cuBLAS on %s; not used", cfg, tuple(weight.shape))
            continue
        us = _time_us(lambda cfg=cfg: gemv(x, weight, bias, cfg))
        timings[f"{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}"] = us
        if us < best_us * 0.97:  # only a clear win replaces cuBLAS
            best, best_us = cfg, us
    return best, timings


@torch.inference_mode()
def tune(model: nn.Module, cache_dir: Path | None = None) -> None:
    """Pick cuBLAS or a GEMV launch shape for every DecodeLinear in `model` (CUDA only),
    once per distinct weight shape, the same as every other engine on this host
    (engine/gemv_choices.py: the first to time a shape records it; cache_dir None: the
    default folder); logs the timings of what it times itself."""
    layers = [m for m in model.modules() if isinstance(m, DecodeLinear)]
    if not layers or layers[0].weight.device.type != "cuda":
        return
    by_shape = {(*m.weight.shape, m.bias is not None): m for m in reversed(layers)}

    def time_shape(key: ShapeKey) -> Choice:
        layer = by_shape[key]
        config, timings = choose(layer.weight, layer.bias)
        log.info("M=1 product %s: %s (us: %s)", key[:2], config or "cuBLAS",
                 ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))  # fmt: skip
        return None if config is None else (config.block_n, config.block_k, config.num_warps)

    choices = HostChoices(_combination(layers[0].weight.device), cache_dir).choose(
        by_shape, time_shape
    )
    for layer in layers:
        choice = choices[(*layer.weight.shape, layer.bias is not None)]
        layer.gemv_config = None if choice is None else GemvConfig(*choice)


def _combination(device: torch.device) -> str:
    """What the recorded choices hold for: the GPU model, the software, the candidates."""
    import triton

    return "; ".join((
        torch.cuda.get_device_name(device),
        f"torch {torch.__version__}",
        f"cuda {torch.version.cuda}",
        f"triton {triton.__version__}",
        f"candidates {[(c.block_n, c.block_k, c.num_warps) for c in CANDIDATES]}",
    ))  # fmt: skip
