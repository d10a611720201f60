"""A subscription's delivery loop: the decode side of the router's one token stream.

`deliver` runs in the actor's event loop for as long as the router reads the subscription.
The engine's loop thread wakes it (once per published step, through
`call_soon_threadsafe`); each wake-up takes one `TokenChunk` per watched request that
advanced and yields them as one list, so the per-message cost (Ray's streaming-generator
item, the router's receive) is paid per step, not per request per step. Every
`DEADLINE_SWEEP_S` it aborts watched requests past their deadline (their chunk carries the
error). When the consumer goes away (the generator is closed or cancelled), its unfinished
requests are aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from decode_worker.messages import TokenChunk
from decode_worker.streams import OutputStreams

DEADLINE_SWEEP_S = 0.25


async def deliver(
    streams: OutputStreams, subscription: str, abort: Callable[[str, str], object]
) -> AsyncIterator[list[TokenChunk]]:
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    streams.attach(subscription, lambda: loop.call_soon_threadsafe(event.set))
    next_sweep_s = 0.0
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), max(next_sweep_s - time.monotonic(), 0))
            event.clear()
            now = time.monotonic()
            if now >= next_sweep_s:
                next_sweep_s = now + DEADLINE_SWEEP_S
                for request_id in streams.expired(subscription, now):
                    abort(request_id, "deadline exceeded on the decode worker")
            chunks = streams.take_ready(subscription)
            if chunks:
                yield chunks
    finally:
        for request_id in streams.detach(subscription):
            abort(request_id, "the router's subscription ended")
