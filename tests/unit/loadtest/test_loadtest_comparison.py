"""The report's figures (loadtest/comparison.py) on hand-made sweeps with known answers."""

from __future__ import annotations

import math

import pytest

from loadtest.comparison import (
    best_goodput,
    best_output_throughput,
    goodput_ratio,
    highest_rate_meeting_ttft,
    output_throughput_ratio,
    swept_runs,
    tpot_p90_ratio,
    ttft_ratio_at_lowest_rate,
)
from loadtest.metrics import SLO, RequestRecord
from loadtest.results import ResultFile, RunResult, build_result
from loadtest.runner import RunRecords
from loadtest.targets import step_deltas

SLO_ = SLO(ttft_ms=1000.0, tpot_ms=25.0)
OUTPUT_TOKENS = 11  # TPOT = (e2e - ttft) / 10


def request(index: int, ttft_ms: float, tpot_ms: float, failed: bool = False) -> RequestRecord:
    """Sent at 0; first token at ttft, the other 10 in one chunk after 10 x tpot."""
    ttft_s, tpot_s = ttft_ms / 1000, tpot_ms / 1000
    return RequestRecord(
        index=index,
        request_id=f"r{index}",
        due_s=0.0,
        send_s=0.0,
        chunk_times_s=(ttft_s, ttft_s + tpot_s * (OUTPUT_TOKENS - 1)),
        chunk_num_tokens=(1, OUTPUT_TOKENS - 1),
        output_tokens=OUTPUT_TOKENS,
        prompt_tokens=100,
        error_code="UNAVAILABLE" if failed else None,
    )


def sweep_run(
    rate: float | None,
    latencies_ms: list[tuple[float, float]],
    duration_s: float = 10.0,
    num_failed: int = 0,
) -> RunResult:
    """A run at `rate` whose requests have the given (TTFT, TPOT) in ms."""
    records = [request(i, ttft, tpot) for i, (ttft, tpot) in enumerate(latencies_ms)]
    records += [request(len(records) + i, 10.0, 10.0, failed=True) for i in range(num_failed)]
    if rate is None:
        arrival = {"kind": "closed_loop", "concurrency": 4}
    else:
        arrival = {"kind": "open_loop", "rate_rps": rate, "burstiness": 1.0, "seed": 0}
    raw = RunRecords(arrival, records, duration_s, num_not_sent=0, started_at_unix_s=0.0)
    return build_result(raw, {"name": "random"}, {"kind": "fake"}, SLO_)


GOOD = (100.0, 10.0)  # meets both SLOs
SLOW_DECODE = (100.0, 40.0)  # misses TPOT
LATE = (2000.0, 10.0)  # misses TTFT


def test_best_goodput_is_the_highest_over_the_sweep_at_the_lowest_rate_on_ties() -> None:
    results = ResultFile(
        "a",
        [
            sweep_run(2, [GOOD] * 20),  # 2.0 req/s good
            sweep_run(4, [GOOD] * 40),  # 4.0
            sweep_run(8, [GOOD] * 40 + [SLOW_DECODE] * 40),  # 4.0 again: a tie
            sweep_run(16, [GOOD] * 10 + [LATE] * 150),  # 1.0: saturated
            sweep_run(None, [GOOD] * 100),  # closed loop: not part of a sweep
        ],
    )
    best = best_goodput(results)
    assert best is not None and (best.value, best.rate_rps) == (4.0, 4)
    tps = best_output_throughput(results)
    assert tps is not None and (tps.value, tps.rate_rps) == (160 * 11 / 10, 16)


def test_swept_runs_orders_by_rate_and_drops_closed_loop_and_infinite_rates() -> None:
    results = ResultFile(
        "a",
        [
            sweep_run(8, [GOOD]),
            sweep_run(math.inf, [GOOD]),
            sweep_run(2, [GOOD]),
            sweep_run(None, [GOOD]),
        ],
    )
    assert [r.rate_rps for r in swept_runs(results)] == [2, 8]


def test_goodput_ratio_compares_each_configuration_at_its_own_best_rate() -> None:
    disagg = ResultFile("disagg", [sweep_run(4, [GOOD] * 40), sweep_run(8, [GOOD] * 80)])
    colocated = ResultFile(
        "colocated",
        [sweep_run(4, [GOOD] * 40), sweep_run(8, [GOOD] * 50 + [SLOW_DECODE] * 30)],
    )
    ratio = goodput_ratio(disagg, colocated)
    assert ratio is not None
    assert (ratio.value, ratio.numerator, ratio.denominator) == (8.0 / 5.0, 8.0, 5.0)
    assert ratio.basis == ("disagg 8.00 req/s at 8 req/s vs colocated 5.00 req/s at 8 req/s")


