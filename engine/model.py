"""Llama-family decoder written for serving: flat token batches, paged KV, fused projections.

The forward pass takes every token of a step in one flat batch (prefill chunks first, then one
token per decoding sequence) with its position; attention reads and writes the paged KV pool
through `AttentionBackend`, so the model itself holds no cache. Projections are fused
(q|k|v and gate|up) so that a decode step launches half the matrix products; the Hugging
Face checkpoint names are mapped onto the fused slices by `load_hf_weight`.

Covers Llama 2/3 (llama3 rope scaling), Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata
from engine.config import ModelConfig, RopeScaling
from engine.gemv import DecodeLinear


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        self.fused = _fused_ops(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and x.dim() == 2:
            return self.fused.rms_norm(x, self.weight, self.eps)
        # Same arithmetic as transformers' LlamaRMSNorm: normalise in fp32, scale in x's dtype.
        input_dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(input_dtype)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """residual + x, normalised; returns (normalised, new residual). One kernel on CUDA."""
        if self.fused is not None:
            return self.fused.rms_norm(x, self.weight, self.eps, residual=residual), residual
        residual = residual + x
        return self.forward(residual), residual


def _fused_ops(device: torch.device):  # -> the engine.triton_ops module, or None
    """Fused Triton kernels on CUDA; the plain-torch reference everywhere else."""
    if device.type != "cuda":
        return None
    from engine import triton_ops

    return triton_ops


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], float32, with the configured scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_len, computed once in fp32."""

    def __init__(self, config: ModelConfig, max_len: int, device: torch.device) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        positions = torch.arange(max_len, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_len, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, D]
        self.register_buffer("cos", emb.cos().to(device), persistent=False)
        self.register_buffer("sin", emb.sin().to(device), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain-torch rotation (CPU reference backend); on CUDA the attention backend
        applies the tables in its fused rotary + K/V-write kernel instead."""
        # q: [T, Hq, D], k: [T, Hkv, D], positions: [T]
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        kw = {"dtype": dtype, "device": device}
        self.qkv_proj = DecodeLinear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias, **kw
        )
        self.o_proj = DecodeLinear(self.q_size, config.hidden_size, bias=config.o_proj_bias, **kw)
        self.q_norm = (
            RMSNorm(self.head_dim, config.rms_norm_eps, dtype, device) if config.qk_norm else None
        )
        self.k_norm = (
            RMSNorm(self.head_dim, config.rms_norm_eps, dtype, device) if config.qk_norm else None
        )

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q + 2kv]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = backend.forward(self.layer_idx, q, k, v, meta, rotary, positions)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device, "bias": config.mlp_bias}
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = DecodeLinear(config.hidden_size, 2 * config.intermediate_size, **kw)
        self.down_proj = DecodeLinear(config.intermediate_size, config.hidden_size, **kw)
        self.fused = _fused_ops(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2I]
        if self.fused is not None:
            return self.down_proj(self.fused.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, dtype, device)
        self.mlp = MLP(config, dtype, device)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype, device
        )

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (mlp output, residual stream before it); the caller adds them.

        Keeping the residual stream separate lets each RMSNorm fuse the preceding add, in
        the same order as transformers: residual = residual + x, then normalise.
        """
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        a = self.self_attn(h, positions, rotary, backend, meta)
        h, residual = self.post_attention_layernorm.add_forward(a, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(
        self, config: ModelConfig, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, dtype=dtype, device=device
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype, device) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.rotary = RotaryEmbedding(config, max_len, device)


class LlamaForCausalLM(nn.Module):
    """One class for every supported architecture; `ModelConfig` carries the differences."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_len: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_len or config.max_position_embeddings, dtype, device)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else DecodeLinear(
                config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device
            )
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        meta: AttentionMetadata,
        on_layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden] after the final norm.

        `on_layer_done(i)` runs after layer i has written its K/V to the pool, so a prefill
        worker can start sending layer i while layers i+1.. still compute.
        """
        x = self.model.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, positions, self.model.rotary, backend, meta)
            if on_layer_done is not None:
                on_layer_done(layer.self_attn.layer_idx)
        assert residual is not None
        return self.model.norm.add_forward(x, residual)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in float32."""
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return F.linear(hidden, self.model.embed_tokens.weight).float()

    # ---- checkpoint mapping -------------------------------------------------------------

    def _hf_targets(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        """HF tensor name -> (our parameter, row offset, rows) for every expected tensor."""
        cfg = self.config
        q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        targets: dict[str, tuple[torch.Tensor, int, int]] = {}

        def whole(name: str, param: torch.Tensor) -> None:
            targets[name] = (param, 0, param.shape[0])

        whole("model.embed_tokens.weight", self.model.embed_tokens.weight)
        whole("model.norm.weight", self.model.norm.weight)
        if self.lm_head is not None:
            whole("lm_head.weight", self.lm_head.weight)
        for i, layer in enumerate(self.model.layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            for suffix in ("weight", "bias") if cfg.attention_bias else ("weight",):
                fused = getattr(attn.qkv_proj, suffix)
                targets[f"{p}self_attn.q_proj.{suffix}"] = (fused, 0, q)
                targets[f"{p}self_attn.k_proj.{suffix}"] = (fused, q, kv)
                targets[f"{p}self_attn.v_proj.{suffix}"] = (fused, q + kv, kv)
            whole(f"{p}self_attn.o_proj.weight", attn.o_proj.weight)
            if cfg.o_proj_bias:
                whole(f"{p}self_attn.o_proj.bias", attn.o_proj.bias)
            if attn.q_norm is not None and attn.k_norm is not None:
                whole(f"{p}self_attn.q_norm.weight", attn.q_norm.weight)
                whole(f"{p}self_attn.k_norm.weight", attn.k_norm.weight)
            for suffix in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                fused = getattr(mlp.gate_up_proj, suffix)
                targets[f"{p}mlp.gate_proj.{suffix}"] = (fused, 0, inter)
                targets[f"{p}mlp.up_proj.{suffix}"] = (fused, inter, inter)
                whole(f"{p}mlp.down_proj.{suffix}", getattr(mlp.down_proj, suffix))
            whole(f"{p}input_layernorm.weight", layer.input_layernorm.weight)
            whole(f"{p}post_attention_layernorm.weight", layer.post_attention_layernorm.weight)
        return targets

    def hf_weight_names(self) -> list[str]:
        return list(self._hf_targets())

    @torch.no_grad()
    def load_hf_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one Hugging Face-named tensor into its (slice of a fused) parameter."""
        targets = self._targets_cache()
        if name not in targets:
            raise ValueError(f"checkpoint tensor {name!r} does not belong to this model")
        param, offset, rows = targets[name]
        dest = param.data[offset : offset + rows]
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(dest.shape)}"
            )
        dest.copy_(tensor)

    def _targets_cache(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        cached = self.__dict__.get("_hf_targets_cached")
        if cached is None:
            cached = self._hf_targets()
            self.__dict__["_hf_targets_cached"] = cached
        return cached
