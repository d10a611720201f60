"""Metric definitions against hand-computed examples (vLLM's `calculate_metrics`)."""

from __future__ import annotations

import pytest

from loadtest.metrics import (
    SLO,
    Distribution,
    RequestRecord,
    ServerPhases,
    parse_slo,
    peak_concurrent_requests,
    summarize,
)


def phases(prefill_s: float, transfer_s: float) -> ServerPhases:
    return ServerPhases(
        router_s=0.001,
        prefill_queue_s=0.0,
        prefill_s=prefill_s,
        transfer_s=transfer_s,
        decode_queue_s=0.002,
        other_s=0.0,
        server_ttft_s=prefill_s + transfer_s + 0.003,
        mode="disaggregated",
    )


def record(
    index: int,
    send_s: float,
    chunks: list[tuple[float, int]],
    prompt_tokens: int,
    cached_tokens: int = 0,
    error_code: str | None = None,
    request_phases: ServerPhases | None = None,
) -> RequestRecord:
    return RequestRecord(
        index=index,
        request_id=f"r{index}",
        due_s=send_s,
        send_s=send_s,
        chunk_times_s=tuple(t for t, _ in chunks),
        chunk_num_tokens=tuple(n for _, n in chunks),
        output_tokens=sum(n for _, n in chunks),
        prompt_tokens=prompt_tokens,
        cached_tokens=cached_tokens,
        phases=request_phases,
        error_code=error_code,
    )


# A: ttft 100 ms, e2el 600, itl [200, 300], tpot (600 - 100) / 2 = 250
# B: ttft 500 ms, e2el 700, itl [200], 4 tokens (3 in the first chunk): tpot 200 / 3 = 66.67
# C: ttft 50 ms, e2el 50, 1 token: no itl, no tpot (0 for goodput); overlaps B
# D: failed after one chunk: counted only as a failure
RECORDS = [
    record(0, 0.0, [(0.1, 1), (0.3, 1), (0.6, 1)], 10, 4, request_phases=phases(0.05, 0.01)),
    record(1, 1.0, [(1.5, 3), (1.7, 1)], 20, 0, request_phases=phases(0.07, 0.03)),
    record(2, 1.6, [(1.65, 1)], 6, 0),
    record(3, 2.5, [(2.6, 1)], 9, 9, error_code="UNAVAILABLE"),
]
DURATION_S = 4.0


def test_per_request_definitions() -> None:
    a, b, c, _ = RECORDS
    assert a.ttft_s == pytest.approx(0.1)
    assert a.e2e_s == pytest.approx(0.6)
    assert a.itls_s == pytest.approx([0.2, 0.3])
    assert a.tpot_s == pytest.approx(0.25)
    assert b.itls_s == pytest.approx([0.2])
    assert b.tpot_s == pytest.approx(0.2 / 3)
    assert c.itls_s == []
    assert c.tpot_s is None


def test_summary_counts_and_throughput() -> None:
    s = summarize(RECORDS, DURATION_S)
    assert (s.num_requests, s.completed, s.failed) == (4, 3, 1)
    assert s.errors_by_code == {"UNAVAILABLE": 1}
    assert s.total_input_tokens == 36  # failed D's 9 prompt tokens excluded
    assert s.total_output_tokens == 8
    assert s.request_throughput_rps == pytest.approx(0.75)
    assert s.output_throughput_tps == pytest.approx(2.0)
    assert s.total_token_throughput_tps == pytest.approx(11.0)
    assert s.prefix_cache_hit_rate == pytest.approx(4 / 36)
    assert s.request_goodput_rps is None and s.slo_attainment is None
    # Second 1 holds B's 4 tokens and C's 1; B and C overlap.
    assert s.peak_output_tokens_per_s == 5.0
    assert s.peak_concurrent_requests == 2


