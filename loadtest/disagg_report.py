"""The disaggregation report (issue 5): disaggregated against colocated serving, measured.

    python -m loadtest.disagg_report --comparison interference,decode-heavy,prefix-cache \\
        --gpus 0,1 --out results/disagg --record
    python -m loadtest.disagg_report --comparison splits --gpus 0,1,2,3 --out results/splits
    python -m loadtest.disagg_report --profile cpu --comparison interference --out /tmp/r
    python -m loadtest.disagg_report --merge results/disagg/figures.json   # into benchmarks
    python -m loadtest.disagg_report --report-only --out results/disagg    # plots again
    python -m loadtest.disagg_report --dry-run     # the plan and its time estimate

Comparisons (llama3-8b shape, random bf16 weights, one GPU per worker):

    interference   1P1D (gpu-1p1d.yaml) vs two colocated replicas (gpu-colocated.yaml) on
                   the same two GPUs; 2048-token prompts, 256-token answers, Poisson
    decode-heavy   the same two configurations; 256-token prompts, 512-token answers
    prefix-cache   1P1D with prefix caching on vs off; 8 system prompts of 1536 tokens x 16
                   questions of 64 tokens, 128-token answers
    splits         four GPUs: 1P3D, 2P2D, 3P1D on the interference workload

Each configuration is a `baton serve` child process (loadtest/server_process.py: the router
does not share this process's GIL), started once for every comparison that uses it, warmed
up, swept over its rates (loadtest/sweeps.py), stopped before the next starts. Written to
--out: configs/ (the YAML each ran), logs/ (each server's output), one folder per comparison
(results-LABEL.json per configuration, comparison.md or summary.md, cdf.png, sweep.png),
report.md (the figures, every run in one table per comparison, what was skipped and why)
and figures.json (entries in docs/benchmarks.json's format; --record merges them there).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest import disagg_comparisons
from loadtest.disagg_comparisons import (
    COMPARISONS,
    DEFAULT_SLO,
    START_ESTIMATE_S,
    Profile,
    cpu_comparisons,
    gpu_comparisons,
)
from loadtest.disagg_outputs import META_JSON, write_outputs
from loadtest.disagg_plan import Comparison, estimate_s, parse_settings, plan
from loadtest.figures import BENCHMARKS_JSON, current_commit, record
from loadtest.metrics import SLO, parse_slo
from loadtest.server_process import ServerOptions, server_env, start_server
from loadtest.sweeps import Budget, Notes, RandomWorkload, run_config_sweeps
from loadtest.targets import GrpcTarget, GrpcTargetConfig, Target

READY_TIMEOUT_S = 60.0  # after the ready line, until Health says serving


def detect_card(gpus: tuple[int, ...] | None) -> str:
    """ "2 x NVIDIA H100 80GB HBM3" from torch in a child process (this process never
    touches CUDA: its memory would count against the workers'); "CPU dev box" without CUDA."""
    code = (
        "import json, torch\n"
        "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
        "print(json.dumps([torch.cuda.get_device_name(i) for i in range(n)]))\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env=server_env(os.environ, gpus),
            check=True,
        ).stdout
        names = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        names = []
    if not names:
        return "CPU dev box"
    return " + ".join(f"{names.count(n)} x {n}" for n in sorted(set(names)))


@contextlib.contextmanager
def served_target(options: ServerOptions) -> Iterator[Target]:
    """A `baton serve` child process behind a GrpcTarget, ready to take requests."""
    with start_server(options) as address:
        target = GrpcTarget(GrpcTargetConfig(address))
        try:
            target.wait_ready(READY_TIMEOUT_S)
            yield target
        finally:
            target.close()


def parse_gpus(text: str) -> tuple[int, ...]:
    try:
        gpus = tuple(int(g) for g in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"GPU indices like 0,1, got {text!r}") from None
    if len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise argparse.ArgumentTypeError(f"distinct GPU indices >= 0, got {text!r}")
    return gpus


def select_comparisons(args: argparse.Namespace) -> list[Comparison]:
    """The comparisons asked for, with --rates and --arrival-s applied, --gpus checked."""
    available = gpu_comparisons() if args.profile is Profile.GPU else cpu_comparisons()
    names = COMPARISONS if args.comparison == "all" else tuple(args.comparison.split(","))
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise ValueError(f"unknown comparison(s) {unknown}; choose from {list(COMPARISONS)}, all")
    rates: dict[str, tuple[float, ...]] = {}
    for item in args.rates:
        name, sep, text = item.partition("=")
        if not sep or name not in available:
            raise ValueError(
                f"--rates takes NAME=R1,R2,... (NAME in {list(COMPARISONS)}): {item!r}"
            )
        try:
            rates[name] = tuple(float(r) for r in text.split(","))
        except ValueError:
            raise ValueError(f"--rates {name}: rates must be numbers, got {text!r}") from None
    comps = []
    for name in names:
        comp = available[name]
        if name in rates:
            comp = replace(comp, rates_rps=rates[name])
        if args.arrival_s is not None and isinstance(comp.workload, RandomWorkload):
            comp = replace(comp, workload=replace(comp.workload, arrival_s=args.arrival_s))
        if args.gpus is not None and len(args.gpus) < comp.num_gpus:
            raise ValueError(f"{name} needs {comp.num_gpus} GPUs; --gpus names {len(args.gpus)}")
        comps.append(comp)
    return comps


def _comparisons_and_slo(args: argparse.Namespace) -> tuple[list[Comparison], SLO]:
    comps = select_comparisons(args)
    slo = parse_slo(args.slo) if args.slo else DEFAULT_SLO[args.profile]
    if slo.ttft_ms is None:
        raise ValueError("--slo needs ttft_ms: the TPOT ratio is taken where TTFT meets it")
    return comps, slo


def _finish(args: argparse.Namespace, entries: list[dict[str, Any]], out_dir: Path) -> None:
    if args.record and entries:
        record(entries, Path(args.benchmarks_json))
        print(f"recorded {len(entries)} figures in {args.benchmarks_json}", file=sys.stderr)
    print(f"\n{'figure':<42} {'value':>10}  target")
    for e in entries:
        print(f"{e['name']:<42} {e['value']:>10g}  {e['target']}")
    print(f"report: {out_dir / 'report.md'}")


def _check_record(record_on: bool, profile: Profile, benchmarks_json: str) -> None:
    if record_on and profile is Profile.CPU and benchmarks_json == str(BENCHMARKS_JSON):
        raise ValueError(
            "CPU-profile figures are a smoke test, not benchmarks: give --benchmarks-json FILE "
            "to record them elsewhere"
        )


def _config_bases(items: list[str], comps: list[Comparison]) -> dict[str, str]:
    """--config LABEL=YAML items, checked against the configurations the comparisons use."""
    labels = {spec.label for comp in comps for spec in comp.configs}
    bases = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or label not in labels:
            raise ValueError(f"--config takes LABEL=YAML with LABEL in {sorted(labels)}: {item!r}")
        if not Path(path).is_file():
            raise ValueError(f"--config {label}: no file at {path}")
        bases[label] = path
    return bases


def rebuild_report(args: argparse.Namespace) -> int:
    """--report-only: the outputs again from --out's results files, with the run's own
    settings, header and notes (say, the plots on a machine with matplotlib)."""
    out_dir = Path(args.out)
    meta = json.loads((out_dir / META_JSON).read_text())
    run_args = build_parser().parse_args(meta["argv"])
    _check_record(args.record, run_args.profile, args.benchmarks_json)
    comps, slo = _comparisons_and_slo(run_args)
    notes = Notes(Budget(None))
    notes.lines = list(meta["notes"])
    entries = write_outputs(comps, out_dir, slo, notes, meta["header"], meta["argv"], plots=True)
    _finish(args, entries, out_dir)
    return 0


def run_report(args: argparse.Namespace, argv: list[str]) -> int:
    if args.merge:
        entries = json.loads(Path(args.merge).read_text())
        record(entries, Path(args.benchmarks_json))
        print(f"merged {len(entries)} figures into {args.benchmarks_json}")
        return 0
    if args.report_only:
        return rebuild_report(args)
    _check_record(args.record, args.profile, args.benchmarks_json)
    comps, slo = _comparisons_and_slo(args)
    out_dir = Path(args.out)
    bases = _config_bases(args.config, comps)
    start_s = args.start_estimate_s or START_ESTIMATE_S[args.profile]
    planned = plan(comps, out_dir, slo, args.seed, bases, parse_settings(args.set))
    print(f"plan: about {estimate_s(planned, start_s):.0f} s if nothing saturates", file=sys.stderr)
    for p in planned:
        runs = ", ".join(f"{s.name} @ {'/'.join(f'{r:g}' for r in s.rates_rps)}" for s in p.sweeps)
        print(f"  {p.spec.label} ({p.num_workers} workers): {runs} req/s", file=sys.stderr)
    if args.dry_run:
        return 0

    for p in planned:  # no results of an earlier report in --out mix with this one's
        for sweep in p.sweeps:
            sweep.out_path.unlink(missing_ok=True)
    budget = Budget(args.time_budget_s)
    notes = Notes(budget)
    card = args.card or (detect_card(args.gpus) if args.profile is Profile.GPU else "CPU dev box")
    header = {
        "card": card,
        "date": time.strftime("%Y-%m-%d"),
        "commit": current_commit(),
        "command": (f"{args.via}  # " if args.via else "")
        + "python -m loadtest.disagg_report "
        + shlex.join(argv),
        "profile": args.profile.value,
        "SLO": ", ".join(f"{k}={v:g}" for k, v in slo.given().items()),
        "GPUs": "inherited" if args.gpus is None else ",".join(map(str, args.gpus)),
    }
    budget_text = "none" if args.time_budget_s is None else f"{args.time_budget_s:g} s"
    notes.add(f"card {card}; commit {header['commit']}; time budget {budget_text}")
    try:
        for p in planned:
            options = ServerOptions(
                config_path=p.config_path,
                log_path=out_dir / "logs" / f"server-{p.spec.label}.log",
                gpus=args.gpus,
                model_path=args.model,
                start_timeout_s=args.start_timeout_s,
            )
            connect = functools.partial(served_target, options)
            run_config_sweeps(
                p.spec.label, p.sweeps, connect, budget, notes, start_s, p.num_workers
            )
            # No plots yet (seconds each): a run killed later keeps report.md and figures.json.
            write_outputs(comps, out_dir, slo, notes, header, argv, plots=False)
    except (KeyboardInterrupt, SystemExit) as exc:  # the server is stopped by now
        notes.add(f"interrupted ({type(exc).__name__}): what ran is reported", failure=True)
        write_outputs(comps, out_dir, slo, notes, header, argv, plots=False)
        raise
    notes.add("done")
    entries = write_outputs(comps, out_dir, slo, notes, header, argv, plots=True)
    _finish(args, entries, out_dir)
    return 1 if notes.num_failures else 0


def help_text() -> str:
    """--help: this module's docstring, then disagg_comparisons' past its first paragraph (the
    SLOs, rates and figures, and why), as one text."""
    rationale = (disagg_comparisons.__doc__ or "").partition("\n\n")[2]
    return f"{__doc__ or ''}\n{rationale}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.disagg_report",
        description=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--comparison", default="all", help=f"comma list of {', '.join(COMPARISONS)}; or all")
    add("--profile", type=Profile, choices=list(Profile), default=Profile.GPU, metavar="{gpu,cpu}")
    add("--gpus", type=parse_gpus, default=None, help="e.g. 0,1: the servers' visible GPUs")
    add("--out", default="results/disagg-report", help="folder for everything written")
    add("--rates", action="append", default=[], metavar="NAME=R1,R2,...", help="per comparison")
    add(
        "--slo",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=MS",
        help="instead of the profile's: ttft_ms=... tpot_ms=... e2el_ms=...",
    )
    add("--arrival-s", type=float, default=None, help="seconds of arrivals per rate (random)")
    add("--seed", type=int, default=0, help="seeds the prompts and the arrivals")
    add(
        "--config",
        action="append",
        default=[],
        metavar="LABEL=YAML",
        help="another base file for a configuration (its overrides still apply)",
    )
    add(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="into every configuration, e.g. cluster.kv_transfer.transport=grpc",
    )
    add("--model", default=None, help="a checkpoint folder instead of the configs' preset")
    add("--time-budget-s", type=float, default=None, help="skip what would not fit (said so)")
    add("--start-estimate-s", type=float, default=None, help="a cluster's start and stop")
    add("--start-timeout-s", type=float, default=300.0, help="until `baton serve` is ready")
    add("--card", default=None, help="default: torch's names of the GPUs used")
    add("--via", default=None, help="the command that ran this one, for the recorded command")
    add("--record", action="store_true", help="merge the figures into --benchmarks-json")
    add("--benchmarks-json", default=str(BENCHMARKS_JSON))
    add("--merge", metavar="FIGURES_JSON", help="record an earlier figures.json; nothing runs")
    add("--dry-run", action="store_true", help="print the plan and its time estimate only")
    add(
        "--report-only",
        action="store_true",
        help="rebuild --out's reports and plots from its results files; nothing runs",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # SIGTERM (say, `timeout` around this command) unwinds like Ctrl-C: servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run_report(args, argv)
    except ValueError as exc:
        print(f"disagg_report: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
