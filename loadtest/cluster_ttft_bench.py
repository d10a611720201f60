"""TTFT at light load, broken into phases, and disaggregated == colocated outputs.

For the GPU machine with two GPUs (gpu-1p1d.yaml, the llama3-8b shape, random bf16 weights):

    python -m loadtest.cluster_ttft_bench --config cluster_configs/gpu-1p1d.yaml --record

1. Launches the config's disaggregated cluster (1 prefill + 1 decode worker) on a local Ray,
   sends `--num-requests` requests one at a time (light load: nothing queues), greedy, a
   random `--prompt-tokens`-token prompt each (no prefix hits), and records the client's
   time to first token and the server's phases from the last response's timings:
   router, prefill queue, prefill, transfer, decode queue, other (Ray calls between them).
2. Stops it and launches the same model and engine settings as one colocated replica, and
   sends the same prompts: the greedy tokens must be equal (reported as a match fraction),
   and so must each token's logprob and its `--logprobs` best alternatives (the first
   token's come from the prefill worker through Commit): the largest logprob difference is
   reported and must stay within LOGPROB_TOLERANCE, the alternatives' ids equal.
3. Prints one JSON object per figure; --record merges them into docs/benchmarks.json.

On CPU (`--config cluster_configs/local.yaml --prompt-tokens 200`) it is a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Any

import numpy as np

from loadtest.figures import current_commit, record

LOGPROB_TOLERANCE = 0.05  # nats; the same kernels on the same card type give ~0

PHASES = (
    "router_ms",
    "prefill_queue_ms",
    "prefill_ms",
    "transfer_ms",
    "decode_queue_ms",
    "other_ms",
)


# per token: (logprob, ((alternative id, its logprob), ...))
LogprobRow = tuple[float, tuple[tuple[int, float], ...]]


def _run_requests(
    address: str, prompts: list[list[int]], max_tokens: int, logprobs: int = 0
) -> tuple[list[list[int]], list[dict[str, float]], list[list[LogprobRow]]]:
    from baton.client import BatonClient, build_request

    outputs, rows, all_logprobs = [], [], []
    with BatonClient(address, timeout_s=600) as client:
        for prompt in prompts:
            req = build_request(
                prompt,
                max_tokens=max_tokens,
                temperature=0.0,
                ignore_eos=True,
                logprobs=logprobs or None,
            )
            start = time.perf_counter()
            first_s = None
            ids: list[int] = []
            lps: list[LogprobRow] = []
            last = None
            for resp in client.stream(req):
                if first_s is None and resp.token_ids:
                    first_s = time.perf_counter() - start
                ids.extend(resp.token_ids)
                lps += [
                    (lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
                    for lp in resp.logprobs
                ]
                last = resp
            assert last is not None and first_s is not None
            t = last.timings
            row = {p: getattr(t, p) for p in PHASES}
            row["server_ttft_ms"] = t.ttft_ms
            row["client_ttft_ms"] = first_s * 1e3
            rows.append(row)
            outputs.append(ids)
            all_logprobs.append(lps)
    return outputs, rows, all_logprobs


def compare_logprobs(a: list[list[LogprobRow]], b: list[list[LogprobRow]]) -> tuple[float, bool]:
    """(largest |logprob difference| over every token and alternative, whether every
    token's alternatives have the same ids in the same order)."""
    worst, same_ids = 0.0, True
    for req_a, req_b in zip(a, b, strict=True):
        if len(req_a) != len(req_b):
            return float("inf"), False
        for (lp_a, top_a), (lp_b, top_b) in zip(req_a, req_b, strict=True):
            worst = max(worst, abs(lp_a - lp_b))
            same_ids &= [t for t, _ in top_a] == [t for t, _ in top_b]
            for (_, x), (_, y) in zip(top_a, top_b, strict=False):
                worst = max(worst, abs(x - y))
    return worst, same_ids


def _launch_and_run(
    cfg: Any, prompts: list[list[int]], max_tokens: int, warmup: int, logprobs: int
) -> tuple[list[list[int]], list[dict[str, float]], list[list[LogprobRow]]]:
    from baton.launcher import launch

    cluster = launch(cfg)
    try:
        _run_requests(cluster.address, prompts[:warmup], max_tokens)  # compile, warm caches
        return _run_requests(cluster.address, prompts, max_tokens, logprobs)
    finally:
        cluster.stop(grace_s=2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="cluster_configs/gpu-1p1d.yaml")
    parser.add_argument("--model", default=None, help="a checkpoint folder instead of the preset")
    parser.add_argument("--num-requests", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--logprobs", type=int, default=2, help="alternatives per token compared (0: off)"
    )
    parser.add_argument(
        "--transport",
        choices=["auto", "grpc", "cuda_ipc"],
        default=None,
        help="override cluster.kv_transfer.transport (grpc if the same-host GPU path fails)",
    )
    parser.add_argument("--card", default=None, help="e.g. '2 x H100 80GB (NVLink)'")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)

    import ray

    from baton.config import ClusterMode, Placement, TransportName, load_config

    cfg = load_config(args.config, args.model)
    if args.transport is not None:
        kv = dataclasses.replace(cfg.cluster.kv_transfer, transport=TransportName(args.transport))
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, kv_transfer=kv))
    if cfg.cluster.mode is not ClusterMode.DISAGGREGATED:
        raise SystemExit("--config must describe a disaggregated cluster")
    colocated = dataclasses.replace(
        cfg,
        cluster=dataclasses.replace(
            cfg.cluster, mode=ClusterMode.COLOCATED, num_decode=1, placement=Placement.NONE
        ),
        prefill_engine=None,
        decode_engine=cfg.decode_engine,
    )
    rng = np.random.default_rng(args.seed)
    vocab = cfg.engine.model.vocab_size
    n = args.num_requests + args.warmup
    prompts = [rng.integers(0, min(vocab, 32000), args.prompt_tokens).tolist() for _ in range(n)]
    # Warm-up prompts first, then the measured ones (distinct: no prefix-cache hits).
    measured = prompts[args.warmup :]

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        disagg_out, rows, disagg_lps = _launch_and_run(
            cfg, prompts[: args.warmup] + measured, args.max_tokens, args.warmup, args.logprobs
        )
        disagg_out, rows, disagg_lps = (
            disagg_out[args.warmup :],
            rows[args.warmup :],
            disagg_lps[args.warmup :],
        )
        coloc_out, coloc_rows, coloc_lps = _launch_and_run(
            colocated, prompts[: args.warmup] + measured, args.max_tokens, args.warmup,
            args.logprobs,
        )  # fmt: skip
        coloc_out, coloc_rows, coloc_lps = (
            coloc_out[args.warmup :],
            coloc_rows[args.warmup :],
            coloc_lps[args.warmup :],
        )
    finally:
        ray.shutdown()

    match = sum(a == b for a, b in zip(disagg_out, coloc_out, strict=True)) / len(measured)
    lp_diff, lp_same_ids = compare_logprobs(disagg_lps, coloc_lps)
    lp_ok = not args.logprobs or (
        lp_diff <= LOGPROB_TOLERANCE
        and lp_same_ids
        and all(len(lps) == len(ids) for lps, ids in zip(disagg_lps, disagg_out, strict=True))
    )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    coloc_ttft = statistics.median(r["client_ttft_ms"] for r in coloc_rows)
    card = args.card or _card()
    command = "python -m loadtest.cluster_ttft_bench " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    common = {
        "card": card,
        "date": time.strftime("%Y-%m-%d"),
        "commit": current_commit(),
        "command": command.strip(),
    }
    shape = f"{args.prompt_tokens}-token prompts, {args.max_tokens} tokens, one at a time, medians of {len(measured)}"
    entries = [
        {
            "name": "cluster.ttft_light_load_ms",
            "value": round(med["client_ttft_ms"], 2),
            "unit": "ms",
            "target": "none set (issue 4 asks for the phases)",
            "phases": {k.removesuffix("_ms"): round(med[k], 3) for k in PHASES},
            "server_ttft_ms": round(med["server_ttft_ms"], 2),
            "baseline": f"colocated replica, same prompts: {coloc_ttft:.2f} ms",
            "note": f"{args.config}; {shape}",
            **common,
        }
    ]
    entries += [
        {
            "name": f"cluster.ttft_light_load.{k.removesuffix('_ms')}_ms",
            "value": round(med[k], 3),
            "unit": "ms",
            "target": "none set",
            **common,
        }
        for k in PHASES
    ]
    entries.append(
        {
            "name": "cluster.disagg_equals_colocated",
            "value": match,
            "unit": "fraction of requests with equal greedy tokens",
            "target": "1.0",
            "note": shape,
            **common,
        }
    )
    if args.logprobs:
        entries.append(
            {
                "name": "cluster.disagg_logprobs_max_abs_diff",
                "value": lp_diff,
                "unit": "nats",
                "target": f"<= {LOGPROB_TOLERANCE}, alternatives' ids equal",
                "note": f"{shape}; {args.logprobs} alternatives per token; ids equal: {lp_same_ids}",
                **common,
            }
        )
    for e in entries:
        print(json.dumps(e))
    if args.record:
        record(entries)
    return 0 if match == 1.0 and lp_ok else 1


def _card() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            return f"{torch.cuda.device_count()} x {name}"
    except ImportError:
        pass
    import os

    return f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
