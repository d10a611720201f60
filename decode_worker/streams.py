"""Per-request output buffers between the decode loop thread and the router's stream calls.

The loop thread `publish`es every engine output; a consumer (the actor's stream method)
`take`s everything buffered for its request at once, so a slow consumer gets tokens
coalesced into one chunk instead of falling behind one message per token.

A stream is created by whichever comes first: the router opening it (usually before the
Commit, so nothing is missed) or the first output. It ends when its final chunk is taken,
when it is closed (abort, deadline), or when nobody claims it for `orphan_ttl_s`.

    publish ──▶ [pending outputs] ──take──▶ TokenChunk ──▶ consumer
                     │ listener() called after every publish/close (wakes the consumer)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from decode_worker.messages import TokenChunk
from engine.engine import RequestOutput


@dataclass(eq=False)
class _Stream:
    request_id: str
    created_s: float = field(default_factory=time.monotonic)
    start_s: float | None = None  # commit / local admission: decode_queue_s counts from here
    outputs: list[RequestOutput] = field(default_factory=list)
    num_taken: int = 0
    claimed: bool = False
    closed_error: str = ""
    listener: Callable[[], None] | None = None


class OutputStreams:
    def __init__(self, orphan_ttl_s: float = 120.0) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self.orphan_ttl_s = orphan_ttl_s

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def _get(self, request_id: str) -> _Stream:
        s = self._streams.get(request_id)
        if s is None:
            s = self._streams[request_id] = _Stream(request_id)
        return s

    def mark_start(self, request_id: str) -> None:
        """The request entered the decode engine (Commit or local admission)."""
        with self._lock:
            s = self._get(request_id)
            if s.start_s is None:
                s.start_s = time.monotonic()

    def claim(self, request_id: str, listener: Callable[[], None]) -> None:
        """A consumer attaches; `listener` is called (from any thread) when data arrives."""
        with self._lock:
            s = self._get(request_id)
            s.claimed = True
            s.listener = listener
        listener()  # data may already be waiting

    def publish(self, outputs: list[RequestOutput]) -> None:
        listeners = []
        with self._lock:
            for out in outputs:
                s = self._get(out.request_id)
                s.outputs.append(out)
                if s.listener is not None:
                    listeners.append(s.listener)
        for notify in listeners:
            notify()

    def close(self, request_id: str, error: str) -> None:
        """End a stream without a final output (abort, deadline); the consumer sees `error`."""
        with self._lock:
            s = self._streams.get(request_id)
            if s is None:
                return
            s.closed_error = error
            listener = s.listener
            if not s.claimed:
                del self._streams[request_id]
        if listener is not None:
            listener()

    def take(self, request_id: str) -> TokenChunk | None:
        """Everything buffered for the request as one chunk; None if nothing is new.

        The returned chunk is final (finished or error) exactly once; the stream is gone after.
        """
        with self._lock:
            s = self._streams.get(request_id)
            if s is None:
                return TokenChunk(request_id, (), "", True, None, 0, 0, 0, error="unknown stream")
            outs, s.outputs = s.outputs, []
            if not outs and not s.closed_error:
                return None
            first = s.num_taken == 0 and bool(outs)
            s.num_taken += len(outs)
            finished = any(o.finished for o in outs)
            if finished or s.closed_error:
                del self._streams[request_id]
        queue_s = 0.0
        if first and s.start_s is not None:
            queue_s = time.monotonic() - s.start_s
        last = outs[-1] if outs else None
        return TokenChunk(
            request_id=request_id,
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
        )

    def drop_orphans(self) -> list[str]:
        """Forget streams nobody claimed within orphan_ttl_s (the router went away)."""
        now = time.monotonic()
        with self._lock:
            dead = [
                rid
                for rid, s in self._streams.items()
                if not s.claimed and now - s.created_s > self.orphan_ttl_s
            ]
            for rid in dead:
                del self._streams[rid]
        return dead
