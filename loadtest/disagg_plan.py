"""What a disaggregation report runs: comparisons of cluster configurations, the plan that
starts each configuration once, and the figures each kind of comparison yields.

    Comparison     a workload swept over rates on two or more configurations, of a kind:
                   PAIR (disaggregated configs[0] against colocated configs[1]), PREFIX
                   (prefix caching on, configs[0], against off) or SPLITS (each on its own,
                   and each against the `baseline` config if one is named)
    ConfigSpec     a YAML file of cluster_configs/ with overrides merged in
    plan()         one PlannedConfig per distinct configuration, in order of first use, with
                   every sweep that uses it: a configuration shared by comparisons (1P1D runs
                   interference, decode-heavy and prefix-cache) starts once
    figures_for()  the comparison's figures (loadtest/comparison.py defines each), or why
                   one is missing

The defaults (which configs, rates, SLOs and why) live in loadtest/disagg_comparisons.py.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from loadtest.comparison import (
    Ratio,
    best_goodput,
    best_output_throughput,
    goodput_ratio,
    output_throughput_ratio,
    swept_runs,
    tpot_p90_ratio,
    ttft_ratio_at_lowest_rate,
)
from loadtest.metrics import SLO
from loadtest.results import ResultFile
from loadtest.server_process import ROOT
from loadtest.sweeps import SweepSpec, Workload


class Kind(enum.Enum):
    PAIR = "pair"  # configs[0] (disaggregated) against configs[1] (colocated)
    PREFIX = "prefix"  # configs[0] (prefix caching on) against configs[1] (off)
    SPLITS = "splits"  # each config on its own, and each against `Comparison.baseline`


@dataclass(frozen=True)
class ConfigSpec:
    """A cluster config: a YAML file of cluster_configs/ with `overrides` merged into it."""

    label: str  # its name in results and plots, e.g. "disagg-1p1d"
    base: str  # path relative to the repository root
    overrides: Mapping[str, Any] = field(default_factory=dict)
    key: str = ""  # its part of a figure name, e.g. "1p3d"

    def render(self, base_path: Path | None = None) -> dict[str, Any]:
        raw = yaml.safe_load((base_path or ROOT / self.base).read_text()) or {}
        return deep_merge(raw, self.overrides)


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in: mappings recursively, anything else replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass(frozen=True)
class Comparison:
    name: str  # "interference"
    kind: Kind
    workload: Workload
    rates_rps: tuple[float, ...]
    configs: tuple[ConfigSpec, ...]
    num_gpus: int  # GPUs every config uses (0 on CPU)
    tail_s: float  # after the last arrival, until the last answer (unsaturated)
    max_run_s: float
    baseline: str = ""  # SPLITS: the label of the config every other one is compared with

    def __post_init__(self) -> None:
        labels = [c.label for c in self.configs]
        if self.baseline and (self.kind is not Kind.SPLITS or self.baseline not in labels):
            raise ValueError(
                f"{self.name}: baseline {self.baseline!r} must be one of the configs "
                f"{labels} of a SPLITS comparison"
            )

    @property
    def figure_prefix(self) -> str:
        return "bench." + {"splits": "split"}.get(self.name, self.name.replace("-", "_"))


@dataclass(frozen=True)
class PlannedConfig:
    spec: ConfigSpec
    config_path: Path  # the rendered YAML under --out/configs
    num_workers: int
    sweeps: tuple[SweepSpec, ...]


def parse_settings(items: list[str]) -> dict[str, Any]:
    """["cluster.kv_transfer.transport=grpc", ...] as nested overrides (values read as YAML:
    `engine.enforce_eager=true` is a bool)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise ValueError(
                f"--set takes SECTION.KEY=VALUE, e.g. engine.enforce_eager=true: {item!r}"
            )
        nested: dict[str, Any] = {path[-1]: yaml.safe_load(text)}
        for part in reversed(path[:-1]):
            nested = {part: nested}
        overrides = deep_merge(overrides, nested)
    return overrides


def plan(
    comparisons: list[Comparison],
    out_dir: Path,
    slo: SLO,
    seed: int,
    bases: Mapping[str, str],
    settings: Mapping[str, Any] | None = None,
) -> list[PlannedConfig]:
    """One entry per distinct configuration, in order of first use, with every sweep that
    uses it in comparison order: a configuration shared by comparisons starts once.
    `bases` replace a label's base file; `settings` are merged into every configuration."""
    from baton.config import parse_config

    by_label: dict[str, PlannedConfig] = {}
    for comp in comparisons:
        for spec in comp.configs:
            sweep = SweepSpec(
                name=comp.name,
                workload=comp.workload,
                rates_rps=comp.rates_rps,
                slo=slo,
                out_path=out_dir / comp.name / f"results-{spec.label}.json",
                seed=seed,
                tail_s=comp.tail_s,
                max_run_s=comp.max_run_s,
            )
            planned = by_label.get(spec.label)
            if planned is None:
                base = Path(bases[spec.label]) if spec.label in bases else None
                raw = deep_merge(spec.render(base), settings or {})
                cfg = parse_config(raw)  # a bad config fails here, before anything starts
                path = out_dir / "configs" / f"{spec.label}.yaml"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(yaml.safe_dump(raw, sort_keys=False))
                planned = PlannedConfig(spec, path, cfg.cluster.num_workers, ())
            by_label[spec.label] = replace(planned, sweeps=(*planned.sweeps, sweep))
    return list(by_label.values())


