"""Token delivery alone: decode actor -> router over Ray, one stream per request or one per step.

A synthetic decode actor stands in for the engine: its loop thread runs "steps" of
`--step-ms` (sleeping like a GPU, then holding the GIL for `--host-ms` like the engine's
Python side), and each step publishes one token for every running request into the real
`OutputStreams`. The driver (this process, standing where the router is) keeps
`--concurrency` requests running, each `--tokens` long, and reads them in one of two ways:

    per_request   one Ray streaming generator per request, one item per request per wake-up
                  (Baton's delivery before this benchmark was written)
    multiplexed   the router's `_Subscription`: one generator per decode worker, one item
                  per wake-up carrying every request that advanced (decode_worker/delivery.py)

Every token carries its publish time; the driver records delivery lag (receive - publish),
the time per output token it observed, and how many tokens the actor produced against how
many it could have (a delivery path that holds the GIL slows the "engine" too).

    python -m loadtest.delivery_bench [--concurrency 64,160,256] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import platform
import statistics
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import ray

from decode_worker.delivery import deliver
from decode_worker.messages import TokenChunk
from decode_worker.streams import OutputStreams
from engine.engine import RequestOutput
from engine.sequence import FinishReason
from loadtest.figures import current_commit

MODES = ("per_request", "multiplexed")


@ray.remote(num_cpus=0)
class StepSource:
    """An actor shaped like `DecodeActor` (watch, subscribe) over a synthetic engine loop."""

    def __init__(self, tokens: int, step_s: float, host_s: float) -> None:
        self.streams = OutputStreams()
        self._tokens, self._step_s, self._host_s = tokens, step_s, host_s
        self._lock = threading.Lock()
        self._admitted: list[str] = []
        self._running: dict[str, int] = {}
        self._stop = threading.Event()
        self.steps = 0
        self.step_s = 0.0
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(max(self._step_s - self._host_s, 0))
            while time.perf_counter() - t0 < self._step_s:  # the engine's Python: GIL held
                pass
            with self._lock:
                for rid in self._admitted:
                    self._running[rid] = 0
                self._admitted = []
                outputs = []
                now = repr(time.time()) + ";"
                for rid, n in list(self._running.items()):
                    done = n + 1 == self._tokens
                    outputs.append(RequestOutput(rid, [n], now, done,
                                                 FinishReason.LENGTH if done else None,
                                                 8, 0, n + 1, []))  # fmt: skip
                    if done:
                        del self._running[rid]
                    else:
                        self._running[rid] = n + 1
            if outputs:
                self.steps += 1
                self.step_s += time.perf_counter() - t0
            self.streams.publish(outputs)

    async def admit(self, request_id: str) -> None:
        with self._lock:
            self._admitted.append(request_id)

    async def watch(self, subscription: str, requests: list[tuple[str, float]]) -> None:
        for request_id, timeout_s in requests:
            self.streams.watch(subscription, request_id, timeout_s)

    async def subscribe(self, subscription: str) -> AsyncIterator[list[TokenChunk]]:
        items = deliver(self.streams, subscription, lambda rid, why: None)
        async with contextlib.aclosing(items):
            async for chunks in items:
                yield chunks

    async def stream_one(self, request_id: str, timeout_s: float) -> AsyncIterator[TokenChunk]:
        """The per-request generator, as Baton delivered before: ends with the request."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        self.streams.attach(request_id, lambda: loop.call_soon_threadsafe(event.set))
        self.streams.watch(request_id, request_id, timeout_s)
        try:
            while True:
                await event.wait()
                event.clear()
                for chunk in self.streams.take_ready(request_id):
                    yield chunk
                    if chunk.finished:
                        return
        finally:
            self.streams.detach(request_id)

    async def counters(self) -> tuple[int, float]:
        return self.steps, self.step_s

    async def stop(self) -> None:
        self._stop.set()


async def _drive(mode: str, actor, concurrency: int, duration_s: float) -> dict:  # noqa: ANN001
    from router.workers import _Subscription

    subscription = _Subscription(actor, "bench") if mode == "multiplexed" else None
    lags: list[float] = []
    tpots: list[float] = []
    messages = tokens = 0
    await actor.counters.remote()  # started
    stop_s = time.monotonic() + duration_s
    ids = iter(range(10**9))

    async def one_request() -> None:
        nonlocal messages, tokens
        rid = f"{mode}-{next(ids)}"
        if subscription is not None:
            stream = subscription.open(rid, 60.0)
            actor.admit.remote(rid)

            async def chunks() -> AsyncIterator[TokenChunk]:
                while True:
                    chunk = await stream.next(60.0)
                    yield chunk
                    if chunk.finished:
                        return
        else:
            gen = actor.stream_one.remote(rid, 60.0)
            actor.admit.remote(rid)

            async def chunks() -> AsyncIterator[TokenChunk]:
                async for ref in gen:
                    yield await ref

        first_s = last_s = 0.0
        n = 0
        async for chunk in chunks():
            now = time.time()
            messages += 1
            n += len(chunk.token_ids)
            lags.extend(now - float(t) for t in chunk.text.split(";") if t)
            first_s = first_s or now
            last_s = now
        tokens += n
        tpots.append((last_s - first_s) / (n - 1))

    async def worker() -> None:
        while time.monotonic() < stop_s:
            await one_request()

    steps0, step_s0 = await actor.counters.remote()
    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall_s = time.monotonic() - t0
    steps1, step_s1 = await actor.counters.remote()

    def pct(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100)[int(q * 100) - 1] * 1e3

    return {"mode": mode, "concurrency": concurrency, "wall_s": round(wall_s, 2),
            "tokens_per_s": round(tokens / wall_s), "messages_per_token": round(messages / tokens, 3),
            "lag_ms_p50": round(pct(lags, 0.5), 2), "lag_ms_p90": round(pct(lags, 0.9), 2),
            "lag_ms_p99": round(pct(lags, 0.99), 2), "tpot_ms_p50": round(pct(tpots, 0.5), 2),
            "tpot_ms_p90": round(pct(tpots, 0.9), 2),
            "engine_step_ms": round((step_s1 - step_s0) / max(steps1 - steps0, 1) * 1e3, 2),
            "engine_steps_per_s": round((steps1 - steps0) / wall_s, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", default="64,160,256")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--step-ms", type=float, default=10.0)
    ap.add_argument("--host-ms", type=float, default=2.0)
    ap.add_argument("--duration-s", type=float, default=6.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        for n in (int(x) for x in args.concurrency.split(",")):
            for mode in MODES:
                actor = StepSource.remote(args.tokens, args.step_ms / 1e3, args.host_ms / 1e3)
                row = asyncio.run(_drive(mode, actor, n, args.duration_s))
                ray.get(actor.stop.remote())
                ray.kill(actor)
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        ray.shutdown()
    if args.out:
        args.out.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "commit": current_commit(),
            "host": platform.node(), "cpus": __import__("os").cpu_count(),
            "args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
