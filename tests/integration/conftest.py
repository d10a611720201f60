"""Fixtures shared by the cluster-level integration tests."""

from __future__ import annotations

import time
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


@pytest.fixture
def requests_done() -> Any:
    """`requests_done(client)`: the workers' settled finished-request counts."""
    return _settled_requests_done


def _settled_requests_done(client: Any) -> dict[str, int]:
    """Each worker's finished-request count (a `BatonClient`'s Stats) once two reads 0.2 s
    apart agree: the router reports polled loads, so a request that just ended can still be
    counted a moment later (comparing two unsettled reads made tests flaky)."""
    last: dict[str, int] | None = None
    for _ in range(50):
        now = {w.name: w.num_requests_done for w in client.stats().workers}
        if now == last:
            return now
        last = now
        time.sleep(0.2)
    raise AssertionError(f"request counts never settled: {last}")
