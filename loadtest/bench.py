"""`baton bench`: load a Baton router, then write results JSON, a Markdown summary and plots.

    python -m loadtest.bench --address 127.0.0.1:50051 --dataset shared-prefix \\
        --num-groups 8 --prompts-per-group 16 --system-prompt-len 1024 --question-len 64 \\
        --output-len 128 --rate 4 --slo ttft_ms=500 tpot_ms=50 --out results/shared-prefix
    python -m loadtest.bench --address ... --dataset random --sweep 1,2,4,8 --out results/sweep
    python -m loadtest.bench --report colocated.json disagg.json --out results/compare

Writes into --out: `results.json` (loadtest/results.py), `summary.md`, `cdf.png` and, for
open-loop runs, `sweep.png`. With --report, no load is sent: the files given are reported
(two are compared side by side). `--config FILE` starts a cluster for the run when the caller
passes a `start_cluster` (as `baton bench` does); otherwise give --address.

Each run of a sweep sends the whole workload with its own cache-salt prefix, so no run starts
with prompts an earlier run left in the prefix cache, and request ids carry a random run tag,
so two load generators can share a router.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from loadtest.arrivals import ClosedLoop, OpenLoop, RateSweep, parse_arrival, sweep_rates
from loadtest.datasets import (
    LengthMixDataset,
    MultiTurnDataset,
    RandomDataset,
    SharedPrefixDataset,
    prefill_decode_mix,
)
from loadtest.jsonl_dataset import JsonlDataset
from loadtest.metrics import parse_slo
from loadtest.report import write_report
from loadtest.results import ResultFile, RunResult, build_result, load_results, save_results
from loadtest.runner import RunOptions, run
from loadtest.targets import GrpcTarget, GrpcTargetConfig, Target, TargetError
from loadtest.workload import BenchRequest, Dataset, TokenRange

log = logging.getLogger("baton.bench")

# Given a config file, start a cluster and yield its serving address; stop it on exit.
StartCluster = Callable[[str], AbstractContextManager[str]]
DATASETS = ("random", "shared-prefix", "length-mix", "multi-turn", "jsonl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench options, for `baton bench` or this module's own parser."""
    where = parser.add_argument_group("target")
    where.add_argument("--address", help="HOST:PORT of a running Baton router")
    where.add_argument("--config", help="start a cluster from this YAML for the run instead")
    where.add_argument("--api-key", default=None)
    where.add_argument("--ready-timeout-s", type=float, default=120.0)
    where.add_argument("--temperature", type=float, default=None, help="default: the server's")
    where.add_argument(
        "--no-ignore-eos", action="store_true", help="let EOS end answers early (lengths vary)"
    )

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", choices=DATASETS, default="random")
    data.add_argument("--num-requests", type=int, default=64, help="random, length-mix")
    data.add_argument("--input-len", type=int, default=128, help="random")
    data.add_argument("--output-len", type=int, default=32, help="random, shared-prefix")
    data.add_argument("--range-ratio", type=float, default=0.0, help="random")
    data.add_argument("--num-groups", type=int, default=4, help="shared-prefix")
    data.add_argument("--prompts-per-group", type=int, default=8, help="shared-prefix")
    data.add_argument(
        "--system-prompt-len", type=int, default=256, help="shared-prefix, multi-turn"
    )
    data.add_argument("--question-len", type=int, default=32, help="shared-prefix")
    data.add_argument("--salt-per-tenant", action="store_true", help="shared-prefix")
    data.add_argument("--long-prompt-fraction", type=float, default=0.5, help="length-mix")
    data.add_argument("--long-input-len", type=int, default=1024, help="length-mix")
    data.add_argument("--short-output-len", type=int, default=16, help="length-mix")
    data.add_argument("--short-input-len", type=int, default=32, help="length-mix")
    data.add_argument("--long-output-len", type=int, default=256, help="length-mix")
    data.add_argument("--num-conversations", type=int, default=8, help="multi-turn")
    data.add_argument("--num-turns", type=int, default=4, help="multi-turn")
    data.add_argument("--user-len", type=int, default=64, help="multi-turn")
    data.add_argument("--answer-len", type=int, default=64, help="multi-turn")
    data.add_argument("--dataset-path", help="jsonl: one JSON object per line")
    data.add_argument(
        "--token-range",
        default="0,256",
        help="LOW,HIGH: synthetic token ids are drawn from [LOW, HIGH)",
    )

    load = parser.add_argument_group("load")
    load.add_argument("--rate", help="open loop: requests/s ('inf': all at once)")
    load.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    load.add_argument(
        "--sweep",
        help="open-loop rates, one run each: R1,R2,... or START:STOP:NUM[:geometric]",
    )
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    load.add_argument("--seed", type=int, default=0, help="seeds the dataset and the arrivals")
    load.add_argument("--request-timeout-s", type=float, default=300.0)
    load.add_argument("--max-duration-s", type=float, default=3600.0, help="per run")
    load.add_argument("--max-inflight", type=int, default=1024)
    load.add_argument("--num-warmups", type=int, default=1, help="unrecorded requests first")

    out = parser.add_argument_group("output")
    out.add_argument(
        "--slo",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=MS",
        help="ttft_ms=..., tpot_ms=..., e2el_ms=... (space or comma separated)",
    )
    out.add_argument("--percentiles", default="50,90,99")
    out.add_argument("--label", default=None, help="the configuration's name in reports")
    out.add_argument("--out", default="bench-results", help="folder for the results")
    out.add_argument("--no-progress", action="store_true")
    out.add_argument(
        "--report",
        nargs="+",
        metavar="RESULTS_JSON",
        help="send no load: report these results files (two: side by side)",
    )


