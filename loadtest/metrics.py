"""Per-request records and the run's aggregate metrics, with `vllm bench serve`'s definitions.

A `RequestRecord` holds what the client saw of one request, every time an offset in seconds
from the start of the run: when it was due, when it was sent, when each streamed chunk that
carried tokens arrived, and what the server reported (usage, phase timings, error status).
`summarize` turns a run's records into a `RunSummary`. The definitions are vLLM's
(`vllm/benchmarks/serve.py: calculate_metrics`, and the stream timing in
`lib/endpoint_request_func.py`), so Baton's figures compare with figures from vLLM:

    TTFT    first token chunk - send
    E2EL    last token chunk - send
    ITL     gaps between consecutive token chunks of a request, pooled over requests (a chunk
            that carries several tokens is one gap, as in vLLM)
    TPOT    (E2EL - TTFT) / (output_tokens - 1), only over requests with > 1 output token
    stats   mean, median, std (population), percentiles by `numpy.percentile` (linear)
    throughput   completed requests, output tokens, input + output tokens per duration, where
            duration runs from the start of the run (time 0, one arrival gap before the
            first send) to the end of the last request
    goodput completed requests meeting every SLO given, per duration; a request's TPOT
            counts as 0 when it has <= 1 output token; a value equal to its SLO meets it
    peak    the most output tokens in one whole second since the first send, and the most
            requests in flight at once ([send, end) intervals)

Failed requests (any error status, or a stream that ended without a token) count only in
`failed` and `errors_by_code`; every latency, token and throughput figure is over completed
requests. Baton adds what vLLM does not measure client-side:

    SLO attainment   good requests / all sent requests (a failed request misses its SLO),
                     overall and per SLO
    prefix-cache hit rate   cached prompt tokens / prompt tokens, over completed requests
    server phases    the server's split of TTFT (router, prefill queue, prefill, KV transfer,
                     decode queue, other) and its own TTFT, over completed requests that
                     report timings, and how many were served in each mode
    client delay     send - due: how far the load generator itself fell behind (open loop)

Where a distribution has no values (no request with two output tokens, say), it is None,
not vLLM's 0.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, fields

import numpy as np

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
MS_PER_S = 1000.0


PHASES = ("router", "prefill_queue", "prefill", "transfer", "decode_queue", "other")


@dataclass(frozen=True)
class ServerPhases:
    """The server's split of a request's TTFT, in seconds (`protos/serving.proto: Timings`):
    router, prefill queue, prefill, KV transfer not hidden by prefill, decode queue, and the
    rest (`other_s`, calls between processes). `server_ttft_s` is TTFT as the router saw it;
    `mode` says how the request was served ("disaggregated", "decode_local", "colocated")."""

    router_s: float
    prefill_queue_s: float
    prefill_s: float
    transfer_s: float
    decode_queue_s: float
    other_s: float
    server_ttft_s: float
    mode: str

    def phase_s(self, name: str) -> float:
        assert name in PHASES, name
        return getattr(self, f"{name}_s")


@dataclass(frozen=True)
class RequestRecord:
    """What the client saw of one request; times are seconds from the start of the run.

    A completed request (`error_code is None`) has at least one token chunk. A failed one
    keeps whatever chunks arrived before the failure, for debugging; metrics ignore them.
    """

    index: int  # position in the workload
    request_id: str
    due_s: float  # when the arrival pattern scheduled it
    send_s: float  # when it was sent (later than due if the client was saturated)
    chunk_times_s: tuple[float, ...]  # arrival of each streamed chunk that carried tokens
    chunk_num_tokens: tuple[int, ...]  # tokens in each of those chunks
    output_tokens: int
    prompt_tokens: int
    cached_tokens: int = 0
    category: str = "default"
    tenant_id: str | None = None
    phases: ServerPhases | None = None
    error_code: str | None = None  # a gRPC status name, e.g. "DEADLINE_EXCEEDED"
    error_message: str = ""

    def __post_init__(self) -> None:
        assert len(self.chunk_times_s) == len(self.chunk_num_tokens), self
        assert self.error_code is not None or self.chunk_times_s, (
            "a completed request has at least one token chunk"
        )
        assert all(b >= a for a, b in itertools.pairwise(self.chunk_times_s)), self

    @property
    def completed(self) -> bool:
        return self.error_code is None

    @property
    def ttft_s(self) -> float:
        return self.chunk_times_s[0] - self.send_s

    @property
    def e2e_s(self) -> float:
        return self.chunk_times_s[-1] - self.send_s

    @property
    def itls_s(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_times_s)]

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with <= 1 output token."""
        if self.output_tokens <= 1:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class SLO:
    """Per-request service-level objectives in milliseconds; a request is good when it meets
    every one given."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not value > 0:
                raise ValueError(f"SLO {f.name} must be > 0, got {value}")

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def given(self) -> dict[str, float]:
        """The SLOs that are set, by name."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def checks(self, record: RequestRecord) -> dict[str, bool]:
        """Which of the given SLOs a completed request meets."""
        assert record.completed
        values_ms = {
            "ttft_ms": record.ttft_s * MS_PER_S,
            "tpot_ms": (record.tpot_s or 0.0) * MS_PER_S,  # vLLM: TPOT is 0 with <= 1 token
            "e2el_ms": record.e2e_s * MS_PER_S,
        }
        return {name: values_ms[name] <= slo for name, slo in self.given().items()}


