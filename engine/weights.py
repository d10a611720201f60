"""Checkpoint loading: stream safetensors into a model, or fill it with dummy weights.

A checkpoint folder holds either one `model.safetensors` or the shards named by
`model.safetensors.index.json`. Tensors are streamed one at a time (memory-mapped by
safetensors, read by `get_tensor`) and handed to the model's `load_hf_weight`, which copies
them into the right slice of its fused parameters; the checkpoint is never materialised as a
whole, so peak extra host memory is one tensor. Pickled checkpoints (`pytorch_model.bin`) are
refused: loading them runs arbitrary code.

The `dummy` load format (`init_dummy_weights`) gives benchmarks and tests a deterministic model
without any files.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)  # old checkpoints saved rope buffers
TIED_HEAD_NAME = "lm_head.weight"
MAX_MISSING_NAMES_SHOWN = 5
DUMMY_CHUNK_NUMEL = 1 << 24  # fp32 scratch per chunk: 64 MiB


class HFWeightLoadable(Protocol):
    """What `load_checkpoint` needs from a model (engine.model.LlamaForCausalLM has it)."""

    def hf_weight_names(self) -> list[str]:
        """Every Hugging Face tensor name the checkpoint must provide."""
        ...

    def load_hf_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one HF-named tensor into the model; ValueError on unknown name or shape."""
        ...


def iter_checkpoint_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, CPU tensor in its stored dtype) for every tensor of the checkpoint.

    Order: shards in the order the index first names them, names sorted within a shard.
    Each tensor is read only when the consumer asks for it.
    """
    folder = Path(folder)
    for shard, names in _checkpoint_shards(folder):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            stored = set(f.keys())
            for name in names if names is not None else sorted(stored):
                if name not in stored:
                    raise ValueError(
                        f"{folder / INDEX_FILE} maps tensor {name!r} to {shard.name}, "
                        "but that shard does not hold it; the index and shards are out of sync"
                    )
                if name.endswith(SKIPPED_SUFFIXES):
                    continue
                yield name, f.get_tensor(name)


def _checkpoint_shards(folder: Path) -> list[tuple[Path, list[str] | None]]:
    """(shard file, names to read from it, or None for all of them) in load order."""
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {folder} does not exist (or is not a folder)")
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no 'weight_map'; re-save the checkpoint")
        by_shard: dict[str, list[str]] = {}
        for name, shard_name in weight_map.items():
            by_shard.setdefault(shard_name, []).append(name)
        shards = []
        for shard_name, names in by_shard.items():
            shard = folder / shard_name
            if not shard.is_file():
                raise ValueError(f"{index_path} names shard {shard_name}, which is missing")
            shards.append((shard, sorted(names)))
        return shards
    single = folder / SINGLE_FILE
    if single.is_file():
        return [(single, None)]
    if any((folder / name).is_file() for name in PICKLE_FILES):
        raise ValueError(
            f"{folder} holds only a pickled checkpoint (pytorch_model.bin), which Baton does "
            "not load because unpickling runs arbitrary code; convert it to safetensors, e.g. "
            "load it with transformers' AutoModelForCausalLM.from_pretrained and call "
            "save_pretrained (which writes model.safetensors)"
        )
    raise ValueError(
        f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE}; "
        "use the dummy load format to run without a checkpoint"
    )


def load_checkpoint(model: HFWeightLoadable, folder: Path) -> int:
    """Load every tensor of the checkpoint in `folder` into `model`; return how many.

    A tied-embedding model does not expect `lm_head.weight`; checkpoints that still carry it
    are accepted and the tensor is skipped (not counted). Any other name the model does not
    expect, and any expected name the checkpoint lacks, is a ValueError.
    """
    folder = Path(folder)
    expected = model.hf_weight_names()
    expected_set = set(expected)
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in iter_checkpoint_tensors(folder):
            if name not in expected_set:
                if name == TIED_HEAD_NAME:
                    continue
                raise ValueError(
                    f"checkpoint {folder} has tensor {name!r}, which {type(model).__name__} "
                    "does not have; is the checkpoint for a different architecture or config?"
                )
            model.load_hf_weight(name, tensor)
            loaded.add(name)
    missing = [name for name in expected if name not in loaded]
    if missing:
        shown = ", ".join(missing[:MAX_MISSING_NAMES_SHOWN])
        more = "" if len(missing) <= MAX_MISSING_NAMES_SHOWN else ", ..."
        raise ValueError(
            f"checkpoint {folder} is missing {len(missing)} of the {len(expected)} tensors "
            f"the model needs: {shown}{more}; is the checkpoint complete and its config.json "
            "the one it was saved with?"
        )
    return len(loaded)


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Fill every parameter in place with deterministic random values (the `dummy` format).

    1-D parameters named `weight` (the RMSNorm scales) become exactly 1; every other parameter
    (matrices, embeddings, biases) is drawn from normal(0, std). Each parameter has its own
    generator on its own device, seeded from `seed` and the parameter's name, so the values do
    not depend on parameter order and two engines built from the same config and seed on the
    same device type hold identical weights. Values are drawn in float32 chunks of
    DUMMY_CHUNK_NUMEL elements and cast into the parameter, so a bfloat16 model holds the
    rounded values of the float32 one and scratch memory stays at 64 MiB per chunk.
    CPU and CUDA generators give different streams: the same seed on different device types
    gives different weights.
    """
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    for name, param in model.named_parameters():
        if param.ndim == 1 and name.rsplit(".", 1)[-1] == "weight":
            param.fill_(1.0)
            continue
        assert param.is_contiguous(), f"parameter {name} is not contiguous"
        generator = torch.Generator(device=param.device)
        generator.manual_seed(_param_seed(seed, name))
        flat = param.view(-1)
        scratch = torch.empty(
            min(DUMMY_CHUNK_NUMEL, flat.numel()), dtype=torch.float32, device=param.device
        )
        for start in range(0, flat.numel(), DUMMY_CHUNK_NUMEL):
            chunk = flat[start : start + DUMMY_CHUNK_NUMEL]
            values = scratch[: chunk.numel()]
            values.normal_(0.0, std, generator=generator)
            chunk.copy_(values)


def _param_seed(seed: int, name: str) -> int:
    """A per-parameter seed: stable across processes (crc32, not Python's salted hash)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63)
