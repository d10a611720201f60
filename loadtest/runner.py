"""The load driver: sends a workload to a `Target` on an arrival pattern and records each request.

One thread per request in flight (gRPC's blocking streams release the GIL while they wait), so
an open-loop run keeps its schedule while earlier requests are still streaming. The run, in
order:

    t = 0        the clock starts; open loop: request i is due at send_times_s[i]
    due          the dispatcher sleeps until the due time, then takes an in-flight slot
                 (`max_inflight`; waiting for one shows as client delay, send - due)
    send         a thread calls target.stream(); turn k of a conversation first waits for
                 turn k-1 to finish and is then sent as turn k-1's prompt + its streamed
                 answer + turn k's own message (`Turn.new_tokens`); every chunk is
                 timestamped on receipt
    end          the last chunk, an error, or the request's deadline:
                 min(send + request_timeout_s, max_duration_s)
    max_duration_s   no request is sent after it, and none runs past it: whatever still runs
                 is recorded as DEADLINE_EXCEEDED

Closed loop runs `concurrency` workers, each sending the next unsent request when its last one
ends. Invariant: every sent request has exactly one record when `run` returns, and
`duration_s` covers every record.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from loadtest.arrivals import Arrival, ClosedLoop, OpenLoop, RateSweep
from loadtest.metrics import RequestRecord, ServerPhases
from loadtest.targets import Target, TargetError, Usage
from loadtest.workload import BenchRequest

JOIN_GRACE_S = 1.0  # past max_duration_s, how long to wait for threads to notice their deadline


@dataclass(frozen=True)
class RunOptions:
    request_timeout_s: float = 300.0
    max_duration_s: float = 3600.0
    max_inflight: int = 1024
    progress: bool = True
    request_id_prefix: str = "bench"
    # open loop: called once with the run's clock (s) when the last request has been sent,
    # before the run waits for the answers (a sweep reads the workers' counters here)
    on_all_sent: Callable[[float], None] | None = None

    def __post_init__(self) -> None:
        if not self.request_timeout_s > 0 or not self.max_duration_s > 0:
            raise ValueError("request_timeout_s and max_duration_s must be > 0")
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")


@dataclass(frozen=True)
class RunRecords:
    """The raw outcome of one run: one record per sent request, in workload order."""

    arrival: dict[str, Any]
    records: list[RequestRecord]
    duration_s: float  # from t = 0 to the end of the last request
    num_not_sent: int  # requests still unsent at max_duration_s
    started_at_unix_s: float


class Progress:
    """A progress bar on stderr: tqdm where installed, else one rewritten line."""

    def __init__(self, total: int, enabled: bool, desc: str, stream: TextIO = sys.stderr) -> None:
        self.total, self.enabled, self.desc, self.stream = total, enabled, desc, stream
        self.done = 0
        self._lock = threading.Lock()
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, desc=desc, file=stream, unit="req")

    def update(self) -> None:
        with self._lock:
            self.done += 1
            if self._bar is not None:
                self._bar.update(1)
            elif self.enabled:
                self.stream.write(f"\r{self.desc}: {self.done}/{self.total} requests")
                self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self.stream.write("\n")


class _Run:
    """State of one run, shared by the dispatcher and the request threads."""

    def __init__(
        self, target: Target, requests: Sequence[BenchRequest], options: RunOptions, desc: str
    ) -> None:
        self.target, self.requests, self.options = target, requests, options
        self.records: list[RequestRecord | None] = [None] * len(requests)  # guarded by _lock
        self._lock = threading.Lock()
        self._turn_done = {
            (r.turn.conversation_id, r.turn.index): threading.Event()
            for r in requests
            if r.turn is not None
        }
        # (conversation, turn) -> (the prompt sent, the answer's token ids); written by the
        # turn's thread before its event is set, read by the next turn's thread after.
        self._turn_sent: dict[tuple[int, int], tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.progress = Progress(len(requests), options.progress, desc)
        self.start = time.perf_counter()

    def now_s(self) -> float:
        return time.perf_counter() - self.start

    def drive(self, index: int, due_s: float) -> None:
        """Send request `index` and record it; never raises."""
        request = self.requests[index]
        try:
            if request.turn is not None and request.turn.index > 0:
                previous = self._turn_done[(request.turn.conversation_id, request.turn.index - 1)]
                previous.wait(timeout=max(0.0, self.options.max_duration_s - self.now_s()))
                request = self._with_history(request)
            self._record(index, self._send(index, request, due_s))
        finally:
            if request.turn is not None:
                self._turn_done[(request.turn.conversation_id, request.turn.index)].set()

    def _with_history(self, request: BenchRequest) -> BenchRequest:
        """Turn k as sent: turn k-1's prompt and streamed answer, then its own message."""
        turn = request.turn
        assert turn is not None
        sent = self._turn_sent.get((turn.conversation_id, turn.index - 1))
        if turn.new_tokens == 0 or request.prompt_token_ids is None or sent is None:
            return request
        prompt, answer = sent
        if not answer:  # the previous turn failed: keep the workload's placeholder answer
            return request
        own = tuple(request.prompt_token_ids[-turn.new_tokens :])
        return dataclasses.replace(request, prompt_token_ids=prompt + answer + own)

    def _send(self, index: int, request: BenchRequest, due_s: float) -> RequestRecord:
        request_id = f"{self.options.request_id_prefix}-{index}"
        send_s = self.now_s()
        deadline_s = min(send_s + self.options.request_timeout_s, self.options.max_duration_s)
        chunk_times_s: list[float] = []
        chunk_num_tokens: list[int] = []
        answer: list[int] = []  # kept for multi-turn requests only
        usage: Usage | None = None
        phases: ServerPhases | None = None
        error: tuple[str, str] | None = None
        if deadline_s <= send_s:
            error = ("DEADLINE_EXCEEDED", "the run's time limit had passed when it was due")
        else:
            stream = None
            try:
                stream = self.target.stream(request, request_id, timeout_s=deadline_s - send_s)
                for chunk in stream:
                    received_s = self.now_s()
                    if chunk.token_ids:
                        chunk_times_s.append(received_s)
                        chunk_num_tokens.append(len(chunk.token_ids))
                        if request.turn is not None:
                            answer.extend(chunk.token_ids)
                    usage = chunk.usage or usage
                    phases = chunk.phases or phases
                    if received_s > deadline_s:
                        limit_s = deadline_s - send_s
                        error = (
                            "DEADLINE_EXCEEDED",
                            f"no end by the client deadline ({limit_s:.3f} s)",
                        )
                        break
            except TargetError as exc:
                error = (exc.code, exc.message)
            except Exception as exc:  # a broken target fails its request, not the run
                error = ("INTERNAL", f"{type(exc).__name__}: {exc}")
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()  # cancels the request on the server if it is still running
        if error is None and not chunk_times_s:
            error = ("NO_TOKENS", "the stream ended without a token")
        if request.turn is not None and request.prompt_token_ids is not None:
            key = (request.turn.conversation_id, request.turn.index)
            self._turn_sent[key] = (
                request.prompt_token_ids,
                tuple(answer) if error is None else (),
            )
        return RequestRecord(
            index=index,
            request_id=request_id,
            due_s=due_s,
            send_s=send_s,
            chunk_times_s=tuple(chunk_times_s),
            chunk_num_tokens=tuple(chunk_num_tokens),
            output_tokens=usage.completion_tokens if usage else sum(chunk_num_tokens),
            prompt_tokens=usage.prompt_tokens if usage else (request.prompt_len or 0),
            cached_tokens=usage.cached_tokens if usage else 0,
            category=request.category,
            tenant_id=request.tenant_id,
            phases=phases,
            error_code=None if error is None else error[0],
            error_message="" if error is None else error[1],
        )

    def _record(self, index: int, record: RequestRecord) -> None:
        with self._lock:
            if self.records[index] is None:  # else abandoned at the time limit already
                self.records[index] = record
                self.progress.update()

    def abandon(self, index: int, due_s: float, send_s: float) -> None:
        """Record a request still running at the time limit as failed."""
        request = self.requests[index]
        self._record(
            index,
            RequestRecord(
                index=index,
                request_id=f"{self.options.request_id_prefix}-{index}",
                due_s=due_s,
                send_s=send_s,
                chunk_times_s=(),
                chunk_num_tokens=(),
                output_tokens=0,
                prompt_tokens=request.prompt_len or 0,
                category=request.category,
                tenant_id=request.tenant_id,
                error_code="DEADLINE_EXCEEDED",
                error_message="still running at the run's time limit",
            ),
        )


