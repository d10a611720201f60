"""`WorkerSlot`: the router's view of one worker (its client, load, counts, health).

The router keeps one slot per worker and refreshes it from the load poll
(`Router._probe`); `view` is what a routing policy sees of it (router/policies.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from decode_worker.messages import WorkerLoad
from router.policies import WorkerView
from router.prefix_index import PrefixIndex
from router.workers import DecodeClient, PrefillClient


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
