"""Arrival patterns: gap statistics for a fixed seed, exact edge cases, repeatability."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.arrivals import ClosedLoop, OpenLoop, RateSweep, parse_arrival, sweep_rates

NUM_ARRIVALS = 20_000


def gaps_s(times_s: np.ndarray) -> np.ndarray:
    return np.diff(times_s, prepend=0.0)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_open_loop_rate_and_burstiness_statistics(burstiness: float) -> None:
    rate_rps = 10.0
    times_s = OpenLoop(rate_rps, burstiness, seed=7).send_times_s(NUM_ARRIVALS)
    gaps = gaps_s(times_s)
    assert np.all(gaps >= 0)
    # Rescaled like vLLM: the last send is at exactly n / rate, so the mean rate is exact.
    assert times_s[-1] == pytest.approx(NUM_ARRIVALS / rate_rps, rel=1e-12)
    assert gaps.mean() == pytest.approx(1 / rate_rps, rel=1e-9)
    # Gamma(shape=b): coefficient of variation 1 / sqrt(b).
    cv = gaps.std() / gaps.mean()
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.04)


def test_poisson_gaps_are_exponential_and_counts_have_unit_dispersion() -> None:
    rate_rps = 50.0
    times_s = OpenLoop(rate_rps, 1.0, seed=3).send_times_s(NUM_ARRIVALS)
    gaps = gaps_s(times_s)
    # P(gap < mean) = 1 - 1/e for an exponential.
    assert np.mean(gaps < 1 / rate_rps) == pytest.approx(1 - math.exp(-1), abs=0.01)
    # Arrivals per 1 s window: Poisson, variance / mean = 1.
    counts = np.bincount(times_s.astype(int))[:-1]  # drop the partial last window
    assert counts.mean() == pytest.approx(rate_rps, rel=0.01)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.1)


def test_open_loop_is_repeatable_for_a_seed() -> None:
    a = OpenLoop(4.0, 0.5, seed=11).send_times_s(100)
    b = OpenLoop(4.0, 0.5, seed=11).send_times_s(100)
    c = OpenLoop(4.0, 0.5, seed=12).send_times_s(100)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_infinite_rate_sends_everything_at_once_and_infinite_burstiness_is_constant() -> None:
    assert OpenLoop(math.inf).send_times_s(5).tolist() == [0.0] * 5
    times_s = OpenLoop(4.0, math.inf).send_times_s(4)
    assert times_s.tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=1e-12)
    assert OpenLoop(4.0).send_times_s(0).shape == (0,)


@pytest.mark.parametrize(
    "make",
    [
        lambda: OpenLoop(0.0),
        lambda: OpenLoop(-1.0),
        lambda: OpenLoop(1.0, 0.0),
        lambda: ClosedLoop(0),
        lambda: RateSweep(()),
        lambda: RateSweep((1.0, 0.0)),
        lambda: sweep_rates(2.0, 1.0, 3),
        lambda: sweep_rates(1.0, 2.0, 0),
    ],
)
def test_invalid_arrivals_are_value_errors(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_sweep_rates_and_points() -> None:
    assert sweep_rates(1.0, 4.0, 4) == (1.0, 2.0, 3.0, 4.0)
    assert sweep_rates(1.0, 8.0, 4, geometric=True) == pytest.approx((1.0, 2.0, 4.0, 8.0))
    sweep = RateSweep((1.0, 2.0), burstiness=0.5, seed=9)
    assert sweep.points() == [OpenLoop(1.0, 0.5, 9), OpenLoop(2.0, 0.5, 9)]


def test_parse_arrival() -> None:
    assert parse_arrival("2.5", None, burstiness=0.5, seed=1) == OpenLoop(2.5, 0.5, 1)
    assert parse_arrival("inf", None) == OpenLoop(math.inf)
    assert parse_arrival(None, 8) == ClosedLoop(8)
    with pytest.raises(ValueError, match="exactly one"):
        parse_arrival("1", 8)
    with pytest.raises(ValueError, match="exactly one"):
        parse_arrival(None, None)
    with pytest.raises(ValueError, match="--rate"):
        parse_arrival("fast", None)
