"""The disaggregation report's comparisons, per profile (`gpu_comparisons`, `cpu_comparisons`):
which configurations, workloads and rates each runs, and the SLOs they are judged by. The CLI
that runs them is loadtest/disagg_report.py; its --help ends with the rest of this docstring.

Service-level objectives (the same for every comparison, so goodputs compare):

    TTFT <= 1000 ms   about 20x an unqueued 2048-token prefill on an H100 (52 ms measured,
                      docs/benchmarks.md): room for batching and some queueing, but not for
                      the backlog of an overloaded prefill tier; an interactive-chat bound
    TPOT <= 25 ms     40 tokens/s per stream (faster than reading); about 2x a batch-64
                      decode step (10.7 ms) and 3.5x a batch-1 step (7.1 ms): an undisturbed
                      decode batch meets it, a batch stalled by 2k-token prefills (about
                      52 ms each) or grown past the engine's limits does not

Rates (requests/s, Poisson), from the same measurements. Interference: 1P1D's prefill GPU
serves about 18 req/s of 2048-token prompts (52 ms each) and its decode GPU up to 128
streams of 256 tokens (about 3 s each: some 40 req/s), while each colocated replica spends
52 ms of decode time per prompt it takes (42% of its GPU at 8 req/s each); the sweep runs
8 to 28 in steps of 4: measured on 2 x H200 (docs/benchmarks.md), 1P1D's TTFT fails from
20 req/s and the colocated pair's from 24, and a sweep that stops below both limits makes
the best goodputs equal by construction. Decode-heavy: 512-token answers
last about 7 s (steps of about 13 ms), so 1P1D's one decode GPU holds about 18 req/s at 128
streams against the colocated pair's 36: 6, 12, 24 (disaggregation is expected to lose at
24; it is reported as measured). Prefix cache: 16 (below the uncached prefill limit of
about 25 req/s of 1600-token prompts: TTFT shows the compute saved) and 64 (above it:
throughput). Splits: 16, 24, 32, 40, on 1P3D, 2P2D, 3P1D and four colocated replicas
(colocated-4, the baseline on the same four GPUs). Measured on 4 x H200 (docs/benchmarks.md),
1P3D's single prefill GPU saturates between 16 and 24, 2P2D holds 32 (93% of requests met
at 40), 3P1D's single decode GPU misses TPOT at 32 to 40, and colocated-4 holds 32 and
misses TPOT at 40 (64% met; the colocated pair holds 20 and fails at 24). 8 is below every
limit and adds nothing to a best goodput. Were colocated-4 to meet the SLOs at the highest
rate, its best goodput would be a lower bound (the basis names the rate), and each split's
ratio to it an upper bound.
Each rate of a random workload sends 8 s of arrivals (at least 16 requests; rate x 8 s is
48 to 320). `--dry-run` prints the estimate (starts plus unsaturated runs): with a minute
per cluster start and stop the 2-GPU comparisons take about 11 minutes (9 with the 35-s
starts the recorded calls assumed, `--start-estimate-s 35`; they run in parts) and the
splits, four configurations x (a start + four runs of 14 s), about 7.7 (6 with 35-s
starts); a saturated run may take up to 35 s. A configuration's sweep stops after a rate
where fewer than 25% of requests met the TTFT SLO (saturated: its queue grows, higher rates
only queue more), and --time-budget-s skips whatever would not fit, saying so in report.md.

Figures (loadtest/comparison.py defines them): goodput ratio = best goodput over the sweep
(disaggregated) / best over the sweep (colocated), each at its own best rate; TPOT p90 ratio
= colocated TPOT p90 / disaggregated TPOT p90 at the highest rate where colocated's TTFT p90
meets the TTFT SLO with no failed request; output-throughput ratio = best output tokens/s,
likewise. Prefix cache: throughput ratio (on / off, best over the sweep), TTFT ratio (off /
on, p50 at the lower rate). Splits: each configuration's best goodput and best output
tokens/s (colocated-4's too), and each split's goodput ratio = its best goodput / colocated-4's
best, each at its own best rate (the 2-GPU goodput ratio's definition).
`--profile cpu` runs every comparison on local.yaml-based configs (tiny model, CPU workers)
with tiny lengths, rates and loose SLOs: a smoke test of the driver, not a benchmark.
"""

