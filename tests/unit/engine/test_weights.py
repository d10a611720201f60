from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

import engine.weights as weights
from engine.config import ModelConfig
from engine.model import LlamaForCausalLM
from engine.weights import (
    init_dummy_weights,
    iter_checkpoint_tensors,
    load_checkpoint,
)


class FakeModel:
    """Records what it is given; validates names and shapes like the real model."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.loaded: dict[str, torch.Tensor] = {}

    def hf_weight_names(self) -> list[str]:
        return list(self.shapes)

    def load_hf_weight(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.shapes:
            raise ValueError(f"unknown tensor {name!r}")
        if tuple(tensor.shape) != self.shapes[name]:
            raise ValueError(f"{name}: got {tuple(tensor.shape)}, expected {self.shapes[name]}")
        self.loaded[name] = tensor.clone()


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(8, 4, generator=g),
        "model.norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(4, generator=g),
    }


def _save_sharded(folder: Path, shards: dict[str, dict[str, torch.Tensor]]) -> None:
    weight_map = {}
    for shard_name, tensors in shards.items():
        save_file(tensors, str(folder / shard_name))
        weight_map.update(dict.fromkeys(tensors, shard_name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


# ---- iter_checkpoint_tensors ---------------------------------------------------------------


def test_single_file_streams_sorted_names_and_skips_inv_freq(tmp_path: Path) -> None:
    tensors = _tensors()
    stored = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2)}
    save_file(stored, str(tmp_path / "model.safetensors"))

    got = list(iter_checkpoint_tensors(tmp_path))

    assert [name for name, _ in got] == sorted(tensors)
    for name, tensor in got:
        assert tensor.dtype == tensors[name].dtype
        assert torch.equal(tensor, tensors[name])


def test_sharded_streams_shards_in_index_order(tmp_path: Path) -> None:
    t = _tensors()
    _save_sharded(
        tmp_path,
        {
            "model-00001-of-00002.safetensors": {
                "model.norm.weight": t["model.norm.weight"],
                "model.embed_tokens.weight": t["model.embed_tokens.weight"],
            },
            "model-00002-of-00002.safetensors": {
                "model.layers.0.self_attn.q_proj.weight": t[
                    "model.layers.0.self_attn.q_proj.weight"
                ],
                "model.layers.0.self_attn.q_proj.bias": t["model.layers.0.self_attn.q_proj.bias"],
            },
        },
    )
    # A stray single-file checkpoint must not be read when an index exists.
    save_file({"stray": torch.zeros(1)}, str(tmp_path / "model.safetensors"))

    got = list(iter_checkpoint_tensors(tmp_path))

    assert [name for name, _ in got] == [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.q_proj.weight",
    ]
    for name, tensor in got:
        assert torch.equal(tensor, t[name])


def test_tensors_are_read_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    reads: list[str] = []
    real_safe_open = weights.safe_open

    class CountingHandle:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self._ctx = real_safe_open(*args, **kwargs)

        def __enter__(self) -> CountingHandle:
            self._f = self._ctx.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self._ctx.__exit__(*exc)

        def keys(self) -> list[str]:
            return list(self._f.keys())

        def get_tensor(self, name: str) -> torch.Tensor:
            reads.append(name)
            return self._f.get_tensor(name)

    monkeypatch.setattr(weights, "safe_open", CountingHandle)
    stream = iter_checkpoint_tensors(tmp_path)

    assert reads == []
    first, _ = next(stream)
    assert reads == [first] == ["model.embed_tokens.weight"]
    next(stream)
    assert reads == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias"]


def test_missing_folder_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"checkpoint folder {folder} does not exist"):
        list(iter_checkpoint_tensors(folder))


def test_folder_without_weights_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"no weights in {tmp_path}: expected model.safetensors"):
        list(iter_checkpoint_tensors(tmp_path))


def test_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="convert it to safetensors"):
        list(iter_checkpoint_tensors(tmp_path))


def test_index_naming_a_missing_shard_is_refused(tmp_path: Path) -> None:
    index = {"weight_map": {"a": "model-00001-of-00001.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names shard model-00001-of-00001.safetensors"):
        list(iter_checkpoint_tensors(tmp_path))


def test_index_out_of_sync_with_shard_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1)}, str(tmp_path / "s1.safetensors"))
    index = {"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="maps tensor 'b' to s1.safetensors"):
        list(iter_checkpoint_tensors(tmp_path))


def test_index_without_weight_map_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="has no 'weight_map'"):
        list(iter_checkpoint_tensors(tmp_path))


# ---- load_checkpoint -----------------------------------------------------------------------


def test_load_checkpoint_loads_every_tensor(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = FakeModel({name: tuple(t.shape) for name, t in tensors.items()})

    assert load_checkpoint(model, tmp_path) == 4

    assert sorted(model.loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(model.loaded[name], tensor)


def test_tied_checkpoint_with_lm_head_skips_it(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file({**tensors, "lm_head.weight": torch.ones(8, 4)}, str(tmp_path / "model.safetensors"))
    model = FakeModel({name: tuple(t.shape) for name, t in tensors.items()})

    assert load_checkpoint(model, tmp_path) == 4

    assert "lm_head.weight" not in model.loaded


def test_unknown_tensor_is_refused(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file({**tensors, "model.extra.weight": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    model = FakeModel({name: tuple(t.shape) for name, t in tensors.items()})

    with pytest.raises(ValueError, match="has tensor 'model.extra.weight', which FakeModel"):
        load_checkpoint(model, tmp_path)


def test_missing_tensors_are_listed_with_count(tmp_path: Path) -> None:
    save_file({"present": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    expected = {"present": (1,), **{f"missing.{i}": (1,) for i in range(7)}}
    model = FakeModel(expected)

    with pytest.raises(ValueError) as info:
        load_checkpoint(model, tmp_path)

    assert str(info.value) == (
        f"checkpoint {tmp_path} is missing 7 of the 8 tensors the model needs: "
        "missing.0, missing.1, missing.2, missing.3, missing.4, ...; is the checkpoint "
        "complete and its config.json the one it was saved with?"
    )


def test_shape_mismatch_from_model_propagates(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"a: got \(3,\), expected \(4,\)"):
        load_checkpoint(FakeModel({"a": (4,)}), tmp_path)


# ---- init_dummy_weights --------------------------------------------------------------------


class TinyModule(nn.Module):
    def __init__(self, reverse: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        kw = {"dtype": dtype}
        modules = {
            "embed": nn.Embedding(64, 32, **kw),
            "proj": nn.Linear(32, 48, bias=True, **kw),
            "norm": nn.LayerNorm(32, bias=False, **kw),
        }
        for name in reversed(modules) if reverse else modules:
            self.add_module(name, modules[name])


def test_dummy_weights_norms_are_exact_ones_and_the_rest_is_normal() -> None:
    model = TinyModule()
    init_dummy_weights(model, seed=0, std=0.02)

    assert torch.equal(model.norm.weight, torch.ones(32))
    for param in (model.embed.weight, model.proj.weight, model.proj.bias):
        assert param.abs().max() > 0
        assert param.abs().max() < 0.02 * 7
    big = torch.cat([model.embed.weight.flatten(), model.proj.weight.flatten()])
    assert abs(big.std().item() - 0.02) < 0.001
    assert abs(big.mean().item()) < 0.001


def test_dummy_weights_are_deterministic_per_seed_and_name() -> None:
    a, b, c, reordered = TinyModule(), TinyModule(), TinyModule(), TinyModule(reverse=True)
    init_dummy_weights(a, seed=7)
    init_dummy_weights(b, seed=7)
    init_dummy_weights(c, seed=8)
    init_dummy_weights(reordered, seed=7)

    sa, sb, sc, sr = a.state_dict(), b.state_dict(), c.state_dict(), reordered.state_dict()
    assert list(sr) != list(sa)
    for name in sa:
        assert torch.equal(sa[name], sb[name])
        assert torch.equal(sa[name], sr[name])
    assert not torch.equal(sa["proj.weight"], sc["proj.weight"])
    assert not torch.equal(sa["proj.weight"][:16], sa["proj.weight"][16:32])


def test_dummy_weights_bf16_are_the_rounded_fp32_values() -> None:
    fp32, bf16 = TinyModule(), TinyModule(dtype=torch.bfloat16)
    init_dummy_weights(fp32, seed=3)
    init_dummy_weights(bf16, seed=3)

    for name, value in fp32.state_dict().items():
        assert bf16.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(bf16.state_dict()[name], value.to(torch.bfloat16))


def test_dummy_weights_fill_every_element_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "DUMMY_CHUNK_NUMEL", 7)  # 48*32 is not a multiple of 7
    model = TinyModule()
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))

    init_dummy_weights(model, seed=0)

    for param in model.parameters():
        assert not param.isnan().any()
    assert abs(model.proj.weight.std().item() - 0.02) < 0.002


def test_dummy_weights_reject_nonpositive_std() -> None:
    with pytest.raises(ValueError, match="std must be > 0, got 0.0"):
        init_dummy_weights(TinyModule(), seed=0, std=0.0)


def test_dummy_weights_on_engine_model_set_every_norm_to_one() -> None:
    config = ModelConfig.from_hf_dict(_hf_config("Qwen3ForCausalLM").to_dict())
    model = LlamaForCausalLM(config, torch.float32, torch.device("cpu"), max_len=64)
    init_dummy_weights(model, seed=0)

    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert param.ndim == 2, name
            assert 0 < param.abs().max() < 0.02 * 7, name


# ---- real Hugging Face checkpoints into engine.model ---------------------------------------

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
}


def _hf_config(arch: str, **overrides: object) -> transformers.PretrainedConfig:
    config_class = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
    }[arch]
    return config_class(architectures=[arch], **{**TINY, **overrides})


def _random_hf_model(hf_config: transformers.PretrainedConfig) -> nn.Module:
    """HF model with every parameter random (norms and biases too, so a mix-up shows)."""
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in hf_model.parameters():
            param.copy_(torch.randn(param.shape, generator=g))
    return hf_model


def _fused_expected(
    hf_state: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """The HF state dict in engine.model's fused naming (q|k|v and gate|up on dim 0)."""
    expected = dict(hf_state)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for suffix in ("weight", "bias"):
            parts = [f"{p}self_attn.{x}_proj.{suffix}" for x in "qkv"]
            if parts[0] in expected:
                expected[f"{p}self_attn.qkv_proj.{suffix}"] = torch.cat(
                    [expected.pop(n) for n in parts]
                )
            parts = [f"{p}mlp.{x}_proj.{suffix}" for x in ("gate", "up")]
            if parts[0] in expected:
                expected[f"{p}mlp.gate_up_proj.{suffix}"] = torch.cat(
                    [expected.pop(n) for n in parts]
                )
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    return expected


