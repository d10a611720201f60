"""The `baton` command line.

baton serve --config FILE [--address RAY] [--port N] [--model PATH] [--demo]
baton demo                      the local cluster serves a few requests, then exits
baton generate --address HOST:PORT --prompt TEXT [sampling flags]
baton status --address HOST:PORT
baton run                       the colocated engine in this process (no Ray, no router)
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from baton.config import LOCAL_CONFIG, load_config


def _run(args: argparse.Namespace) -> int:
    """Serve a batch of prompts with the colocated engine and stream the outputs."""
    from engine.engine import Engine
    from engine.sampling_params import SamplingParams
    from engine.tokenizer import load_tokenizer

    cfg = load_config(args.config, args.model)
    tokenizer = load_tokenizer(cfg.model_path)
    engine = Engine(cfg.engine, cfg.model_path, tokenizer=tokenizer)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, ignore_eos=True
    )
    prompts = args.prompt or ["The quick brown fox", "Once upon a time", "KV caches are"]
    start = time.perf_counter()
    texts: dict[str, str] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"req-{i}", tokenizer.encode(prompt), params)
        texts[f"req-{i}"] = ""
    num_tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.new_text
            num_tokens += len(out.new_token_ids)
    elapsed = time.perf_counter() - start
    for i, prompt in enumerate(prompts):
        print(f"[req-{i}] {prompt!r} -> {texts[f'req-{i}']!r}")
    print(
        f"served {len(prompts)} requests, {num_tokens} tokens in {elapsed:.2f} s "
        f"({num_tokens / elapsed:.1f} tokens/s); free KV blocks "
        f"{engine.num_free_blocks}/{engine.block_manager.num_blocks}"
    )
    return 0


DEMO_PROMPTS = [
    "The quick brown fox",
    "Once upon a time",
    "KV caches are",
    "Prefill and decode",
]


def _serve(args: argparse.Namespace) -> int:
    """Start (or join) Ray, launch the cluster, print the ready line, serve until Ctrl-C."""
    import dataclasses

    import ray

    from baton.launcher import launch

    cfg = load_config(args.config, args.model)
    if args.port is not None:
        router = dataclasses.replace(cfg.cluster.router, port=args.port)
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, router=router))
    ray.init(
        # "local": a Ray of this process's own, never one another process left running
        # (address=None would join a `ray start` cluster or RAY_ADDRESS); --address auto joins.
        address=args.address or "local",
        include_dashboard=False,
        log_to_driver=args.verbose,
        logging_level=logging.INFO if args.verbose else logging.WARNING,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = None
    try:
        cluster = launch(cfg)
        c = cfg.cluster
        layout = (
            f"{c.num_prefill} prefill + {c.num_decode} decode workers"
            if c.num_prefill_workers
            else f"{c.num_decode} colocated replicas"
        )
        print(
            f"baton: serving on {cluster.address} ({c.mode.value}, {layout}, "
            f"policy {c.routing.policy.value})",
            flush=True,
        )
        if args.demo:
            return _demo_requests(cluster.address, args)
        stop.wait()
        print("baton: draining and stopping", flush=True)
        return 0
    finally:
        if cluster is not None:
            cluster.stop(grace_s=args.drain_s)
        ray.shutdown()


def _demo_requests(address: str, args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from baton.client import BatonClient

    with BatonClient(address) as client, ThreadPoolExecutor(len(DEMO_PROMPTS)) as pool:
        start = time.perf_counter()
        results = list(
            pool.map(
                lambda p: client.generate(
                    p, max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True
                ),
                DEMO_PROMPTS,
            )
        )
        elapsed = time.perf_counter() - start
        for prompt, r in zip(DEMO_PROMPTS, results, strict=True):
            t = r.timings
            print(
                f"[{t.mode}: {t.prefill_worker or '-'} -> {t.decode_worker}] {prompt!r} -> "
                f"{r.text!r} (ttft {t.ttft_ms:.0f} ms, cached {r.usage.cached_tokens})"
            )
        stats = client.stats()
    num_tokens = sum(len(r.token_ids) for r in results)
    print(
        f"served {len(results)} requests, {num_tokens} tokens in {elapsed:.2f} s; "
        + ", ".join(
            f"{w.name} free KV {w.num_free_blocks}/{w.num_total_blocks}" for w in stats.workers
        )
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from baton.client import BatonClient, build_request, finish_reason_name

    req = build_request(
        args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or (),
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )
    with BatonClient(args.address, api_key=args.api_key, timeout_s=args.timeout) as client:
        try:
            logprobs = []
            for resp in client.stream(req):
                sys.stdout.write(resp.text)
                sys.stdout.flush()
                logprobs.extend(resp.logprobs)
                if resp.finish_reason:
                    print()
                    for t in logprobs:  # token id, its logprob, then the best alternatives
                        top = " ".join(f"{a.token_id}:{a.logprob:.4f}" for a in t.top)
                        print(f"{t.token_id}\t{t.logprob:.4f}\t{top}", file=sys.stderr)
                    if args.timings:
                        t, u = resp.timings, resp.usage
                        print(
                            f"finish {finish_reason_name(resp.finish_reason)}; tokens prompt "
                            f"{u.prompt_tokens} completion {u.completion_tokens} cached "
                            f"{u.cached_tokens}; ttft {t.ttft_ms:.1f} ms (router {t.router_ms:.1f}, "
                            f"prefill queue {t.prefill_queue_ms:.1f}, prefill {t.prefill_ms:.1f}, "
                            f"transfer {t.transfer_ms:.1f}, decode queue {t.decode_queue_ms:.1f}); "
                            f"total {t.total_ms:.1f} ms",
                            file=sys.stderr,
                        )
        except grpc.RpcError as e:
            print(f"baton: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    import grpc

    from baton.client import BatonClient

    with BatonClient(args.address, api_key=args.api_key) as client:
        try:
            stats = client.stats()
            health = client.health()
        except grpc.RpcError as e:
            print(f"baton: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    healthy = {w.name: w.healthy for w in health.workers}
    print(
        f"{stats.mode}, policy {stats.policy}; requests {stats.requests_total} total, "
        f"{stats.requests_failed} failed, {stats.requests_in_flight} in flight, "
        f"{stats.attempts_retried} attempts retried; "
        f"{'serving' if health.serving else 'NOT serving'}"
    )
    print(
        f"{'worker':<12} {'role':<10} {'ok':<3} {'queue':>5} {'run':>4} {'KV used':>14} "
        f"{'cached':>7} {'prefix hit':>10} {'steps':>9} {'ms/step':>8} {'rows/step':>9}"
    )
    for w in stats.workers:
        used = w.num_total_blocks - w.num_free_blocks
        steps = max(w.num_steps, 1)  # means since the worker started
        print(
            f"{w.name:<12} {w.role:<10} {'y' if healthy.get(w.name) else 'n':<3} "
            f"{w.queue_depth:>5} {w.num_running:>4} {used:>6}/{w.num_total_blocks:<7} "
            f"{w.num_cached_blocks:>7} {w.prefix_hit_rate:>10.1%} {w.num_steps:>9} "
            f"{1e3 * w.step_s / steps:>8.2f} {w.step_rows / steps:>9.1f}"
        )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from loadtest.bench import run_bench, start_cluster_from_config

    return run_bench(args, start_cluster_from_config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="baton", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve prompts with the colocated engine on a config")
    run.add_argument("--config", default=str(LOCAL_CONFIG))
    run.add_argument("--model", default=None, help="a local Hugging Face checkpoint folder")
    run.add_argument("--prompt", action="append", help="repeat for several prompts")
    run.add_argument("--max-tokens", type=int, default=32)
    run.add_argument("--temperature", type=float, default=0.0)
    run.add_argument("--seed", type=int, default=None)
    run.set_defaults(func=_run)

    for name, help_text in (
        ("serve", "start the cluster (local Ray, or join one with --address) and serve"),
        ("demo", "start the local cluster, serve a few requests, print them and exit"),
    ):
        serve = sub.add_parser(name, help=help_text)
        serve.add_argument("--config", default=str(LOCAL_CONFIG))
        serve.add_argument(
            "--address",
            default=None,
            help="Ray cluster to join, or auto (default: start a local Ray of its own)",
        )
        serve.add_argument("--port", type=int, default=None, help="router port (default: config)")
        serve.add_argument("--model", default=None, help="a local Hugging Face checkpoint folder")
        serve.add_argument("--drain-s", type=float, default=5.0, help="grace period on Ctrl-C")
        serve.add_argument("--max-tokens", type=int, default=16, help="demo requests' max_tokens")
        serve.add_argument(
            "--demo",
            action="store_true",
            default=name == "demo",
            help=argparse.SUPPRESS if name == "demo" else "serve a few requests, then exit",
        )
        serve.set_defaults(func=_serve)

    gen = sub.add_parser("generate", help="stream one completion from a running cluster")
    gen.add_argument("--address", required=True, help="the router, HOST:PORT")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument(
        "--logprobs", type=int, default=None, help="print each token's logprob and N best"
    )
    gen.add_argument("--api-key", default=None)
    gen.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    gen.add_argument("--timings", action="store_true", help="print usage and phase timings")
    gen.set_defaults(func=_generate)

    status = sub.add_parser(
        "status", help="workers, load, KV usage, prefix hit rate, engine step means"
    )
    status.add_argument("--address", required=True, help="the router, HOST:PORT")
    status.add_argument("--api-key", default=None)
    status.set_defaults(func=_status)
    bench = sub.add_parser("bench", help="load-test a running router, or a cluster from --config")
    from loadtest.bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"baton: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
