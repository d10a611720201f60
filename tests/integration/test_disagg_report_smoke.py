"""The disaggregation report end to end on CPU: `python -m loadtest.disagg_report --profile cpu`.

Starts two real clusters in turn, each a `baton serve` child process on its own local Ray
(local.yaml's tiny model: 1 prefill + 1 decode worker, then two colocated replicas), loads
each with the interference workload at one rate, stops it, and checks the results, the
report, the plots and the figures (finite, recorded into a scratch benchmarks file).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("ray")

from loadtest.disagg_report import main  # noqa: E402
from loadtest.results import load_results  # noqa: E402

pytestmark = pytest.mark.timeout(240)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RATE = 4  # req/s; the CPU profile sends 2 s of arrivals: 8 requests


def test_interference_report_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "report"
    bench_json = tmp_path / "benchmarks.json"
    argv = ["--profile", "cpu", "--comparison", "interference", "--rates", f"interference={RATE}"]
    argv += ["--out", str(out), "--record", "--benchmarks-json", str(bench_json)]
    assert main(argv) == 0

    modes = {"disagg-1p1d": "disaggregated", "colocated-2": "colocated"}
    for label, mode in modes.items():
        (run,) = load_results(out / "interference" / f"results-{label}.json").runs
        s = run.summary
        assert (run.rate_rps, s.num_requests, s.completed, s.failed) == (RATE, 8, 8, 0)
        assert s.total_input_tokens == 8 * 128 and s.total_output_tokens == 8 * 16
        assert s.modes == {mode: 8} and run.target["mode"] == mode
        log = (out / "logs" / f"server-{label}.log").read_text()
        assert "baton: serving on" in log and "baton: draining and stopping" in log

    for name in ("comparison.md", "cdf.png", "sweep.png"):
        assert (out / "interference" / name).is_file()
    for name in ("cdf.png", "sweep.png"):
        assert (out / "interference" / name).read_bytes()[:8] == PNG_MAGIC
    entries = json.loads((out / "figures.json").read_text())
    assert [e["name"] for e in entries] == [
        "bench.interference_goodput_ratio",
        "bench.interference_tpot_p90_ratio",
        "bench.interference_output_throughput_ratio",
    ]
    # Finite and not negative: on a box loaded by other work 1P1D can miss the CPU SLO on
    # every request (goodput ratio 0), which says nothing about the report's plumbing.
    assert all(math.isfinite(e["value"]) and e["value"] >= 0 for e in entries)
    assert json.loads(bench_json.read_text()) == entries
    report = (out / "report.md").read_text()
    assert "| 4 | disagg-1p1d | 8/8 |" in report and "| 4 | colocated-2 | 8/8 |" in report
    assert "FAILED" not in report
