"""What the load generator talks to: the `Target` interface and its in-process fake.

A `Target` sends one `BenchRequest` and yields the response as `StreamChunk`s as they arrive;
the runner timestamps each chunk on receipt. The contract every target keeps:

- chunks arrive in order; a chunk may carry zero tokens (a text-only or final message);
- the last chunk carries the server's `Usage` and `ServerPhases` where the server reports them;
- a failure raises `TargetError` with a gRPC status name (`UNAVAILABLE`, `DEADLINE_EXCEEDED`,
  `RESOURCE_EXHAUSTED`, `INVALID_ARGUMENT`, ...) and a message;
- nothing blocks past `timeout_s`: a target past it raises `TargetError("DEADLINE_EXCEEDED")`;
- closing the iterator early (the runner's own deadline) cancels the request on the server.

`GrpcTarget` loads a Baton router through `baton.client.BatonClient` (any address: a local
`baton serve` or a deployed cluster). `FakeTarget` serves from this process with configurable
delays and a simulated prefix cache, so the runner, metrics and reports are tested end to end
without a cluster.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from baton.client import BatonClient, build_request
from loadtest.metrics import ServerPhases
from loadtest.workload import BenchRequest
from protos import serving_pb2 as pb

MS_PER_S = 1000.0


@dataclass(frozen=True)
class Usage:
    """Token counts the server reports at the end of a request."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class StreamChunk:
    token_ids: tuple[int, ...]
    text: str = ""
    usage: Usage | None = None  # last chunk only
    phases: ServerPhases | None = None  # last chunk only


class TargetError(Exception):
    """A request failed; `code` is a gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Target(ABC):
    """A serving endpoint under load. `stream` is called from many threads at once."""

    @abstractmethod
    def stream(
        self, request: BenchRequest, request_id: str, timeout_s: float
    ) -> Iterator[StreamChunk]:
        """Send `request` and yield its response chunks; see the module docstring."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What was loaded (address, mode, settings), for the results file."""

    def close(self) -> None:  # noqa: B027 - optional hook, most targets hold nothing
        """Release connections; called once after the last request."""

    def worker_steps(self) -> dict[str, tuple[int, float, int]]:
        """Per worker ("role:name"): engine steps so far, their wall seconds, their batch
        rows; {} where the target cannot tell (differences over a run: `step_deltas`)."""
        return {}


@dataclass(frozen=True)
class FakeTargetConfig:
    """Delays of the fake server, in seconds.

    TTFT = `base_ttft_s` + `prefill_s_per_token` x (prompt tokens not in the prefix cache);
    then one chunk of `tokens_per_chunk` tokens every `itl_s`, until `max_tokens`. The prefix
    cache holds every full `block_size` block of every prompt seen, keyed by cache salt and
    the whole prefix (as Baton's block manager), and a hit leaves at least one token to
    compute. Requests whose id is in `fail_request_ids` fail with `fail_code` after their first
    chunk.
    """

    base_ttft_s: float = 0.002
    prefill_s_per_token: float = 0.0
    itl_s: float = 0.001
    tokens_per_chunk: int = 1
    block_size: int = 16
    fail_request_ids: frozenset[str] = frozenset()
    fail_code: str = "UNAVAILABLE"

    def __post_init__(self) -> None:
        if min(self.base_ttft_s, self.prefill_s_per_token, self.itl_s) < 0:
            raise ValueError("fake target delays must be >= 0")
        if self.tokens_per_chunk < 1 or self.block_size < 1:
            raise ValueError("tokens_per_chunk and block_size must be >= 1")


