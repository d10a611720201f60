"""Rate sweeps of several workloads against one running cluster, under a wall-clock budget.

`run_config_sweeps` is one configuration's share of a report: connect (start the cluster,
wait until it serves), warm every worker up, then for each workload in turn send it at each
rate of its sweep, open loop, and write its results file after every run, so whatever ran
survives a later crash. In order:

    budget?     the cluster start plus the first run must fit the time left, else nothing
                starts (said so in the notes)
    connect     `connect()` yields a ready `Target` (a `baton serve` child process behind a
                GrpcTarget, or a fake in tests) and stops it on exit
    warm up     2 requests per worker at once, shaped like each workload's first request
                (answers cut to WARMUP_MAX_TOKENS): kernels compiled, KV paths opened
    each rate   skipped (with a note) if its estimated time does not fit what is left; the
                run's deadline is also cut to what is left; after a run in which fewer than
                `stop_below_ttft_met` of the requests met the TTFT SLO (failures count as
                missing it), the later rates are skipped: the configuration is saturated,
                its queue grows, and higher rates only queue more (a TPOT miss alone is not
                saturation: decode may be slow at every rate)

Every run of a sweep gets a fresh cache salt and request-id prefix (bench.salted), and the
same arrival seed at the same rate index, so two configurations see identical traffic.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from loadtest.arrivals import OpenLoop
from loadtest.bench import salted, warm_up
from loadtest.datasets import RandomDataset, SharedPrefixDataset
from loadtest.metrics import SLO
from loadtest.results import ResultFile, RunResult, build_result, save_results
from loadtest.runner import RunOptions, run
from loadtest.targets import Target, step_deltas
from loadtest.workload import Dataset

WARMUP_MAX_TOKENS = 32
WARMUPS_PER_WORKER = 2


@dataclass(frozen=True)
class RandomWorkload:
    """Random prompts of `input_len` tokens, answers of `output_len`; at each rate,
    `arrival_s` seconds of arrivals (at least `min_requests` requests)."""

    input_len: int
    output_len: int
    arrival_s: float
    min_requests: int = 16

    def num_requests(self, rate_rps: float) -> int:
        return max(self.min_requests, round(rate_rps * self.arrival_s))

    def dataset(self, rate_rps: float, seed: int) -> Dataset:
        return RandomDataset(
            self.num_requests(rate_rps), self.input_len, self.output_len, 0.0, seed
        )

    def describe(self) -> str:
        return (
            f"random {self.input_len}-token prompts, {self.output_len}-token answers, "
            f"{self.arrival_s:g} s of Poisson arrivals per rate (>= {self.min_requests} requests)"
        )


@dataclass(frozen=True)
class SharedPrefixWorkload:
    """`num_groups` system prompts, `prompts_per_group` questions on each: the same requests
    at every rate (loadtest.datasets.SharedPrefixDataset)."""

    num_groups: int
    prompts_per_group: int
    system_prompt_len: int
    question_len: int
    output_len: int

    def num_requests(self, rate_rps: float) -> int:
        return self.num_groups * self.prompts_per_group

    def dataset(self, rate_rps: float, seed: int) -> Dataset:
        return SharedPrefixDataset(
            num_groups=self.num_groups,
            prompts_per_group=self.prompts_per_group,
            system_prompt_len=self.system_prompt_len,
            question_len=self.question_len,
            output_len=self.output_len,
            seed=seed,
        )

    def describe(self) -> str:
        return (
            f"shared prefix: {self.num_groups} groups x {self.prompts_per_group} prompts, "
            f"{self.system_prompt_len}-token system prompt + {self.question_len}-token "
            f"question, {self.output_len}-token answers, Poisson arrivals"
        )


Workload = RandomWorkload | SharedPrefixWorkload


@dataclass(frozen=True)
class SweepSpec:
    """One workload swept over rates on one configuration."""

    name: str  # the comparison it belongs to, e.g. "interference"
    workload: Workload
    rates_rps: tuple[float, ...]
    slo: SLO
    out_path: Path  # the results file
    seed: int = 0
    tail_s: float = 5.0  # expected time from the last arrival to the last answer, unsaturated
    max_run_s: float = 60.0  # a run's hard limit (runner max_duration_s)
    request_timeout_s: float = 120.0
    stop_below_ttft_met: float = 0.25  # saturated: later rates are skipped

    def __post_init__(self) -> None:
        if not self.rates_rps or not all(r > 0 and math.isfinite(r) for r in self.rates_rps):
            raise ValueError(f"{self.name}: rates must be finite and > 0, got {self.rates_rps}")

    def estimate_run_s(self, rate_rps: float) -> float:
        """Arrivals plus the tail: what an unsaturated run takes."""
        return min(self.max_run_s, self.workload.num_requests(rate_rps) / rate_rps + self.tail_s)


class Budget:
    """Wall-clock time left from `budget_s` (None: unlimited), on `clock`."""

    def __init__(self, budget_s: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start = clock()
        self.deadline = math.inf if budget_s is None else self.start + budget_s

    def elapsed_s(self) -> float:
        return self.clock() - self.start

    def remaining_s(self) -> float:
        return self.deadline - self.clock()

    def fits(self, need_s: float) -> bool:
        return need_s <= self.remaining_s()


class Notes:
    """What ran, was skipped or failed, with times since the start: printed as it happens
    and kept for the report."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.lines: list[str] = []
        self.num_failures = 0

    def add(self, text: str, failure: bool = False) -> None:
        line = f"[{self.budget.elapsed_s():7.1f} s] {'FAILED: ' if failure else ''}{text}"
        self.lines.append(line)
        self.num_failures += failure
        print(line, file=sys.stderr, flush=True)


