"""`Flight`: one request in flight through the router and the bookkeeping of its attempts
(per-attempt worker id, delivered tokens to resume from, deadline, timings)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field

import grpc

from engine.sampling_params import SamplingParams
from protos import serving_pb2 as pb
from router.policies import Route
from router.validation import RequestError, ValidatedRequest
from router.worker_slot import WorkerSlot
from router.workers import TokenStream


@dataclass(eq=False)
class Flight:
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