class FakeTarget(Target):
    """An in-process server for tests; emits `max_tokens` tokens (ids 0, 1, 2, ...)."""

    def __init__(self, config: FakeTargetConfig | None = None) -> None:
        self.config = config or FakeTargetConfig()
        self._lock = threading.Lock()
        self._cached_blocks: set[tuple[str | None, tuple[int, ...]]] = set()  # guarded by _lock
        self.num_requests = 0  # guarded by _lock

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "fake",
            **{k: v for k, v in vars(self.config).items() if k != "fail_request_ids"},
        }

    def _prefill(self, request: BenchRequest) -> tuple[int, int]:
        """(prompt tokens, cached tokens); registers the prompt's full blocks."""
        block = self.config.block_size
        prompt = request.prompt_token_ids
        if prompt is None:  # text: one "token" per UTF-8 byte
            assert request.prompt_text is not None
            prompt = tuple(request.prompt_text.encode("utf-8"))
        keys = [(request.cache_salt, prompt[:end]) for end in range(block, len(prompt) + 1, block)]
        with self._lock:
            self.num_requests += 1
            num_hit_blocks = 0
            while num_hit_blocks < len(keys) and keys[num_hit_blocks] in self._cached_blocks:
                num_hit_blocks += 1
            self._cached_blocks.update(keys)
        cached = min(num_hit_blocks * block, len(prompt) - 1)
        return len(prompt), cached

    def stream(
        self, request: BenchRequest, request_id: str, timeout_s: float
    ) -> Iterator[StreamChunk]:
        cfg = self.config
        deadline = time.perf_counter() + timeout_s

        def sleep(duration_s: float) -> None:
            if time.perf_counter() + duration_s > deadline:
                time.sleep(max(0.0, deadline - time.perf_counter()))
                raise TargetError(
                    "DEADLINE_EXCEEDED", f"{request_id} passed its {timeout_s:.3f} s deadline"
                )
            time.sleep(duration_s)

        prompt_tokens, cached_tokens = self._prefill(request)
        ttft_s = cfg.base_ttft_s + cfg.prefill_s_per_token * (prompt_tokens - cached_tokens)
        sleep(ttft_s)
        sent = 0
        while sent < request.max_tokens:
            if sent > 0:
                sleep(cfg.itl_s)
            num = min(cfg.tokens_per_chunk, request.max_tokens - sent)
            ids = tuple(range(sent, sent + num))
            sent += num
            last = sent == request.max_tokens
            yield StreamChunk(
                token_ids=ids,
                text="x" * num,
                usage=Usage(prompt_tokens, sent, cached_tokens) if last else None,
                phases=ServerPhases(
                    router_s=0.0,
                    prefill_queue_s=0.0,
                    prefill_s=ttft_s,
                    transfer_s=0.0,
                    decode_queue_s=0.0,
                    other_s=0.0,
                    server_ttft_s=ttft_s,
                    mode="fake",
                )
                if last
                else None,
            )
            if request_id in cfg.fail_request_ids:
                raise TargetError(cfg.fail_code, f"{request_id} failed as the test asked")


def phases_from_timings(timings: pb.Timings) -> ServerPhases:
    """The serving API's TTFT split (milliseconds) as `ServerPhases` (seconds)."""
    return ServerPhases(
        router_s=timings.router_ms / MS_PER_S,
        prefill_queue_s=timings.prefill_queue_ms / MS_PER_S,
        prefill_s=timings.prefill_ms / MS_PER_S,
        transfer_s=timings.transfer_ms / MS_PER_S,
        decode_queue_s=timings.decode_queue_ms / MS_PER_S,
        other_s=timings.other_ms / MS_PER_S,
        server_ttft_s=timings.ttft_ms / MS_PER_S,
        mode=timings.mode,
    )


@dataclass(frozen=True)
class GrpcTargetConfig:
    """How requests are sent. `ignore_eos` (the default) makes every request generate exactly
    `max_tokens`, so output lengths are the workload's, as in `vllm bench serve --ignore-eos`;
    `temperature` None leaves the server's default."""

    address: str
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float | None = None

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("the target needs an address, HOST:PORT of a Baton router")


