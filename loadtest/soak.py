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
               random deadline (uniform in [--deadline-min-s, --deadline-max-s]);
               --cancel-fraction of them are cancelled by the client at a random time
               (uniform in [0, --cancel-max-s]) (soak_traffic.py)
    sampling   every minute: worker RSS, for the drift figures (soak_memory.py)
    quiesce    after the last request: wait until the router has nothing in flight and every
               worker nothing running, then read free blocks (cached blocks count as free)
    report     requests sent / served, errors by status, p99 end-to-end latency per minute of
               send time and its drift (last full minute / first), RSS at start and end per
               worker, blocks not free at the end; JSON (`<out>.json`) and Markdown (`<out>.md`)
               (soak_report.py, which says which statuses count as server errors)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadtest.arrivals import OpenLoop
from loadtest.runner import RunOptions, run
from loadtest.soak_memory import actor_pids, sample_rss
from loadtest.soak_report import markdown, summarize_soak
from loadtest.soak_traffic import SoakTarget, build_workload
from loadtest.targets import GrpcTarget, GrpcTargetConfig
from protos import serving_pb2 as pb

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
