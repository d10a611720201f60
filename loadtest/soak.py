"""The soak run: mixed traffic with cancellations and random deadlines for N minutes.

    python -m loadtest.soak --config cluster_configs/local.yaml --minutes 10 --rate 4 \
        --out results/soak

A run, in order:

    start      the cluster is started from --config (a local Ray of its own, as `baton bench
               --config`) or --address names a running router; one warm-up request; worker
               resident memory (VmRSS of each Ray actor process; --config only) and the free
               KV blocks of every worker (Stats) are sampled
    traffic    open-loop Poisson arrivals at --rate for --minutes: prompts of mixed lengths
               (short / medium / long text), mixed output lengths, every request with a
               random deadline (uniform in --deadline-s); --cancel-fraction of them are
               cancelled by the client at a random time (uniform in [0, --cancel-max-s])
    sampling   every minute: worker RSS, for the drift figures
    quiesce    after the last request: wait until the router has nothing in flight and every
               worker nothing running, then read free blocks (cached blocks count as free)
    report     requests sent / served, errors by status, p99 end-to-end latency per minute of
               send time and its drift (last full minute / first), RSS at start and end per
               worker, blocks not free at the end; JSON (`<out>.json`) and Markdown (`<out>.md`)

Cancelled requests show as CANCELLED, expired deadlines as DEADLINE_EXCEEDED: both are the
traffic's design, not server errors. Server errors are every other status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from baton.client import build_request
from loadtest.arrivals import OpenLoop
from loadtest.metrics import RequestRecord
from loadtest.runner import RunOptions, run
from loadtest.targets import GrpcTarget, GrpcTargetConfig, StreamChunk, chunks_from_call
from loadtest.workload import BenchRequest
from protos import serving_pb2 as pb

# (share, prompt tokens range, output tokens range): short chat, medium, long documents.
MIX = (
    (0.5, (8, 64), (8, 64)),
    (0.35, (100, 300), (32, 128)),
    (0.15, (400, 700), (64, 200)),
)
EXPECTED_CODES = frozenset({"CANCELLED", "DEADLINE_EXCEEDED"})  # the traffic's own design
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "baton",
    "relays",
    "key",
    "value",
    "caches",
    "between",
    "prefill",
    "and",
    "decode",
    "workers",
    "under",
    "load",
    "with",
    "deadlines",
    "cancellations",
    "and",
    "mixed",
    "lengths",
]


@dataclass(frozen=True)
class Plan:
    """What the client does to one request: its deadline and, maybe, when it cancels."""

    deadline_s: float
    cancel_after_s: float | None


def _text(rng: random.Random, num_bytes: int) -> str:
    words: list[str] = []
    size = 0
    while size < num_bytes:
        w = rng.choice(WORDS)
        words.append(w)
        size += len(w) + 1
    return " ".join(words)[:num_bytes]


def build_workload(
    num: int,
    seed: int,
    cancel_fraction: float,
    deadline_s: tuple[float, float],
    cancel_max_s: float,
) -> tuple[list[BenchRequest], list[Plan]]:
    rng = random.Random(seed)
    shares = [m[0] for m in MIX]
    requests, plans = [], []
    for _ in range(num):
        index = rng.choices(range(len(MIX)), shares)[0]
        _, (p_lo, p_hi), (o_lo, o_hi) = MIX[index]
        category = ("short", "medium", "long")[index]
        requests.append(
            BenchRequest(
                prompt_token_ids=None,
                prompt_text=_text(rng, rng.randint(p_lo, p_hi)),  # byte tokenizer: 1 token/byte
                max_tokens=rng.randint(o_lo, o_hi),
                category=category,
            )
        )
        cancel = rng.uniform(0.0, cancel_max_s) if rng.random() < cancel_fraction else None
        plans.append(Plan(rng.uniform(*deadline_s), cancel))
    return requests, plans


class SoakTarget(GrpcTarget):
    """A `GrpcTarget` that applies each request's `Plan`: its own deadline, and a timer that
    cancels the call (the server then aborts the request on every worker)."""

    def __init__(self, config: GrpcTargetConfig, plans: list[Plan], prefix: str) -> None:
        super().__init__(config)
        self.plans = plans
        self.prefix = prefix

    def stream(
        self, request: BenchRequest, request_id: str, timeout_s: float
    ) -> Iterator[StreamChunk]:
        plan = self.plans[int(request_id.removeprefix(f"{self.prefix}-"))]
        prompt = (
            request.prompt_text if request.prompt_text is not None else request.prompt_token_ids
        )
        assert prompt is not None
        call = self.client.stream(
            build_request(
                prompt,
                request_id=request_id,
                max_tokens=request.max_tokens,
                temperature=self.config.temperature,
                ignore_eos=self.config.ignore_eos,
            ),
            timeout_s=min(timeout_s, plan.deadline_s),
        )
        timer = None
        if plan.cancel_after_s is not None:
            timer = threading.Timer(plan.cancel_after_s, call.cancel)
            timer.daemon = True
            timer.start()
        try:
            yield from chunks_from_call(call)
        finally:
            if timer is not None:
                timer.cancel()


# ---- resident memory ------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process on this host, in MiB (None if it is gone or not readable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def actor_pids(cluster: Any) -> dict[str, int]:
    """name -> pid of every worker actor of a cluster started here."""
    import ray

    def getpid(_self: object) -> int:
        return os.getpid()

    names = [f"prefill-{i}" for i in range(len(cluster.prefill_actors))] + [
        f"decode-{i}" for i in range(len(cluster.decode_actors))
    ]
    actors = list(cluster.prefill_actors) + list(cluster.decode_actors)
    pids = ray.get([a.__ray_call__.remote(getpid) for a in actors], timeout=30)
    return dict(zip(names, pids, strict=True))


def sample_rss(pids: dict[str, int]) -> dict[str, float | None]:
    found = {name: rss_mb(pid) for name, pid in pids.items()}
    found["driver (router + load generator)"] = rss_mb(os.getpid())
    return found


# ---- quiesce and blocks -------------------------------------------------------------------


def quiesce(target: GrpcTarget, timeout_s: float) -> pb.StatsResponse:
    """Wait until nothing is in flight or running anywhere; the last Stats."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = target.client.stats()
        busy = stats.requests_in_flight or any(
            w.num_running or w.queue_depth for w in stats.workers
        )
        if not busy and all(w.num_free_blocks == w.num_total_blocks for w in stats.workers):
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


