"""The decode worker: a decode engine, its KV-transfer service, and one loop thread.

A disaggregated request, through the decode worker's queues in order:

  stream watched    the router watches the request id on its subscription (streams.py),
                    usually before anything else happens, so no token can be missed
  reserved          the prefill worker's Reserve (a gRPC thread of the KV-transfer service)
                    takes blocks in the engine under a lease (kv_transfer/lease.py)
  receiving         chunks land straight in the reserved blocks (no engine lock)
  committed         Commit hands the blocks to the engine: the request joins the running
                    batch with its first token, which is queued as the first output
  running           the loop thread steps the engine (continuous batching); every output is
                    published to the request's stream, and the router's subscription (the
                    actor) takes every stream's new tokens as coalesced `TokenChunk`s, one
                    message per wake-up
  done              the final output ends the stream; blocks go back to the pool (full ones
                    stay in the prefix cache)

A local request (colocated mode, or the conditional policy keeping a short prompt here)
skips reserve/receive/commit: `submit_local` queues it in the engine's waiting queue and the
same loop prefills and decodes it.

Abort, from any state: the lease is failed (blocks freed, later chunks refused), the engine
drops the request, the stream is closed. An abort that arrives before the Reserve is
remembered for `ABORT_MEMORY_S`, and a Commit of that request is undone at once.

Threads: the loop thread is the only one that steps the engine; gRPC threads (Reserve,
Commit, Abort) and the actor's threads touch the engine only under `EngineSink.lock`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

from decode_worker.messages import WorkerLoad, WorkerRole
from decode_worker.streams import OutputStreams
from engine.engine import Engine, RequestOutput
from engine.sampler import TokenLogprobs
from engine.sampling_params import SamplingParams
from kv_transfer.lease import LeaseState
from kv_transfer.server import KVTransferServer, ServerConfig, TlsConfig, start_server
from kv_transfer.sink import EngineSink

log = logging.getLogger(__name__)

ABORT_MEMORY_S = 300.0
IDLE_WAIT_S = 0.05  # longest sleep of an idle loop (a commit or submission wakes it at once)


class _WakingSink(EngineSink):
    """EngineSink that wakes the loop on Commit and undoes commits of aborted requests.

    (Wrapped here rather than in kv_transfer/: the sink's contract has no hook for either.)
    """

    def __init__(self, engine: Engine, worker: DecodeWorker) -> None:
        super().__init__(engine)
        self._worker = worker

    def commit(
        self, request_id: str, first_token_id: int, logprobs: TokenLogprobs | None = None
    ) -> None:
        super().commit(request_id, first_token_id, logprobs)
        self._worker.streams.mark_start(request_id)
        with self.lock:
            if request_id in self._worker._aborted:
                self.engine.abort(request_id)
                self.outputs = [o for o in self.outputs if o.request_id != request_id]
        self._worker.wake.set()


@dataclass(frozen=True)
class KVServiceSpec:
    auth_token: str
    bind_host: str  # the address to bind and to advertise
    lease_s: float = 30.0
    tls: TlsConfig | None = None  # set: the KV-transfer port serves TLS
    keep_freed_memory: bool = False  # kv_transfer/allocator.py, applied by the actor at start


class DecodeWorker:
    def __init__(
        self,
        name: str,
        engine: Engine,
        kv_service: KVServiceSpec | None,
        node_id: str = "",
    ) -> None:
        """kv_service None: a colocated replica (no KV-transfer service)."""
        self.name = name
        self.engine = engine
        self.node_id = node_id
        self.role = WorkerRole.DECODE if kv_service is not None else WorkerRole.COLOCATED
        self.streams = OutputStreams()
        self.wake = threading.Event()
        self.sink = _WakingSink(engine, self)
        self._aborted: dict[str, float] = {}  # request id -> time of the abort
        self._num_done = 0
        self._steps = (0, 0.0, 0)  # engine steps, their wall seconds, their batch rows
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str = ""
        self._kv_spec = kv_service
        self._kv: KVTransferServer | None = None
        self.kv_address = ""

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self._kv_spec is not None:
            spec = self._kv_spec
            self._kv = start_server(
                self.sink,
                ServerConfig(
                    auth_token=spec.auth_token,
                    bind=f"{spec.bind_host}:0",
                    default_lease_s=spec.lease_s,
                    max_lease_s=max(spec.lease_s, 120.0),
                    tls=spec.tls,
                ),
            )
            self.kv_address = f"{spec.bind_host}:{self._kv.port}"
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-loop", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 1.0) -> None:
        self._stop.set()
        self.wake.set()
        if self._kv is not None:
            self._kv.stop(grace_s)  # fails every open lease: their blocks are freed
        if self._thread is not None:
            self._thread.join(grace_s + 5.0)

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._error

    @property
    def health_detail(self) -> str:
        return self._error or ("ok" if self.healthy else "loop not running")

    # ---- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        """Invariant: each pass publishes pending commit outputs, then steps the engine if it
        has work, else sleeps until woken (Commit, submission) or IDLE_WAIT_S."""
        last_gc_s = time.monotonic()
        try:
            self.engine.bind_thread()  # this thread launches the engine's kernels
            while not self._stop.is_set():
                # First tokens of new commits go out before the next step computes (that
                # step would add its own latency to their time to first token).
                with self.sink.lock:
                    committed, self.sink.outputs = self.sink.outputs, []
                    busy = self.engine.has_unfinished()
                if committed:
                    self._publish(committed)
                if busy:
                    start_s = time.perf_counter()
                    outputs = self.sink.step()
                    steps, step_s, rows = self._steps
                    self._steps = (steps + 1, step_s + time.perf_counter() - start_s,
                                   rows + len(self.engine.current_batch.seqs))  # fmt: skip
                    self._publish(outputs)
                elif not committed:
                    self.wake.wait(IDLE_WAIT_S)
                    self.wake.clear()
                now = time.monotonic()
                if now - last_gc_s > 1.0:
                    last_gc_s = now
                    self._gc(now)
        except Exception as e:  # a dead loop must show in health, not hang every stream
            log.exception("decode loop of %s died", self.name)
            self._error = f"decode loop died: {e!r}"

    def _publish(self, outputs: list[RequestOutput]) -> None:
        self._num_done += sum(1 for o in outputs if o.finished)
        self.streams.publish(outputs)

    def _gc(self, now: float) -> None:
        with self.sink.lock:
            for rid, t in list(self._aborted.items()):
                if now - t > ABORT_MEMORY_S:
                    del self._aborted[rid]
        for rid in self.streams.drop_orphans():
            log.warning("%s: nobody watched the output of %s; aborting it", self.name, rid)
            self.abort(rid)

    # ---- requests ------------------------------------------------------------------------

    def submit_local(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str = "",
    ) -> None:
        """Prefill and decode here. Raises ValueError for a request that can never run."""
        with self.sink.lock:
            self.engine.add_request(request_id, list(prompt_token_ids), params, cache_salt)
        self.streams.mark_start(request_id)
        self.wake.set()

    def abort(self, request_id: str, reason: str = "aborted") -> bool:
        """Stop the request wherever it is on this worker; frees its blocks. Thread-safe."""
        released = False
        if self._kv is not None:
            servicer = self._kv.servicer
            for lease in servicer.leases.active():
                if lease.request_id == request_id:
                    with lease.lock:
                        released |= servicer.fail_lease(lease, reason)
        with self.sink.lock:
            self._aborted[request_id] = time.monotonic()
            if request_id in self.engine._requests:  # committed or local: in the batch
                released |= self.engine.abort(request_id)
            self.sink.outputs = [o for o in self.sink.outputs if o.request_id != request_id]
        self.streams.close(request_id, reason)
        return released

    # ---- reports -------------------------------------------------------------------------

    def load(self) -> WorkerLoad:
        with self.sink.lock:
            e = self.engine
            stats = e.prefix_cache_stats
            return WorkerLoad(
                name=self.name,
                role=self.role,
                node_id=self.node_id,
                queue_depth=len(e.scheduler.waiting) + len(e._reserved),
                num_running=len(e.scheduler.running),
                num_free_blocks=e.num_free_blocks,
                num_total_blocks=e.block_manager.num_blocks,
                num_cached_blocks=e.block_manager.num_cached_blocks,
                prefix_hit_tokens=stats.hit_tokens,
                prefix_queried_tokens=stats.queried_tokens,
                num_requests_done=self._num_done,
                kv_address=self.kv_address,
                num_steps=self._steps[0],
                step_s=self._steps[1],
                step_rows=self._steps[2],
            )

    def kv_counters(self) -> dict[str, int]:
        """The KV-transfer service's counters (bytes received, transfers committed, ...)."""
        if self._kv is None:
            return {}
        return dataclasses.asdict(self._kv.servicer.counters.snapshot())

    def num_active_leases(self) -> int:
        if self._kv is None:
            return 0
        return sum(1 for x in self._kv.servicer.leases.active() if x.state is LeaseState.ACTIVE)
