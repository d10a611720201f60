"""In-process fake workers behind the router's client interfaces (tests, router benchmark).

`FakeDecode` produces `num_tokens` tokens per request (prompt token ids echoed, or a
counter) with an optional delay per token; `FakePrefill` answers a prefill after an
optional delay. Both record what they were asked, so tests can assert where requests went
and that aborts arrived. No engine, no Ray: what is measured with them is the router alone.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from decode_worker.messages import (
    PrefillResult,
    PrefillStatus,
    PrefillTask,
    TokenChunk,
    WorkerLoad,
    WorkerRole,
)
from engine.sampling_params import SamplingParams
from router.workers import DecodeClient, PrefillClient, TokenStream


@dataclass
class _Req:
    prompt: tuple[int, ...]
    params: SamplingParams
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: bool = False


class _FakeStream(TokenStream):
    def __init__(self, owner: FakeDecode, request_id: str) -> None:
        self._owner = owner
        self._rid = request_id

    async def next(self, timeout_s: float) -> TokenChunk:
        req = await asyncio.wait_for(self._owner._wait_request(self._rid), timeout_s)
        return await asyncio.wait_for(req.queue.get(), timeout_s)


class FakeDecode(DecodeClient):
    def __init__(
        self, name: str = "fake-decode", token_delay_s: float = 0.0, kv_address: str = "fake:0"
    ) -> None:
        self.name = name
        self.kv_address = kv_address
        self.token_delay_s = token_delay_s
        self.requests: dict[str, _Req] = {}
        self.aborted: list[str] = []
        self.local: list[str] = []
        self._arrived: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task] = set()

    def _event(self, rid: str) -> asyncio.Event:
        return self._arrived.setdefault(rid, asyncio.Event())

    async def _wait_request(self, rid: str) -> _Req:
        await self._event(rid).wait()
        return self.requests[rid]

    def start_request(self, rid: str, prompt: tuple[int, ...], params: SamplingParams) -> None:
        req = self.requests[rid] = _Req(prompt, params)
        self._event(rid).set()
        task = asyncio.ensure_future(self._produce(rid, req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _produce(self, rid: str, req: _Req) -> None:
        n = req.params.max_tokens
        for i in range(n):
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            if rid in self.aborted:
                return
            token = req.prompt[i % len(req.prompt)]
            done = i == n - 1
            await req.queue.put(
                TokenChunk(
                    rid,
                    (token,),
                    chr(token) if token < 128 else "",
                    done,
                    "length" if done else None,
                    len(req.prompt),
                    0,
                    i + 1,
                )
            )

    def open_stream(self, request_id: str, timeout_s: float) -> TokenStream:
        return _FakeStream(self, request_id)

    async def submit_local(self, request_id, prompt, params, cache_salt) -> None:  # noqa: ANN001
        self.local.append(request_id)
        self.start_request(request_id, prompt, params)

    async def abort(self, request_id: str, reason: str) -> None:
        self.aborted.append(request_id)

    async def close(self) -> None:
        """The router stops: the token producers still running stop with it."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def load(self) -> WorkerLoad:
        return WorkerLoad(
            self.name,
            WorkerRole.DECODE,
            "fake",
            0,
            len(self._tasks),
            100,
            100,
            0,
            0,
            0,
            0,
            self.kv_address,
        )

    async def health(self) -> tuple[bool, str]:
        return True, "ok"


class FakePrefill(PrefillClient):
    def __init__(
        self,
        decode: list[FakeDecode],
        name: str = "fake-prefill",
        delay_s: float = 0.0,
        refuse: tuple[str, str] | None = None,
    ) -> None:
        """refuse: (gRPC code name, detail) to answer every prefill with REJECTED."""
        self.name = name
        self.delay_s = delay_s
        self.refuse = refuse
        self._decode = {d.kv_address: d for d in decode}
        self.tasks: list[PrefillTask] = []
        self.aborted: list[str] = []

    async def prefill(self, task: PrefillTask) -> PrefillResult:
        self.tasks.append(task)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if task.request_id in self.aborted:
            return PrefillResult(task.request_id, PrefillStatus.ABORTED, code="CANCELLED")
        if self.refuse is not None:
            code, detail = self.refuse
            return PrefillResult(task.request_id, PrefillStatus.REJECTED, code=code, detail=detail)
        self._decode[task.kv_address].start_request(
            task.request_id, task.prompt_token_ids, task.params
        )
        return PrefillResult(
            task.request_id, PrefillStatus.COMMITTED, first_token_id=task.prompt_token_ids[0]
        )

    async def abort(self, request_id: str, reason: str) -> None:
        self.aborted.append(request_id)

    async def load(self) -> WorkerLoad:
        return WorkerLoad(self.name, WorkerRole.PREFILL, "fake", 0, 0, 100, 100, 0, 0, 0, 0)

    async def health(self) -> tuple[bool, str]:
        return True, "ok"
