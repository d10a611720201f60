"""One attempt of a request on (P, D): dispatch, stream relay, per-phase timings, abort.

  dispatch     the request is watched on the router's token stream from D first (one
               stream per decode worker, router/workers.py; nothing can be missed), then P
               is asked to prefill and transfer to D's KV-transfer service; P answers once
               D committed. A local route (no P) submits the prompt to D, which prefills it.
  relay        chunks from D become GenerateResponses; the last one carries the finish
               reason, usage and per-phase timings
  failure      a worker or transfer failure raises `AttemptFailed` (another attempt may
               succeed); a failure of the request itself raises `RequestError`
  abort        `abort_attempt` frees an unfinished attempt's blocks on D, and on P before
               commit

The retry loop around attempts is `Router._attempts` (router/router.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from baton.config import ClusterMode
from decode_worker.messages import PrefillStatus, PrefillTask, TokenChunk
from protos import serving_pb2 as pb
from router.flight import Flight
from router.validation import RequestError
from router.worker_slot import WorkerSlot
from router.workers import DecodeClient, PrefillClient, StreamEnded, WorkerUnavailable

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


class AttemptFailed(Exception):
    """One attempt of a request failed in a way another attempt may not (a worker died, a
    transfer broke); `suspects` are the workers to probe before routing again."""

    def __init__(self, message: str, suspects: tuple[WorkerSlot | None, ...]) -> None:
        super().__init__(message)
        self.suspects = suspects


async def abort_attempt(rid: str, d: WorkerSlot, p: WorkerSlot | None, committed: bool) -> None:
    calls = [d.client.abort(rid, "aborted by the router")]
    if p is not None and not committed:
        calls.append(p.client.abort(rid, "aborted by the router"))
    results = await asyncio.gather(
        *(asyncio.wait_for(c, ABORT_TIMEOUT_S) for c in calls), return_exceptions=True
    )
    for r in results:
        if isinstance(r, BaseException):
            log.warning("abort of %s not delivered: %r", rid, r)


async def run_attempt(
    f: Flight, d: WorkerSlot, p: WorkerSlot | None, mode: ClusterMode
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
        t.mode = "colocated" if mode is ClusterMode.COLOCATED else "decode_local"
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
        task = PrefillTask(wid, prompt, params, r.cache_salt, dclient.kv_address, f.remaining_s())
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
        resp = _response(r.request_id, chunk)
        if chunk.token_ids:
            f.prefill_done()  # a local prefill ends with its first token
        if not t.ttft_ms and chunk.token_ids:
            t.decode_queue_ms = chunk.decode_queue_s * 1e3
            t.ttft_ms = (time.monotonic() - f.arrival_s) * 1e3
            if p is None:  # the decode worker's queue and prefill are one phase here
                t.prefill_ms, t.decode_queue_ms = t.decode_queue_ms, 0.0
            t.other_ms = t.ttft_ms - (
                t.router_ms + t.prefill_queue_ms + t.prefill_ms + t.transfer_ms + t.decode_queue_ms
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
