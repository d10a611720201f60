"""The soak run's report: errors by status, p99 latency by minute, memory, free blocks.

Requests sent / served, errors by status, p99 end-to-end latency per minute of send time and
its drift (last full minute / first), RSS at start and end per worker, blocks not free at
the end; as a dict (written as `<out>.json`) and Markdown (`<out>.md`).

Cancelled requests show as CANCELLED, expired deadlines as DEADLINE_EXCEEDED: both are the
traffic's design, not server errors. Server errors are every other status.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from loadtest.metrics import RequestRecord
from protos import serving_pb2 as pb

EXPECTED_CODES = frozenset({"CANCELLED", "DEADLINE_EXCEEDED"})  # the traffic's own design


def p99_by_minute(records: list[RequestRecord]) -> list[dict[str, Any]]:
    """p99 end-to-end latency of completed requests, by the minute they were sent in."""
    by_minute: dict[int, list[float]] = {}
    for r in records:
        if r.completed:
            by_minute.setdefault(int(r.send_s // 60), []).append(r.e2e_s)
    return [
        {
            "minute": m,
            "completed": len(v),
            "p99_e2e_ms": float(np.percentile(np.array(v) * 1e3, 99)),
            "p50_e2e_ms": float(np.percentile(np.array(v) * 1e3, 50)),
        }
        for m, v in sorted(by_minute.items())
    ]


def summarize_soak(
    records: list[RequestRecord],
    minutes: float,
    rss_start: dict[str, float | None],
    rss_end: dict[str, float | None],
    rss_samples: list[dict[str, Any]],
    stats_start: pb.StatsResponse,
    stats_end: pb.StatsResponse,
    config: dict[str, Any],
) -> dict[str, Any]:
    errors = Counter(r.error_code for r in records if not r.completed)
    per_minute = p99_by_minute(records)
    full = [m for m in per_minute if m["minute"] < int(minutes)]  # the last may be partial
    drift = full[-1]["p99_e2e_ms"] / full[0]["p99_e2e_ms"] if len(full) >= 2 else None
    workers_rss = {
        name: {
            "start_mb": rss_start.get(name),
            "end_mb": rss_end.get(name),
            "growth_mb": (rss_end[name] - rss_start[name])
            if rss_start.get(name) is not None and rss_end.get(name) is not None
            else None,
        }
        for name in rss_start
    }
    worker_growth = [
        v["growth_mb"]
        for k, v in workers_rss.items()
        if v["growth_mb"] is not None and not k.startswith("driver")
    ]
    leaked = {w.name: w.num_total_blocks - w.num_free_blocks for w in stats_end.workers}
    return {
        "config": config,
        "minutes": minutes,
        "requests_sent": len(records),
        "requests_served": sum(r.completed for r in records),
        "requests_cancelled_by_client": errors.get("CANCELLED", 0),
        "requests_deadline_exceeded": errors.get("DEADLINE_EXCEEDED", 0),
        "server_errors": sum(n for c, n in errors.items() if c not in EXPECTED_CODES),
        "errors_by_status": dict(sorted(errors.items())),
        "error_examples": {
            c: next(r.error_message for r in records if r.error_code == c) for c in errors
        },
        "p99_e2e_ms_by_minute": per_minute,
        "p99_drift": drift,
        "rss_mb": workers_rss,
        "rss_samples": rss_samples,
        "max_worker_rss_growth_mb": max(worker_growth) if worker_growth else None,
        "free_blocks_start": {w.name: w.num_free_blocks for w in stats_start.workers},
        "free_blocks_end": {w.name: w.num_free_blocks for w in stats_end.workers},
        "total_blocks": {w.name: w.num_total_blocks for w in stats_end.workers},
        "leaked_blocks": sum(leaked.values()),
        "router_in_flight_end": stats_end.requests_in_flight,
    }


def markdown(s: dict[str, Any]) -> str:
    lines = [
        f"# Soak: {s['minutes']:g} minutes, {s['config']['rate']:g} req/s",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests sent | {s['requests_sent']} |",
        f"| requests served (complete) | {s['requests_served']} |",
        f"| cancelled by the client (by design) | {s['requests_cancelled_by_client']} |",
        f"| deadline exceeded (random deadlines) | {s['requests_deadline_exceeded']} |",
        f"| other errors (server) | {s['server_errors']} |",
        f"| errors by status | {s['errors_by_status']} |",
        f"| p99 E2E drift (last / first full minute) | {s['p99_drift']} |",
        f"| blocks not free at the end | {s['leaked_blocks']} |",
        f"| free blocks at the end | {s['free_blocks_end']} of {s['total_blocks']} |",
        "",
        "| minute | completed | p50 E2E ms | p99 E2E ms |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {m['minute']} | {m['completed']} | {m['p50_e2e_ms']:.0f} | {m['p99_e2e_ms']:.0f} |"
        for m in s["p99_e2e_ms_by_minute"]
    ]
    lines += ["", "| process | RSS start MiB | RSS end MiB | growth MiB |", "|---|---|---|---|"]
    for name, v in s["rss_mb"].items():

        def f(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.1f}"

        lines.append(f"| {name} | {f(v['start_mb'])} | {f(v['end_mb'])} | {f(v['growth_mb'])} |")
    return "\n".join(lines) + "\n"
