"""Model and engine configuration: frozen dataclasses that check themselves.

`ModelConfig` is read from a Hugging Face `config.json` (or a dict of the same keys) and
normalises the differences between the Llama-family architectures Baton serves:

| architecture          | what differs                                             |
|-----------------------|----------------------------------------------------------|
| LlamaForCausalLM      | optional `attention_bias` / `mlp_bias`, llama3 rope      |
| MistralForCausalLM    | `sliding_window` (refused unless the context fits in it)  |
| Qwen2ForCausalLM      | bias on q/k/v (not on o_proj)                            |
| Qwen3ForCausalLM      | RMSNorm on q and k per head (`q_norm`, `k_norm`)          |

`EngineConfig` holds what the engine needs beyond the model: KV block size and pool size,
batching limits, dtype and device.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding parameters; `rope_type` picks how inverse frequencies are scaled."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v projections
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_hidden_layers * self.kv_size * dtype_bytes

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embed + h

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the keys of a Hugging Face `config.json` (transformers 4.x or 5.x)."""
        architectures = hf.get("architectures") or []
        if not architectures:
            raise ValueError("config.json has no 'architectures' entry; cannot pick a model")
        arch = architectures[0]
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // heads
        # transformers 5 moved rope settings into `rope_parameters`; 4.x had rope_theta +
        # rope_scaling at top level.
        rope_params = dict(hf.get("rope_parameters") or {})
        rope_scaling_raw = dict(hf.get("rope_scaling") or {})
        rope_theta = float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling_src = rope_scaling_raw or rope_params
        rope_type = scaling_src.get("rope_type", scaling_src.get("type", "default"))
        scaling_kwargs: dict[str, Any] = {"rope_type": rope_type}
        for key in (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ):
            if scaling_src.get(key) is not None:
                scaling_kwargs[key] = scaling_src[key]
        eos = hf.get("eos_token_id")
        eos_ids: tuple[int, ...] = (
            () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported; Baton's MLP is SiLU-gated")
        is_qwen2 = arch == "Qwen2ForCausalLM"
        sliding_window = hf.get("sliding_window")
        if is_qwen2 and not hf.get("use_sliding_window", False):
            sliding_window = None
        if arch == "Qwen3ForCausalLM" and not hf.get("use_sliding_window", False):
            sliding_window = None
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=RopeScaling(**scaling_kwargs),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if is_qwen2 else bool(hf.get("attention_bias", False)),
            o_proj_bias=False if is_qwen2 else bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=int(sliding_window) if sliding_window else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_path(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise ValueError(f"no config.json at {config_file}")
        return cls.from_hf_dict(json.loads(config_file.read_text()))


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs besides the weights.

    KV pool size: `num_kv_blocks` if given, else from `kv_cache_memory_bytes` (any device),
    else from `gpu_memory_utilization` (CUDA: the fraction of total GPU memory the process
    may use, weights and activations included).
    """

    model: ModelConfig
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False  # True: no CUDA graphs
    cuda_graph_max_batch: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be > 0, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv_cache_memory_bytes must be > 0")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be > 0, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be > 0, got {self.max_num_batched_tokens}"
            )
        max_len = self.resolved_max_model_len
        if max_len > self.model.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({max_len}) exceeds the model's max_position_embeddings "
                f"({self.model.max_position_embeddings})"
            )
        if max_len % self.block_size:
            raise ValueError(
                f"block_size ({self.block_size}) must divide max_model_len ({max_len}); "
                "pick a max_model_len that is a multiple of the block size"
            )
        window = self.model.sliding_window
        if window is not None and window < max_len:
            raise ValueError(
                f"the model uses a sliding window of {window} tokens, which Baton does not "
                f"implement; set max_model_len <= {window} to serve it exactly"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens})"
                f" must be >= max_model_len ({max_len}) so that every prompt fits one step"
            )

    @property
    def resolved_max_model_len(self) -> int:
        return self.max_model_len or self.model.max_position_embeddings

    @property
    def max_blocks_per_seq(self) -> int:
        return self.resolved_max_model_len // self.block_size

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)
