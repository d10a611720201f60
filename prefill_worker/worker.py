"""The prefill worker: a prefill engine and one loop thread that streams KV to decode workers.

A request, through the prefill worker's queues in order:

  inbox        `submit` (any thread) puts the task in the inbox and wakes the loop; the
               caller waits on a Future for the `PrefillResult`
  reserving    the loop thread takes every task in the inbox at once; for each, Reserve on
               the chosen decode worker's KV-transfer service (its prefix hits come back and
               are never sent; Reserves to different decode workers overlap), open a
               transport session, queue the prompt in the engine with hold_kv=True and
               max_tokens=1 (`LayerStreamer.add_reserved`)
  deferred     Reserve refused with RESOURCE_EXHAUSTED (the decode pool is full now): the
               task waits here and retries with exponential backoff (5 ms doubling to
               200 ms) until its deadline, as it would wait in a queue
  prefilling   one engine step prefills every queued prompt that fits the token budget
               together (a prompt is chunked only past the budget); after layer i the
               hook hands layer i's final blocks of each request to its session, so bytes
               move while layer i+1 computes
  completing   the step that samples the first token ends the prefill: wait for the last
               bytes, release the local blocks (they stay in the prefix cache), send Commit
               with the first token; the loop goes on to the next step at once, and
               Commit's answer (on a gRPC thread) resolves the Future
  failed       Reserve refused for another reason, transfer or Commit failed, abort or
               deadline: the remote reservation is aborted, local
               blocks freed, the Future resolves with the status and a gRPC code name

One `LayerStreamer` (kv_transfer/layer_stream.py) per decode worker, all over the one
engine: the loop steps the engine itself and fans each layer's hook out to every streamer
(their `StreamerPool`: streamers.py). A task's state, backoff and result: inbox.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
import time
from concurrent.futures import Future

import grpc

from decode_worker.messages import (
    PrefillResult,
    PrefillStatus,
    PrefillTask,
    WorkerLoad,
    WorkerRole,
)
from engine.engine import Engine
from kv_transfer.layer_stream import LayerStreamer, TransferOutcome, TransferStatus
from kv_transfer.transport import TransportKind, make_transport
from prefill_worker.inbox import AbortMessage, InboxItem, PendingTask, RetireMessage
from prefill_worker.streamers import StreamerPool, TransportFactory

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05


class PrefillWorker:
    def __init__(
        self,
        name: str,
        engine: Engine,
        kv_auth_token: str,
        transport: TransportKind = TransportKind.AUTO,
        lease_s: float = 30.0,
        finish_timeout_s: float = 30.0,
        node_id: str = "",
        transport_factory: TransportFactory = make_transport,
        kv_tls_root_pem: bytes | None = None,
        kv_tls_server_name: str | None = None,
    ) -> None:
        """kv_tls_root_pem set: KV-transfer connections use TLS and trust these roots."""
        self.name = name
        self.engine = engine
        self.node_id = node_id
        self._inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streamers = StreamerPool(
            name,
            engine,
            kv_auth_token,
            transport,
            transport_factory,
            lease_s,
            finish_timeout_s,
            kv_tls_root_pem,
            kv_tls_server_name,
        )
        self._owner: dict[str, LayerStreamer] = {}  # request id -> its streamer
        self._tasks: dict[str, PendingTask] = {}  # in the engine, by request id
        self._deferred: list[PendingTask] = []  # Reserve refused (decode side full): retry later
        self._num_inbox = 0
        self._num_deferred = 0  # len(_deferred), readable from other threads
        self._num_done = 0
        self._steps = (0, 0.0, 0)  # engine steps, their wall seconds, their batch rows
        self._stats_lock = threading.Lock()  # guards the numbers load() reads
        self._load_snapshot: WorkerLoad | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error = ""

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._publish_load()
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10.0)
        self._streamers.retire_all()

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._error

    @property
    def health_detail(self) -> str:
        return self._error or ("ok" if self.healthy else "loop not running")

    # ---- any thread ----------------------------------------------------------------------

    def submit(self, task: PrefillTask) -> Future[PrefillResult]:
        fut: Future[PrefillResult] = Future()
        if not self.healthy:
            fut.set_result(
                PrefillResult(
                    task.request_id,
                    PrefillStatus.REJECTED,
                    code="UNAVAILABLE",
                    detail=f"prefill worker {self.name}: {self.health_detail}",
                )
            )
            return fut
        with self._stats_lock:
            self._num_inbox += 1
        self._inbox.put(PendingTask(task, fut))
        self._wake.set()
        return fut

    def abort(self, request_id: str, reason: str = "aborted") -> Future[bool]:
        fut: Future[bool] = Future()
        self._inbox.put(AbortMessage(request_id, reason, fut))
        self._wake.set()
        return fut

    def transport_kinds(self) -> dict[str, str]:
        """Decode worker KV address -> transport in use ("grpc", "cuda_ipc")."""
        return self._streamers.transport_kinds()

    def load(self) -> WorkerLoad:
        with self._stats_lock:
            assert self._load_snapshot is not None
            snap = self._load_snapshot
            return dataclasses.replace(
                snap, queue_depth=snap.queue_depth + self._num_inbox + self._num_deferred
            )

    # ---- the loop (only this thread touches the engine) ----------------------------------

    def _loop(self) -> None:
        """Invariant: every task is in exactly one of inbox, _tasks, or resolved."""
        try:
            self.engine.bind_thread()  # this thread launches the engine's kernels
            while not self._stop.is_set():
                self._drain_inbox()
                self._expire()
                if self.engine.has_unfinished():
                    self._step()
                else:
                    self._publish_load()
                    wait = IDLE_WAIT_S
                    if self._deferred:
                        next_retry = min(t.retry_at_s for t in self._deferred)
                        wait = min(wait, max(next_retry - time.monotonic(), 0.0))
                    self._wake.wait(wait)
                    self._wake.clear()
        except Exception as e:
            log.exception("prefill loop of %s died", self.name)
            self._error = f"prefill loop died: {e!r}"
        finally:
            for rid in list(self._tasks):
                self._abort_task(rid, "prefill worker stopping", PrefillStatus.FAILED)
            for t in self._deferred:
                t.resolve(PrefillStatus.REJECTED, "UNAVAILABLE", "prefill worker stopping")
            self._deferred.clear()
            self._fail_inbox()

    def _fail_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, RetireMessage):
                continue
            if isinstance(item, PendingTask):
                item.resolve(PrefillStatus.REJECTED, "UNAVAILABLE", "prefill worker stopping")
            else:
                item.future.set_result(False)

    def _drain_inbox(self) -> None:
        starting: list[PendingTask] = []
        if self._deferred:
            now = time.monotonic()
            starting = [t for t in self._deferred if t.retry_at_s <= now]
            self._deferred = [t for t in self._deferred if t.retry_at_s > now]
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, AbortMessage):
                # A task of this very drain is not started yet: drop it before its Reserve.
                mine = [t for t in starting if t.task.request_id == item.request_id]
                for t in mine:
                    starting.remove(t)
                    t.resolve(PrefillStatus.ABORTED, "CANCELLED", item.reason)
                item.future.set_result(
                    bool(mine)
                    or self._abort_task(item.request_id, item.reason, PrefillStatus.ABORTED)
                    or self._drop_deferred(item.request_id, item.reason)
                )
                continue
            if isinstance(item, RetireMessage):
                self._streamers.retire(item.kv_address)
                continue
            with self._stats_lock:
                self._num_inbox -= 1
            starting.append(item)
        if starting:
            self._start(starting)

    def _start(self, tasks: list[PendingTask]) -> None:
        """Reserve for the tasks and queue each reserved prompt. Reserves to one decode
        worker go one after another, in arrival order (its free blocks go first come first
        served); those to different decode workers overlap their round trips."""
        by_address: dict[str, list[PendingTask]] = {}
        ids = set(self._tasks)
        for t in tasks:
            rid = t.task.request_id
            if time.monotonic() >= t.deadline_s:
                t.resolve(
                    PrefillStatus.DEADLINE, "DEADLINE_EXCEEDED", "deadline passed in the queue"
                )
            elif rid in ids:
                t.resolve(PrefillStatus.REJECTED, "INVALID_ARGUMENT", f"request_id {rid!r} in use")
            else:
                ids.add(rid)
                by_address.setdefault(t.task.kv_address, []).append(t)
        while by_address:
            sent: list[tuple[PendingTask, LayerStreamer, grpc.Future]] = []
            for address, queued in list(by_address.items()):
                t = queued.pop(0)
                if not queued:
                    del by_address[address]
                streamer = self._streamers.get(address)
                task = t.task
                try:
                    future = streamer.reserve_future(
                        task.request_id, list(task.prompt_token_ids), task.params, task.cache_salt
                    )
                except ValueError as e:
                    t.resolve(PrefillStatus.REJECTED, "INVALID_ARGUMENT", str(e))
                    continue
                sent.append((t, streamer, future))
            for t, streamer, future in sent:
                self._add_reserved(t, streamer, future)

    def _add_reserved(self, t: PendingTask, streamer: LayerStreamer, future: grpc.Future) -> None:
        task = t.task
        rid = task.request_id
        try:
            reservation = streamer.client.reservation(rid, future.result())
            streamer.add_reserved(
                reservation, list(task.prompt_token_ids), task.params, task.cache_salt
            )
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                self._defer(t)
                return
            if e.code() is grpc.StatusCode.UNAVAILABLE:
                self._streamers.retire(task.kv_address)  # a later request reconnects afresh
            t.resolve(PrefillStatus.REJECTED, e.code().name, f"Reserve: {e.details()}")
            return
        except ValueError as e:
            t.resolve(PrefillStatus.REJECTED, "INVALID_ARGUMENT", str(e))
            return
        self._owner[rid] = streamer
        self._tasks[rid] = t

    def _defer(self, t: PendingTask) -> None:
        t.back_off()
        self._deferred.append(t)

    def _drop_deferred(self, rid: str, reason: str) -> bool:
        for t in self._deferred:
            if t.task.request_id == rid:
                self._deferred.remove(t)
                t.resolve(PrefillStatus.ABORTED, "CANCELLED", reason)
                return True
        return False

    def _step(self) -> None:
        start_s = time.monotonic()
        outputs = self.engine.step(on_layer_done=self._streamers.on_layer_done)
        end_s = time.monotonic()
        end_perf = time.perf_counter()
        steps, step_s, rows = self._steps
        self._steps = (
            steps + 1,
            step_s + end_s - start_s,
            rows + len(self.engine.current_batch.seqs),
        )
        self._publish_load()  # the transfers completed below may take a while
        for seq in self.engine.current_batch.seqs:
            t = self._tasks.get(seq.request_id)
            if t is not None and t.first_step_s is None:
                t.first_step_s = start_s
        for out in outputs:
            if not out.finished or out.request_id not in self._tasks:
                continue
            rid = out.request_id
            t = self._tasks.pop(rid)
            streamer = self._owner.pop(rid)
            first_step_s = t.first_step_s if t.first_step_s is not None else start_s
            on_outcome = functools.partial(
                self._committed, t, out.num_cached_tokens, first_step_s, end_s
            )
            first_logprobs = out.logprobs[0] if out.logprobs else None
            streamer.complete(rid, out.new_token_ids[0], end_perf, on_outcome, first_logprobs)
        self._publish_load()

    def _committed(
        self,
        t: PendingTask,
        num_cached_tokens: int,
        first_step_s: float,
        end_s: float,
        outcome: TransferOutcome,
    ) -> None:
        """A request's transfer ended (Commit answered, or failed): resolve its Future. Runs
        on a gRPC thread, or on the loop's when the transfer failed before Commit."""
        if outcome.status is not TransferStatus.COMMITTED:
            # closed on the loop's thread once nothing else is in flight there
            self._inbox.put(RetireMessage(t.task.kv_address))
            self._wake.set()
        with self._stats_lock:
            self._num_done += 1
        t.future.set_result(t.transfer_result(outcome, num_cached_tokens, first_step_s, end_s))

    def _expire(self) -> None:
        now = time.monotonic()
        for rid, t in list(self._tasks.items()):
            if now >= t.deadline_s:
                self._abort_task(
                    rid, "deadline exceeded on the prefill worker", PrefillStatus.DEADLINE
                )

    def _abort_task(self, rid: str, reason: str, status: PrefillStatus) -> bool:
        t = self._tasks.pop(rid, None)
        streamer = self._owner.pop(rid, None)
        if t is None or streamer is None:
            return False
        streamer.abort(rid, reason)
        code = "DEADLINE_EXCEEDED" if status is PrefillStatus.DEADLINE else "CANCELLED"
        t.resolve(status, code, reason)
        return True

    def _publish_load(self) -> None:
        e = self.engine
        stats = e.prefix_cache_stats
        with self._stats_lock:
            self._num_deferred = len(self._deferred)
            self._load_snapshot = WorkerLoad(
                name=self.name,
                role=WorkerRole.PREFILL,
                node_id=self.node_id,
                queue_depth=len(e.scheduler.waiting),  # load() adds the inbox
                # prefilling, or prefilled and still sending (its blocks held till Commit)
                num_running=max(len(self._tasks) - len(e.scheduler.waiting), 0),
                num_free_blocks=e.num_free_blocks,
                num_total_blocks=e.block_manager.num_blocks,
                num_cached_blocks=e.block_manager.num_cached_blocks,
                prefix_hit_tokens=stats.hit_tokens,
                prefix_queried_tokens=stats.queried_tokens,
                num_requests_done=self._num_done,
                num_steps=self._steps[0],
                step_s=self._steps[1],
                step_rows=self._steps[2],
            )