def estimate_s(planned: list[PlannedConfig], start_s: float) -> float:
    """Starts plus unsaturated runs: what the plan takes if nothing saturates."""
    return sum(
        start_s + sum(s.estimate_run_s(r) for s in p.sweeps for r in s.rates_rps) for p in planned
    )


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    target: str
    basis: str


def _named(name: str, ratio: Ratio | None, target: str, missing: list[str]) -> list[Figure]:
    if ratio is None:
        missing.append(f"{name}: not computable from the runs made (see the tables)")
        return []
    return [Figure(name, round(ratio.value, 3), "ratio", target, ratio.basis)]


def _split_figures(prefix: str, spec: ConfigSpec, results: ResultFile) -> list[Figure]:
    rates = ", ".join(f"{r.rate_rps:g}" for r in swept_runs(results))
    figures = []
    goodput, tps = best_goodput(results), best_output_throughput(results)
    if goodput is not None:
        basis = f"best over rates {rates} req/s, at {goodput.rate_rps:g} req/s"
        name = f"{prefix}_goodput_{spec.key}"
        figures.append(Figure(name, round(goodput.value, 3), "req/s", "report", basis))
    if tps is not None:
        basis = f"best over rates {rates} req/s, at {tps.rate_rps:g} req/s"
        name = f"{prefix}_output_tps_{spec.key}"
        figures.append(Figure(name, round(tps.value, 1), "tokens/s", "report", basis))
    return figures


# Targets from issue 5; every other figure is reported as measured.
TARGETS = {
    "bench.interference_goodput_ratio": ">= 1.3",
    "bench.interference_tpot_p90_ratio": ">= 2",
}


def _split_ratios(
    comp: Comparison, files: Mapping[str, ResultFile], absent: list[str], missing: list[str]
) -> list[Figure]:
    """Each config's best goodput over the baseline's, each at its own best rate (the
    2-GPU goodput ratio's definition): PREFIX_goodput_ratio_KEY."""
    prefix = comp.figure_prefix
    if comp.baseline in absent:
        missing.append(f"{prefix}_goodput_ratio_*: {comp.baseline} did not run")
        return []
    baseline = files[comp.baseline]
    figures = []
    for spec in comp.configs:
        if spec.label != comp.baseline and spec.label not in absent:  # absent: said already
            ratio = goodput_ratio(files[spec.label], baseline)
            name = f"{prefix}_goodput_ratio_{spec.key}"
            figures += _named(name, ratio, TARGETS.get(name, "report"), missing)
    return figures


def figures_for(
    comp: Comparison, files: Mapping[str, ResultFile], slo: SLO, missing: list[str]
) -> list[Figure]:
    """The comparison's figures from its results files (by config label); what cannot be
    computed goes to `missing` with the reason."""
    prefix = comp.figure_prefix
    absent = [c.label for c in comp.configs if c.label not in files or not files[c.label].runs]
    if comp.kind is Kind.SPLITS:
        figures = []
        for spec in comp.configs:
            if spec.label in absent:
                missing.append(f"{prefix}_*_{spec.key}: {spec.label} did not run")
            else:
                figures += _split_figures(prefix, spec, files[spec.label])
        if comp.baseline:
            figures += _split_ratios(comp, files, absent, missing)
        return figures
    if absent:
        missing.append(f"{prefix}_*: {', '.join(absent)} did not run")
        return []
    subject, baseline = files[comp.configs[0].label], files[comp.configs[1].label]
    if comp.kind is Kind.PREFIX:
        ratios = {
            "throughput_ratio": output_throughput_ratio(subject, baseline),
            "ttft_ratio": ttft_ratio_at_lowest_rate(subject, baseline),
        }
    else:
        assert comp.kind is Kind.PAIR and slo.ttft_ms is not None, (comp.kind, slo)
        ratios = _pair_ratios(subject, baseline, slo.ttft_ms)
        for spec in comp.configs[2:]:  # further subjects against the same baseline: reported
            extra = _pair_ratios(files[spec.label], baseline, slo.ttft_ms)
            ratios |= {f"{spec.key}_{suffix}": ratio for suffix, ratio in extra.items()}
    figures = []
    for suffix, ratio in ratios.items():
        name = f"{prefix}_{suffix}"
        figures += _named(name, ratio, TARGETS.get(name, "report"), missing)
    return figures


def _pair_ratios(subject: ResultFile, baseline: ResultFile, ttft_slo_ms: float) -> dict:
    return {
        "goodput_ratio": goodput_ratio(subject, baseline),
        "tpot_p90_ratio": tpot_p90_ratio(subject, baseline, ttft_slo_ms),
        "output_throughput_ratio": output_throughput_ratio(subject, baseline),
    }


def figure_entries(
    figures: list[Figure], slo: SLO, card: str, command: str, date: str, commit: str
) -> list[dict[str, Any]]:
    """docs/benchmarks.json entries (loadtest/figures.py `record`)."""
    slo_text = ", ".join(f"{k}={v:g}" for k, v in slo.given().items())
    return [
        {
            "name": f.name,
            "value": f.value,
            "unit": f.unit,
            "target": f.target,
            "baseline": f"{f.basis}; SLO {slo_text}; same run",
            "card": card,
            "date": date,
            "commit": commit,
            "command": command,
        }
        for f in figures
    ]