from __future__ import annotations

import enum

from loadtest.disagg_plan import Comparison, ConfigSpec, Kind
from loadtest.metrics import SLO
from loadtest.sweeps import RandomWorkload, SharedPrefixWorkload


class Profile(enum.Enum):
    GPU = "gpu"  # llama3-8b on one GPU per worker: the figures
    CPU = "cpu"  # local.yaml's tiny model on CPU workers: a smoke test of the driver


GPU_SLO = SLO(ttft_ms=1000.0, tpot_ms=25.0)
CPU_SLO = SLO(ttft_ms=3000.0, tpot_ms=300.0)  # a loaded 2-core box: only gross failures miss
DEFAULT_SLO = {Profile.GPU: GPU_SLO, Profile.CPU: CPU_SLO}
START_ESTIMATE_S = {Profile.GPU: 60.0, Profile.CPU: 20.0}  # `baton serve` to ready, + stop
COMPARISONS = ("interference", "decode-heavy", "prefix-cache", "splits")
NO_PREFIX_CACHE = {"engine": {"enable_prefix_caching": False}}


def gpu_comparisons() -> dict[str, Comparison]:
    """The figures' comparisons: llama3-8b, bf16, one GPU per worker (see the module docstring)."""
    p1d1 = ConfigSpec("disagg-1p1d", "cluster_configs/gpu-1p1d.yaml", key="1p1d")
    colocated = ConfigSpec("colocated-2", "cluster_configs/gpu-colocated.yaml", key="colocated")
    no_cache = ConfigSpec("disagg-1p1d-nocache", p1d1.base, NO_PREFIX_CACHE, key="1p1d_nocache")
    # 1P1D that prefills on the decode GPU while the prefill worker is a full step behind
    # (4 prompts of 2k), in chunks riding along the decode batch (a step of the decode
    # engine carries at most 384 tokens: its decodes plus a prompt chunk; measured by
    # loadtest/mixed_step_bench.py on H200, 96 decodes + 256 prompt tokens step in 20.5 ms
    # against 13.0 ms alone). Reported beside the pure split, not instead of it.
    conditional = ConfigSpec(
        "disagg-1p1d-conditional",
        p1d1.base,
        {
            "decode_engine": {"max_num_batched_tokens": 384},
            "cluster": {
                "routing": {
                    "policy": "conditional",
                    "inner_policy": "least_loaded",
                    "max_prefill_queue_tokens": 8192,
                }
            },
        },  # fmt: skip
        key="1p1d_conditional",
    )
    # gpu-2p2d.yaml leaves the per-role engine limits at their defaults and routes by
    # prefix: give every split 1P3D/3P1D's limits and least-loaded routing, so that only the
    # split differs (2P2D under prefix_aware routing measured TPOT p90 25 ms at 24 req/s,
    # 3P1D's single decode GPU 19 ms).
    same_roles = {
        "prefill_engine": {"max_num_seqs": 32},
        "decode_engine": {"max_num_batched_tokens": 2048},
        "cluster": {"routing": {"policy": "least_loaded"}},
    }
    splits = tuple(
        ConfigSpec(f"disagg-{s}", f"cluster_configs/gpu-{s}.yaml", same_roles, key=s)
        for s in ("1p3d", "2p2d", "3p1d")
    )
    # The splits' baseline on the same four GPUs: colocated-2 with four replicas, nothing
    # else changed (same engine limits, least-loaded routing), so that the 2- and 4-GPU
    # comparisons have the same colocated replica. same_roles does not apply: there is no
    # prefill tier, and decode_engine would set the replicas' limits (a colocated replica
    # runs the decode role's engine config, baton/launcher.py), chunking their 2k prompts.
    # First in the plan: a time budget cuts the last configuration's highest rates, which
    # are the baseline's likely best.
    colocated4 = ConfigSpec(
        "colocated-4", colocated.base, {"cluster": {"num_decode": 4}}, key="colocated4"
    )
    prefill_heavy = RandomWorkload(input_len=2048, output_len=256, arrival_s=8.0)
    decode_heavy = RandomWorkload(input_len=256, output_len=512, arrival_s=8.0)
    shared_prefix = SharedPrefixWorkload(
        num_groups=8, prompts_per_group=16, system_prompt_len=1536, question_len=64, output_len=128
    )
    return {
        "interference": Comparison(
            name="interference",
            kind=Kind.PAIR,
            workload=prefill_heavy,
            rates_rps=(8, 12, 16, 20, 24, 28),
            configs=(p1d1, colocated, conditional),
            num_gpus=2,
            tail_s=6.0,  # 256 decode steps of up to ~20 ms
            max_run_s=35.0,
        ),
        "decode-heavy": Comparison(
            name="decode-heavy",
            kind=Kind.PAIR,
            workload=decode_heavy,
            rates_rps=(6, 12, 24),
            configs=(p1d1, colocated),
            num_gpus=2,
            tail_s=10.0,  # 512 decode steps of up to ~20 ms
            max_run_s=40.0,
        ),
        "prefix-cache": Comparison(
            name="prefix-cache",
            kind=Kind.PREFIX,
            workload=shared_prefix,
            rates_rps=(16, 64),
            configs=(p1d1, no_cache),
            num_gpus=2,
            tail_s=5.0,
            max_run_s=30.0,
        ),
        "splits": Comparison(
            name="splits",
            kind=Kind.SPLITS,
            workload=prefill_heavy,
            rates_rps=(16, 24, 32, 40),
            configs=(colocated4, *splits),
            num_gpus=4,
            tail_s=6.0,
            max_run_s=35.0,
            baseline=colocated4.label,
        ),
    }