Connect = Callable[[], AbstractContextManager[Target]]


def _warm_up(target: Target, sweeps: Sequence[SweepSpec], num_workers: int) -> None:
    """WARMUPS_PER_WORKER requests per worker at once for each workload, so the router
    spreads them over every worker; ValueError if one fails."""
    for sweep in sweeps:
        first = sweep.workload.dataset(sweep.rates_rps[0], sweep.seed).generate()[0]
        request = dataclasses.replace(first, max_tokens=min(first.max_tokens, WARMUP_MAX_TOKENS))
        num = WARMUPS_PER_WORKER * max(1, num_workers)
        with ThreadPoolExecutor(num) as pool:
            futures = [
                pool.submit(warm_up, target, [request], 1, sweep.request_timeout_s)
                for _ in range(num)
            ]
            for future in futures:
                future.result()


def run_sweep(target: Target, sweep: SweepSpec, label: str, budget: Budget, notes: Notes) -> None:
    """Send `sweep`'s workload at each rate; rewrite `sweep.out_path` after every run."""
    described = target.describe()
    runs: list[RunResult] = []
    for i, rate in enumerate(sweep.rates_rps):
        need_s = sweep.estimate_run_s(rate)
        if not budget.fits(need_s):
            notes.add(
                f"{sweep.name} / {label}: skipped {', '.join(f'{r:g}' for r in sweep.rates_rps[i:])}"
                f" req/s: the time budget has {max(0.0, budget.remaining_s()):.0f} s left, "
                f"the next run needs about {need_s:.0f} s"
            )
            break
        dataset = sweep.workload.dataset(rate, sweep.seed)
        tag = f"{sweep.name}-{label}-{i}-{uuid.uuid4().hex[:6]}"
        all_sent: dict[str, object] = {}  # the workers' counters when the last request went
        options = RunOptions(
            request_timeout_s=sweep.request_timeout_s,
            max_duration_s=max(1.0, min(sweep.max_run_s, budget.remaining_s())),
            progress=False,
            request_id_prefix=tag,
            on_all_sent=functools.partial(_read_steps, target, all_sent),
        )
        arrival = OpenLoop(rate, 1.0, sweep.seed + i)
        steps_before = target.worker_steps()
        raw = run(target, salted(dataset.generate(), tag), arrival, options)
        steps = step_deltas(steps_before, target.worker_steps(), raw.duration_s)
        if all_sent:  # "busy" over the whole run includes the tail after the last arrival
            sending = step_deltas(steps_before, all_sent["steps"], all_sent["at_s"])  # type: ignore[arg-type]
            for worker, d in steps.items():
                d["busy_while_sending"] = sending.get(worker, {}).get("busy", 0.0)
        result = build_result(
            raw, dataset.describe(), described | {"worker_steps": steps}, sweep.slo
        )
        runs.append(result)
        save_results(sweep.out_path, ResultFile(label, runs))
        s = result.summary
        notes.add(
            f"{sweep.name} / {label} @ {rate:g} req/s: {s.completed}/{s.num_requests} completed"
            f" in {s.duration_s:.1f} s, goodput {s.request_goodput_rps or 0:.2f} req/s, SLO met "
            f"{100 * (s.slo_attainment or 0):.0f}%, TTFT p90 {_p90(s.ttft)} ms, TPOT p90 "
            f"{_p90(s.tpot)} ms, {s.output_throughput_tps:.0f} out tok/s"
            + "".join(
                f"; {w} {d['step_ms']:.1f} ms x {d['rows']:.0f} rows, busy {100 * d['busy']:.0f}%"
                f" ({100 * d.get('busy_while_sending', 0):.0f}% while sending)"
                for w, d in steps.items()
            )  # fmt: skip
        )
        ttft_met = s.slo_attainment_by_slo.get("ttft_ms")
        if (
            ttft_met is not None
            and ttft_met < sweep.stop_below_ttft_met
            and i + 1 < len(sweep.rates_rps)
        ):
            notes.add(
                f"{sweep.name} / {label}: saturated at {rate:g} req/s (TTFT SLO met by "
                f"{100 * ttft_met:.0f}% < {100 * sweep.stop_below_ttft_met:.0f}%): "
                f"skipped {', '.join(f'{r:g}' for r in sweep.rates_rps[i + 1 :])} req/s"
            )
            break