def test_a_zero_baseline_gives_no_ratio_not_infinity() -> None:
    disagg = ResultFile("disagg", [sweep_run(4, [GOOD] * 40)])
    colocated = ResultFile("colocated", [sweep_run(4, [LATE] * 40)])
    assert goodput_ratio(disagg, colocated) is None
    assert goodput_ratio(colocated, disagg) is not None  # 0 / 4: a figure, and it is 0
    assert goodput_ratio(colocated, disagg).value == 0.0  # type: ignore[union-attr]


def test_tpot_ratio_is_taken_at_the_highest_rate_where_the_baseline_meets_ttft() -> None:
    # Colocated: TTFT p90 met at 2 and 4 req/s, missed at 8 (the highest 10% are late).
    colocated = ResultFile(
        "colocated",
        [
            sweep_run(2, [(100.0, 12.0)] * 10),
            sweep_run(4, [(900.0, 30.0)] * 10),
            sweep_run(8, [(100.0, 60.0)] * 8 + [LATE] * 2),
        ],
    )
    disagg = ResultFile(
        "disagg",
        [
            sweep_run(2, [(150.0, 8.0)] * 10),
            sweep_run(4, [(150.0, 10.0)] * 10),
            sweep_run(8, [GOOD] * 10),
        ],
    )
    assert highest_rate_meeting_ttft(colocated, 1000.0) == 4
    ratio = tpot_p90_ratio(disagg, colocated, 1000.0)
    assert ratio is not None
    assert ratio.value == pytest.approx(3.0)  # 30 ms / 10 ms at 4 req/s
    assert ratio.basis.startswith("at 4 req/s (colocated's highest rate with TTFT p90 <= 1000")


def test_tpot_ratio_falls_back_to_a_rate_both_ran_and_says_so() -> None:
    colocated = ResultFile(
        "colocated", [sweep_run(2, [(100.0, 12.0)] * 10), sweep_run(4, [(100.0, 30.0)] * 10)]
    )
    disagg = ResultFile("disagg", [sweep_run(2, [(100.0, 6.0)] * 10)])  # stopped before 4
    ratio = tpot_p90_ratio(disagg, colocated, 1000.0)
    assert ratio is not None and ratio.value == pytest.approx(2.0)
    assert "that both ran; its highest is 4" in ratio.basis


def test_a_run_with_failures_does_not_meet_the_ttft_slo() -> None:
    colocated = ResultFile("colocated", [sweep_run(2, [GOOD] * 10, num_failed=1)])
    disagg = ResultFile("disagg", [sweep_run(2, [GOOD] * 10)])
    assert highest_rate_meeting_ttft(colocated, 1000.0) is None
    assert tpot_p90_ratio(disagg, colocated, 1000.0) is None


def test_output_throughput_ratio() -> None:
    on = ResultFile("on", [sweep_run(16, [GOOD] * 100, duration_s=5.0)])
    off = ResultFile("off", [sweep_run(16, [GOOD] * 100, duration_s=10.0)])
    ratio = output_throughput_ratio(on, off)
    assert ratio is not None and ratio.value == pytest.approx(2.0)
    assert ratio.basis == "on 220 tok/s at 16 req/s vs off 110 tok/s at 16 req/s"


def test_ttft_ratio_uses_the_lowest_common_rate_and_the_median() -> None:
    on = ResultFile(
        "on",
        [sweep_run(16, [(20.0, 10.0)] * 9 + [(500.0, 10.0)]), sweep_run(64, [(30.0, 10.0)] * 10)],
    )
    off = ResultFile("off", [sweep_run(4, [(10.0, 10.0)] * 10), sweep_run(16, [(80.0, 10.0)] * 10)])
    ratio = ttft_ratio_at_lowest_rate(on, off)
    assert ratio is not None and ratio.value == pytest.approx(4.0)  # 80 / 20 at 16 req/s
    assert ratio.basis == "TTFT p50 at 16 req/s: off 80.0 ms vs on 20.0 ms"
    assert ttft_ratio_at_lowest_rate(on, ResultFile("x", [sweep_run(2, [GOOD])])) is None


def test_step_deltas_are_per_worker_means_over_the_run() -> None:
    before = {"decode:d0": (100, 1.0, 3000), "prefill:p0": (5, 0.5, 10)}
    after = {"decode:d0": (300, 3.5, 9000), "prefill:p0": (5, 0.5, 10), "decode:d1": (4, 0.2, 8)}
    deltas = step_deltas(before, after, duration_s=5.0)
    assert deltas == {
        "decode:d0": {"steps": 200, "step_ms": 12.5, "rows": 30.0, "busy": 0.5},
        "decode:d1": {"steps": 4, "step_ms": 50.0, "rows": 2.0, "busy": 0.04},
    }  # p0 did not step: left out; d1 appeared during the run: counted from zero
