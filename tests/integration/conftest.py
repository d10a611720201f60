"""Fixtures shared by the cluster-level integration tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

TINY_VOCAB = 320  # covers the byte tokenizer's ids
TINY_MAX_LEN = 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A 2-layer random Llama saved as a Hugging Face checkpoint, and the transformers model
    itself as the greedy reference (no EOS, so every request runs to max_tokens)."""
    torch.manual_seed(7)
    hf_config = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MAX_LEN,
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder)
    return folder, model