def _p90(dist: object) -> str:
    value = None if dist is None else dist.percentiles_ms.get("p90")  # type: ignore[attr-defined]
    return "—" if value is None else f"{value:.0f}"


def run_config_sweeps(
    label: str,
    sweeps: Sequence[SweepSpec],
    connect: Connect,
    budget: Budget,
    notes: Notes,
    start_estimate_s: float,
    num_workers: int,
) -> bool:
    """Start the configuration, warm it up, run `sweeps` in order, stop it. Returns False
    if it did not start (budget or failure: in the notes)."""
    first = sweeps[0]
    need_s = start_estimate_s + first.estimate_run_s(first.rates_rps[0])
    if not budget.fits(need_s):
        notes.add(
            f"{label}: not started (for {', '.join(s.name for s in sweeps)}): the time budget "
            f"has {max(0.0, budget.remaining_s()):.0f} s left, the start and a first run need "
            f"about {need_s:.0f} s"
        )
        return False
    started_s = budget.elapsed_s()
    try:
        with connect() as target:
            ready_s = budget.elapsed_s()
            _warm_up(target, sweeps, num_workers)
            notes.add(
                f"{label}: serving after {ready_s - started_s:.1f} s, warmed up in "
                f"{budget.elapsed_s() - ready_s:.1f} s"
            )
            for sweep in sweeps:
                run_sweep(target, sweep, label, budget, notes)
    except Exception as exc:  # one configuration failing must not end the report
        notes.add(f"{label}: {type(exc).__name__}: {exc}", failure=True)
        return False
    notes.add(f"{label}: stopped ({budget.elapsed_s() - started_s:.1f} s in all)")
    return True


def _read_steps(target: Target, into: dict[str, object], at_s: float) -> None:
    into.update(at_s=at_s, steps=target.worker_steps())
