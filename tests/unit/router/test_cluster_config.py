"""Cluster config validation: unknown keys and impossible layouts are errors naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from baton.config import (
    ClusterMode,
    Placement,
    PolicyName,
    TransportName,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[3]


def cfg(**sections: Any) -> dict[str, Any]:
    return {"model": {"preset": "tiny"}, "engine": {"num_kv_blocks": 32}, **sections}


def test_defaults_are_one_prefill_one_decode_round_robin() -> None:
    c = parse_config(cfg()).cluster
    assert (c.mode, c.num_prefill, c.num_decode, c.placement) == (
        ClusterMode.DISAGGREGATED,
        1,
        1,
        Placement.NONE,
    )
    assert c.routing.policy is PolicyName.ROUND_ROBIN
    assert c.router.port == 0 and c.kv_transfer.transport is TransportName.AUTO


@pytest.mark.parametrize(
    "name",
    [
        "local.yaml",
        "gpu-1p1d.yaml",
        "gpu-1p3d.yaml",
        "gpu-2p2d.yaml",
        "gpu-3p1d.yaml",
        "gpu-colocated.yaml",
    ],
)
def test_shipped_configs_load(name: str) -> None:
    c = load_config(ROOT / "cluster_configs" / name)
    assert c.cluster.num_workers >= 2


def test_per_role_engine_overrides() -> None:
    c = parse_config(
        cfg(prefill_engine={"max_num_seqs": 4}, decode_engine={"max_num_batched_tokens": 64})
    )
    assert (c.prefill.max_num_seqs, c.decode.max_num_seqs) == (4, 64)
    assert (c.prefill.max_num_batched_tokens, c.decode.max_num_batched_tokens) == (2048, 64)
    assert c.prefill.num_kv_blocks == c.decode.num_kv_blocks == 32


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"clusterr": {}}, "unknown key(s) in config: clusterr"),
        ({"cluster": {"num_prefil": 1}}, "unknown key(s) in cluster: num_prefil"),
        (
            {"cluster": {"routing": {"policy": "random"}}},
            "cluster.routing.policy: 'random' is not one of",
        ),
        ({"cluster": {"router": {"prot": 1}}}, "unknown key(s) in cluster.router: prot"),
        ({"cluster": {"router": {"port": 70000}}}, "cluster.router.port"),
        ({"cluster": {"num_decode": 0}}, "cluster.num_decode must be >= 1"),
        ({"cluster": {"num_prefill": 0}}, "cluster.num_prefill must be >= 1 in disaggregated mode"),
        ({"cluster": {"num_prefill": "2"}}, "cluster.num_prefill must be an integer"),
        (
            {"cluster": {"placement": "pack", "num_prefill": 2, "num_decode": 1}},
            "num_prefill (2) must equal num_decode (1)",
        ),
        (
            {"cluster": {"mode": "colocated", "routing": {"policy": "conditional"}}},
            "conditional needs mode: disaggregated",
        ),
        ({"cluster": {"routing": {"inner_policy": "conditional"}}}, "cluster.routing.inner_policy"),
        (
            {"cluster": {"limits": {"max_request_bytes": 0}}},
            "cluster.limits.max_request_bytes must be > 0",
        ),
        ({"cluster": {"kv_transfer": {"lease_s": -1}}}, "cluster.kv_transfer.lease_s"),
        ({"cluster": {"kv_transfer": {"transport": "rdma"}}}, "cluster.kv_transfer.transport"),
        ({"cluster": []}, "cluster must be a mapping"),
        (
            {"prefill_engine": {"block_size": 32}},
            "prefill_engine.block_size (32) differs from decode_engine.block_size (16)",
        ),
        ({"decode_engine": {"dtype": "bfloat16"}}, "decode_engine.dtype"),
        ({"prefill_engine": {"max_num_seq": 3}}, "unknown key(s) in prefill_engine: max_num_seq"),
        ({"engine": {"device": "cuda"}}, "cluster.gpus_per_worker must be >= 1"),
        ({"engine": {"block_size": 48}}, "engine: block_size must be a power of two"),
    ],
)
def test_errors_name_the_field(sections: dict[str, Any], message: str) -> None:
    raw = cfg()
    for key, value in sections.items():
        raw[key] = (
            {**raw[key], **value}
            if isinstance(raw.get(key), dict) and isinstance(value, dict)
            else value
        )
    with pytest.raises(ValueError) as err:
        parse_config(raw)
    assert message in str(err.value)


def test_model_override_replaces_the_model_section(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        parse_config(cfg(), model_override=str(tmp_path))


def test_model_default_points_at_the_shipped_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import baton.config as config

    monkeypatch.setattr(config, "DEFAULT_MODEL_DIR", tmp_path / "missing")
    with pytest.raises(ValueError, match="model.default: the default model is not in this install"):
        parse_config({"model": {"default": True}})
    with pytest.raises(ValueError, match="model.default must be true"):
        parse_config({"model": {"default": False}})
    with pytest.raises(ValueError, match="exactly one of"):
        parse_config({"model": {"default": True, "preset": "tiny"}})
