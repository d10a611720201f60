"""The shipped default model (baton/default_model/) loads, reads as English, matches transformers.

The folder is a plain Llama checkpoint without tokenizer files, trained by
scripts/train_default_model.py: Baton serves it with ByteTokenizer, and transformers loads the
same folder, so greedy decoding must give the same tokens on both (float32, CPU). Nothing is
downloaded: tests/conftest.py sets HF_HUB_OFFLINE=1 and the folder is read with
local_files_only.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers

import baton
from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.model import LlamaForCausalLM
from engine.sampling_params import SamplingParams
from engine.tokenizer import ByteTokenizer, load_tokenizer
from engine.weights import load_checkpoint

DEFAULT_MODEL = Path(baton.__file__).resolve().parent / "default_model"
PROMPT = "The "
NUM_NEW_TOKENS = 40
ENGLISH_CHAR = re.compile(r"[a-zA-Z ,.'\n-]")
MIN_ENGLISH_FRACTION = 0.9
MAX_FOLDER_BYTES = 10 * 2**20  # it ships inside the wheel


def _engine_greedy(prompt_ids: list[int]) -> tuple[list[int], str]:
    config = EngineConfig(
        model=ModelConfig.from_path(DEFAULT_MODEL),
        dtype="float32",
        device="cpu",
        num_kv_blocks=16,
        max_model_len=256,
    )
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    engine = Engine(config, DEFAULT_MODEL, tokenizer=tokenizer)
    engine.add_request("r", prompt_ids, SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0))
    token_ids: list[int] = []
    text = ""
    while engine.has_unfinished():
        for out in engine.step():
            token_ids.extend(out.new_token_ids)
            text += out.new_text
    assert engine.num_free_blocks == engine.block_manager.num_blocks
    return token_ids, text


@torch.no_grad()
def _transformers_greedy(prompt_ids: list[int]) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        DEFAULT_MODEL, dtype=torch.float32, local_files_only=True
    ).eval()
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=NUM_NEW_TOKENS,
    )
    return out[0, len(prompt_ids) :].tolist()


def test_folder_is_a_small_byte_level_llama() -> None:
    files = {p.name for p in DEFAULT_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= files
    assert sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir()) <= MAX_FOLDER_BYTES
    config = ModelConfig.from_path(DEFAULT_MODEL)
    assert config.architecture == "LlamaForCausalLM"
    assert config.vocab_size >= ByteTokenizer.VOCAB_SIZE
    assert config.bos_token_id == ByteTokenizer.BOS_ID
    assert config.eos_token_ids == (ByteTokenizer.EOS_ID,)
    assert isinstance(load_tokenizer(DEFAULT_MODEL), ByteTokenizer)


def test_checkpoint_loads_every_tensor() -> None:
    config = ModelConfig.from_path(DEFAULT_MODEL)
    model = LlamaForCausalLM(config, torch.float32, torch.device("cpu"))
    assert load_checkpoint(model, DEFAULT_MODEL) == len(model.hf_weight_names())


def test_greedy_text_is_english_and_matches_transformers() -> None:
    tokenizer = ByteTokenizer()
    prompt_ids = tokenizer.encode(PROMPT)

    token_ids, text = _engine_greedy(prompt_ids)

    assert token_ids == _transformers_greedy(prompt_ids)
    assert text == tokenizer.decode(token_ids)
    assert len(text) >= NUM_NEW_TOKENS // 2, f"stopped early: {text!r}"
    english = sum(1 for ch in text if ENGLISH_CHAR.fullmatch(ch))
    assert english >= MIN_ENGLISH_FRACTION * len(text), f"not English-like: {text!r}"
    assert len(set(text.split())) >= 3, f"too few distinct words: {text!r}"