def test_summary_distributions_use_numpy_linear_percentiles() -> None:
    s = summarize(RECORDS, DURATION_S, percentiles=(50.0, 90.0, 99.0))
    assert s.ttft is not None and s.tpot is not None and s.itl is not None and s.e2el is not None
    # TTFT ms [100, 500, 50]: sorted [50, 100, 500], p90 at rank 1.8 -> 100 + 0.8 * 400.
    assert s.ttft.count == 3
    assert s.ttft.mean_ms == pytest.approx(650 / 3)
    assert s.ttft.median_ms == pytest.approx(100)
    assert s.ttft.std_ms == pytest.approx(
        (((100 - 650 / 3) ** 2 + (500 - 650 / 3) ** 2 + (50 - 650 / 3) ** 2) / 3) ** 0.5
    )
    assert s.ttft.percentiles_ms == pytest.approx({"p50": 100, "p90": 420, "p99": 492})
    # TPOT ms [250, 66.67] (C has one token and no TPOT).
    assert s.tpot.count == 2
    assert s.tpot.mean_ms == pytest.approx((250 + 200 / 3) / 2)
    assert s.tpot.percentiles_ms["p90"] == pytest.approx(200 / 3 + 0.9 * (250 - 200 / 3))
    # ITL ms pooled over requests [200, 300, 200]: p90 at rank 1.8 -> 200 + 0.8 * 100.
    assert s.itl.count == 3
    assert s.itl.mean_ms == pytest.approx(700 / 3)
    assert s.itl.median_ms == pytest.approx(200)
    assert s.itl.percentiles_ms["p90"] == pytest.approx(280)
    # E2EL ms [600, 700, 50].
    assert s.e2el.mean_ms == pytest.approx(450)
    assert s.e2el.median_ms == pytest.approx(600)
    assert s.client_delay is not None and s.client_delay.mean_ms == 0.0


def test_goodput_and_slo_attainment() -> None:
    s = summarize(RECORDS, DURATION_S, SLO(ttft_ms=200, tpot_ms=200))
    # A misses TPOT (250), B misses TTFT (500), C meets both (TPOT counts as 0), D failed.
    assert s.request_goodput_rps == pytest.approx(1 / DURATION_S)
    assert s.slo_attainment == pytest.approx(1 / 4)
    assert s.slo_attainment_by_slo == pytest.approx({"ttft_ms": 2 / 4, "tpot_ms": 2 / 4})
    # A value equal to its SLO meets it (vLLM: slo >= value).
    at_bound = summarize(RECORDS, DURATION_S, SLO(ttft_ms=500))
    assert at_bound.slo_attainment == pytest.approx(3 / 4)
    e2el = summarize(RECORDS, DURATION_S, SLO(e2el_ms=100))
    assert e2el.request_goodput_rps == pytest.approx(1 / DURATION_S)


def test_server_phases_are_summarized_over_requests_that_report_them() -> None:
    s = summarize(RECORDS, DURATION_S)
    assert set(s.phases) == {
        "router",
        "prefill_queue",
        "prefill",
        "transfer",
        "decode_queue",
        "other",
    }
    assert s.phases["prefill"].count == 2
    assert s.phases["prefill"].mean_ms == pytest.approx(60)
    assert s.phases["transfer"].percentiles_ms["p50"] == pytest.approx(20)
    assert s.server_ttft is not None and s.server_ttft.mean_ms == pytest.approx((63 + 103) / 2)
    assert s.modes == {"disaggregated": 2}


def test_empty_distributions_are_none() -> None:
    only_single_tokens = [record(0, 0.0, [(0.2, 1)], 4)]
    s = summarize(only_single_tokens, 1.0)
    assert s.tpot is None and s.itl is None
    assert s.phases == {} and s.server_ttft is None
    all_failed = summarize([RECORDS[3]], 1.0, SLO(ttft_ms=1))
    assert all_failed.ttft is None and all_failed.prefix_cache_hit_rate is None
    assert all_failed.slo_attainment == 0.0 and all_failed.request_goodput_rps == 0.0
    assert Distribution.of([], (50.0,)) is None
    with pytest.raises(ValueError, match="duration_s"):
        summarize(RECORDS, 0.0)


def test_peak_concurrency_uses_half_open_intervals() -> None:
    touching = [record(0, 0.0, [(1.0, 1)], 1), record(1, 1.0, [(2.0, 1)], 1)]
    assert peak_concurrent_requests(touching) == 1
    nested = [
        record(0, 0.0, [(3.0, 1)], 1),
        record(1, 1.0, [(2.0, 1)], 1),
        record(2, 1.5, [(1.6, 1)], 1),
    ]
    assert peak_concurrent_requests(nested) == 3


def test_parse_slo() -> None:
    assert parse_slo(["ttft_ms=200", "tpot_ms=50"]) == SLO(ttft_ms=200, tpot_ms=50)
    assert parse_slo(["ttft_ms=200,e2el_ms=1000"]) == SLO(ttft_ms=200, e2el_ms=1000)
    assert parse_slo([]).is_empty
    with pytest.raises(ValueError, match="unknown SLO 'ttft'"):
        parse_slo(["ttft=200"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_slo(["ttft_ms"])
    with pytest.raises(ValueError, match="milliseconds"):
        parse_slo(["tpot_ms=fast"])
    with pytest.raises(ValueError, match="> 0"):
        parse_slo(["tpot_ms=0"])
