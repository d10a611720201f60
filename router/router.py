"""The router's core: validate, route, dispatch, relay the token stream, clean up.

`Router` admits requests, routes them, runs the retry loop over their attempts and polls the
workers' load. Its parts: a request in flight and its attempts' bookkeeping
(router/flight.py), the view of one worker (router/worker_slot.py), one attempt's dispatch,
relay and abort (router/attempt.py).

A request through the router, in order (disaggregated mode):

  arrival      `generate` validates every field (router/validation.py) and tokenizes, then
               checks the request id is not in flight and the in-flight limit
  routing      the policy picks (P, D) from the workers' last reported load, the router's
               own in-flight counts and the prefix index; the prompt's block hashes are
               recorded for the chosen workers (router/prefix_index.py)
  dispatch     the request is watched on the router's token stream from D first (one
               stream per decode worker, router/workers.py; nothing can be missed), then P
               is asked to prefill and transfer to D's KV-transfer service; P answers once
               D committed (router/attempt.py)
  relay        chunks from D become GenerateResponses; the last one carries the finish
               reason, usage and per-phase timings (router/attempt.py)
  cleanup      in `finally`: an attempt that did not finish (client cancelled, deadline,
               failure) is aborted on P and on D, which frees its blocks on both sides;
               in-flight counts drop
  retry        a worker that dies or fails the transfer (actor error, stream ended, prefill
               answered UNAVAILABLE / DATA_LOSS) ends the attempt, not the request: the
               workers involved are probed (a dead one is marked down until its load report
               succeeds again), and the request runs again on another (P, D) as a new
               attempt, resumed from the tokens already delivered (the prompt plus those
               tokens is prefilled, max_tokens shrinks by as many), so with greedy sampling
               the client sees exactly the tokens of an undisturbed run, none twice. After
               `max_attempts` attempts, or past the deadline: UNAVAILABLE / DEADLINE_EXCEEDED.

Workers rejoin by themselves: the load poll is the health probe (a failed report marks the
worker down, the next good one up), and a decode worker restarted by Ray comes back with a
new KV-transfer address, which its load report carries and the router adopts (prefill workers
open a new KV-transfer client for a new address: the re-handshake).

Local routes (colocated mode, or the conditional policy: a short uncached prompt, or any
prompt while the chosen prefill worker is backed up) skip P: D prefills itself. The router
counts each worker's pending prompt tokens (routed to it, first token not back) exactly.
Every wait is bounded by the request's deadline (the client's, capped by
limits.request_timeout_s); errors surface as `RequestError` with a gRPC status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from baton.config import ClusterMode, Limits
from decode_worker.messages import WorkerLoad
from engine.tokenizer import Tokenizer
from protos import serving_pb2 as pb
from router.attempt import ABORT_TIMEOUT_S, AttemptFailed, abort_attempt, run_attempt
from router.flight import Flight
from router.policies import NoWorker, RouteQuery, RoutingPolicy
from router.prefix_index import PrefixIndex, prompt_block_hashes
from router.validation import RequestError, UndecodableRequest, ValidatedRequest, validate
from router.worker_slot import WorkerSlot
from router.workers import (
    DecodeClient,
    PrefillClient,
    StreamEnded,
    WorkerUnavailable,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 3
PROBE_TIMEOUT_S = 2.0
# A worker that is alive but slow to report (a saturated CPU) is marked down only after this
# many silent probes in a row; an actor error (a dead process) marks it down at once.
SILENT_PROBES_DOWN = 3


@dataclass
class RouterCounters:
    requests_total: int = 0
    requests_failed: int = 0
    attempts_retried: int = 0  # attempts that failed and were followed by another


class Router:
    def __init__(
        self,
        *,
        mode: ClusterMode,
        policy: RoutingPolicy,
        prefill: Sequence[PrefillClient],
        decode: Sequence[DecodeClient],
        tokenizer: Tokenizer,
        vocab_size: int,
        max_model_len: int,
        block_size: int,
        limits: Limits,
        prefix_capacity_blocks: int = 1 << 16,
        load_poll_interval_s: float = 0.1,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        assert max_attempts >= 1
        self.mode = mode
        self.policy = policy
        self.prefill = [
            WorkerSlot(i, c, PrefixIndex(prefix_capacity_blocks)) for i, c in enumerate(prefill)
        ]
        self.decode = [
            WorkerSlot(i, c, PrefixIndex(prefix_capacity_blocks)) for i, c in enumerate(decode)
        ]
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.limits = limits
        self.load_poll_interval_s = load_poll_interval_s
        self.max_attempts = max_attempts
        self._prefix_capacity_blocks = prefix_capacity_blocks
        self.counters = RouterCounters()
        self._flights: dict[str, Flight] = {}
        self._background: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.poll_loads()
        self._poller = asyncio.create_task(self._poll_forever())

    async def stop(self) -> None:
        """After the server cancelled its calls: let their requests unwind (each aborts its
        attempt on the workers), bounded by ABORT_TIMEOUT_S, then wait for the aborts."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        deadline_s = time.monotonic() + ABORT_TIMEOUT_S
        while self._flights and time.monotonic() < deadline_s:
            await asyncio.sleep(0.01)
        if self._background:
            await asyncio.wait(self._background, timeout=ABORT_TIMEOUT_S)
        for slot in self.decode:
            await slot.client.close()  # type: ignore[union-attr]

    @property
    def num_in_flight(self) -> int:
        return len(self._flights)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.load_poll_interval_s)
            try:
                await self.poll_loads()
            except Exception:  # keep polling; a worker error marks it unhealthy
                log.exception("load poll failed")

    async def poll_loads(self) -> None:
        await self._probe(self.prefill + self.decode)

    async def _probe(self, slots: Sequence[WorkerSlot]) -> None:
        """Ask each worker for its load: an answer marks it up (and adopts a restarted
        worker's new KV-transfer address), a failure or silence marks it down."""

        async def one(slot: WorkerSlot) -> None:
            try:
                load = await asyncio.wait_for(slot.client.load(), PROBE_TIMEOUT_S)
            except (TimeoutError, WorkerUnavailable) as e:
                slot.silent_probes += 1
                if isinstance(e, TimeoutError) and slot.silent_probes < SILENT_PROBES_DOWN:
                    return  # slow, not (yet) dead: keep routing to it
                if slot.healthy:
                    log.warning("worker %s is down: %r", slot.client.name, e)
                slot.healthy, slot.detail = False, f"load report failed: {e!r}"
                return
            slot.silent_probes = 0
            self._adopt(slot, load)

        await asyncio.gather(*(one(s) for s in slots))

    def _adopt(self, slot: WorkerSlot, load: WorkerLoad) -> None:
        old = slot.load
        restarted = old is not None and (
            load.num_requests_done < old.num_requests_done
            or (load.kv_address and load.kv_address != old.kv_address)
        )
        if restarted:  # a new process: its caches are empty
            log.warning("worker %s restarted %s", slot.client.name, load.kv_address)
            slot.prefix = PrefixIndex(self._prefix_capacity_blocks)
            if isinstance(slot.client, DecodeClient):
                slot.client.restarted()
        if load.kv_address and isinstance(slot.client, DecodeClient):
            slot.client.kv_address = load.kv_address
        if not slot.healthy:
            log.info("worker %s is up", slot.client.name)
        slot.load = load
        slot.healthy, slot.detail = True, "ok"

    # ---- requests ------------------------------------------------------------------------

    def _admit(
        self, req: pb.GenerateRequest | UndecodableRequest, timeout_s: float | None
    ) -> Flight:
        v = validate(req, self.limits, self.tokenizer, self.vocab_size, self.max_model_len)
        rid = v.request_id or f"req-{uuid.uuid4().hex}"
        if rid in self._flights:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"request_id {rid!r} is already in flight"
            )
        if len(self._flights) >= self.limits.max_in_flight:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(self._flights)} requests in flight (cluster.limits.max_in_flight); retry later",
            )
        now = time.monotonic()
        budget = (
            self.limits.request_timeout_s
            if timeout_s is None
            else min(timeout_s, self.limits.request_timeout_s)
        )
        flight = Flight(
            ValidatedRequest(rid, v.prompt_token_ids, v.params, v.cache_salt),
            f"{rid}@{uuid.uuid4().hex[:12]}",
            now,
            now + budget,
        )
        self._flights[rid] = flight
        return flight

    def _route(self, f: Flight, prompt: tuple[int, ...]) -> tuple[WorkerSlot, WorkerSlot | None]:
        r = f.request
        hashes = prompt_block_hashes(prompt, self.block_size, r.cache_salt)
        bs = self.block_size
        pviews = [s.view(s.prefix.match_blocks(hashes) * bs) for s in self.prefill]
        dviews = [s.view(s.prefix.match_blocks(hashes) * bs) for s in self.decode]
        try:
            route = self.policy.choose(RouteQuery(len(prompt)), pviews, dviews)
        except NoWorker as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from e
        f.route = route
        d = self.decode[route.decode]
        p = self.prefill[route.prefill] if route.prefill is not None else None
        for slot in (d, p):
            if slot is not None:
                slot.in_flight += 1
                slot.prefix.insert(hashes)
        views = pviews if p is not None else dviews
        prefiller = p if p is not None else d
        uncached = max(len(prompt) - views[prefiller.index].prefix_match_tokens, 1)
        prefiller.pending_prefill_tokens += uncached
        f.prefilling = (prefiller, uncached)
        return d, p

    async def generate(
        self, req: pb.GenerateRequest | UndecodableRequest, timeout_s: float | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream responses; raises RequestError. timeout_s: the client's deadline, if any."""
        self.counters.requests_total += 1
        try:
            f = self._admit(req, timeout_s)
        except RequestError:
            self.counters.requests_failed += 1
            raise
        try:
            async for resp in self._attempts(f):
                yield resp
        except RequestError:
            self.counters.requests_failed += 1
            raise
        finally:
            self._flights.pop(f.request.request_id, None)

    async def _attempts(self, f: Flight) -> AsyncIterator[pb.GenerateResponse]:
        """Invariant: at most one attempt of the request is on workers at a time, and each
        attempt that did not finish is aborted on its workers before the next is routed."""
        while True:
            f.new_attempt()
            d: WorkerSlot | None = None
            p: WorkerSlot | None = None
            try:
                d, p = self._route(f, f.attempt_request()[0])
                async for resp in run_attempt(f, d, p, self.mode):
                    yield resp
                return
            except TimeoutError:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
            except (WorkerUnavailable, StreamEnded) as e:  # a call outside the usual places
                failure = AttemptFailed(f"worker failed: {e}", (d, p))
            except AttemptFailed as e:
                failure = e
            finally:
                f.prefill_done()
                if f.stream is not None:
                    f.stream.close()
                    f.stream = None
                for slot in (d, p):
                    if slot is not None:
                        slot.in_flight -= 1
                if not f.finished and d is not None:
                    self._spawn(abort_attempt(f.worker_request_id, d, p, f.committed))
            log.warning(
                "request %s attempt %d failed: %s", f.request.request_id, f.num_attempts, failure
            )
            if f.num_attempts >= self.max_attempts:
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"failed after {f.num_attempts} attempts; last: {failure}",
                )
            f.remaining_s()  # DEADLINE_EXCEEDED rather than another attempt past it
            self.counters.attempts_retried += 1
            await self._probe([s for s in failure.suspects if s is not None])

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- health and stats ----------------------------------------------------------------

    async def health(self) -> pb.ServingHealthResponse:
        async def one(slot: WorkerSlot, role: str) -> pb.WorkerHealth:
            try:
                ok, detail = await asyncio.wait_for(slot.client.health(), 2.0)
            except (TimeoutError, WorkerUnavailable) as e:
                ok, detail = False, repr(e)
            return pb.WorkerHealth(name=slot.client.name, role=role, healthy=ok, detail=detail)

        decode_role = "colocated" if self.mode is ClusterMode.COLOCATED else "decode"
        workers = await asyncio.gather(
            *(one(s, "prefill") for s in self.prefill), *(one(s, decode_role) for s in self.decode)
        )
        serving = any(w.healthy for w in workers if w.role != "prefill") and (
            not self.prefill or any(w.healthy for w in workers if w.role == "prefill")
        )
        return pb.ServingHealthResponse(serving=serving, workers=workers)

    async def stats(self) -> pb.StatsResponse:
        await self.poll_loads()
        resp = pb.StatsResponse(
            mode=self.mode.value,
            policy=self.policy.name.value,
            requests_total=self.counters.requests_total,
            requests_failed=self.counters.requests_failed,
            requests_in_flight=len(self._flights),
            attempts_retried=self.counters.attempts_retried,
        )
        for slot in self.prefill + self.decode:
            load = slot.load
            if load is None:
                resp.workers.add(name=slot.client.name, healthy=False)
                continue
            resp.workers.add(
                name=load.name,
                role=load.role.value,
                node_id=load.node_id,
                queue_depth=load.queue_depth,
                num_running=load.num_running,
                num_free_blocks=load.num_free_blocks,
                num_total_blocks=load.num_total_blocks,
                num_cached_blocks=load.num_cached_blocks,
                prefix_hit_rate=load.prefix_hit_rate,
                prefix_hit_tokens=load.prefix_hit_tokens,
                prefix_queried_tokens=load.prefix_queried_tokens,
                num_requests_done=load.num_requests_done,
                healthy=slot.healthy,
                kv_address=load.kv_address,
                num_steps=load.num_steps,
                step_s=load.step_s,
                step_rows=load.step_rows,
            )
        return resp
