"""Turns a config into a running cluster: worker actors placed on Ray, and the router.

    launch(cfg)          checks the layout against the Ray cluster, places the workers
                         (placement groups for `pack` / `spread`), waits until every worker
                         has loaded its model, then starts the router's gRPC server
    Cluster.stop()       drains the router (running requests finish within the grace
                         period), stops the workers, removes the placement groups
    Cluster.restart_router()  a new router over the same workers (its requests in flight
                         fail; the workers keep running and abort them)

Workers are restarted by Ray when their process dies (`cluster.max_restarts`; calls are not
retried, `max_task_retries=0`: the router retries whole requests), re-initialise (a decode
worker's KV-transfer service gets a new port) and rejoin the router's pool through its
load poll.

Ray must be initialised by the caller (`baton serve` does it: local, or `--address`).
Worker actors get `num_cpus=0` (a CPU-only machine is not partitioned by Ray's CPU count;
`cluster.cpu_threads_per_worker` bounds torch's threads instead) and
`num_gpus=cluster.gpus_per_worker`.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from baton.config import BatonConfig, ClusterMode, Placement
from engine.config import EngineConfig
from engine.engine import Engine

log = logging.getLogger(__name__)

NOSET_CUDA_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
_BUNDLE_CPU = 0.01  # a bundle needs some resource; workers themselves ask for num_cpus=0


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker actor needs to build its engine (pickled by Ray)."""

    engine: EngineConfig
    model_path: str | None
    cpu_threads: int = 1


def cuda_device_index(ray_gpu_id: int | str, cuda_visible_devices: str | None) -> int:
    """The torch device index of the GPU Ray assigned, in a process that sees every GPU.

    Ray names GPUs as CUDA_VISIBLE_DEVICES lists them where that is set (ids "2" and "3" for
    CUDA_VISIBLE_DEVICES=2,3, or UUIDs), while torch numbers the visible GPUs from 0: the
    index is the id's position in that list. Unset, Ray's id is the index itself.
    """
    if cuda_visible_devices is None:
        return int(ray_gpu_id)
    visible = [d.strip() for d in cuda_visible_devices.split(",") if d.strip()]
    try:
        return visible.index(str(ray_gpu_id).strip())
    except ValueError:
        raise ValueError(
            f"Ray assigned GPU {ray_gpu_id!r}, which is not in CUDA_VISIBLE_DEVICES="
            f"{cuda_visible_devices!r}; start Ray from a process with the same "
            "CUDA_VISIBLE_DEVICES as its workers"
        ) from None


def build_engine(spec: WorkerSpec) -> Engine:
    """Inside a worker process: pick the device Ray assigned, load the model and tokenizer."""
    import torch

    from engine.tokenizer import load_tokenizer

    cfg = spec.engine
    if cfg.device.startswith("cuda"):
        gpu_ids = ray.get_gpu_ids()
        if gpu_ids and os.environ.get(NOSET_CUDA_ENV) == "1":
            # Every worker sees every GPU of the node (CUDA IPC needs one numbering).
            index = cuda_device_index(gpu_ids[0], os.environ.get("CUDA_VISIBLE_DEVICES"))
            device = f"cuda:{index}"
        else:
            device = "cuda:0"  # CUDA_VISIBLE_DEVICES holds only this worker's GPU
        torch.cuda.set_device(device)
        cfg = cfg.replace(device=device)
    else:
        torch.set_num_threads(spec.cpu_threads)
    path = Path(spec.model_path) if spec.model_path else None
    return Engine(cfg, path, tokenizer=load_tokenizer(path))


def resolve_bind_host(bind_host: str) -> str:
    return ray.util.get_node_ip_address() if bind_host == "node_ip" else bind_host


