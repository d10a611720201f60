"""Named model shapes, as Hugging Face config dicts: `tiny` for tests, real shapes for benchmarks."""

from __future__ import annotations

from typing import Any

from engine.config import ModelConfig

PRESETS: dict[str, dict[str, Any]] = {
    # A few hundred thousand parameters; vocabulary covers the built-in byte tokenizer.
    "tiny": {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 256,
        "eos_token_id": 257,
    },
    # Llama-3-8B's shape (Llama 3.0: no rope scaling; random weights in benchmarks: no checkpoint can be downloaded).
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128009],
    },
}


def preset_hf_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])


def preset(name: str) -> ModelConfig:
    return ModelConfig.from_hf_dict(preset_hf_config(name))