class GrpcTarget(Target):
    """A Baton router over its gRPC serving API; one channel shared by all request threads."""

    def __init__(self, config: GrpcTargetConfig) -> None:
        self.config = config
        self.client = BatonClient(config.address, api_key=config.api_key, timeout_s=None)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the router answers Health with serving=true; ValueError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        last_error = "no answer"
        while time.monotonic() < deadline:
            try:
                if self.client.health().serving:
                    return
                last_error = "the router is up but not serving (no healthy workers)"
            except grpc.RpcError as exc:
                last_error = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.2)
        raise ValueError(
            f"no Baton router serving at {self.config.address} after {timeout_s:.0f} s "
            f"({last_error}); start one with `baton serve` or pass its --address"
        )

    def describe(self) -> dict[str, Any]:
        """The address and settings, plus the cluster's mode, policy and workers where the
        router answers Stats."""
        described: dict[str, Any] = {
            "kind": "grpc",
            "address": self.config.address,
            "ignore_eos": self.config.ignore_eos,
            "temperature": self.config.temperature,
        }
        try:
            stats = self.client.stats()
        except grpc.RpcError:
            return described
        described["mode"] = stats.mode
        described["policy"] = stats.policy
        described["workers"] = sorted(f"{w.role}:{w.name}" for w in stats.workers)
        return described

    def worker_steps(self) -> dict[str, tuple[int, float, int]]:
        try:
            stats = self.client.stats()
        except grpc.RpcError:
            return {}
        return {f"{w.role}:{w.name}": (w.num_steps, w.step_s, w.step_rows) for w in stats.workers}

    def start_call(self, request: BenchRequest, request_id: str, timeout_s: float) -> Any:
        """Send the request; the streaming call, for the caller to read (or cancel)."""
        prompt = (
            request.prompt_token_ids
            if request.prompt_token_ids is not None
            else request.prompt_text
        )
        assert prompt is not None
        return self.client.stream(
            build_request(
                prompt,
                request_id=request_id,
                max_tokens=request.max_tokens,
                temperature=self.config.temperature,
                ignore_eos=self.config.ignore_eos,
                cache_salt=request.cache_salt or "",
            ),
            timeout_s=timeout_s,
        )

    def stream(
        self, request: BenchRequest, request_id: str, timeout_s: float
    ) -> Iterator[StreamChunk]:
        yield from chunks_from_call(self.start_call(request, request_id, timeout_s))

    def close(self) -> None:
        self.client.close()


def chunks_from_call(call: Any) -> Iterator[StreamChunk]:
    """A Generate call's responses as StreamChunks; gRPC errors become TargetError.

    The call is cancelled on the way out: a no-op once the stream has ended, else it aborts
    the request on the server (the consumer stopped early)."""
    try:
        for response in call:
            last = response.finish_reason != pb.FINISH_REASON_UNSPECIFIED
            usage = timings = None
            if last and response.HasField("usage"):
                u = response.usage
                usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
            if last and response.HasField("timings"):
                timings = phases_from_timings(response.timings)
            yield StreamChunk(tuple(response.token_ids), response.text, usage, timings)
    except grpc.RpcError as exc:
        raise TargetError(exc.code().name, exc.details() or "") from None
    finally:
        call.cancel()


def step_deltas(
    before: dict[str, tuple[int, float, int]],
    after: dict[str, tuple[int, float, int]],
    duration_s: float,
) -> dict[str, dict[str, float]]:
    """What each worker's engine loop did between two `worker_steps` readings: steps, mean
    step ms, mean batch rows, and the share of `duration_s` spent in steps (busy)."""
    out: dict[str, dict[str, float]] = {}
    for worker, (steps, step_s, rows) in sorted(after.items()):
        steps0, step_s0, rows0 = before.get(worker, (0, 0.0, 0))
        n = steps - steps0
        if n <= 0:
            continue
        out[worker] = {
            "steps": n,
            "step_ms": round((step_s - step_s0) / n * 1e3, 2),
            "rows": round((rows - rows0) / n, 1),
            "busy": round((step_s - step_s0) / duration_s, 3) if duration_s > 0 else 0.0,
        }
    return out
