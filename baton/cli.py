"""The `baton` command line."""

from __future__ import annotations

import argparse
import logging
import sys
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baton", description=__doc__)
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"baton: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
