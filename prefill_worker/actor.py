"""The prefill worker's Ray actor: a thin async shell over `PrefillWorker`.

`prefill` resolves when the request's KV is committed on the decode worker (or failed);
its result carries the first token and the prefill-side phase timings.
"""

from __future__ import annotations

import asyncio

import ray

from decode_worker.messages import PrefillResult, PrefillTask, WorkerLoad
from kv_transfer import allocator
from kv_transfer.transport import TransportKind, make_transport
from prefill_worker.streamers import TransportFactory
from prefill_worker.worker import PrefillWorker


@ray.remote(num_cpus=0, max_restarts=0)
class PrefillActor:
    def __init__(
        self,
        name: str,
        worker_spec: object,
        kv_auth_token: str,
        transport: str,
        lease_s: float,
        finish_timeout_s: float,
        transport_factory: TransportFactory | None = None,
        kv_tls_root_pem: bytes | None = None,
        kv_tls_server_name: str | None = None,
        keep_freed_memory: bool = False,
    ) -> None:
        """transport_factory: None for kv_transfer's own (`make_transport`); tests pass
        prefill_worker/faults.py's to inject transfer faults. keep_freed_memory: apply
        kv_transfer/allocator.py's malloc settings to this process first."""
        from baton.launcher import build_engine

        self.keeps_freed_memory = keep_freed_memory and allocator.keep_freed_memory()
        engine = build_engine(worker_spec)
        self.worker = PrefillWorker(
            name,
            engine,
            kv_auth_token,
            TransportKind(transport),
            lease_s,
            finish_timeout_s,
            node_id=ray.get_runtime_context().get_node_id(),
            transport_factory=transport_factory or make_transport,
            kv_tls_root_pem=kv_tls_root_pem,
            kv_tls_server_name=kv_tls_server_name,
        )
        self.worker.start()

    async def ready(self) -> str:
        return self.worker.name

    async def load(self) -> WorkerLoad:
        return self.worker.load()

    async def health(self) -> tuple[bool, str]:
        return self.worker.healthy, self.worker.health_detail

    async def prefill(self, task: PrefillTask) -> PrefillResult:
        return await asyncio.wrap_future(self.worker.submit(task))

    async def abort(self, request_id: str, reason: str = "aborted") -> bool:
        return await asyncio.wrap_future(self.worker.abort(request_id, reason))

    async def transport_kinds(self) -> dict[str, str]:
        return self.worker.transport_kinds()

    async def stop(self) -> None:
        self.worker.stop()