@dataclass
class Cluster:
    config: BatonConfig
    prefill_actors: list[ray.actor.ActorHandle]
    decode_actors: list[ray.actor.ActorHandle]
    server: object  # router.server.RouterServer
    placement_groups: list[PlacementGroup] = field(default_factory=list)
    make_server: Callable[[], object] | None = None  # a new RouterServer over these workers

    @property
    def address(self) -> str:
        return self.server.address  # type: ignore[attr-defined]

    @property
    def actors(self) -> list[ray.actor.ActorHandle]:
        return self.prefill_actors + self.decode_actors

    def restart_router(self, grace_s: float = 0.0) -> str:
        """Stop the router (requests still running after grace_s fail) and start a new one
        over the same worker actors; returns its address (the configured port, or a new one
        the OS picked)."""
        assert self.make_server is not None
        self.server.stop(grace_s)  # type: ignore[attr-defined]
        self.server = self.make_server()
        self.server.start()  # type: ignore[attr-defined]
        return self.address

    def stop(self, grace_s: float = 5.0) -> None:
        self.server.stop(grace_s)  # type: ignore[attr-defined]
        stops = [a.stop.remote() for a in self.actors]
        try:
            ray.get(stops, timeout=grace_s + 10.0)
        except Exception as e:  # a dead worker is stopped already
            log.warning("worker stop: %r", e)
        for a in self.actors:
            ray.kill(a)
        for pg in self.placement_groups:
            remove_placement_group(pg)


def _check_resources(cfg: BatonConfig) -> None:
    c = cfg.cluster
    need = c.num_workers * c.gpus_per_worker
    have = ray.cluster_resources().get("GPU", 0)
    if need > have:
        raise ValueError(
            f"the layout needs {need:g} GPUs ({c.num_workers} workers x cluster.gpus_per_worker "
            f"{c.gpus_per_worker:g}) but the Ray cluster has {have:g}; lower cluster.num_prefill/"
            "num_decode or gpus_per_worker, or add nodes"
        )


def _placements(cfg: BatonConfig) -> tuple[list[PlacementGroup], list[dict], list[dict]]:
    """Scheduling options per prefill and per decode worker, and the groups made for them."""
    c = cfg.cluster
    bundle = {"CPU": _BUNDLE_CPU}
    if c.gpus_per_worker:
        bundle["GPU"] = c.gpus_per_worker
    n_p, n_d = c.num_prefill_workers, c.num_decode
    if c.placement is Placement.NONE:
        return [], [{}] * n_p, [{}] * n_d

    def opts(pg: PlacementGroup, i: int) -> dict:
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=i
            )
        }

    if c.placement is Placement.SPREAD:
        pg = placement_group([bundle] * (n_p + n_d), strategy="STRICT_SPREAD")
        return [pg], [opts(pg, i) for i in range(n_p)], [opts(pg, n_p + i) for i in range(n_d)]
    # PACK: prefill i and decode i share a node (NVLink between their GPUs).
    pgs, p_opts, d_opts = [], [], []
    for _i in range(n_d):
        if n_p:
            pg = placement_group([bundle, bundle], strategy="STRICT_PACK")
            p_opts.append(opts(pg, 0))
            d_opts.append(opts(pg, 1))
        else:
            pg = placement_group([bundle], strategy="STRICT_PACK")
            d_opts.append(opts(pg, 0))
        pgs.append(pg)
    return pgs, p_opts, d_opts


