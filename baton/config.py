"""The config file a user writes: validated on load, unknown keys are errors.

    model:                       # exactly one of preset / path / default
      preset: tiny               # a named shape with random weights (engine/presets.py)
      path: /models/Llama-3-8B   # a local Hugging Face checkpoint folder
      default: true              # the small trained model shipped in baton/default_model/
    engine:                      # any EngineConfig field except `model`; both roles
      dtype: float32
      device: cpu
      num_kv_blocks: 512
    prefill_engine: {}           # optional per-role overrides of `engine`
    decode_engine: {}
    cluster:                     # optional; every key has a default (ClusterConfig below)
      mode: disaggregated        # or colocated (N engine replicas, no transfer)
      num_prefill: 1
      num_decode: 1              # colocated: the number of replicas
      gpus_per_worker: 0
      placement: none            # pack (P and D of a pair on one node) | spread | none
      routing: {policy: round_robin}
      router: {host: 127.0.0.1, port: 0}
      kv_transfer: {bind_host: 127.0.0.1}
      limits: {max_request_bytes: 1048576}

Every section is a frozen dataclass; a wrong key or value raises ValueError naming the
field by its dotted path (`cluster.routing.policy`), with what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.config import EngineConfig, ModelConfig
from engine.presets import preset

LOCAL_CONFIG = Path(__file__).resolve().parent.parent / "cluster_configs" / "local.yaml"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"

_ENGINE_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig) if f.name != "model"}
# Fields that fix the KV layout: the prefill and decode engines must agree on them.
_KV_LAYOUT_FIELDS = ("block_size", "dtype")


class ClusterMode(enum.Enum):
    DISAGGREGATED = "disaggregated"
    COLOCATED = "colocated"


class Placement(enum.Enum):
    NONE = "none"  # Ray places each actor wherever it fits
    PACK = "pack"  # one STRICT_PACK placement group per (prefill, decode) pair: same node
    SPREAD = "spread"  # every worker on its own node (STRICT_SPREAD)


class PolicyName(enum.Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    PREFIX_AWARE = "prefix_aware"
    CONDITIONAL = "conditional"  # prefill on the decode worker when the uncached part is short


class TransportName(enum.Enum):
    AUTO = "auto"  # same-host GPU path when both pools are GPUs of one host, else grpc
    GRPC = "grpc"
    CUDA_IPC = "cuda_ipc"


@dataclass(frozen=True)
class RoutingConfig:
    policy: PolicyName = PolicyName.ROUND_ROBIN
    # prefix_aware: a worker with the longest cached prefix is skipped when its load exceeds
    # both balance_abs_threshold + the least load and balance_rel_threshold * the least load.
    balance_abs_threshold: int = 4
    balance_rel_threshold: float = 1.5
    # conditional: prefill on the decode worker when at most this many prompt tokens are
    # not in its prefix cache.
    local_prefill_max_tokens: int = 64
    # conditional: the policy that places the requests it does not keep local.
    inner_policy: PolicyName = PolicyName.PREFIX_AWARE
    # conditional: also prefill on the decode worker when the chosen prefill worker already
    # has at least this many prompt tokens waiting or being prefilled (router's count) and
    # the decode worker has no local prefill pending: the prefill tier is backed up and the
    # decode GPU has compute to spare (NVIDIA Dynamo's rule). 0: off.
    max_prefill_queue_tokens: int = 0

    def __post_init__(self) -> None:
        if self.balance_abs_threshold < 0:
            raise ValueError("cluster.routing.balance_abs_threshold must be >= 0")
        if self.balance_rel_threshold < 1.0:
            raise ValueError("cluster.routing.balance_rel_threshold must be >= 1.0")
        if self.local_prefill_max_tokens < 0:
            raise ValueError("cluster.routing.local_prefill_max_tokens must be >= 0")
        if self.max_prefill_queue_tokens < 0:
            raise ValueError("cluster.routing.max_prefill_queue_tokens must be >= 0")
        if self.inner_policy is PolicyName.CONDITIONAL:
            raise ValueError("cluster.routing.inner_policy cannot be conditional itself")


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"  # 0.0.0.0 to serve other machines
    port: int = 0  # 0: the OS picks one, printed in the ready line
    auth_token: str | None = None  # set: clients must send "authorization: Bearer <token>"
    load_poll_interval_s: float = 0.1  # how often the router refreshes worker load
    reflection: bool = True
    tls_cert_file: str | None = None  # PEM certificate chain; set with tls_key_file: TLS on
    tls_key_file: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"cluster.router.port must be in [0, 65535], got {self.port}")
        if self.load_poll_interval_s <= 0:
            raise ValueError("cluster.router.load_poll_interval_s must be > 0")
        _check_tls_pair("cluster.router", self.tls_cert_file, self.tls_key_file)


@dataclass(frozen=True)
class KVTransferSettings:
    # Where decode workers bind their KV-transfer service: an address, or "node_ip" for the
    # IP Ray gives the worker's node (needed when P and D are on different machines).
    bind_host: str = "127.0.0.1"
    auth_token: str | None = None  # None: a random token per cluster, handed to every worker
    transport: TransportName = TransportName.AUTO
    lease_s: float = 30.0  # a reservation not committed by then is freed
    finish_timeout_s: float = 30.0  # the prefill side's wait for the last bytes to land
    # Every worker keeps freed multi-MiB KV messages' memory for reuse instead of returning it
    # to the OS (kv_transfer/allocator.py: glibc mallopt; measured +20 to 25% KV throughput
    # over gRPC on a 2-core box, up to 256 MiB per malloc arena kept). For the gRPC path
    # (workers on different nodes); the same-host GPU path moves no messages.
    keep_freed_memory: bool = False
    # TLS for the KV-transfer service: decode workers serve with cert/key; prefill workers
    # trust tls_ca_file (default: the certificate itself, for a self-signed one) and check
    # the name tls_server_name (default: the decode worker's bind address).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None
    tls_server_name: str | None = None

    def __post_init__(self) -> None:
        if self.lease_s <= 0 or self.finish_timeout_s <= 0:
            raise ValueError("cluster.kv_transfer.lease_s and finish_timeout_s must be > 0")
        _check_tls_pair("cluster.kv_transfer", self.tls_cert_file, self.tls_key_file)
        if self.tls_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("cluster.kv_transfer.tls_ca_file needs tls_cert_file and tls_key_file")
        if self.tls_ca_file is not None and not Path(self.tls_ca_file).is_file():
            raise ValueError(f"cluster.kv_transfer.tls_ca_file: no file at {self.tls_ca_file}")


def _check_tls_pair(section: str, cert: str | None, key: str | None) -> None:
    if (cert is None) != (key is None):
        raise ValueError(f"{section}: set both tls_cert_file and tls_key_file, or neither")
    for name, path in (("tls_cert_file", cert), ("tls_key_file", key)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{section}.{name}: no file at {path}")


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 1 << 20  # larger Generate requests: RESOURCE_EXHAUSTED
    max_in_flight: int = 1024  # more concurrent requests: RESOURCE_EXHAUSTED
    max_stop_strings: int = 16
    max_stop_token_ids: int = 64
    max_request_id_chars: int = 128
    default_max_tokens: int = 16
    request_timeout_s: float = 300.0  # upper bound on any request, deadline or not

    def __post_init__(self) -> None:
        for name in (
            "max_request_bytes",
            "max_in_flight",
            "max_request_id_chars",
            "default_max_tokens",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"cluster.limits.{name} must be > 0, got {getattr(self, name)}")
        if self.max_stop_strings < 0 or self.max_stop_token_ids < 0:
            raise ValueError("cluster.limits.max_stop_strings / max_stop_token_ids must be >= 0")
        if self.request_timeout_s <= 0:
            raise ValueError("cluster.limits.request_timeout_s must be > 0")


@dataclass(frozen=True)
class ClusterConfig:
    mode: ClusterMode = ClusterMode.DISAGGREGATED
    num_prefill: int = 1  # disaggregated only
    num_decode: int = 1  # colocated: engine replicas
    gpus_per_worker: float = 0
    placement: Placement = Placement.NONE
    cpu_threads_per_worker: int = 1  # torch threads of a CPU worker
    ready_timeout_s: float = 300.0  # workers must load their model within this
    max_restarts: int = 3  # times Ray restarts a dead worker (-1: without limit); it rejoins
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    kv_transfer: KVTransferSettings = field(default_factory=KVTransferSettings)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        disagg = self.mode is ClusterMode.DISAGGREGATED
        if self.num_decode < 1:
            raise ValueError(f"cluster.num_decode must be >= 1, got {self.num_decode}")
        if disagg and self.num_prefill < 1:
            raise ValueError(
                f"cluster.num_prefill must be >= 1 in disaggregated mode, got {self.num_prefill}"
                "; use mode: colocated for engines without a prefill tier"
            )
        if self.gpus_per_worker < 0:
            raise ValueError("cluster.gpus_per_worker must be >= 0")
        if self.cpu_threads_per_worker < 1:
            raise ValueError("cluster.cpu_threads_per_worker must be >= 1")
        if self.max_restarts < -1:
            raise ValueError(
                f"cluster.max_restarts must be >= 0, or -1 for no limit, got {self.max_restarts}"
            )
        if self.placement is Placement.PACK and disagg and self.num_prefill != self.num_decode:
            raise ValueError(
                f"cluster.placement: pack pairs prefill and decode workers one to one; "
                f"num_prefill ({self.num_prefill}) must equal num_decode ({self.num_decode})"
            )
        if not disagg and self.routing.policy is PolicyName.CONDITIONAL:
            raise ValueError(
                "cluster.routing.policy: conditional needs mode: disaggregated "
                "(colocated replicas always prefill locally)"
            )

    @property
    def num_prefill_workers(self) -> int:
        return self.num_prefill if self.mode is ClusterMode.DISAGGREGATED else 0

    @property
    def num_workers(self) -> int:
        return self.num_prefill_workers + self.num_decode


@dataclass(frozen=True)
class BatonConfig:
    engine: EngineConfig  # the shared section (what `baton run` uses)
    model_path: Path | None  # None: random weights (a preset)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    prefill_engine: EngineConfig | None = None  # None: `engine`
    decode_engine: EngineConfig | None = None

    @property
    def prefill(self) -> EngineConfig:
        return self.prefill_engine or self.engine

    @property
    def decode(self) -> EngineConfig:
        return self.decode_engine or self.engine


def _check_keys(section: str, got: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(got) - allowed)
    if unknown:
        raise ValueError(
            f"unknown key(s) in {section}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


def _convert(path: str, hint: Any, value: Any) -> Any:
    """value checked against a field's type hint; nested dataclasses are built recursively."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(path, args[0], value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, path, value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        if value not in allowed:
            raise ValueError(f"{path}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return hint(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, path: str, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    _check_keys(path, raw, fields)
    kwargs = {k: _convert(f"{path}.{k}", hints[k], v) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from e


def _engine_config(section: str, model: ModelConfig, raw: dict[str, Any]) -> EngineConfig:
    _check_keys(section, raw, set(_ENGINE_FIELDS))
    try:
        return EngineConfig(model=model, **raw)
    except ValueError as e:
        raise ValueError(f"{section}: {e}") from e


def _model(section: dict[str, Any], model_override: str | None) -> tuple[ModelConfig, Path | None]:
    _check_keys("model", section, {"preset", "path", "default"})
    if model_override is not None:
        section = {"path": model_override}
    if len(section) != 1:
        raise ValueError("model: give exactly one of 'preset', 'path' or 'default'")
    if "preset" in section:
        return preset(str(section["preset"])), None
    if "default" in section:
        if section["default"] is not True:
            raise ValueError("model.default must be true (or use preset / path instead)")
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise ValueError(
                f"model.default: the default model is not in this install ({DEFAULT_MODEL_DIR}); "
                "train it with scripts/train_default_model.py or give model.preset / model.path"
            )
        return ModelConfig.from_path(DEFAULT_MODEL_DIR), DEFAULT_MODEL_DIR
    model_path = Path(str(section["path"])).expanduser()
    return ModelConfig.from_path(model_path), model_path


def parse_config(raw: dict[str, Any], model_override: str | None = None) -> BatonConfig:
    if not isinstance(raw, dict):
        raise ValueError("config must be a mapping with 'model' and 'engine' sections")
    _check_keys("config", raw, {"model", "engine", "prefill_engine", "decode_engine", "cluster"})
    model_config, model_path = _model(dict(raw.get("model") or {}), model_override)
    engine_raw = dict(raw.get("engine") or {})
    engine = _engine_config("engine", model_config, engine_raw)
    per_role: dict[str, EngineConfig | None] = {}
    for role in ("prefill_engine", "decode_engine"):
        if raw.get(role) is None:
            per_role[role] = None
            continue
        if not isinstance(raw[role], dict):
            raise ValueError(f"{role} must be a mapping of engine fields")
        per_role[role] = _engine_config(role, model_config, {**engine_raw, **raw[role]})
    cluster = _build(ClusterConfig, "cluster", raw.get("cluster"))
    cfg = BatonConfig(
        engine, model_path, cluster, per_role["prefill_engine"], per_role["decode_engine"]
    )
    for name in _KV_LAYOUT_FIELDS:
        if getattr(cfg.prefill, name) != getattr(cfg.decode, name):
            raise ValueError(
                f"prefill_engine.{name} ({getattr(cfg.prefill, name)}) differs from "
                f"decode_engine.{name} ({getattr(cfg.decode, name)}): the KV cache moves "
                "between them block by block, so both must use the same value"
            )
    on_gpu = any(e.device.startswith("cuda") for e in (cfg.prefill, cfg.decode))
    if on_gpu and cluster.gpus_per_worker < 1:
        raise ValueError(
            "cluster.gpus_per_worker must be >= 1 when an engine's device is cuda "
            "(each worker needs its own GPU)"
        )
    return cfg


def load_config(path: str | Path, model_override: str | None = None) -> BatonConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    return parse_config(yaml.safe_load(path.read_text()) or {}, model_override)