# ---- the report -----------------------------------------------------------------------------


def p99_by_minute(records: list[RequestRecord]) -> list[dict[str, Any]]:
    """p99 end-to-end latency of completed requests, by the minute they were sent in."""
    by_minute: dict[int, list[float]] = {}
    for r in records:
        if r.completed:
            by_minute.setdefault(int(r.send_s // 60), []).append(r.e2e_s)
    return [
        {
            "minute": m,
            "completed": len(v),
            "p99_e2e_ms": float(np.percentile(np.array(v) * 1e3, 99)),
            "p50_e2e_ms": float(np.percentile(np.array(v) * 1e3, 50)),
        }
        for m, v in sorted(by_minute.items())
    ]


def summarize_soak(
    records: list[RequestRecord],
    minutes: float,
    rss_start: dict[str, float | None],
    rss_end: dict[str, float | None],
    rss_samples: list[dict[str, Any]],
    stats_start: pb.StatsResponse,
    stats_end: pb.StatsResponse,
    config: dict[str, Any],
) -> dict[str, Any]:
    errors = Counter(r.error_code for r in records if not r.completed)
    per_minute = p99_by_minute(records)
    full = [m for m in per_minute if m["minute"] < int(minutes)]  # the last may be partial
    drift = full[-1]["p99_e2e_ms"] / full[0]["p99_e2e_ms"] if len(full) >= 2 else None
    workers_rss = {
        name: {
            "start_mb": rss_start.get(name),
            "end_mb": rss_end.get(name),
            "growth_mb": (rss_end[name] - rss_start[name])
            if rss_start.get(name) is not None and rss_end.get(name) is not None
            else None,
        }
        for name in rss_start
    }
    worker_growth = [
        v["growth_mb"]
        for k, v in workers_rss.items()
        if v["growth_mb"] is not None and not k.startswith("driver")
    ]
    leaked = {w.name: w.num_total_blocks - w.num_free_blocks for w in stats_end.workers}
    return {
        "config": config,
        "minutes": minutes,
        "requests_sent": len(records),
        "requests_served": sum(r.completed for r in records),
        "requests_cancelled_by_client": errors.get("CANCELLED", 0),
        "requests_deadline_exceeded": errors.get("DEADLINE_EXCEEDED", 0),
        "server_errors": sum(n for c, n in errors.items() if c not in EXPECTED_CODES),
        "errors_by_status": dict(sorted(errors.items())),
        "error_examples": {
            c: next(r.error_message for r in records if r.error_code == c) for c in errors
        },
        "p99_e2e_ms_by_minute": per_minute,
        "p99_drift": drift,
        "rss_mb": workers_rss,
        "rss_samples": rss_samples,
        "max_worker_rss_growth_mb": max(worker_growth) if worker_growth else None,
        "free_blocks_start": {w.name: w.num_free_blocks for w in stats_start.workers},
        "free_blocks_end": {w.name: w.num_free_blocks for w in stats_end.workers},
        "total_blocks": {w.name: w.num_total_blocks for w in stats_end.workers},
        "leaked_blocks": sum(leaked.values()),
        "router_in_flight_end": stats_end.requests_in_flight,
    }


def markdown(s: dict[str, Any]) -> str:
    lines = [
        f"# Soak: {s['minutes']:g} minutes, {s['config']['rate']:g} req/s",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests sent | {s['requests_sent']} |",
        f"| requests served (complete) | {s['requests_served']} |",
        f"| cancelled by the client (by design) | {s['requests_cancelled_by_client']} |",
        f"| deadline exceeded (random deadlines) | {s['requests_deadline_exceeded']} |",
        f"| other errors (server) | {s['server_errors']} |",
        f"| errors by status | {s['errors_by_status']} |",
        f"| p99 E2E drift (last / first full minute) | {s['p99_drift']} |",
        f"| blocks not free at the end | {s['leaked_blocks']} |",
        f"| free blocks at the end | {s['free_blocks_end']} of {s['total_blocks']} |",
        "",
        "| minute | completed | p50 E2E ms | p99 E2E ms |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {m['minute']} | {m['completed']} | {m['p50_e2e_ms']:.0f} | {m['p99_e2e_ms']:.0f} |"
        for m in s["p99_e2e_ms_by_minute"]
    ]
    lines += ["", "| process | RSS start MiB | RSS end MiB | growth MiB |", "|---|---|---|---|"]
    for name, v in s["rss_mb"].items():

        def f(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.1f}"

        lines.append(f"| {name} | {f(v['start_mb'])} | {f(v['end_mb'])} | {f(v['growth_mb'])} |")
    return "\n".join(lines) + "\n"


# ---- the run --------------------------------------------------------------------------------


@contextlib.contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[tuple[str, dict[str, int]]]:
    if args.address:
        yield args.address, {}
        return
    import ray

    from baton.config import load_config
    from baton.launcher import launch

    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        cluster = launch(load_config(args.config))
        try:
            yield cluster.address, actor_pids(cluster)
        finally:
            cluster.stop(grace_s=1.0)
    finally:
        ray.shutdown()


def soak(args: argparse.Namespace) -> dict[str, Any]:
    duration_s = args.minutes * 60.0
    num = int(args.rate * duration_s * 1.2) + 10
    prefix = "soak"
    requests, plans = build_workload(
        num,
        args.seed,
        args.cancel_fraction,
        (args.deadline_min_s, args.deadline_max_s),
        args.cancel_max_s,
    )
    config = {k: v for k, v in vars(args).items() if k != "out"}
    with _cluster(args) as (address, pids):
        target = SoakTarget(
            GrpcTargetConfig(address, api_key=args.api_key, temperature=args.temperature),
            plans,
            prefix,
        )
        target.wait_ready(120)
        target.client.generate("warm up", max_tokens=4)
        stats_start = quiesce(target, 30)
        rss_start = sample_rss(pids)
        rss_samples = [{"t_s": 0.0, **rss_start}]
        stop = threading.Event()

        def sampler() -> None:
            t0 = time.monotonic()
            while not stop.wait(60.0):
                rss_samples.append({"t_s": round(time.monotonic() - t0, 1), **sample_rss(pids)})

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        result = run(
            target,
            requests,
            OpenLoop(args.rate, seed=args.seed),
            RunOptions(
                request_timeout_s=args.deadline_max_s,
                max_duration_s=duration_s,
                progress=False,
                request_id_prefix=prefix,
            ),
        )
        stop.set()
        stats_end = quiesce(target, 60)
        rss_end = sample_rss(pids)
        target.close()
    return summarize_soak(
        result.records,
        args.minutes,
        rss_start,
        rss_end,
        rss_samples,
        stats_start,
        stats_end,
        config,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="start a cluster from this YAML for the run")
    where.add_argument("--address", help="HOST:PORT of a running router (no RSS figures)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second")
    parser.add_argument("--cancel-fraction", type=float, default=0.1)
    parser.add_argument("--cancel-max-s", type=float, default=3.0)
    parser.add_argument("--deadline-min-s", type=float, default=2.0)
    parser.add_argument("--deadline-max-s", type=float, default=60.0)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/soak", help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if not 0 <= args.cancel_fraction <= 1:
        parser.error("--cancel-fraction must be in [0, 1]")
    if not 0 < args.deadline_min_s <= args.deadline_max_s:
        parser.error("need 0 < --deadline-min-s <= --deadline-max-s")
    summary = soak(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))
    return 0 if summary["server_errors"] == 0 and summary["leaked_blocks"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
