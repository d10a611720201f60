"""Reports from results files: a Markdown summary, a side-by-side comparison, and PNG plots.

    summary     each configuration: an overview row per run (load, throughput, goodput, SLO
                attainment, p99 latencies), then per run vLLM's latency table (mean, median,
                percentiles), the server's TTFT phases and, for mixed workloads, per category
    comparison  two configurations (say colocated against disaggregated): runs matched by load,
                each metric for A and B and the ratio B / A
    cdf.png     latency CDFs (TTFT, TPOT, ITL, E2EL), one line per run of every file
    sweep.png   output-token throughput, and request throughput and goodput, against offered
                rate; one line per configuration (open-loop runs only)

Plots use matplotlib's Agg backend: no display is needed. Where matplotlib is not installed
(the GPU image has no package index), `write_report` writes the Markdown alone; the plots can
be made from the results JSON on any other machine.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.metrics import PHASES, Distribution, RunSummary, percentile_key
from loadtest.results import ResultFile, RunResult

log = logging.getLogger(__name__)

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _p(dist: Distribution | None, key: str) -> float | None:
    return None if dist is None else dist.percentiles_ms.get(key)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _slo_text(run: RunResult) -> str:
    given = run.slo.given()
    return ", ".join(f"{k}={v:g}" for k, v in given.items()) if given else "none"


def _overview_rows(runs: list[RunResult]) -> list[list[str]]:
    rows = []
    for run in runs:
        s = run.summary
        rows.append(
            [
                run.name,
                f"{s.completed}/{s.num_requests}",
                _fmt(s.duration_s),
                _fmt(s.request_throughput_rps),
                _fmt(s.output_throughput_tps, 1),
                _fmt(s.request_goodput_rps),
                _pct(s.slo_attainment),
                _fmt(s.ttft.median_ms if s.ttft else None),
                _fmt(_p(s.ttft, "p99")),
                _fmt(s.tpot.median_ms if s.tpot else None),
                _fmt(_p(s.tpot, "p99")),
                _pct(s.prefix_cache_hit_rate),
            ]
        )
    return rows


OVERVIEW_HEADER = [
    "load",
    "completed",
    "duration s",
    "req/s",
    "out tok/s",
    "goodput req/s",
    "SLO met",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "TPOT p50 ms",
    "TPOT p99 ms",
    "prefix hit",
]


def _latency_rows(summary: RunSummary, percentiles: tuple[float, ...]) -> list[list[str]]:
    rows = []
    named = [*LATENCIES, ("client_delay", "client delay"), ("server_ttft", "server TTFT")]
    named += [(f"phase:{p}", f"phase {p.replace('_', ' ')}") for p in PHASES]
    for key, title in named:
        if key.startswith("phase:"):
            dist = summary.phases.get(key.removeprefix("phase:"))
        else:
            dist = getattr(summary, key)
        if dist is None:
            continue
        rows.append(
            [title, str(dist.count), _fmt(dist.mean_ms), _fmt(dist.median_ms), _fmt(dist.std_ms)]
            + [_fmt(dist.percentiles_ms.get(percentile_key(p))) for p in percentiles]
        )
    return rows


def _run_section(run: RunResult) -> list[str]:
    s = run.summary
    lines = [f"## {run.name}", ""]
    lines += [
        f"- requests: {s.completed} completed, {s.failed} failed"
        + (f" ({', '.join(f'{k}: {v}' for k, v in s.errors_by_code.items())})" if s.failed else "")
        + (f", {run.num_not_sent} not sent (time limit)" if run.num_not_sent else ""),
        f"- duration {s.duration_s:.2f} s; input {s.total_input_tokens} tokens, output "
        f"{s.total_output_tokens} tokens",
        f"- throughput {s.request_throughput_rps:.2f} req/s, {s.output_throughput_tps:.1f} "
        f"output tok/s, {s.total_token_throughput_tps:.1f} total tok/s; peak "
        f"{s.peak_output_tokens_per_s:.0f} output tok/s, {s.peak_concurrent_requests} requests "
        "in flight",
    ]
    if s.request_goodput_rps is not None:
        per_slo = ", ".join(f"{k} {_pct(v)}" for k, v in s.slo_attainment_by_slo.items())
        lines.append(
            f"- SLO ({_slo_text(run)}): goodput {s.request_goodput_rps:.2f} req/s, attainment "
            f"{_pct(s.slo_attainment)} ({per_slo})"
        )
    lines.append(f"- prefix-cache hit rate {_pct(s.prefix_cache_hit_rate)}")
    if s.modes:
        lines.append("- served as " + ", ".join(f"{m}: {n}" for m, n in s.modes.items()))
    lines.append("")
    header = ["latency (ms)", "n", "mean", "median", "std"]
    header += [percentile_key(p) for p in run.percentiles]
    lines += _table(header, _latency_rows(s, run.percentiles))
    if run.by_category:
        lines += ["By category:", ""]
        lines += _table(
            ["category", *OVERVIEW_HEADER[1:]],
            [
                [category, *row[1:]]
                for category, row in zip(
                    run.by_category,
                    _overview_rows([_with_summary(run, c) for c in run.by_category.values()]),
                    strict=True,
                )
            ],
        )
    return lines


def _with_summary(run: RunResult, summary: RunSummary) -> RunResult:
    from dataclasses import replace

    return replace(run, summary=summary, by_category={})


def markdown_summary(results: ResultFile) -> str:
    """One configuration's report."""
    first = results.runs[0]
    lines = [f"# Load test: {results.label}", ""]
    lines += [
        f"- target: {_describe(first.target)}",
        f"- dataset: {_describe(first.dataset)}",
        f"- SLO: {_slo_text(first)}",
        "",
    ]
    lines += _table(OVERVIEW_HEADER, _overview_rows(results.runs))
    for run in results.runs:
        lines += _run_section(run)
    return "\n".join(lines)


