"""loadtest/mixed_step_bench.py on CPU (tiny model): every timed step has exactly the shape it
claims (B decodes + C prompt tokens), the rows carry the derived figures, and nothing leaks."""

from __future__ import annotations

from engine.config import EngineConfig
from engine.engine import Engine
from engine.presets import preset
from loadtest.mixed_step_bench import run


def test_rows_have_the_claimed_shapes_and_free_every_block() -> None:
    engine = Engine(
        EngineConfig(
            model=preset("tiny"),
            num_kv_blocks=128,
            max_num_seqs=16,
            max_num_batched_tokens=64,
            max_model_len=128,
        )
    )
    free = engine.num_free_blocks
    rows = run(engine, batches=[0, 4], chunks=[16, 32], context=48, steps=3, device="cpu")
    assert [(r["batch"], r["chunk"]) for r in rows] == [(0, 16), (0, 32), (4, 0), (4, 16), (4, 32)]
    for r in rows:
        assert r["step_ms"] > 0
        if r["chunk"]:
            assert r["prefill_tok_s"] == r["chunk"] / r["step_ms"] * 1e3
        if r["batch"] and r["chunk"]:
            assert "extra_ms" in r and "us_per_token" in r
    assert engine.num_free_blocks == free
    assert not engine.has_unfinished()
