"""Fused elementwise kernels (engine/triton_ops.py) against the plain-torch reference path.

Runs on CUDA; with BATON_TRITON_INTERPRET=1 it runs on CPU under Triton's interpreter.
Outputs are poisoned before each launch, inputs are fresh random draws.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("BATON_TRITON_INTERPRET") == "1"
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not INTERPRET and not torch.cuda.is_available(),
        reason="needs CUDA (or BATON_TRITON_INTERPRET=1 for the CPU interpreter)",
    ),
]

import engine.triton_interpreter  # noqa: E402,F401  (patches the interpreter when interpreting)
from engine import triton_ops  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def ref_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 96), (33, 4096)])
def test_rms_norm_with_and_without_residual(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(shape[0])
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    r = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(shape[1], generator=g)).to(DEVICE, dtype)
    out = triton_ops.rms_norm(x, w, 1e-6)
    assert rel_err(out, ref_rms_norm(x, w, 1e-6)) < TOL[dtype]
    expected_sum = r + x
    residual = r.clone()
    out = triton_ops.rms_norm(x, w, 1e-6, residual=residual)
    if INTERPRET:  # the CPU interpreter truncates fp32 -> bf16 instead of rounding
        assert rel_err(residual, expected_sum) < TOL[dtype]
    else:
        assert torch.equal(residual, expected_sum)  # rounded exactly like torch's add
    assert rel_err(out, ref_rms_norm(expected_sum, w, 1e-6)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_cache_against_float64(dtype: torch.dtype) -> None:
    # q, k, v are strided views of one fused qkv projection, as in the model.
    g = torch.Generator().manual_seed(5)
    t, hq, hkv, d, max_len, num_blocks, bs = 7, 8, 2, 32, 64, 6, 4
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(DEVICE, dtype)
    q = qkv[:, : hq * d].reshape(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].reshape(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].reshape(t, hkv, d)
    positions = torch.randint(0, max_len, (t,), generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * bs, generator=g)[:t].to(DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.arange(max_len).float()[:, None] * inv_freq[None]
    emb = torch.cat((emb, emb), -1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)

    def ref(x: torch.Tensor) -> torch.Tensor:
        c, s = cos[positions][:, None].double(), sin[positions][:, None].double()
        xd = x.double()
        return xd * c + torch.cat((-xd[..., d // 2 :], xd[..., : d // 2]), -1) * s

    q_ref, k_ref = ref(q), ref(k)
    k_before, v_before = k.clone(), v.clone()
    k_cache = torch.full((num_blocks, bs, hkv, d), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    triton_ops.rotary_and_cache_(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    assert rel_err(q, q_ref) < TOL[dtype]  # rotated in place
    assert torch.equal(k, k_before) and torch.equal(v, v_before)  # k, v left as they were
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    assert rel_err(flat_k[slots], k_ref) < TOL[dtype]
    assert torch.equal(flat_v[slots], v_before)
    untouched = torch.ones(num_blocks * bs, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 128), (5, 3000)])
def test_silu_and_mul(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(shape[1])
    t, n = shape
    x = torch.randn(t, 2 * n, generator=g).to(DEVICE, dtype)
    ref = torch.nn.functional.silu(x[:, :n].double()) * x[:, n:].double()
    assert rel_err(triton_ops.silu_and_mul(x), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(40, 96), (130, 1000)])
def test_gemv_against_float64(dtype: torch.dtype, bias: bool, shape: tuple[int, int]) -> None:
    from engine.gemv import CANDIDATES, gemv

    g = torch.Generator().manual_seed(shape[0])
    n, k = shape  # neither a multiple of the blocks: masked edges on both axes
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    ref = x.double() @ w.double().T + (b.double() if b is not None else 0)
    for cfg in CANDIDATES:
        out = gemv(x, w, b, cfg)
        assert out.shape == (1, n) and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], cfg


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="tune times on CUDA only")
def test_engines_of_one_host_take_the_recorded_gemv_choices(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    # engine/gemv_choices.py: the first tune times and records; a second model of the same
    # shapes takes those choices without timing (gemv.choose would fail if called).
    from engine import gemv

    def model() -> torch.nn.Module:
        layers = [gemv.DecodeLinear(512, 1024, bias=False), gemv.DecodeLinear(512, 256)]
        return torch.nn.Sequential(*layers).to(DEVICE, torch.bfloat16)

    first = model()
    gemv.tune(first, tmp_path)
    assert len(list(tmp_path.glob("gemv-*.json"))) == 1

    def no_timing(*args: object) -> None:
        raise AssertionError("timed again")

    monkeypatch.setattr(gemv, "choose", no_timing)
    second = model()
    gemv.tune(second, tmp_path)
    for a, b in zip(first, second, strict=True):
        assert a.gemv_config == b.gemv_config