def run(
    target: Target,
    requests: Sequence[BenchRequest],
    arrival: Arrival,
    options: RunOptions | None = None,
) -> RunRecords:
    """Send `requests` to `target` on `arrival`; see the module docstring."""
    options = options or RunOptions()
    if not requests:
        raise ValueError("the workload is empty")
    if isinstance(arrival, OpenLoop):
        desc = f"{arrival.rate_rps:g} req/s"
    else:
        desc = f"concurrency {arrival.concurrency}"
    state = _Run(target, requests, options, desc)
    started_at = time.time()
    if isinstance(arrival, OpenLoop):
        sent = _dispatch_open_loop(state, arrival.send_times_s(len(requests)))
    else:
        assert isinstance(arrival, ClosedLoop), arrival
        sent = _dispatch_closed_loop(state, arrival.concurrency)
    duration_s = state.now_s()  # every request has ended (or was abandoned) by now
    state.progress.close()
    records = [r for r in state.records if r is not None]
    assert len(records) == sent, (len(records), sent)
    return RunRecords(
        arrival=arrival.describe(),
        records=records,
        duration_s=duration_s,
        num_not_sent=len(requests) - sent,
        started_at_unix_s=started_at,
    )


def _dispatch_open_loop(state: _Run, due_times_s: Any) -> int:
    """Start one thread per request at its due time; returns how many were sent."""
    options = state.options
    slots = threading.BoundedSemaphore(options.max_inflight)
    threads: list[tuple[int, float, threading.Thread]] = []

    def drive_and_release(index: int, due_s: float) -> None:
        try:
            state.drive(index, due_s)
        finally:
            slots.release()

    for index, due_s in enumerate(float(t) for t in due_times_s):
        if due_s >= options.max_duration_s:
            break
        wait_s = due_s - state.now_s()
        if wait_s > 0:
            time.sleep(wait_s)
        if not slots.acquire(timeout=max(0.0, options.max_duration_s - state.now_s())):
            break
        thread = threading.Thread(target=drive_and_release, args=(index, due_s), daemon=True)
        thread.start()
        threads.append((index, due_s, thread))
    if options.on_all_sent is not None:
        options.on_all_sent(state.now_s())
    _join(state, threads)
    return len(threads)


