"""The config file a user writes: validated on load, unknown keys are errors.

    model:                       # exactly one of preset / path
      preset: tiny               # a named shape with random weights (engine/presets.py)
      path: /models/Llama-3-8B   # a local Hugging Face checkpoint folder
    engine:                      # any EngineConfig field except `model`
      dtype: float32
      device: cpu
      num_kv_blocks: 512
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.config import EngineConfig, ModelConfig
from engine.presets import preset

LOCAL_CONFIG = Path(__file__).resolve().parent.parent / "cluster_configs" / "local.yaml"

_ENGINE_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig) if f.name != "model"}


@dataclass(frozen=True)
class BatonConfig:
    engine: EngineConfig
    model_path: Path | None  # None: random weights (a preset)


def _check_keys(section: str, got: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(got) - allowed)
    if unknown:
        raise ValueError(
            f"unknown key(s) in {section}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


def parse_config(raw: dict[str, Any], model_override: str | None = None) -> BatonConfig:
    if not isinstance(raw, dict):
        raise ValueError("config must be a mapping with 'model' and 'engine' sections")
    _check_keys("config", raw, {"model", "engine"})
    model_section = dict(raw.get("model") or {})
    _check_keys("model", model_section, {"preset", "path"})
    if model_override is not None:
        model_section = {"path": model_override}
    if len(model_section) != 1:
        raise ValueError("model: give exactly one of 'preset' or 'path'")
    if "preset" in model_section:
        model_config, model_path = preset(str(model_section["preset"])), None
    else:
        model_path = Path(str(model_section["path"])).expanduser()
        model_config = ModelConfig.from_path(model_path)
    engine_section = dict(raw.get("engine") or {})
    _check_keys("engine", engine_section, set(_ENGINE_FIELDS))
    return BatonConfig(EngineConfig(model=model_config, **engine_section), model_path)


def load_config(path: str | Path, model_override: str | None = None) -> BatonConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    return parse_config(yaml.safe_load(path.read_text()) or {}, model_override)