def _describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


COMPARED = (
    ("completed", lambda s: float(s.completed), 0),
    ("req/s", lambda s: s.request_throughput_rps, 2),
    ("output tok/s", lambda s: s.output_throughput_tps, 1),
    ("goodput req/s", lambda s: s.request_goodput_rps, 2),
    ("SLO attainment %", lambda s: None if s.slo_attainment is None else 100 * s.slo_attainment, 1),
    ("TTFT mean ms", lambda s: s.ttft and s.ttft.mean_ms, 2),
    ("TTFT p99 ms", lambda s: _p(s.ttft, "p99"), 2),
    ("TPOT mean ms", lambda s: s.tpot and s.tpot.mean_ms, 2),
    ("TPOT p99 ms", lambda s: _p(s.tpot, "p99"), 2),
    ("ITL p99 ms", lambda s: _p(s.itl, "p99"), 2),
    ("E2EL mean ms", lambda s: s.e2el and s.e2el.mean_ms, 2),
    ("E2EL p99 ms", lambda s: _p(s.e2el, "p99"), 2),
    (
        "prefix hit %",
        lambda s: None if s.prefix_cache_hit_rate is None else 100 * s.prefix_cache_hit_rate,
        1,
    ),
)


def markdown_comparison(a: ResultFile, b: ResultFile) -> str:
    """Two configurations side by side, runs matched by load (rate or concurrency)."""
    lines = [f"# {a.label} vs {b.label}", ""]
    lines += [f"- A = {a.label}: {_describe(a.runs[0].target)}"]
    lines += [f"- B = {b.label}: {_describe(b.runs[0].target)}"]
    lines += [f"- dataset: {_describe(a.runs[0].dataset)}", f"- SLO: {_slo_text(a.runs[0])}", ""]
    if a.runs[0].dataset != b.runs[0].dataset:
        lines += [f"Warning: the workloads differ; B's dataset: {_describe(b.runs[0].dataset)}", ""]
    b_by_name = {run.name: run for run in b.runs}
    unmatched = [run.name for run in b.runs if run.name not in {r.name for r in a.runs}]
    for run_a in a.runs:
        run_b = b_by_name.get(run_a.name)
        if run_b is None:
            lines += [f"## {run_a.name}: only in A", ""]
            continue
        rows = []
        for title, get, digits in COMPARED:
            value_a, value_b = get(run_a.summary), get(run_b.summary)
            ratio = value_b / value_a if value_a and value_b is not None else None
            rows.append([title, _fmt(value_a, digits), _fmt(value_b, digits), _fmt(ratio, 2)])
        lines += [f"## {run_a.name}", ""]
        lines += _table(["metric", f"A: {a.label}", f"B: {b.label}", "B / A"], rows)
    lines += [f"## {name}: only in B\n" for name in unmatched]
    return "\n".join(lines)


