"""How the router talks to workers: two small async interfaces, with Ray implementations.

The router only ever sees `PrefillClient` and `DecodeClient`; `RayPrefillClient` and
`RayDecodeClient` call the worker actors, and `router/fake_workers.py` implements the same
interfaces in-process (tests, the router benchmark). Every call takes a timeout: a worker
that does not answer in time is a failed call, never a hung request.
"""

from __future__ import annotations

import asyncio
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


class RayTokenStream(TokenStream):
    def __init__(self, gen: ray.ObjectRefGenerator) -> None:
        self._gen = gen

    async def next(self, timeout_s: float) -> TokenChunk:
        try:
            ref = await asyncio.wait_for(self._gen.__anext__(), timeout_s)
        except StopAsyncIteration:
            raise StreamEnded("the decode worker ended the stream early") from None
        except RayError as e:
            raise WorkerUnavailable(str(e).splitlines()[0]) from e
        return await _call(ref, timeout_s)


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

    def open_stream(self, request_id: str, timeout_s: float) -> TokenStream:
        return RayTokenStream(self.actor.stream.remote(request_id, timeout_s))

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
