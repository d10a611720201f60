"""ModelConfig from Hugging Face config dicts, EngineConfig and SamplingParams validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig, ModelConfig, RopeScaling
from engine.presets import preset, preset_hf_config
from engine.sampling_params import SamplingParams


def llama_dict(**overrides: Any) -> dict[str, Any]:
    """A Llama-3-style config.json as transformers 4.x wrote it (top-level rope keys)."""
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 1000,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128009],
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0",
    }
    hf.update(overrides)
    return hf


# ---- ModelConfig.from_hf_dict --------------------------------------------------------------


def test_llama3_transformers4_style() -> None:
    cfg = ModelConfig.from_hf_dict(llama_dict())
    assert cfg == ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        tie_word_embeddings=False,
        attention_bias=False,
        o_proj_bias=False,
        mlp_bias=False,
        qk_norm=False,
        sliding_window=None,
        bos_token_id=128000,
        eos_token_ids=(128001, 128009),
    )
    assert cfg.q_size == 256 and cfg.kv_size == 64
    assert cfg.kv_bytes_per_token(2) == 2 * 4 * 64 * 2


def test_llama3_transformers5_style_rope_parameters() -> None:
    hf = llama_dict()
    rope = {"rope_theta": hf.pop("rope_theta"), **hf.pop("rope_scaling")}
    hf["rope_parameters"] = rope
    assert ModelConfig.from_hf_dict(hf) == ModelConfig.from_hf_dict(llama_dict())


def test_rope_defaults_and_legacy_type_key() -> None:
    plain = ModelConfig.from_hf_dict(llama_dict(rope_scaling=None, rope_theta=250000.0))
    assert plain.rope_theta == 250000.0
    assert plain.rope_scaling == RopeScaling()
    missing = llama_dict(rope_scaling=None)
    del missing["rope_theta"]
    assert ModelConfig.from_hf_dict(missing).rope_theta == 10000.0
    linear = ModelConfig.from_hf_dict(llama_dict(rope_scaling={"type": "linear", "factor": 2.0}))
    assert linear.rope_scaling == RopeScaling(rope_type="linear", factor=2.0)
    v5_default = llama_dict(rope_scaling=None)
    del v5_default["rope_theta"]
    v5_default["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
    cfg = ModelConfig.from_hf_dict(v5_default)
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling == RopeScaling()


def test_llama_biases_ties_and_single_eos() -> None:
    cfg = ModelConfig.from_hf_dict(
        llama_dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True, eos_token_id=2)
    )
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, True)
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == (2,)
    no_eos = llama_dict()
    del no_eos["eos_token_id"]
    assert ModelConfig.from_hf_dict(no_eos).eos_token_ids == ()


def test_missing_kv_heads_means_multi_head_attention() -> None:
    hf = llama_dict()
    del hf["num_key_value_heads"]
    assert ModelConfig.from_hf_dict(hf).num_key_value_heads == 8


def test_mistral() -> None:
    hf = {
        "architectures": ["MistralForCausalLM"],
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": None,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg = ModelConfig.from_hf_dict(hf)
    assert cfg.architecture == "MistralForCausalLM"
    assert cfg.head_dim == 128 and cfg.num_key_value_heads == 8
    assert cfg.sliding_window == 4096
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.qk_norm) == (False, False, False)
    assert cfg.eos_token_ids == (2,) and cfg.rope_theta == 1e6
    assert ModelConfig.from_hf_dict({**hf, "sliding_window": None}).sliding_window is None


def qwen_dict(arch: str, **overrides: Any) -> dict[str, Any]:
    hf: dict[str, Any] = {
        "architectures": [arch],
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }
    hf.update(overrides)
    return hf


def test_qwen2_has_qkv_bias_but_no_o_proj_bias() -> None:
    cfg = ModelConfig.from_hf_dict(qwen_dict("Qwen2ForCausalLM"))
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias, cfg.qk_norm) == (
        True,
        False,
        False,
        False,
    )
    assert cfg.head_dim == 64
    assert cfg.sliding_window is None  # use_sliding_window is off
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == (151645,)
    windowed = ModelConfig.from_hf_dict(qwen_dict("Qwen2ForCausalLM", use_sliding_window=True))
    assert windowed.sliding_window == 32768


def test_qwen3_has_qk_norm_and_its_own_head_dim() -> None:
    hf = qwen_dict("Qwen3ForCausalLM", head_dim=128, attention_bias=False)
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_theta": 1000000.0, "rope_type": "default"}
    cfg = ModelConfig.from_hf_dict(hf)
    assert cfg.qk_norm
    assert cfg.head_dim == 128 and cfg.q_size == 2048 and cfg.kv_size == 1024
    assert (cfg.attention_bias, cfg.o_proj_bias) == (False, False)
    assert cfg.sliding_window is None
    assert cfg.rope_theta == 1e6


def test_from_path(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(llama_dict()))
    expected = ModelConfig.from_hf_dict(llama_dict())
    assert ModelConfig.from_path(tmp_path) == expected
    assert ModelConfig.from_path(tmp_path / "config.json") == expected
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig.from_path(tmp_path / "absent")


def test_unsupported_architecture() -> None:
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' is not supported"):
        ModelConfig.from_hf_dict(llama_dict(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match="no 'architectures'"):
        ModelConfig.from_hf_dict(llama_dict(architectures=[]))


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_type(rope_type: str) -> None:
    with pytest.raises(ValueError, match=f"rope_type='{rope_type}' is not supported"):
        ModelConfig.from_hf_dict(llama_dict(rope_scaling={"rope_type": rope_type, "factor": 4.0}))


def test_model_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"num_attention_heads \(8\) must be a multiple"):
        ModelConfig.from_hf_dict(llama_dict(num_key_value_heads=3))
    with pytest.raises(ValueError, match="vocab_size must be > 0"):
        ModelConfig.from_hf_dict(llama_dict(vocab_size=0))
    with pytest.raises(ValueError, match="rope_scaling.factor must be > 0"):
        RopeScaling(rope_type="linear", factor=0.0)


def test_model_config_is_frozen() -> None:
    cfg = preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vocab_size = 1  # type: ignore[misc]


def test_presets() -> None:
    assert preset("tiny").vocab_size == 320
    big = preset("llama3-8b")
    assert big.num_parameters() == 8_030_261_248  # Llama-3-8B's published count
    assert preset_hf_config("tiny") is not preset_hf_config("tiny")
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        preset("nope")


# ---- EngineConfig --------------------------------------------------------------------------


def test_engine_config_defaults() -> None:
    cfg = EngineConfig(model=preset("tiny"))
    assert cfg.resolved_max_model_len == 1024
    assert cfg.max_blocks_per_seq == 64
    short = cfg.replace(max_model_len=256, block_size=32)
    assert short.max_blocks_per_seq == 8 and short.model is cfg.model
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dtype": "float64"}, "dtype must be"),
        ({"block_size": 12}, "block_size must be a power of two"),
        ({"block_size": 0}, "block_size must be a power of two"),
        ({"max_model_len": 100}, r"block_size \(16\) must divide max_model_len \(100\)"),
        ({"block_size": 64, "max_model_len": 96}, r"block_size \(64\) must divide"),
        ({"max_model_len": 2048}, r"max_model_len \(2048\) exceeds .* \(1024\)"),
        ({"num_kv_blocks": 0}, "num_kv_blocks must be > 0"),
        ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes must be > 0"),
        ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization must be in"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be in"),
        ({"max_num_seqs": 0}, "max_num_seqs must be > 0"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be > 0"),
        (
            {"enable_chunked_prefill": False, "max_num_batched_tokens": 512},
            r"without chunked prefill, max_num_batched_tokens \(512\) must be >= max_model_len",
        ),
    ],
)
def test_engine_config_errors(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(model=preset("tiny"), **changes)


def test_sliding_window_shorter_than_the_context_is_refused() -> None:
    windowed = dataclasses.replace(
        preset("tiny"), architecture="MistralForCausalLM", sliding_window=256
    )
    with pytest.raises(ValueError, match="sliding window of 256 tokens.*max_model_len <= 256"):
        EngineConfig(model=windowed)
    assert EngineConfig(model=windowed, max_model_len=256).resolved_max_model_len == 256


def test_chunked_prefill_off_with_a_budget_covering_the_context() -> None:
    cfg = EngineConfig(
        model=preset("tiny"),
        enable_chunked_prefill=False,
        max_model_len=512,
        max_num_batched_tokens=512,
    )
    assert not cfg.enable_chunked_prefill


# ---- SamplingParams ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", -2),
        ("top_k", 2.0),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", float("nan")),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("presence_penalty", 2.5),
        ("presence_penalty", float("nan")),
        ("frequency_penalty", -2.5),
        ("seed", -1),
        ("seed", 2**63),
        ("seed", "7"),
        ("stop_token_ids", (-1,)),
        ("stop_token_ids", tuple(range(65))),
        ("stop", ("",)),
        ("stop", ("x" * 257,)),
        ("stop", tuple(f"s{i}" for i in range(17))),
        ("logprobs", -1),
        ("logprobs", 21),
    ],
)
def test_sampling_params_invalid_field_is_named(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_valid_edges() -> None:
    params = SamplingParams(
        max_tokens=1,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        min_p=1.0,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        seed=2**63 - 1,
        stop_token_ids=[5, 6],  # type: ignore[arg-type]
        stop=["</s>"],  # type: ignore[arg-type]
        logprobs=20,
    )
    assert params.stop_token_ids == (5, 6) and params.stop == ("</s>",)
    assert params.greedy and params.has_penalties
    assert not SamplingParams(temperature=0.5).greedy
    assert not SamplingParams().has_penalties
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(top_k=-1).top_k == -1