def parse_slo(items: list[str]) -> SLO:
    """`["ttft_ms=200", "tpot_ms=50"]` (or comma-separated in one item) -> `SLO`."""
    known = {f.name for f in fields(SLO)}
    values: dict[str, float] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            key, sep, raw = part.partition("=")
            if not sep:
                raise ValueError(f"SLO {part!r} is not NAME=VALUE; e.g. --slo ttft_ms=200")
            key = key.strip()
            if key not in known:
                raise ValueError(f"unknown SLO {key!r}; known SLOs are {sorted(known)}")
            try:
                values[key] = float(raw)
            except ValueError:
                raise ValueError(f"SLO {key} needs a number of milliseconds, got {raw!r}") from None
    return SLO(**values)


@dataclass(frozen=True)
class Distribution:
    """Summary statistics of one latency, in milliseconds."""

    count: int
    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: dict[str, float]  # "p90" -> value

    @staticmethod
    def of(values_s: list[float], percentiles: tuple[float, ...]) -> Distribution | None:
        if not values_s:
            return None
        values_ms = np.asarray(values_s, dtype=np.float64) * MS_PER_S
        return Distribution(
            count=len(values_s),
            mean_ms=float(np.mean(values_ms)),
            median_ms=float(np.median(values_ms)),
            std_ms=float(np.std(values_ms)),
            percentiles_ms={
                percentile_key(p): float(np.percentile(values_ms, p)) for p in percentiles
            },
        )


def percentile_key(percentile: float) -> str:
    return f"p{percentile:g}"


