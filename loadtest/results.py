"""The results file: one configuration's runs (one per rate of a sweep), as JSON.

    {
      "schema": "baton.loadtest.results/v1",
      "label": "disagg-1p1d",            # the configuration, a line in every plot
      "runs": [
        {
          "arrival": {"kind": "open_loop", "rate_rps": 4.0, "burstiness": 1.0, "seed": 0},
          "dataset": {"name": "shared_prefix", ...},      # the generator's settings
          "target": {"kind": "grpc", "address": ...},
          "slo": {"ttft_ms": 200.0},                      # only those given
          "percentiles": [50.0, 90.0, 99.0],
          "started_at_unix_s": 1760000000.0,
          "num_not_sent": 0,
          "summary": {...},                               # metrics.RunSummary
          "by_category": {"long-prompt": {...}, ...},     # per category, if more than one
          "requests": [{...}, ...]                        # metrics.RequestRecord each
        }
      ]
    }

Loading checks the schema name and rebuilds the dataclasses, so a report can be made again
from files alone, and two files compared.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from loadtest.metrics import (
    DEFAULT_PERCENTILES,
    SLO,
    Distribution,
    RequestRecord,
    RunSummary,
    ServerPhases,
    summarize,
)
from loadtest.runner import RunRecords

SCHEMA = "baton.loadtest.results/v1"


@dataclass(frozen=True)
class RunResult:
    """One run with its settings, aggregate metrics and per-request records."""

    arrival: dict[str, Any]
    dataset: dict[str, Any]
    target: dict[str, Any]
    slo: SLO
    percentiles: tuple[float, ...]
    started_at_unix_s: float
    num_not_sent: int
    summary: RunSummary
    by_category: dict[str, RunSummary]
    requests: list[RequestRecord]

    @property
    def rate_rps(self) -> float | None:
        """The offered rate of an open-loop run; None for closed loop."""
        return self.arrival.get("rate_rps")

    @property
    def name(self) -> str:
        """A short name for the run's load: "4 req/s", "inf req/s", "concurrency 8"."""
        if self.arrival["kind"] == "open_loop":
            return f"{self.arrival['rate_rps']:g} req/s"
        return f"concurrency {self.arrival['concurrency']}"


def build_result(
    raw: RunRecords,
    dataset: dict[str, Any],
    target: dict[str, Any],
    slo: SLO | None = None,
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
) -> RunResult:
    """Aggregate a run's records into a `RunResult` (per category too, when mixed)."""
    slo = slo or SLO()
    categories = sorted({r.category for r in raw.records})
    by_category = {}
    if len(categories) > 1:
        by_category = {
            c: summarize(
                [r for r in raw.records if r.category == c], raw.duration_s, slo, percentiles
            )
            for c in categories
        }
    return RunResult(
        arrival=raw.arrival,
        dataset=dataset,
        target=target,
        slo=slo,
        percentiles=percentiles,
        started_at_unix_s=raw.started_at_unix_s,
        num_not_sent=raw.num_not_sent,
        summary=summarize(raw.records, raw.duration_s, slo, percentiles),
        by_category=by_category,
        requests=raw.records,
    )


@dataclass(frozen=True)
class ResultFile:
    """One configuration's runs, in the order they ran."""

    label: str
    runs: list[RunResult]

    def __post_init__(self) -> None:
        if not self.label:
            raise ValueError("a results file needs a label (the configuration's name)")


def save_results(path: str | Path, results: ResultFile) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": SCHEMA,
        "label": results.label,
        "runs": [_run_to_json(r) for r in results.runs],
    }
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def load_results(path: str | Path) -> ResultFile:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read a results file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(
            f"{path}: not a Baton results file (schema {found!r}, expected {SCHEMA!r})"
        )
    try:
        return ResultFile(label=doc["label"], runs=[_run_from_json(r) for r in doc["runs"]])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: malformed results file ({type(exc).__name__}: {exc})") from None


def _run_to_json(run: RunResult) -> dict[str, Any]:
    return {
        "arrival": run.arrival,
        "dataset": run.dataset,
        "target": run.target,
        "slo": run.slo.given(),
        "percentiles": list(run.percentiles),
        "started_at_unix_s": run.started_at_unix_s,
        "num_not_sent": run.num_not_sent,
        "summary": asdict(run.summary),
        "by_category": {c: asdict(s) for c, s in run.by_category.items()},
        "requests": [asdict(r) for r in run.requests],
    }


def _distribution(obj: dict[str, Any] | None) -> Distribution | None:
    return None if obj is None else Distribution(**obj)


def _summary_from_json(obj: dict[str, Any]) -> RunSummary:
    values = dict(obj)
    for name in ("ttft", "tpot", "itl", "e2el", "client_delay", "server_ttft"):
        values[name] = _distribution(values[name])
    values["phases"] = {k: Distribution(**v) for k, v in values["phases"].items()}
    expected = {f.name for f in fields(RunSummary)}
    if set(values) != expected:
        raise KeyError(f"summary keys differ from {sorted(expected)}")
    return RunSummary(**values)


def _record_from_json(obj: dict[str, Any]) -> RequestRecord:
    values = dict(obj)
    values["chunk_times_s"] = tuple(values["chunk_times_s"])
    values["chunk_num_tokens"] = tuple(values["chunk_num_tokens"])
    if values["phases"] is not None:
        values["phases"] = ServerPhases(**values["phases"])
    return RequestRecord(**values)


def _run_from_json(obj: dict[str, Any]) -> RunResult:
    return RunResult(
        arrival=obj["arrival"],
        dataset=obj["dataset"],
        target=obj["target"],
        slo=SLO(**obj["slo"]),
        percentiles=tuple(obj["percentiles"]),
        started_at_unix_s=obj["started_at_unix_s"],
        num_not_sent=obj["num_not_sent"],
        summary=_summary_from_json(obj["summary"]),
        by_category={c: _summary_from_json(s) for c, s in obj["by_category"].items()},
        requests=[_record_from_json(r) for r in obj["requests"]],
    )
