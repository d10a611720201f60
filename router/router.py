"""The router's core: validate, route, dispatch, relay the token stream, clean up.

A request through the router, in order (disaggregated mode):

  arrival      `generate` validates every field (router/validation.py) and tokenizes, then
               checks the request id is not in flight and the in-flight limit
  routing      the policy picks (P, D) from the workers' last reported load, the router's
               own in-flight counts and the prefix index; the prompt's block hashes are
               recorded for the chosen workers (router/prefix_index.py)
  dispatch     the request is watched on the router's token stream from D first (one
               stream per decode worker, router/workers.py; nothing can be missed), then P
               is asked to prefill and transfer to D's KV-transfer service; P answers once
               D committed
  relay        chunks from D become GenerateResponses; the last one carries the finish
               reason, usage and per-phase timings
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
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from baton.config import ClusterMode, Limits
from decode_worker.messages import PrefillStatus, PrefillTask, TokenChunk, WorkerLoad
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from protos import serving_pb2 as pb
from router.policies import NoWorker, Route, RouteQuery, RoutingPolicy, WorkerView
from router.prefix_index import PrefixIndex, prompt_block_hashes
from router.validation import RequestError, UndecodableRequest, ValidatedRequest, validate
from router.workers import (
    DecodeClient,
    PrefillClient,
    StreamEnded,
    TokenStream,
    WorkerUnavailable,
)

log = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 5.0
_FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
_PREFILL_CODES = {
    PrefillStatus.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Prefill answers that say "this attempt's workers or bytes failed", not "this request is
# wrong": worth another attempt on other workers.
_RETRYABLE_PREFILL_CODES = frozenset({"UNAVAILABLE", "DATA_LOSS", "ABORTED", "NOT_FOUND"})
DEFAULT_MAX_ATTEMPTS = 3
PROBE_TIMEOUT_S = 2.0
# A worker that is alive but slow to report (a saturated CPU) is marked down only after this
# many silent probes in a row; an actor error (a dead process) marks it down at once.
SILENT_PROBES_DOWN = 3


class AttemptFailed(Exception):
    """One attempt of a request failed in a way another attempt may not (a worker died, a
    transfer broke); `suspects` are the workers to probe before routing again."""

    def __init__(self, message: str, suspects: tuple[WorkerSlot | None, ...]) -> None:
        super().__init__(message)
        self.suspects = suspects


@dataclass(eq=False)
class WorkerSlot:
    """The router's view of one worker."""

    index: int
    client: PrefillClient | DecodeClient
    prefix: PrefixIndex
    load: WorkerLoad | None = None
    in_flight: int = 0
    pending_prefill_tokens: int = 0  # sent here to prefill, first token not back yet
    healthy: bool = True
    detail: str = ""
    silent_probes: int = 0  # load reports in a row that timed out

    def view(self, prefix_match_tokens: int) -> WorkerView:
        load = self.load
        return WorkerView(
            index=self.index,
            queue_depth=load.queue_depth if load else 0,
            num_running=load.num_running if load else 0,
            in_flight=self.in_flight,
            num_free_blocks=load.num_free_blocks if load else 0,
            prefix_match_tokens=prefix_match_tokens,
            healthy=self.healthy,
            pending_prefill_tokens=self.pending_prefill_tokens,
        )


@dataclass
class RouterCounters:
    requests_total: int = 0
    requests_failed: int = 0
    attempts_retried: int = 0  # attempts that failed and were followed by another


