"""The router alone: requests per second and added latency, with fake workers, on CPU.

The router (validation, tokenization, routing, the stream relay, gRPC) runs in a process
of its own with in-process fake workers that answer at once (router/fake_workers.py), so
every millisecond measured is the router's and gRPC's. A grpc.aio load generator in this
process sends short streaming requests (a 16-byte text prompt, 8 tokens):

    latency     one request at a time: client-observed time to the first response and to
                the last; the router's added latency is the time to the first response,
                since the fake prefill and decode take no time
    throughput  a closed loop of `--concurrency` streams for `--duration-s`: requests/s

    python -m loadtest.router_bench [--record]   # --record: update docs/benchmarks.json

Each figure is printed as a JSON object (name, value, unit, target, card, date, commit,
command); --record merges them into docs/benchmarks.json by name.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.figures import current_commit, record

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Short prompt: hi"  # 16 bytes -> 17 tokens with the byte tokenizer's BOS


def _serve(conn: Any, policy: str) -> None:
    """Child process: the router with two fake prefill and two fake decode workers."""
    import signal

    from baton.config import ClusterMode, Limits, PolicyName, RoutingConfig
    from engine.tokenizer import ByteTokenizer
    from router.fake_workers import FakeDecode, FakePrefill
    from router.policies import make_policy
    from router.router import Router
    from router.server import RouterServer

    def factory() -> Router:
        decode = [FakeDecode(f"d{i}", kv_address=f"d{i}:1") for i in range(2)]
        prefill = [FakePrefill(decode, f"p{i}") for i in range(2)]
        return Router(
            mode=ClusterMode.DISAGGREGATED,
            policy=make_policy(RoutingConfig(policy=PolicyName(policy))),
            prefill=prefill,
            decode=decode,
            tokenizer=ByteTokenizer(),
            vocab_size=320,
            max_model_len=1024,
            block_size=16,
            limits=Limits(max_in_flight=4096),
        )

    server = RouterServer(factory)
    conn.send(server.start())
    signal.sigwait({signal.SIGTERM})
    server.stop(grace_s=1.0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


async def _one(stub: Any, pb: Any, max_tokens: int) -> tuple[float, float, int]:
    req = pb.GenerateRequest(text=PROMPT, sampling=pb.Sampling(max_tokens=max_tokens))
    start = time.perf_counter()
    first = 0.0
    n = 0
    async for resp in stub.Generate(req, timeout=30):
        if not first:
            first = time.perf_counter() - start
        n += len(resp.token_ids)
    return first, time.perf_counter() - start, n


async def _measure(address: str, args: argparse.Namespace) -> dict[str, float]:
    import grpc

    from protos import serving_pb2 as pb
    from protos import serving_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ServingStub(channel)
        for _ in range(50):  # warm-up
            await _one(stub, pb, args.max_tokens)
        ttft, total = [], []
        for _ in range(args.num_latency):
            first, whole, n = await _one(stub, pb, args.max_tokens)
            assert n == args.max_tokens
            ttft.append(first)
            total.append(whole)
        done = 0
        stop_at = time.perf_counter() + args.duration_s

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await _one(stub, pb, args.max_tokens)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "ttft_p50_ms": _percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": _percentile(ttft, 99) * 1e3,
        "total_p50_ms": statistics.median(total) * 1e3,
        "requests_per_s": done / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-latency", type=int, default=500, help="sequential requests")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--policy", default="round_robin")
    parser.add_argument(
        "--card", default=f"CPU dev box ({mp.cpu_count()} cores, {platform.machine()})"
    )
    parser.add_argument("--record", action="store_true", help="merge into docs/benchmarks.json")
    args = parser.parse_args(argv)

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, args.policy), daemon=True)
    proc.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the router did not start within 60 s")
        address = parent.recv()
        figures = asyncio.run(_measure(address, args))
    finally:
        proc.terminate()
        proc.join(10)
    command = "python -m loadtest.router_bench " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    common = {
        "card": args.card,
        "date": datetime.date.today().isoformat(),
        "commit": current_commit(),
        "command": command.strip(),
    }
    entries = [
        {
            "name": "cluster.router_added_latency_p50_ms",
            "value": round(figures["ttft_p50_ms"], 3),
            "unit": "ms",
            "target": "none set (issue 4 asks for the figure)",
            **common,
            "note": f"time to first response of a {args.max_tokens}-token stream, fake workers answering at once, one request at a time",
        },
        {
            "name": "cluster.router_added_latency_p99_ms",
            "value": round(figures["ttft_p99_ms"], 3),
            "unit": "ms",
            "target": "none set (issue 4 asks for the figure)",
            **common,
        },
        {
            "name": "cluster.router_requests_per_s",
            "value": round(figures["requests_per_s"], 1),
            "unit": "requests/s",
            "target": "none set (issue 4 asks for the figure)",
            **common,
            "note": f"closed loop, {args.concurrency} concurrent {args.max_tokens}-token streams, {args.duration_s:g} s; load generator on the same cores",
        },
    ]
    for e in entries:
        print(json.dumps(e))
    print(f"# total p50 {figures['total_p50_ms']:.2f} ms (whole 8-token stream)", file=sys.stderr)
    if args.record:
        record(entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
