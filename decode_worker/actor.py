"""The decode worker's Ray actor: a thin async shell over `DecodeWorker`.

Tokens reach the router through one subscription per router: `subscribe` is a Ray
streaming generator, and each item is a list of `TokenChunk`s, one per request that
advanced since the last item. The router `watch`es each request on it (a batch of ids per
call). One item per engine step replaces one item per request per step: at 24 req/s on
2P2D (4 x H200, `f9bf1fa`) the per-request streams delivered tokens at ~34 ms p90 while the
engine produced one every ~13 ms, the actor's event loop (which shares a GIL with the
engine loop) and the router each paying Ray's per-item cost for every request. Chunks
coalesce: when the router is slower than the engine, one chunk carries every token
produced since the last.

The actor is async (one event loop); the engine runs on the worker's own loop thread, and
the loop thread wakes the subscription's coroutine through `call_soon_threadsafe`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

import ray

from decode_worker.delivery import deliver
from decode_worker.messages import TokenChunk, WorkerLoad
from decode_worker.worker import DecodeWorker, KVServiceSpec
from engine.sampling_params import SamplingParams
from kv_transfer import allocator


@ray.remote(num_cpus=0, max_restarts=0)
class DecodeActor:
    def __init__(self, name: str, worker_spec: object, kv_service: KVServiceSpec | None) -> None:
        from baton.launcher import build_engine, resolve_bind_host

        # kv_transfer/allocator.py's malloc settings, before this process allocates much
        wanted = kv_service is not None and kv_service.keep_freed_memory
        self.keeps_freed_memory = wanted and allocator.keep_freed_memory()
        if kv_service is not None:
            kv_service = dataclasses.replace(
                kv_service, bind_host=resolve_bind_host(kv_service.bind_host)
            )
        engine = build_engine(worker_spec)
        node_id = ray.get_runtime_context().get_node_id()
        self.worker = DecodeWorker(name, engine, kv_service, node_id=node_id)
        self.worker.start()

    async def ready(self) -> str:
        return self.worker.kv_address

    async def load(self) -> WorkerLoad:
        return self.worker.load()

    async def health(self) -> tuple[bool, str]:
        return self.worker.healthy, self.worker.health_detail

    async def submit_local(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, cache_salt: str
    ) -> None:
        self.worker.submit_local(request_id, prompt_token_ids, params, cache_salt)

    async def abort(self, request_id: str, reason: str = "aborted") -> bool:
        return self.worker.abort(request_id, reason)

    async def num_free_blocks(self) -> tuple[int, int]:
        w = self.worker
        with w.sink.lock:
            return w.engine.num_free_blocks, w.engine.block_manager.num_blocks

    async def num_active_leases(self) -> int:
        return self.worker.num_active_leases()

    async def kv_counters(self) -> dict[str, int]:
        return self.worker.kv_counters()

    async def stop(self) -> None:
        self.worker.stop()

    async def watch(self, subscription: str, requests: list[tuple[str, float]]) -> None:
        """Send each (request id, timeout_s)'s output to `subscription` until it ends."""
        for request_id, timeout_s in requests:
            self.worker.streams.watch(subscription, request_id, timeout_s)

    async def subscribe(self, subscription: str) -> AsyncIterator[list[TokenChunk]]:
        """Yield the new output of every watched request, one list per wake-up (see
        `decode_worker/delivery.py`)."""
        items = deliver(self.worker.streams, subscription, self.worker.abort)
        async with contextlib.aclosing(items):  # its cleanup runs when the router goes away
            async for chunks in items:
                yield chunks