@dataclass(frozen=True)
class RunSummary:
    """A run's aggregate metrics (see the module docstring for definitions)."""

    num_requests: int
    completed: int
    failed: int
    errors_by_code: dict[str, int]
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput_rps: float
    output_throughput_tps: float
    total_token_throughput_tps: float
    request_goodput_rps: float | None  # None without SLOs
    slo_attainment: float | None  # None without SLOs
    slo_attainment_by_slo: dict[str, float]
    ttft: Distribution | None
    tpot: Distribution | None
    itl: Distribution | None
    e2el: Distribution | None
    client_delay: Distribution | None
    prefix_cache_hit_rate: float | None  # None when no completed request had a prompt token
    phases: dict[str, Distribution]  # PHASES name -> distribution; empty if none reported
    server_ttft: Distribution | None  # TTFT as the router measured it
    modes: dict[str, int]  # serving mode -> completed requests reporting it
    peak_output_tokens_per_s: float
    peak_concurrent_requests: int


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    slo: SLO | None = None,
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
) -> RunSummary:
    """Aggregate one run. `duration_s` is the run's wall time, from time 0 to the last end."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    done = [r for r in records if r.completed]
    failed = [r for r in records if not r.completed]
    total_input = sum(r.prompt_tokens for r in done)
    total_output = sum(r.output_tokens for r in done)
    total_cached = sum(r.cached_tokens for r in done)

    goodput_rps: float | None = None
    attainment: float | None = None
    attainment_by_slo: dict[str, float] = {}
    if slo is not None and not slo.is_empty:
        checks = [slo.checks(r) for r in done]
        num_good = sum(all(c.values()) for c in checks)
        goodput_rps = num_good / duration_s
        attainment = num_good / len(records) if records else 0.0
        for name in slo.given():
            met = sum(c[name] for c in checks)
            attainment_by_slo[name] = met / len(records) if records else 0.0

    with_phases = [r.phases for r in done if r.phases is not None]
    phases = {
        name: dist
        for name in PHASES
        if (dist := Distribution.of([p.phase_s(name) for p in with_phases], percentiles))
    }

    return RunSummary(
        num_requests=len(records),
        completed=len(done),
        failed=len(failed),
        errors_by_code=dict(sorted(Counter(r.error_code or "" for r in failed).items())),
        duration_s=duration_s,
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput_rps=len(done) / duration_s,
        output_throughput_tps=total_output / duration_s,
        total_token_throughput_tps=(total_input + total_output) / duration_s,
        request_goodput_rps=goodput_rps,
        slo_attainment=attainment,
        slo_attainment_by_slo=attainment_by_slo,
        ttft=Distribution.of([r.ttft_s for r in done], percentiles),
        tpot=Distribution.of([t for r in done if (t := r.tpot_s) is not None], percentiles),
        itl=Distribution.of([itl for r in done for itl in r.itls_s], percentiles),
        e2el=Distribution.of([r.e2e_s for r in done], percentiles),
        client_delay=Distribution.of([r.send_s - r.due_s for r in records], percentiles),
        prefix_cache_hit_rate=total_cached / total_input if total_input else None,
        phases=phases,
        server_ttft=Distribution.of([p.server_ttft_s for p in with_phases], percentiles),
        modes=dict(sorted(Counter(p.mode for p in with_phases).items())),
        peak_output_tokens_per_s=peak_output_tokens_per_s(done),
        peak_concurrent_requests=peak_concurrent_requests(done),
    )


def peak_output_tokens_per_s(records: list[RequestRecord]) -> float:
    """Most output tokens received in one whole second, seconds counted from the first send
    (vLLM's buckets; a chunk's tokens all land in its arrival second)."""
    if not records:
        return 0.0
    start_s = min(r.send_s for r in records)
    end_s = max(r.chunk_times_s[-1] for r in records)
    num_buckets = int(math.ceil(end_s - start_s)) + 1
    tokens_per_bucket = np.zeros(num_buckets)
    for r in records:
        for time_s, num_tokens in zip(r.chunk_times_s, r.chunk_num_tokens, strict=True):
            tokens_per_bucket[int(time_s - start_s)] += num_tokens
    return float(tokens_per_bucket.max())


def peak_concurrent_requests(records: list[RequestRecord]) -> int:
    """Most requests in flight at once over half-open [send, last chunk) intervals."""
    events = sorted(
        [(r.send_s, 1) for r in records] + [(r.chunk_times_s[-1], -1) for r in records]
    )  # at equal times the end (-1) sorts before the start (+1)
    in_flight = peak = 0
    for _, delta in events:
        in_flight += delta
        peak = max(peak, in_flight)
    return peak
