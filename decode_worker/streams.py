"""Per-request output buffers between the decode loop thread and the router.

The loop thread `publish`es every engine output. A request's output goes to whichever
subscription `watch`es it: the router holds one subscription per decode worker, and every
wake-up of it `take_ready`s a `TokenChunk` for each watched request that has something new,
so one engine step reaches the router as one message however many requests it advanced,
and a slow consumer gets tokens coalesced instead of falling behind one message per token.

A stream is created by whichever comes first: the watch (usually before the Commit, so
nothing is missed), the first output, or a close. It ends when its final chunk is taken,
when it is closed (abort, deadline: the chunk carries the error), or when nobody watches it
for `orphan_ttl_s`.

    publish ──▶ [pending outputs] ──take_ready──▶ [TokenChunk, ...] ──▶ subscription
                     │ the subscription's listener is called once per publish/close
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from decode_worker.messages import TokenChunk
from engine.engine import RequestOutput


@dataclass(eq=False)
class Subscription:
    """One consumer of many streams: the requests with something to take, and its wake-up."""

    name: str
    listener: Callable[[], None] | None = None
    ready: dict[str, None] = field(default_factory=dict)  # ordered set of request ids


@dataclass(eq=False)
class _Stream:
    request_id: str
    created_s: float = field(default_factory=time.monotonic)
    start_s: float | None = None  # commit / local admission: decode_queue_s counts from here
    deadline_s: float = float("inf")  # monotonic; set by the watch
    outputs: list[RequestOutput] = field(default_factory=list)
    num_taken: int = 0
    subscription: Subscription | None = None
    closed_error: str = ""


class OutputStreams:
    def __init__(self, orphan_ttl_s: float = 120.0) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._subscriptions: dict[str, Subscription] = {}
        self.orphan_ttl_s = orphan_ttl_s

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def _get(self, request_id: str) -> _Stream:
        s = self._streams.get(request_id)
        if s is None:
            s = self._streams[request_id] = _Stream(request_id)
        return s

    def _subscription(self, name: str) -> Subscription:
        sub = self._subscriptions.get(name)
        if sub is None:
            sub = self._subscriptions[name] = Subscription(name)
        return sub

    def _mark_ready(self, s: _Stream, wake: dict[int, Callable[[], None]]) -> None:
        sub = s.subscription
        if sub is not None:
            sub.ready[s.request_id] = None
            if sub.listener is not None:
                wake[id(sub)] = sub.listener

    @staticmethod
    def _notify(wake: dict[int, Callable[[], None]]) -> None:
        for notify in wake.values():
            notify()

    # ---- the producer side (the loop thread, abort) ---------------------------------------

    def mark_start(self, request_id: str) -> None:
        """The request entered the decode engine (Commit or local admission)."""
        with self._lock:
            s = self._get(request_id)
            if s.start_s is None:
                s.start_s = time.monotonic()

    def publish(self, outputs: list[RequestOutput]) -> None:
        wake: dict[int, Callable[[], None]] = {}
        with self._lock:
            for out in outputs:
                s = self._get(out.request_id)
                s.outputs.append(out)
                self._mark_ready(s, wake)
        self._notify(wake)

    def close(self, request_id: str, error: str) -> None:
        """End a stream without a final output (abort, deadline); its consumer sees `error`.

        A stream nobody watches yet is kept, closed, until the orphan sweep: a watch that
        arrives after the abort still gets the error instead of waiting for its deadline.
        """
        wake: dict[int, Callable[[], None]] = {}
        with self._lock:
            s = self._get(request_id)
            s.closed_error = error
            self._mark_ready(s, wake)
        self._notify(wake)

    # ---- the consumer side (the actor's subscription) -------------------------------------

    def attach(self, subscription: str, listener: Callable[[], None]) -> None:
        """The consumer of `subscription` is running; `listener` wakes it (from any thread)."""
        with self._lock:
            self._subscription(subscription).listener = listener
        listener()

    def detach(self, subscription: str) -> list[str]:
        """The consumer went away: returns the unfinished requests it was watching."""
        with self._lock:
            sub = self._subscriptions.pop(subscription, None)
            if sub is None:
                return []
            sub.listener = None
            left = []
            for rid, s in self._streams.items():
                if s.subscription is sub:
                    s.subscription, s.created_s = None, time.monotonic()
                    left.append(rid)
            return left

    def watch(self, subscription: str, request_id: str, timeout_s: float) -> None:
        """Send the request's output to `subscription` until it ends or timeout_s passes."""
        wake: dict[int, Callable[[], None]] = {}
        with self._lock:
            s = self._get(request_id)
            s.subscription = self._subscription(subscription)
            s.deadline_s = time.monotonic() + timeout_s
            if s.outputs or s.closed_error:  # data may already be waiting
                self._mark_ready(s, wake)
        self._notify(wake)

    def expired(self, subscription: str, now: float) -> list[str]:
        """The requests `subscription` watches that are open past their deadline."""
        with self._lock:
            sub = self._subscriptions.get(subscription)
            return [
                rid
                for rid, s in self._streams.items()
                if sub is not None
                and s.subscription is sub
                and not s.closed_error
                and s.deadline_s <= now
            ]

    def take_ready(self, subscription: str) -> list[TokenChunk]:
        """One chunk per watched request with something new; finished streams are gone after."""
        chunks = []
        with self._lock:
            sub = self._subscriptions.get(subscription)
            if sub is None:
                return []
            ready, sub.ready = sub.ready, {}
            for rid in ready:
                s = self._streams.get(rid)
                if s is not None and s.subscription is sub:
                    chunk = self._take(s)
                    if chunk is not None:
                        chunks.append(chunk)
        return chunks

    def _take(self, s: _Stream) -> TokenChunk | None:
        """Everything buffered for the request as one chunk; None if nothing is new. (Under
        the lock.) The returned chunk is final (finished or error) exactly once."""
        outs, s.outputs = s.outputs, []
        if not outs and not s.closed_error:
            return None
        first = s.num_taken == 0 and bool(outs)
        s.num_taken += len(outs)
        finished = any(o.finished for o in outs)
        if finished or s.closed_error:
            del self._streams[s.request_id]
        queue_s = 0.0
        if first and s.start_s is not None:
            queue_s = time.monotonic() - s.start_s
        last = outs[-1] if outs else None
        return TokenChunk(
            request_id=s.request_id,
            token_ids=tuple(t for o in outs for t in o.new_token_ids),
            text="".join(o.new_text for o in outs),
            finished=finished or bool(s.closed_error),
            finish_reason=next(
                (o.finish_reason.value for o in outs if o.finish_reason is not None), None
            ),
            num_prompt_tokens=last.num_prompt_tokens if last else 0,
            num_cached_tokens=last.num_cached_tokens if last else 0,
            num_output_tokens=last.num_output_tokens if last else 0,
            decode_queue_s=queue_s,
            error="" if finished else s.closed_error,
            logprobs=tuple((lp.logprob, lp.top) for o in outs for lp in o.logprobs),
        )

    def drop_orphans(self) -> list[str]:
        """Forget streams nobody watched within orphan_ttl_s; returns the unfinished ones
        (the router went away: their requests should be aborted). Closed ones just go."""
        now = time.monotonic()
        dead = []
        with self._lock:
            for rid, s in list(self._streams.items()):
                if s.subscription is None and now - s.created_s > self.orphan_ttl_s:
                    del self._streams[rid]
                    if not s.closed_error:
                        dead.append(rid)
        return dead