def launch(
    cfg: BatonConfig, *, prefill_transport_factories: Mapping[int, Callable] | None = None
) -> Cluster:
    """Place the workers, wait for them, start the router. Ray must be initialised.

    prefill_transport_factories: prefill worker index -> its KV transport factory instead of
    `make_transport` (fault injection in tests: prefill_worker/faults.py)."""
    from decode_worker.actor import DecodeActor
    from decode_worker.worker import KVServiceSpec
    from engine.tokenizer import load_tokenizer
    from kv_transfer.server import TlsConfig
    from prefill_worker.actor import PrefillActor
    from router.policies import make_policy
    from router.router import Router
    from router.server import RouterServer, ServerTls
    from router.workers import RayDecodeClient, RayPrefillClient

    c = cfg.cluster
    _check_resources(cfg)
    pgs, p_opts, d_opts = _placements(cfg)
    for pg in pgs:
        try:
            ray.get(pg.ready(), timeout=c.ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            for g in pgs:
                remove_placement_group(g)
            raise ValueError(
                f"cluster.placement: {c.placement.value}: Ray could not place the workers "
                f"within {c.ready_timeout_s:g} s (not enough nodes or GPUs for this layout)"
            ) from None
    model_path = str(cfg.model_path) if cfg.model_path else None
    kv = c.kv_transfer
    token = kv.auth_token or secrets.token_hex(16)
    kv_server_tls = (
        TlsConfig(_read(kv.tls_cert_file), _read(kv.tls_key_file)) if kv.tls_cert_file else None
    )
    kv_root_pem = _read(kv.tls_ca_file or kv.tls_cert_file) if kv.tls_cert_file else None
    common = {
        "num_gpus": c.gpus_per_worker,
        "max_restarts": c.max_restarts,
        "max_task_retries": 0,  # the router retries whole requests, never single calls
    }
    if c.gpus_per_worker:
        common["runtime_env"] = {"env_vars": {NOSET_CUDA_ENV: "1"}}
    disagg = c.mode is ClusterMode.DISAGGREGATED
    prefill_actors = [
        PrefillActor.options(name=None, **common, **p_opts[i]).remote(
            f"prefill-{i}",
            WorkerSpec(cfg.prefill, model_path, c.cpu_threads_per_worker),
            token,
            kv.transport.value,
            kv.lease_s,
            kv.finish_timeout_s,
            (prefill_transport_factories or {}).get(i),
            kv_root_pem,
            kv.tls_server_name,
            kv.keep_freed_memory,
        )
        for i in range(c.num_prefill_workers)
    ]
    role = "decode" if disagg else "replica"
    decode_actors = [
        DecodeActor.options(**common, **d_opts[i]).remote(
            f"{role}-{i}",
            WorkerSpec(cfg.decode, model_path, c.cpu_threads_per_worker),
            KVServiceSpec(token, kv.bind_host, kv.lease_s, kv_server_tls, kv.keep_freed_memory)
            if disagg
            else None,
        )
        for i in range(c.num_decode)
    ]
    try:
        ray.get([a.ready.remote() for a in prefill_actors], timeout=c.ready_timeout_s)
        kv_addresses = ray.get([a.ready.remote() for a in decode_actors], timeout=c.ready_timeout_s)
    except Exception:
        for a in prefill_actors + decode_actors:
            ray.kill(a)
        for pg in pgs:
            remove_placement_group(pg)
        raise
    tokenizer = load_tokenizer(cfg.model_path)
    engine = cfg.decode

    def make_router() -> Router:
        return Router(
            mode=c.mode,
            policy=make_policy(c.routing),
            prefill=[RayPrefillClient(f"prefill-{i}", a) for i, a in enumerate(prefill_actors)],
            decode=[
                RayDecodeClient(f"{role}-{i}", a, kv_addresses[i])
                for i, a in enumerate(decode_actors)
            ],
            tokenizer=tokenizer,
            vocab_size=engine.model.vocab_size,
            max_model_len=min(cfg.prefill.resolved_max_model_len, engine.resolved_max_model_len),
            block_size=engine.block_size,
            limits=c.limits,
            prefix_capacity_blocks=engine.num_kv_blocks or 1 << 16,
            load_poll_interval_s=c.router.load_poll_interval_s,
        )

    def make_server() -> RouterServer:
        return RouterServer(
            make_router,
            host=c.router.host,
            port=c.router.port,
            auth_token=c.router.auth_token,
            max_request_bytes=c.limits.max_request_bytes,
            reflection_on=c.router.reflection,
            tls=(
                ServerTls(_read(c.router.tls_cert_file), _read(c.router.tls_key_file))
                if c.router.tls_cert_file
                else None
            ),
        )

    cluster = Cluster(cfg, prefill_actors, decode_actors, make_server(), pgs, make_server)
    server = cluster.server
    try:
        server.start()
    except Exception:
        cluster.stop(grace_s=0.0)
        raise
    return cluster


def _read(path: str | None) -> bytes:
    assert path is not None
    return Path(path).read_bytes()
