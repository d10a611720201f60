"""The load-test smoke run: `baton bench --config cluster_configs/local.yaml` end to end.

Starts the embedded default cluster (a tiny random-weight Llama, 1 prefill + 1 decode worker
on a local Ray), sends a few dozen shared-prefix requests open loop through the gRPC API, and
checks that every metric is present and sane and that the report and plots are written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray")

from baton.config import LOCAL_CONFIG  # noqa: E402
from loadtest.bench import main, start_cluster_from_config  # noqa: E402
from loadtest.metrics import PHASES  # noqa: E402
from loadtest.results import load_results  # noqa: E402

pytestmark = pytest.mark.timeout(240)

NUM_GROUPS, PER_GROUP, SYSTEM_LEN, QUESTION_LEN, OUTPUT_LEN = 2, 16, 48, 8, 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_smoke_against_the_embedded_default_cluster(tmp_path: Path) -> None:
    argv = ["--config", str(LOCAL_CONFIG), "--dataset", "shared-prefix"]
    argv += ["--num-groups", str(NUM_GROUPS), "--prompts-per-group", str(PER_GROUP)]
    argv += ["--system-prompt-len", str(SYSTEM_LEN), "--question-len", str(QUESTION_LEN)]
    argv += ["--output-len", str(OUTPUT_LEN), "--rate", "8", "--seed", "1"]
    argv += ["--slo", "ttft_ms=5000", "tpot_ms=1000", "--request-timeout-s", "60"]
    argv += ["--max-duration-s", "120", "--out", str(tmp_path), "--no-progress"]
    assert main(argv, start_cluster=start_cluster_from_config) == 0

    (run,) = load_results(tmp_path / "results.json").runs
    s = run.summary
    num_requests = NUM_GROUPS * PER_GROUP
    assert (s.num_requests, s.completed, s.failed, run.num_not_sent) == (
        num_requests,
        num_requests,
        0,
        0,
    )
    assert s.total_input_tokens == num_requests * (SYSTEM_LEN + QUESTION_LEN)
    assert s.total_output_tokens == num_requests * OUTPUT_LEN  # ignore_eos: exact lengths
    for dist in (s.ttft, s.tpot, s.itl, s.e2el, s.server_ttft):
        assert dist is not None
        assert 0 < dist.median_ms <= dist.percentiles_ms["p99"] < 60_000
    assert s.ttft.mean_ms < s.e2el.mean_ms  # type: ignore[union-attr]
    assert (
        0 < s.request_throughput_rps <= s.num_requests / 3.0
    )  # 32 requests at 8 req/s take >= 4 s
    assert s.output_throughput_tps == pytest.approx(s.request_throughput_rps * OUTPUT_LEN)
    assert (
        s.request_goodput_rps is not None and 0 < s.request_goodput_rps <= s.request_throughput_rps
    )
    assert s.slo_attainment is not None and 0 < s.slo_attainment <= 1
    # Every tenant's 3-block system prompt is cached after its first request.
    assert (
        0.5
        < s.prefix_cache_hit_rate
        <= (num_requests - NUM_GROUPS) * SYSTEM_LEN / s.total_input_tokens
    )  # type: ignore[operator]
    assert set(s.phases) == set(PHASES)
    assert s.modes == {"disaggregated": num_requests}
    assert run.target["mode"] == "disaggregated"

    assert {p.name for p in tmp_path.iterdir()} == {
        "results.json",
        "summary.md",
        "cdf.png",
        "sweep.png",
    }
    assert "| TTFT |" in (tmp_path / "summary.md").read_text()
    for name in ("cdf.png", "sweep.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
