"""When requests are sent: open loop at a rate, closed loop at a concurrency, a rate sweep.

Open loop (`OpenLoop`) fixes the send times in advance, whatever the server does; that is
how real users arrive and the only way to see queueing. The gaps between sends follow a
gamma distribution with shape `burstiness` and mean `1 / rate`, exactly as `vllm bench
serve --burstiness`:

    gap ~ Gamma(shape=b, scale=1 / (rate * b))     mean 1/rate, CV 1/sqrt(b)
    b = 1     Poisson arrivals (exponential gaps)
    b < 1     burstier (clumps and lulls)
    b > 1     smoother; b = inf gives constant gaps

Like vLLM, the cumulative send times are rescaled so the last send lands at exactly
`num_requests / rate` (a raw gamma sum misses it by a few per cent, which moves the measured
throughput from seed to seed); the rescaling multiplies every gap by one constant, so it keeps
the gaps' coefficient of variation. `rate = inf` sends everything at t = 0.

Closed loop (`ClosedLoop`) keeps `concurrency` requests in flight: each finished request
frees a slot for the next. It measures capacity, not latency under load.

A `RateSweep` is one open-loop run per rate, same burstiness and seed, for throughput and
goodput curves against offered load.

Every random draw comes from a `numpy.random.Generator` seeded from the run's seed, so a run
is repeatable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OpenLoop:
    """Send at `rate_rps` requests per second with gamma gaps of shape `burstiness`."""

    rate_rps: float
    burstiness: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.rate_rps > 0:
            raise ValueError(
                f"rate_rps must be > 0 (or inf to send all at once), got {self.rate_rps}"
            )
        if not self.burstiness > 0:
            raise ValueError(
                f"burstiness must be > 0 (1 = Poisson, inf = constant gaps), got {self.burstiness}"
            )

    def send_times_s(self, num_requests: int) -> np.ndarray:
        """Send offsets in seconds from the start of the run, non-decreasing. # [num_requests]"""
        if num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {num_requests}")
        if num_requests == 0:
            return np.zeros(0)
        if math.isinf(self.rate_rps):
            return np.zeros(num_requests)
        if math.isinf(self.burstiness):
            gaps_s = np.full(num_requests, 1.0 / self.rate_rps)
        else:
            rng = np.random.default_rng(self.seed)
            scale = 1.0 / (self.rate_rps * self.burstiness)
            gaps_s = rng.gamma(shape=self.burstiness, scale=scale, size=num_requests)
        times_s = np.cumsum(gaps_s)
        # Rescale so the last send is at exactly n / rate (vLLM does the same).
        if times_s[-1] > 0:
            times_s *= (num_requests / self.rate_rps) / times_s[-1]
        return times_s

    def describe(self) -> dict[str, float | int | str]:
        return {
            "kind": "open_loop",
            "rate_rps": self.rate_rps,
            "burstiness": self.burstiness,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class ClosedLoop:
    """Keep `concurrency` requests in flight; the next is sent when one finishes."""

    concurrency: int

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")

    def describe(self) -> dict[str, float | int | str]:
        return {"kind": "closed_loop", "concurrency": self.concurrency}


Arrival = OpenLoop | ClosedLoop


@dataclass(frozen=True)
class RateSweep:
    """One open-loop run per rate, in the order given."""

    rates_rps: tuple[float, ...]
    burstiness: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.rates_rps:
            raise ValueError("a rate sweep needs at least one rate")
        for point in self.points():  # validates every rate
            del point

    def points(self) -> list[OpenLoop]:
        return [OpenLoop(rate, self.burstiness, self.seed) for rate in self.rates_rps]


def sweep_rates(
    start_rps: float, stop_rps: float, num: int, geometric: bool = False
) -> tuple[float, ...]:
    """`num` rates from `start_rps` to `stop_rps` inclusive, evenly or geometrically spaced."""
    if num < 1:
        raise ValueError(f"a sweep needs num >= 1 points, got {num}")
    if not 0 < start_rps <= stop_rps or math.isinf(stop_rps):
        raise ValueError(
            f"sweep rates need 0 < start <= stop < inf, got start={start_rps}, stop={stop_rps}"
        )
    grid = np.geomspace if geometric else np.linspace
    return tuple(float(rate) for rate in grid(start_rps, stop_rps, num))


def parse_arrival(
    rate: str | None, concurrency: int | None, burstiness: float = 1.0, seed: int = 0
) -> Arrival:
    """The arrival pattern from command-line values: exactly one of `rate` ("inf" allowed)
    and `concurrency`."""
    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of --rate (open loop) and --concurrency (closed loop)")
    if concurrency is not None:
        return ClosedLoop(concurrency)
    assert rate is not None
    try:
        rate_rps = float(rate)
    except ValueError:
        raise ValueError(f"--rate must be a number of requests/s or 'inf', got {rate!r}") from None
    return OpenLoop(rate_rps, burstiness, seed)