def _token_range(text: str) -> TokenRange:
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--token-range must be LOW,HIGH, got {text!r}") from None
    return TokenRange(low, high)


def build_dataset(args: argparse.Namespace) -> Dataset:
    tokens = _token_range(args.token_range)
    if args.dataset == "random":
        return RandomDataset(
            args.num_requests, args.input_len, args.output_len, args.range_ratio, args.seed, tokens
        )
    if args.dataset == "shared-prefix":
        return SharedPrefixDataset(
            num_groups=args.num_groups,
            prompts_per_group=args.prompts_per_group,
            system_prompt_len=args.system_prompt_len,
            question_len=args.question_len,
            output_len=args.output_len,
            salt_per_tenant=args.salt_per_tenant,
            seed=args.seed,
            token_range=tokens,
        )
    if args.dataset == "length-mix":
        classes = prefill_decode_mix(
            args.long_prompt_fraction,
            args.long_input_len,
            args.short_output_len,
            args.short_input_len,
            args.long_output_len,
        )
        return LengthMixDataset(args.num_requests, classes, args.seed, tokens)
    if args.dataset == "multi-turn":
        return MultiTurnDataset(
            num_conversations=args.num_conversations,
            num_turns=args.num_turns,
            user_len=args.user_len,
            answer_len=args.answer_len,
            system_prompt_len=args.system_prompt_len,
            seed=args.seed,
            token_range=tokens,
        )
    assert args.dataset == "jsonl", args.dataset
    if not args.dataset_path:
        raise ValueError("--dataset jsonl needs --dataset-path FILE")
    return JsonlDataset(args.dataset_path, default_max_tokens=args.output_len)


def parse_sweep(text: str, burstiness: float, seed: int) -> RateSweep:
    """ "1,2,4" or "START:STOP:NUM[:geometric]"."""
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "geometric"):
                raise ValueError
            rates = sweep_rates(float(parts[0]), float(parts[1]), int(parts[2]), len(parts) == 4)
        else:
            rates = tuple(float(rate) for rate in text.split(","))
    except ValueError:
        raise ValueError(
            f"--sweep must be R1,R2,... or START:STOP:NUM[:geometric], got {text!r}"
        ) from None
    return RateSweep(rates, burstiness, seed)


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 <= p <= 100 for p in values):
        raise ValueError(f"--percentiles must be numbers in [0, 100] like 50,90,99, got {text!r}")
    return values


def salted(requests: Sequence[BenchRequest], salt: str) -> list[BenchRequest]:
    """The requests with `salt` prefixed to their cache salt (a fresh prefix cache per run)."""
    return [dataclasses.replace(r, cache_salt=f"{salt}/{r.cache_salt or ''}") for r in requests]