def _cdf(values_ms: list[float]) -> tuple[np.ndarray, np.ndarray]:
    xs = np.sort(np.asarray(values_ms))
    return xs, np.arange(1, len(xs) + 1) / len(xs)


def _latencies_ms(run: RunResult, key: str) -> list[float]:
    done = [r for r in run.requests if r.completed]
    if key == "ttft":
        values = [r.ttft_s for r in done]
    elif key == "tpot":
        values = [t for r in done if (t := r.tpot_s) is not None]
    elif key == "itl":
        values = [itl for r in done for itl in r.itls_s]
    else:
        assert key == "e2el", key
        values = [r.e2e_s for r in done]
    return [1000.0 * v for v in values]


def plot_latency_cdfs(files: list[ResultFile], path: str | Path) -> Path:
    """CDFs of TTFT, TPOT, ITL and E2EL: one panel each, one line per (file, run)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, title) in zip(axes.flat, LATENCIES, strict=True):
        for results in files:
            for run in results.runs:
                values = _latencies_ms(run, key)
                if values:
                    xs, ys = _cdf(values)
                    ax.step(xs, ys, where="post", label=f"{results.label} @ {run.name}")
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_rate_sweep(files: list[ResultFile], path: str | Path) -> Path:
    """Throughput and goodput against offered request rate, one line per configuration.

    Left: output tokens/s. Right: completed requests/s (solid) and goodput (dashed, where SLOs
    were given). Only open-loop runs at a finite rate are plotted.
    """
    plt = _pyplot()
    fig, (ax_tok, ax_req) = plt.subplots(1, 2, figsize=(12, 4.5))
    for results in files:
        runs = sorted(
            (r for r in results.runs if r.rate_rps is not None and np.isfinite(r.rate_rps)),
            key=lambda r: r.rate_rps,
        )
        if not runs:
            continue
        rates = [r.rate_rps for r in runs]
        (line,) = ax_tok.plot(
            rates, [r.summary.output_throughput_tps for r in runs], marker="o", label=results.label
        )
        color = line.get_color()
        ax_req.plot(
            rates,
            [r.summary.request_throughput_rps for r in runs],
            marker="o",
            color=color,
            label=f"{results.label} throughput",
        )
        goodput = [r.summary.request_goodput_rps for r in runs]
        if all(g is not None for g in goodput):
            ax_req.plot(
                rates,
                goodput,
                marker="s",
                linestyle="--",
                color=color,
                label=f"{results.label} goodput",
            )
    ax_tok.set_title("output token throughput")
    ax_tok.set_xlabel("offered rate (req/s)")
    ax_tok.set_ylabel("tokens/s")
    ax_req.set_title("request throughput and goodput")
    ax_req.set_xlabel("offered rate (req/s)")
    ax_req.set_ylabel("requests/s")
    for ax in (ax_tok, ax_req):
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(files: list[ResultFile], out_dir: str | Path) -> list[Path]:
    """comparison.md for two files, else summary.md (each file's summary in turn); cdf.png;
    and sweep.png, every file on one chart, where any has open-loop runs at a finite rate.
    Returns the paths written."""
    if not files:
        raise ValueError("a report needs at least one results file")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(files) == 2:
        markdown, name = markdown_comparison(files[0], files[1]), "comparison.md"
    else:
        markdown, name = "\n".join(markdown_summary(f) for f in files), "summary.md"
    written = [out_dir / name]
    written[0].write_text(markdown + "\n", encoding="utf-8")
    if importlib.util.find_spec("matplotlib") is None:  # e.g. the GPU image: plot elsewhere
        log.warning("matplotlib is not installed: no plots; run `baton bench --report` on the JSON")
        return written
    written.append(plot_latency_cdfs(files, out_dir / "cdf.png"))
    if any(r.rate_rps is not None and np.isfinite(r.rate_rps) for f in files for r in f.runs):
        written.append(plot_rate_sweep(files, out_dir / "sweep.png"))
    return written
