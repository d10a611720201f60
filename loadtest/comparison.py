"""Figures that compare configurations from their rate sweeps (results files), as ratios.

Every figure is computed from open-loop runs at a finite rate, and says what it was computed
from (`Ratio.basis`), so a report can print the baseline beside the figure:

    best goodput         the highest request goodput (requests meeting every SLO, per second
                         of the run) over a configuration's sweep, and the rate that gave it
    goodput ratio        best goodput of the subject / best goodput of the baseline; each at
                         its own best rate (a configuration is run at the rates it sustains)
    TPOT p90 ratio       baseline TPOT p90 / subject TPOT p90 at one rate: the highest rate
                         at which the baseline's TTFT p90 still meets the TTFT SLO with no
                         failed request (where it "just meets" it) and at which both ran;
                         > 1: the subject decodes faster
    throughput ratio     best output-token throughput of the subject / of the baseline
    TTFT ratio           baseline TTFT (a percentile) / subject TTFT at the lowest rate both
                         ran (light load: the saving itself, without queueing)

A ratio whose denominator is zero or missing is None, never inf or NaN: the caller reports
why it is missing instead of a figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from loadtest.metrics import Distribution
from loadtest.results import ResultFile, RunResult


@dataclass(frozen=True)
class Ratio:
    """numerator / denominator, oriented so that > 1 favours the subject (throughputs:
    subject / baseline; latencies: baseline / subject), with where both were measured."""

    value: float
    numerator: float
    denominator: float
    basis: str  # e.g. "disagg 12.10 req/s at 16 req/s vs colocated 8.30 req/s at 12 req/s"

    def __post_init__(self) -> None:
        assert math.isfinite(self.value), self


@dataclass(frozen=True)
class AtRate:
    """A value measured at one offered rate."""

    value: float
    rate_rps: float


def swept_runs(results: ResultFile) -> list[RunResult]:
    """The open-loop runs at a finite rate, by rate (a later run at the same rate wins)."""
    by_rate = {
        run.rate_rps: run
        for run in results.runs
        if run.rate_rps is not None and math.isfinite(run.rate_rps)
    }
    return [by_rate[rate] for rate in sorted(by_rate)]


def run_at(results: ResultFile, rate_rps: float) -> RunResult | None:
    return next((r for r in swept_runs(results) if r.rate_rps == rate_rps), None)


def _best(results: ResultFile, value_of: Callable[[RunResult], float | None]) -> AtRate | None:
    """The highest value over the sweep (the lowest rate on ties); None if no run has one."""
    best: AtRate | None = None
    for run in swept_runs(results):
        value = value_of(run)
        if value is not None and (best is None or value > best.value):
            best = AtRate(value, run.rate_rps)  # type: ignore[arg-type]
    return best


def best_goodput(results: ResultFile) -> AtRate | None:
    """The highest goodput over the sweep (the lowest rate on ties); None without SLOs."""
    return _best(results, lambda run: run.summary.request_goodput_rps)


def best_output_throughput(results: ResultFile) -> AtRate | None:
    """The highest output-token throughput over the sweep (the lowest rate on ties)."""
    return _best(results, lambda run: run.summary.output_throughput_tps)


def _percentile_ms(dist: Distribution | None, key: str) -> float | None:
    return None if dist is None else dist.percentiles_ms.get(key)


def meets_ttft(run: RunResult, ttft_slo_ms: float) -> bool:
    """TTFT p90 within the SLO, and no request failed (a failure has no TTFT to count)."""
    p90 = _percentile_ms(run.summary.ttft, "p90")
    return run.summary.failed == 0 and p90 is not None and p90 <= ttft_slo_ms


def highest_rate_meeting_ttft(results: ResultFile, ttft_slo_ms: float) -> float | None:
    """The highest swept rate whose run `meets_ttft`."""
    meeting = [run.rate_rps for run in swept_runs(results) if meets_ttft(run, ttft_slo_ms)]
    return max(meeting) if meeting else None  # type: ignore[type-var]


def _ratio(numerator: float, denominator: float, basis: str) -> Ratio | None:
    if not denominator > 0 or not math.isfinite(numerator) or not math.isfinite(denominator):
        return None
    return Ratio(numerator / denominator, numerator, denominator, basis)


def _best_ratio(
    subject: ResultFile,
    baseline: ResultFile,
    best: Callable[[ResultFile], AtRate | None],
    unit: str,
    digits: int,
) -> Ratio | None:
    s, b = best(subject), best(baseline)
    if s is None or b is None:
        return None
    basis = (
        f"{subject.label} {s.value:.{digits}f} {unit} at {s.rate_rps:g} req/s vs "
        f"{baseline.label} {b.value:.{digits}f} {unit} at {b.rate_rps:g} req/s"
    )
    return _ratio(s.value, b.value, basis)


def goodput_ratio(subject: ResultFile, baseline: ResultFile) -> Ratio | None:
    """Best goodput of `subject` / best goodput of `baseline`, each over its own sweep."""
    return _best_ratio(subject, baseline, best_goodput, "req/s", 2)


def output_throughput_ratio(subject: ResultFile, baseline: ResultFile) -> Ratio | None:
    """Best output tokens/s of `subject` / best of `baseline`, each over its own sweep."""
    return _best_ratio(subject, baseline, best_output_throughput, "tok/s", 0)


def tpot_p90_ratio(subject: ResultFile, baseline: ResultFile, ttft_slo_ms: float) -> Ratio | None:
    """Baseline TPOT p90 / subject TPOT p90 at the highest rate where the baseline
    `meets_ttft` and both ran; None if there is no such rate."""
    subject_rates = {r.rate_rps for r in swept_runs(subject)}
    candidates = [
        run
        for run in swept_runs(baseline)
        if run.rate_rps in subject_rates and meets_ttft(run, ttft_slo_ms)
    ]
    if not candidates:
        return None
    base_run = candidates[-1]
    rate: float = base_run.rate_rps  # type: ignore[assignment]
    subject_run = run_at(subject, rate)
    assert subject_run is not None
    s = _percentile_ms(subject_run.summary.tpot, "p90")
    b = _percentile_ms(base_run.summary.tpot, "p90")
    if s is None or b is None:
        return None
    limit = highest_rate_meeting_ttft(baseline, ttft_slo_ms)
    where = f"{baseline.label}'s highest rate with TTFT p90 <= {ttft_slo_ms:g} ms"
    if limit != rate:
        where += f" that both ran; its highest is {limit:g}"
    basis = (
        f"at {rate:g} req/s ({where}): {baseline.label} TPOT p90 {b:.1f} ms vs "
        f"{subject.label} {s:.1f} ms"
    )
    return _ratio(b, s, basis)


def ttft_ratio_at_lowest_rate(
    subject: ResultFile, baseline: ResultFile, percentile_key: str = "p50"
) -> Ratio | None:
    """Baseline TTFT / subject TTFT (`percentile_key`, e.g. "p50") at the lowest rate both
    ran; > 1: the subject answers first faster."""
    subject_rates = {r.rate_rps for r in swept_runs(subject)}
    common = [r for r in swept_runs(baseline) if r.rate_rps in subject_rates]
    if not common:
        return None
    base_run = common[0]
    subject_run = run_at(subject, base_run.rate_rps)  # type: ignore[arg-type]
    assert subject_run is not None
    s = _percentile_ms(subject_run.summary.ttft, percentile_key)
    b = _percentile_ms(base_run.summary.ttft, percentile_key)
    if s is None or b is None:
        return None
    basis = (
        f"TTFT {percentile_key} at {base_run.rate_rps:g} req/s: {baseline.label} {b:.1f} ms vs "
        f"{subject.label} {s:.1f} ms"
    )
    return _ratio(b, s, basis)