def warm_up(target: Target, requests: Sequence[BenchRequest], num: int, timeout_s: float) -> None:
    """Send `num` requests shaped like the first, under their own salt, before measuring
    (vLLM's initial test run); raise ValueError if one fails."""
    for i in range(num):
        request = dataclasses.replace(
            requests[0], cache_salt=f"warmup-{uuid.uuid4().hex[:8]}", turn=None
        )
        try:
            for _ in target.stream(request, f"warmup-{uuid.uuid4().hex[:8]}-{i}", timeout_s):
                pass
        except TargetError as exc:
            raise ValueError(
                f"the warm-up request failed ({exc}); check the target and the workload"
            ) from None


@contextlib.contextmanager
def start_cluster_from_config(config_path: str) -> Iterator[str]:
    """Start the cluster `config_path` describes (on a local Ray unless one is initialised),
    yield the router's address, and stop everything this started on exit."""
    import ray

    from baton.config import load_config
    from baton.launcher import launch

    cfg = load_config(config_path)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        # address="local": a Ray of its own, never one that another process left running.
        ray.init(
            address="local", include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    try:
        cluster = launch(cfg)
        try:
            yield cluster.address
        finally:
            cluster.stop()
    finally:
        if owns_ray:
            ray.shutdown()


@contextlib.contextmanager
def _address(args: argparse.Namespace, start_cluster: StartCluster | None) -> Iterator[str]:
    if (args.address is None) == (args.config is None):
        raise ValueError(
            "give exactly one of --address (a running router) and --config (start one)"
        )
    if args.address is not None:
        yield args.address
        return
    if start_cluster is None:
        raise ValueError("--config needs `baton bench` to start the cluster; here, give --address")
    with start_cluster(args.config) as address:
        yield address


def run_bench(args: argparse.Namespace, start_cluster: StartCluster | None = None) -> int:
    """Run `baton bench` from parsed arguments; returns the exit code."""
    out_dir = Path(args.out)
    if args.report:
        files = [load_results(path) for path in args.report]
        for path in write_report(files, out_dir):
            print(path)
        return 0

    loads = [args.rate is not None, args.concurrency is not None, args.sweep is not None]
    if sum(loads) != 1:
        raise ValueError("give exactly one of --rate, --concurrency and --sweep")
    if args.sweep is not None:
        points: list[OpenLoop | ClosedLoop] = list(
            parse_sweep(args.sweep, args.burstiness, args.seed).points()
        )
    else:
        points = [parse_arrival(args.rate, args.concurrency, args.burstiness, args.seed)]
    slo = parse_slo(args.slo)
    percentiles = _percentiles(args.percentiles)
    dataset = build_dataset(args)
    requests = dataset.generate()
    run_tag = uuid.uuid4().hex[:8]

    with _address(args, start_cluster) as address:
        target = GrpcTarget(
            GrpcTargetConfig(address, args.api_key, not args.no_ignore_eos, args.temperature)
        )
        try:
            target.wait_ready(args.ready_timeout_s)
            described = target.describe()
            warm_up(target, requests, args.num_warmups, args.request_timeout_s)
            runs: list[RunResult] = []
            for i, point in enumerate(points):
                options = RunOptions(
                    request_timeout_s=args.request_timeout_s,
                    max_duration_s=args.max_duration_s,
                    max_inflight=args.max_inflight,
                    progress=not args.no_progress,
                    request_id_prefix=f"bench-{run_tag}-{i}",
                )
                raw = run(target, salted(requests, f"bench-{run_tag}-{i}"), point, options)
                result = build_result(raw, dataset.describe(), described, slo, percentiles)
                runs.append(result)
                s = result.summary
                print(
                    f"{result.name}: {s.completed}/{s.num_requests} completed, "
                    f"{s.request_throughput_rps:.2f} req/s, {s.output_throughput_tps:.1f} tok/s",
                    file=sys.stderr,
                )
        finally:
            target.close()

    label = args.label or str(described.get("mode") or "baton")
    results = ResultFile(label, runs)
    print(save_results(out_dir / "results.json", results))
    for path in write_report([results], out_dir):
        print(path)
    return 0


def main(argv: list[str] | None = None, start_cluster: StartCluster | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baton bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return run_bench(args, start_cluster)
    except ValueError as exc:
        print(f"baton bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
