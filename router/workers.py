"""How the router talks to workers: two small async interfaces, with Ray implementations.

The router only ever sees `PrefillClient` and `DecodeClient`; `RayPrefillClient` and
`RayDecodeClient` call the worker actors, and `router/fake_workers.py` implements the same
interfaces in-process (tests, the router benchmark). Every call takes a timeout: a worker
that does not answer in time is a failed call, never a hung request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from abc import ABC, abstractmethod

import ray
from ray.exceptions import RayError

from decode_worker.messages import PrefillResult, PrefillTask, TokenChunk, WorkerLoad
from engine.sampling_params import SamplingParams


class WorkerUnavailable(Exception):
    """The worker did not answer (dead actor, timeout): maps to UNAVAILABLE."""


class StreamEnded(Exception):
    """A token stream ended without a final chunk."""


class TokenStream(ABC):
    @abstractmethod
    async def next(self, timeout_s: float) -> TokenChunk:
        """The next chunk; raises TimeoutError, StreamEnded or WorkerUnavailable."""

    def close(self) -> None:  # noqa: B027 - optional
        """The router stops reading before the final chunk (the worker side is aborted
        separately); releases what the stream holds on the router."""


class PrefillClient(ABC):
    name: str

    @abstractmethod
    async def prefill(self, task: PrefillTask) -> PrefillResult:
        """Resolves when the KV is committed on the decode worker, or failed."""

    @abstractmethod
    async def abort(self, request_id: str, reason: str) -> None: ...

    @abstractmethod
    async def load(self) -> WorkerLoad: ...

    @abstractmethod
    async def health(self) -> tuple[bool, str]: ...


class DecodeClient(ABC):
    name: str
    kv_address: str  # empty for a colocated replica

    @abstractmethod
    def open_stream(self, request_id: str, timeout_s: float) -> TokenStream:
        """Start receiving the request's tokens (before or after they exist)."""

    def restarted(self) -> None:  # noqa: B027 - optional
        """The worker behind this client is a new process (its load report says so)."""

    async def close(self) -> None:  # noqa: B027 - optional
        """The router stops: end what the client runs in the background."""

    @abstractmethod
    async def submit_local(
        self, request_id: str, prompt: tuple[int, ...], params: SamplingParams, cache_salt: str
    ) -> None:
        """Prefill and decode on this worker. Raises ValueError if it can never run."""

    @abstractmethod
    async def abort(self, request_id: str, reason: str) -> None: ...

    @abstractmethod
    async def load(self) -> WorkerLoad: ...

    @abstractmethod
    async def health(self) -> tuple[bool, str]: ...


# ---- Ray ----------------------------------------------------------------------------------

CONTROL_TIMEOUT_S = 10.0


async def _call(ref: ray.ObjectRef, timeout_s: float = CONTROL_TIMEOUT_S) -> object:
    try:
        return await asyncio.wait_for(ref, timeout_s)
    except TimeoutError:
        raise
    except RayError as e:
        raise WorkerUnavailable(str(e).splitlines()[0]) from e


class _QueuedStream(TokenStream):
    """One request's chunks, pushed by its decode worker's `_Subscription`."""

    def __init__(self, subscription: _Subscription, request_id: str) -> None:
        self._subscription = subscription
        self.request_id = request_id
        self.queue: asyncio.Queue[TokenChunk | Exception] = asyncio.Queue()
        self._error: Exception | None = None

    async def next(self, timeout_s: float) -> TokenChunk:
        if self._error is not None:
            raise self._error
        item = await asyncio.wait_for(self.queue.get(), timeout_s)
        # Whatever else has arrived goes out with it: one message to the client, not several.
        while isinstance(item, TokenChunk) and not item.finished and not self.queue.empty():
            more = self.queue.get_nowait()
            if isinstance(more, Exception):
                self._error = more
                break
            item = item.then(more)
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._subscription.forget(self)


