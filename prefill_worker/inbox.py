"""What the prefill loop's inbox carries: tasks with their Futures, aborts, retirements.

A `PendingTask` is one `PrefillTask` from `submit` until its Future resolves: its deadline,
its Reserve backoff while the decode side is full, and when its first engine step began
(the queue and prefill phase timings in its `PrefillResult`).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from decode_worker.messages import PrefillResult, PrefillStatus, PrefillTask
from kv_transfer.layer_stream import TransferOutcome, TransferStatus

# Reserve refused for lack of room on the decode side: retry with exponential backoff
# (the request waits here, as it would in a queue) until its deadline.
RESERVE_RETRY_FIRST_S = 0.005
RESERVE_RETRY_MAX_S = 0.2


@dataclass(eq=False)
class PendingTask:
    task: PrefillTask
    future: Future[PrefillResult]
    arrival_s: float = field(default_factory=time.monotonic)
    deadline_s: float = 0.0
    first_step_s: float | None = None
    retry_at_s: float = 0.0
    retry_wait_s: float = 0.0

    def __post_init__(self) -> None:
        self.deadline_s = self.arrival_s + self.task.timeout_s

    def back_off(self) -> None:
        """Set the next Reserve attempt: 5 ms after the first refusal, doubling to 200 ms."""
        self.retry_wait_s = min(
            max(2 * self.retry_wait_s, RESERVE_RETRY_FIRST_S), RESERVE_RETRY_MAX_S
        )
        self.retry_at_s = time.monotonic() + self.retry_wait_s

    def resolve(self, status: PrefillStatus, code: str, detail: str) -> None:
        """Resolve the Future with a result that carries no token (refused, aborted, ...)."""
        self.future.set_result(
            PrefillResult(self.task.request_id, status, code=code, detail=detail)
        )

    def transfer_result(
        self,
        outcome: TransferOutcome,
        num_cached_tokens: int,
        first_step_s: float,
        end_s: float,
    ) -> PrefillResult:
        """The result of a request whose transfer ended (Commit answered, or failed)."""
        ok = outcome.status is TransferStatus.COMMITTED
        return PrefillResult(
            request_id=self.task.request_id,
            status=PrefillStatus.COMMITTED if ok else PrefillStatus.FAILED,
            first_token_id=outcome.first_token_id if ok else None,
            num_cached_tokens=num_cached_tokens,
            queue_s=first_step_s - self.arrival_s,
            prefill_s=end_s - first_step_s,
            transfer_s=outcome.record.exposed_s,
            num_bytes=outcome.record.num_bytes,
            code="" if ok else "UNAVAILABLE",
            detail=outcome.detail,
        )


@dataclass(frozen=True)
class AbortMessage:
    request_id: str
    reason: str
    future: Future[bool]


@dataclass(frozen=True)
class RetireMessage:
    """A transfer to this decode worker failed after the loop let go of it (its Commit)."""

    kv_address: str


InboxItem = PendingTask | AbortMessage | RetireMessage
