"""The report's files, from the results files in its folder: report.md (the figures, each
comparison's runs in one table, what ran or was skipped and why), figures.json (entries in
docs/benchmarks.json's format), report-meta.json (the run's argv, header and notes, so
`--report-only` can rebuild everything elsewhere) and, at the end, each comparison's
Markdown report and plots (loadtest/report.py: every configuration on one chart).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loadtest.comparison import best_goodput, best_output_throughput, swept_runs
from loadtest.disagg_plan import (
    Comparison,
    ConfigSpec,
    Figure,
    Kind,
    figure_entries,
    figures_for,
)
from loadtest.metrics import SLO, Distribution
from loadtest.report import write_report
from loadtest.results import ResultFile, load_results
from loadtest.sweeps import Notes


def _ms(dist: Distribution | None, key: str) -> str:
    value = None if dist is None else dist.percentiles_ms.get(key)
    return "—" if value is None else f"{value:.0f}"


def rate_table(comp: Comparison, files: Mapping[str, ResultFile]) -> list[str]:
    """Every run of the comparison: one row per (rate, configuration)."""
    lines = [
        "| rate req/s | config | completed | goodput req/s | SLO met | TTFT p50 / p90 ms "
        "| TPOT p50 / p90 ms | out tok/s | prefix hit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in comp.rates_rps:
        for spec in comp.configs:
            runs = swept_runs(files[spec.label]) if spec.label in files else []
            run = next((r for r in runs if r.rate_rps == rate), None)
            if run is None:
                lines.append(f"| {rate:g} | {spec.label} | not run | | | | | | |")
                continue
            s = run.summary
            hit = s.prefix_cache_hit_rate
            lines.append(
                f"| {rate:g} | {spec.label} | {s.completed}/{s.num_requests} | "
                f"{s.request_goodput_rps or 0:.2f} | {100 * (s.slo_attainment or 0):.0f}% | "
                f"{_ms(s.ttft, 'p50')} / {_ms(s.ttft, 'p90')} | {_ms(s.tpot, 'p50')} / "
                f"{_ms(s.tpot, 'p90')} | {s.output_throughput_tps:.0f} | "
                f"{'—' if hit is None else f'{100 * hit:.0f}%'} |"
            )
    return lines + [""]


def split_table(
    comp: Comparison, files: Mapping[str, ResultFile], figures: Mapping[str, Figure]
) -> list[str]:
    """A SPLITS comparison's figures: a bullet naming them, then one row per configuration:
    its best goodput and best output tokens/s, each with the rate it was taken at, and its
    goodput ratio to the baseline (when the comparison names one)."""
    prefix, baseline = comp.figure_prefix, comp.baseline
    names = f"{prefix}_goodput_KEY, {prefix}_output_tps_KEY"
    if baseline:
        names += f", {prefix}_goodput_ratio_KEY (best goodput / {baseline}'s)"
    lines = [f"- figures, best over the sweep: {names}", ""]
    lines += [
        "| config | best goodput req/s (at rate) | best out tok/s (at rate) |"
        + (f" goodput / {baseline} |" if baseline else ""),
        "|---|---|---|" + ("---|" if baseline else ""),
    ]
    for spec in comp.configs:
        results = files.get(spec.label)
        cells = []
        for figure, best in (("goodput", best_goodput), ("output_tps", best_output_throughput)):
            f = figures.get(f"{prefix}_{figure}_{spec.key}")
            at = best(results) if results is not None else None
            cells.append("—" if f is None or at is None else f"**{f.value:g}** ({at.rate_rps:g})")
        if baseline:
            ratio = figures.get(f"{prefix}_goodput_ratio_{spec.key}")
            cell = "—" if ratio is None else f"**{ratio.value:g}**"
            cells.append("baseline" if spec.label == baseline else cell)
        lines.append(f"| {spec.label} | {' | '.join(cells)} |")
    return lines + [""]


def _describe_config(spec: ConfigSpec) -> str:
    return f"{spec.label} ({spec.base}" + (f" + {dict(spec.overrides)})" if spec.overrides else ")")


def markdown_report(
    comps: list[Comparison],
    files: Mapping[str, Mapping[str, ResultFile]],
    figures: list[Figure],
    missing: list[str],
    notes: Notes,
    header: Mapping[str, str],
) -> str:
    """The figures, then each comparison's runs, then what ran, was skipped or failed."""
    lines = ["# Disaggregation report", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()] + [""]
    lines += ["## Figures", "", "| figure | value | target | basis |", "|---|---|---|---|"]
    for f in figures:
        unit = "" if f.unit == "ratio" else f" {f.unit}"
        lines.append(f"| {f.name} | **{f.value:g}**{unit} | {f.target} | {f.basis} |")
    lines += [""] + [f"- missing: {m}" for m in missing] + [""]
    for comp in comps:
        lines += [f"## {comp.name}", ""]
        lines += [f"- workload: {comp.workload.describe()}"]
        lines += [f"- configs: {', '.join(_describe_config(c) for c in comp.configs)}"]
        lines += [f"- per-run details and plots: `{comp.name}/`"]
        if comp.kind is Kind.SPLITS:  # its figures' bullet, then their table
            by_name = {f.name: f for f in figures}
            lines += split_table(comp, files.get(comp.name, {}), by_name)
        else:
            lines += [""]
        lines += rate_table(comp, files.get(comp.name, {}))
    lines += ["## What ran", "", "```", *notes.lines, "```", ""]
    return "\n".join(lines)


META_JSON = "report-meta.json"  # the run's argv, header and notes: for --report-only


def write_outputs(
    comps: list[Comparison],
    out_dir: Path,
    slo: SLO,
    notes: Notes,
    header: Mapping[str, str],
    argv: list[str],
    plots: bool,
) -> list[dict[str, Any]]:
    """From the results files in `out_dir`: report.md, figures.json, report-meta.json and,
    with `plots`, each comparison's Markdown report and PNGs. Returns the figure entries."""
    files: dict[str, dict[str, ResultFile]] = {}
    figures: list[Figure] = []
    missing: list[str] = []
    for comp in comps:
        found = {}
        for spec in comp.configs:
            path = out_dir / comp.name / f"results-{spec.label}.json"
            if path.is_file():
                found[spec.label] = load_results(path)
        files[comp.name] = found
        if found and plots:
            for stale in ("comparison.md", "summary.md"):  # which one depends on the count
                (out_dir / comp.name / stale).unlink(missing_ok=True)
            write_report(
                [found[c.label] for c in comp.configs if c.label in found], out_dir / comp.name
            )
        figures += figures_for(comp, found, slo, missing)
    entries = figure_entries(
        figures, slo, header["card"], header["command"], header["date"], header["commit"]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "figures.json").write_text(json.dumps(entries, indent=1) + "\n")
    report = markdown_report(comps, files, figures, missing, notes, header)
    (out_dir / "report.md").write_text(report + "\n")
    meta = {"argv": argv, "header": dict(header), "notes": notes.lines}
    (out_dir / META_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    return entries