class _Subscription:
    """The router's token stream from one decode worker: one Ray streaming generator whose
    items are lists of chunks (one per request that advanced), dispatched here to the
    requests' queues. Requests join it with a `watch` call, batched per event-loop turn.
    When the generator fails (the worker died) every open request gets the error."""

    _ids = itertools.count()

    def __init__(self, actor: ray.actor.ActorHandle, worker_name: str) -> None:
        self._actor = actor
        self.name = f"router-{uuid.uuid4().hex[:8]}-{worker_name}-{next(self._ids)}"
        self._streams: dict[str, _QueuedStream] = {}
        self._to_watch: list[tuple[str, float]] = []
        self._task = asyncio.get_running_loop().create_task(self._pump())
        self.ended = False

    def open(self, request_id: str, timeout_s: float) -> _QueuedStream:
        stream = self._streams[request_id] = _QueuedStream(self, request_id)
        if not self._to_watch:
            asyncio.get_running_loop().call_soon(self._send_watches)
        self._to_watch.append((request_id, timeout_s))
        return stream

    def cancel(self) -> None:
        """End the pump: its open requests get StreamEnded."""
        self._task.cancel()

    async def close(self) -> None:
        self.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def forget(self, stream: _QueuedStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]

    def _send_watches(self) -> None:
        batch, self._to_watch = self._to_watch, []
        if batch and not self.ended:  # (fire and forget: a dead worker fails the pump)
            self._actor.watch.remote(self.name, batch)

    async def _pump(self) -> None:
        error: Exception = StreamEnded("the decode worker ended the token stream")
        try:
            async for ref in self._actor.subscribe.remote(self.name):
                for chunk in await ref:
                    stream = self._streams.get(chunk.request_id)
                    if stream is None:
                        continue
                    stream.queue.put_nowait(chunk)
                    if chunk.finished:
                        del self._streams[chunk.request_id]
        except RayError as e:
            error = WorkerUnavailable(str(e).splitlines()[0])
        except asyncio.CancelledError:
            error = StreamEnded("the router closed the token stream")
            raise
        finally:
            self.ended = True
            streams, self._streams = self._streams, {}
            for stream in streams.values():
                stream.queue.put_nowait(error)


class RayPrefillClient(PrefillClient):
    def __init__(self, name: str, actor: ray.actor.ActorHandle) -> None:
        self.name = name
        self.actor = actor

    async def prefill(self, task: PrefillTask) -> PrefillResult:
        return await _call(self.actor.prefill.remote(task), task.timeout_s + CONTROL_TIMEOUT_S)

    async def abort(self, request_id: str, reason: str) -> None:
        await _call(self.actor.abort.remote(request_id, reason))

    async def load(self) -> WorkerLoad:
        return await _call(self.actor.load.remote())

    async def health(self) -> tuple[bool, str]:
        return await _call(self.actor.health.remote())


class RayDecodeClient(DecodeClient):
    def __init__(self, name: str, actor: ray.actor.ActorHandle, kv_address: str) -> None:
        self.name = name
        self.actor = actor
        self.kv_address = kv_address
        self._subscription: _Subscription | None = None  # opened by the first stream

    def open_stream(self, request_id: str, timeout_s: float) -> TokenStream:
        if self._subscription is None or self._subscription.ended:
            self._subscription = _Subscription(self.actor, self.name)
        return self._subscription.open(request_id, timeout_s)

    async def close(self) -> None:
        if self._subscription is not None:
            await self._subscription.close()
            self._subscription = None

    def restarted(self) -> None:
        # The old process is gone: its requests end now (the router retries them) rather than
        # whenever Ray reports the generator dead, and new ones get a new subscription.
        if self._subscription is not None:
            self._subscription.cancel()
            self._subscription = None

    async def submit_local(
        self, request_id: str, prompt: tuple[int, ...], params: SamplingParams, cache_salt: str
    ) -> None:
        await _call(self.actor.submit_local.remote(request_id, list(prompt), params, cache_salt))

    async def abort(self, request_id: str, reason: str) -> None:
        await _call(self.actor.abort.remote(request_id, reason))

    async def load(self) -> WorkerLoad:
        return await _call(self.actor.load.remote())

    async def health(self) -> tuple[bool, str]:
        return await _call(self.actor.health.remote())
