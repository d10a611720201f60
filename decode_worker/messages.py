"""What crosses the process boundary between the router and the workers (Ray pickles these).

Both worker roles report `WorkerLoad`; the decode side streams `TokenChunk`s; the prefill
side takes a `PrefillTask` and answers a `PrefillResult`. Plain frozen dataclasses of
builtins: no engine objects, no tensors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class WorkerRole(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"  # hosts the KV-transfer service; also prefills short prompts locally
    COLOCATED = "colocated"  # a decode worker without the KV-transfer service


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's load and prefix-cache summary, for the router's policies and `baton status`."""

    name: str
    role: WorkerRole
    node_id: str
    queue_depth: int  # requests accepted but not yet running (inbox + engine waiting queue)
    num_running: int  # sequences in the running batch (decode) or being prefilled/sent
    num_free_blocks: int
    num_total_blocks: int
    num_cached_blocks: int  # blocks registered in the prefix cache (free or in use)
    prefix_hit_tokens: int
    prefix_queried_tokens: int
    num_requests_done: int
    kv_address: str = ""  # decode workers: host:port of the KV-transfer service
    # Engine steps since the worker started: how many, their wall time (the loop's
    # `engine.step` calls, host and GPU) and their batch rows (sequences stepped) summed.
    # Differences over a load-test run give the mean step time and batch, and how busy the
    # loop was: the evidence for where decode time goes in a cluster.
    num_steps: int = 0
    step_s: float = 0.0
    step_rows: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        if not self.prefix_queried_tokens:
            return 0.0
        return self.prefix_hit_tokens / self.prefix_queried_tokens

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks if self.num_total_blocks else 0.0


@dataclass(frozen=True)
class TokenChunk:
    """Every token of one request produced since the previous chunk (coalesced).

    The first chunk of a request carries `decode_queue_s`: on the decode worker, from Commit
    (or local admission) to the moment the chunk was handed to the stream.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: str | None  # engine FinishReason value ("stop", "length", "abort")
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    decode_queue_s: float = 0.0
    error: str = ""  # set when the stream ends without the request finishing (abort, deadline)
    # when the request asked for logprobs: per token, (its logprob, ((token id, logprob), ...)
    # of the best alternatives, best first)
    logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] = ()

    def then(self, later: TokenChunk) -> TokenChunk:
        """This chunk and the request's next one as one chunk."""
        return TokenChunk(
            request_id=self.request_id,
            token_ids=self.token_ids + later.token_ids,
            text=self.text + later.text,
            finished=later.finished,
            finish_reason=later.finish_reason,
            num_prompt_tokens=later.num_prompt_tokens,
            num_cached_tokens=later.num_cached_tokens,
            num_output_tokens=later.num_output_tokens,
            decode_queue_s=self.decode_queue_s or later.decode_queue_s,
            error=later.error,
            logprobs=self.logprobs + later.logprobs,
        )


class PrefillStatus(enum.Enum):
    COMMITTED = "committed"  # the decode worker owns the KV and continues the request
    REJECTED = "rejected"  # never started: invalid, or no room on the decode side
    FAILED = "failed"  # started, then the transfer failed; nothing held on either side
    ABORTED = "aborted"  # the router aborted it
    DEADLINE = "deadline"  # its deadline passed on the prefill worker


@dataclass(frozen=True)
class PrefillTask:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: object  # engine.sampling_params.SamplingParams (a frozen dataclass)
    cache_salt: str
    kv_address: str  # the chosen decode worker's KV-transfer service
    timeout_s: float  # relative: clocks of different machines are not compared


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    status: PrefillStatus
    first_token_id: int | None = None  # set when COMMITTED
    num_cached_tokens: int = 0  # prompt tokens taken from the prefill worker's prefix cache
    queue_s: float = 0.0  # arrival to the first engine step that computed it
    prefill_s: float = 0.0  # that step's start to the end of the step that sampled token 1
    transfer_s: float = 0.0  # exposed transfer: end of that step to Commit's answer
    num_bytes: int = 0
    code: str = ""  # gRPC status name for the router when not COMMITTED
    detail: str = ""