def cpu_comparisons() -> dict[str, Comparison]:
    """The same comparisons on local.yaml (tiny model, CPU workers), sized to take seconds."""
    local = "cluster_configs/local.yaml"
    p1d1 = ConfigSpec("disagg-1p1d", local, key="1p1d")
    two_replicas = {"cluster": {"mode": "colocated", "num_decode": 2}}
    colocated = ConfigSpec("colocated-2", local, two_replicas, key="colocated")
    no_cache = ConfigSpec("disagg-1p1d-nocache", local, NO_PREFIX_CACHE, key="1p1d_nocache")
    splits = tuple(
        ConfigSpec(
            f"disagg-{p}p{d}d", local, {"cluster": {"num_prefill": p, "num_decode": d}}, f"{p}p{d}d"
        )
        for p, d in ((1, 3), (2, 2), (3, 1))
    )
    four_replicas = {"cluster": {"mode": "colocated", "num_decode": 4}}
    colocated4 = ConfigSpec("colocated-4", local, four_replicas, key="colocated4")
    prefill_heavy = RandomWorkload(input_len=128, output_len=16, arrival_s=2.0, min_requests=4)
    common = {"num_gpus": 0, "tail_s": 2.0, "max_run_s": 20.0}
    return {
        "interference": Comparison(
            "interference", Kind.PAIR, prefill_heavy, (2, 4), (p1d1, colocated), **common
        ),
        "decode-heavy": Comparison(
            "decode-heavy",
            Kind.PAIR,
            RandomWorkload(input_len=16, output_len=48, arrival_s=2.0, min_requests=4),
            (2, 4),
            (p1d1, colocated),
            **common,
        ),
        "prefix-cache": Comparison(
            "prefix-cache",
            Kind.PREFIX,
            SharedPrefixWorkload(2, 4, system_prompt_len=64, question_len=8, output_len=8),
            (4, 16),
            (p1d1, no_cache),
            **common,
        ),
        "splits": Comparison(
            "splits",
            Kind.SPLITS,
            prefill_heavy,
            (2, 4),
            (colocated4, *splits),
            **common,
            baseline=colocated4.label,
        ),
    }