def _dispatch_closed_loop(state: _Run, concurrency: int) -> int:
    """`concurrency` workers drain the workload in order; returns how many were sent."""
    options = state.options
    next_index = itertools.count()
    sent: list[tuple[int, float, threading.Thread]] = []
    sent_lock = threading.Lock()

    def worker() -> None:
        while True:
            with sent_lock:
                index = next(next_index)
                due_s = state.now_s()
                if index >= len(state.requests) or due_s >= options.max_duration_s:
                    return
                sent.append((index, due_s, threading.current_thread()))
            state.drive(index, due_s)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=max(0.0, options.max_duration_s + JOIN_GRACE_S - state.now_s()))
    with sent_lock:  # workers still alive past the limit start nothing new (they check time)
        in_flight = list(sent)
    _join(state, in_flight)
    return len(in_flight)


def _join(state: _Run, threads: list[tuple[int, float, threading.Thread]]) -> None:
    """Wait for request threads until the time limit; record the stragglers as failed."""
    limit_s = state.options.max_duration_s + JOIN_GRACE_S
    for index, due_s, thread in threads:
        thread.join(timeout=max(0.0, limit_s - state.now_s()))
        if state.records[index] is None:
            state.abandon(index, due_s, send_s=due_s)


def run_sweep(
    target: Target,
    requests: Sequence[BenchRequest],
    sweep: RateSweep,
    options: RunOptions | None = None,
) -> list[RunRecords]:
    """One open-loop run per rate of the sweep, each over the whole workload."""
    return [run(target, requests, point, options) for point in sweep.points()]