@dataclass(eq=False)
class _Flight:
    """One request in flight. Workers know it as `worker_request_id`: the client's id plus
    a per-attempt suffix, so that a client reusing an id after a cancel is never mistaken
    for the aborted attempt (decode workers remember aborted ids for a while)."""

    request: ValidatedRequest  # request_id: the client's
    worker_request_id: str  # of the current attempt
    arrival_s: float
    deadline_s: float
    route: Route | None = None
    committed: bool = False  # the current attempt's KV is on its decode worker
    finished: bool = False
    timings: pb.Timings = field(default_factory=pb.Timings)
    delivered: list[int] = field(default_factory=list)  # token ids sent to the client
    num_resumed: int = 0  # len(delivered) when the current attempt started
    num_attempts: int = 0
    stream: TokenStream | None = None  # the current attempt's, once opened
    # the worker prefilling the current attempt and the prompt tokens counted on it
    prefilling: tuple[WorkerSlot, int] | None = None

    def prefill_done(self) -> None:
        if self.prefilling is not None:
            slot, num_tokens = self.prefilling
            slot.pending_prefill_tokens -= num_tokens
            self.prefilling = None

    def new_attempt(self) -> None:
        self.num_attempts += 1
        # "<client id>@a<attempt number>-<random>": unique per attempt, readable in logs
        self.worker_request_id = (
            f"{self.request.request_id}@a{self.num_attempts}-{uuid.uuid4().hex[:12]}"
        )
        self.committed = False
        self.num_resumed = len(self.delivered)

    def attempt_request(self) -> tuple[tuple[int, ...], SamplingParams]:
        """The prompt and parameters of the current attempt: resumed after the delivered
        tokens (exact for greedy sampling; a seeded sampler restarts its stream)."""
        r = self.request
        if not self.delivered:
            return r.prompt_token_ids, r.params
        params = dataclasses.replace(r.params, max_tokens=r.params.max_tokens - len(self.delivered))
        return r.prompt_token_ids + tuple(self.delivered), params

    def remaining_s(self) -> float:
        left = self.deadline_s - time.monotonic()
        if left <= 0:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return left


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
        self._flights: dict[str, _Flight] = {}
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
    ) -> _Flight:
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
        flight = _Flight(
            ValidatedRequest(rid, v.prompt_token_ids, v.params, v.cache_salt),
            f"{rid}@{uuid.uuid4().hex[:12]}",
            now,
            now + budget,
        )
        self._flights[rid] = flight
        return flight

    def _route(self, f: _Flight, prompt: tuple[int, ...]) -> tuple[WorkerSlot, WorkerSlot | None]:
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

    async def _attempts(self, f: _Flight) -> AsyncIterator[pb.GenerateResponse]:
        """Invariant: at most one attempt of the request is on workers at a time, and each
        attempt that did not finish is aborted on its workers before the next is routed."""
        while True:
            f.new_attempt()
            d: WorkerSlot | None = None
            p: WorkerSlot | None = None
            try:
                d, p = self._route(f, f.attempt_request()[0])
                async for resp in self._run(f, d, p):
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
                    self._spawn(self._abort_everywhere(f.worker_request_id, d, p, f.committed))
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

    async def _abort_everywhere(
        self, rid: str, d: WorkerSlot, p: WorkerSlot | None, committed: bool
    ) -> None:
        calls = [d.client.abort(rid, "aborted by the router")]
        if p is not None and not committed:
            calls.append(p.client.abort(rid, "aborted by the router"))
        results = await asyncio.gather(
            *(asyncio.wait_for(c, ABORT_TIMEOUT_S) for c in calls), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                log.warning("abort of %s not delivered: %r", rid, r)

    async def _run(
        self, f: _Flight, d: WorkerSlot, p: WorkerSlot | None
    ) -> AsyncIterator[pb.GenerateResponse]:
        """One attempt on (P, D). Raises AttemptFailed when a worker or the transfer failed."""
        r = f.request
        prompt, params = f.attempt_request()
        wid = f.worker_request_id
        t = f.timings
        dclient: DecodeClient = d.client  # type: ignore[assignment]
        t.decode_worker = dclient.name
        num_cached = 0
        if p is None:
            t.mode = "colocated" if self.mode is ClusterMode.COLOCATED else "decode_local"
            t.router_ms = t.router_ms or (time.monotonic() - f.arrival_s) * 1e3
            try:
                await asyncio.wait_for(
                    dclient.submit_local(wid, prompt, params, r.cache_salt), f.remaining_s()
                )
            except ValueError as e:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
            except WorkerUnavailable as e:
                raise AttemptFailed(f"decode worker {dclient.name}: {e}", (d,)) from e
            f.committed = True
            stream = f.stream = dclient.open_stream(wid, f.remaining_s())
        else:
            pclient: PrefillClient = p.client  # type: ignore[assignment]
            t.mode = "disaggregated"
            t.prefill_worker = pclient.name
            stream = f.stream = dclient.open_stream(wid, f.remaining_s())
            task = PrefillTask(
                wid, prompt, params, r.cache_salt, dclient.kv_address, f.remaining_s()
            )
            t.router_ms = t.router_ms or (time.monotonic() - f.arrival_s) * 1e3
            try:
                result = await asyncio.wait_for(pclient.prefill(task), f.remaining_s())
            except WorkerUnavailable as e:
                raise AttemptFailed(f"prefill worker {pclient.name}: {e}", (p, d)) from e
            finally:
                f.prefill_done()
            if result.status is not PrefillStatus.COMMITTED:
                detail = f"prefill on {pclient.name}: {result.detail}"
                if result.code in _RETRYABLE_PREFILL_CODES:
                    raise AttemptFailed(detail, (p, d))
                code = _PREFILL_CODES.get(result.status) or getattr(
                    grpc.StatusCode, result.code or "UNAVAILABLE", grpc.StatusCode.UNAVAILABLE
                )
                raise RequestError(code, detail)
            f.committed = True
            num_cached = result.num_cached_tokens
            if not f.delivered:  # timings describe the path of the first token
                t.prefill_queue_ms = result.queue_s * 1e3
                t.prefill_ms = result.prefill_s * 1e3
                t.transfer_ms = result.transfer_s * 1e3
        while True:
            try:
                chunk = await stream.next(f.remaining_s())
            except (WorkerUnavailable, StreamEnded) as e:
                raise AttemptFailed(f"decode worker {dclient.name}: {e}", (d,)) from e
            resp = self._response(r.request_id, chunk)
            if chunk.token_ids:
                f.prefill_done()  # a local prefill ends with its first token
            if not t.ttft_ms and chunk.token_ids:
                t.decode_queue_ms = chunk.decode_queue_s * 1e3
                t.ttft_ms = (time.monotonic() - f.arrival_s) * 1e3
                if p is None:  # the decode worker's queue and prefill are one phase here
                    t.prefill_ms, t.decode_queue_ms = t.decode_queue_ms, 0.0
                t.other_ms = t.ttft_ms - (
                    t.router_ms
                    + t.prefill_queue_ms
                    + t.prefill_ms
                    + t.transfer_ms
                    + t.decode_queue_ms
                )
            if chunk.error:
                code = (
                    grpc.StatusCode.DEADLINE_EXCEEDED
                    if "deadline" in chunk.error
                    else grpc.StatusCode.ABORTED
                )
                raise RequestError(code, f"decode worker {dclient.name}: {chunk.error}")
            f.delivered.extend(chunk.token_ids)
            if chunk.finished:
                f.finished = True
                t.total_ms = (time.monotonic() - f.arrival_s) * 1e3
                resp.usage.CopyFrom(
                    pb.Usage(  # a resumed attempt's prompt holds the tokens delivered before
                        prompt_tokens=chunk.num_prompt_tokens - f.num_resumed,
                        completion_tokens=f.num_resumed + chunk.num_output_tokens,
                        cached_tokens=num_cached if p is not None else chunk.num_cached_tokens,
                    )
                )
                resp.timings.CopyFrom(t)
                yield resp
                return
            yield resp

    @staticmethod
    def _response(request_id: str, chunk: TokenChunk) -> pb.GenerateResponse:
        resp = pb.GenerateResponse(
            request_id=request_id,
            token_ids=list(chunk.token_ids),
            text=chunk.text,
            finish_reason=_FINISH.get(chunk.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED),
        )
        if chunk.logprobs:  # one per token: a mismatch is a bug, and raises here
            resp.logprobs.extend(
                pb.TokenLogprob(
                    token_id=token,
                    logprob=logprob,
                    top=[pb.TopLogprob(token_id=t, logprob=x) for t, x in top],
                )
                for token, (logprob, top) in zip(chunk.token_ids, chunk.logprobs, strict=True)
            )
        return resp

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