CASES = {
    "llama": ("LlamaForCausalLM", {}),
    "llama-tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama-bias": ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("case", list(CASES))
def test_hf_checkpoint_loads_exactly_into_engine_model(
    tmp_path: Path, case: str, sharded: bool
) -> None:
    arch, overrides = CASES[case]
    hf_model = _random_hf_model(_hf_config(arch, **overrides))
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    assert (tmp_path / "model.safetensors").is_file() != sharded
    config = ModelConfig.from_path(tmp_path)
    model = LlamaForCausalLM(config, torch.float32, torch.device("cpu"), max_len=64)
    init_dummy_weights(model, seed=0)  # nothing of this may survive the load

    num_loaded = load_checkpoint(model, tmp_path)

    assert num_loaded == len(model.hf_weight_names())
    expected = _fused_expected(hf_model.state_dict(), config)
    ours = model.state_dict()
    assert sorted(ours) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


def test_hf_checkpoint_loads_into_bf16_engine_model(tmp_path: Path) -> None:
    hf_model = _random_hf_model(_hf_config("LlamaForCausalLM"))
    hf_model.save_pretrained(tmp_path)
    config = ModelConfig.from_path(tmp_path)
    model = LlamaForCausalLM(config, torch.bfloat16, torch.device("cpu"), max_len=64)

    load_checkpoint(model, tmp_path)

    expected = _fused_expected(hf_model.state_dict(), config)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name


def test_hf_checkpoint_for_other_config_is_refused(tmp_path: Path) -> None:
    _random_hf_model(_hf_config("LlamaForCausalLM", num_hidden_layers=3)).save_pretrained(tmp_path)
    config = ModelConfig.from_hf_dict(_hf_config("LlamaForCausalLM").to_dict())
    model = LlamaForCausalLM(config, torch.float32, torch.device("cpu"), max_len=64)

    with pytest.raises(ValueError, match="has tensor 'model.layers.2.input_layernorm.weight'"):
        load_checkpoint(model, tmp_path)
