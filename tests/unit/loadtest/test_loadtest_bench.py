"""`GrpcTarget` and the bench CLI against a minimal in-test Serving server (the proto's
contract, no router): statuses, timings, sweeps, reports, and starting a cluster from config."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from loadtest.bench import main, parse_sweep
from loadtest.results import load_results
from loadtest.targets import GrpcTarget, GrpcTargetConfig, TargetError, Usage
from loadtest.workload import BenchRequest
from protos import serving_pb2 as pb
from protos import serving_pb2_grpc as pb_grpc

TOKEN_DELAY_S = 0.001


class TinyServing(pb_grpc.ServingServicer):
    """Streams `max_tokens` tokens, one per response; the last carries usage and timings.
    A prompt starting with token 999 is refused (UNAVAILABLE); token 998 stalls for 2 s."""

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:  # noqa: N802
        ids = list(request.token_ids.ids)
        if ids and ids[0] == 999:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no decode worker")
        if ids and ids[0] == 998:
            time.sleep(2.0)
        num = request.sampling.max_tokens
        for i in range(num):
            time.sleep(TOKEN_DELAY_S)
            response = pb.GenerateResponse(request_id=request.request_id, token_ids=[i], text="x")
            if i == num - 1:
                response.finish_reason = pb.FINISH_REASON_LENGTH
                response.usage.CopyFrom(
                    pb.Usage(prompt_tokens=len(ids), completion_tokens=num, cached_tokens=2)
                )
                response.timings.CopyFrom(
                    pb.Timings(
                        router_ms=0.5,
                        prefill_queue_ms=1.0,
                        prefill_ms=2.0,
                        transfer_ms=3.0,
                        decode_queue_ms=0.25,
                        ttft_ms=7.0,
                        other_ms=0.25,
                        mode="disaggregated",
                    )
                )
            yield response

    def Health(
        self, request: pb.ServingHealthRequest, context: grpc.ServicerContext
    ) -> pb.ServingHealthResponse:  # noqa: N802
        return pb.ServingHealthResponse(serving=True)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:  # noqa: N802
        return pb.StatsResponse(
            mode="disaggregated",
            policy="round_robin",
            workers=[
                pb.WorkerStats(name="p0", role="prefill"),
                pb.WorkerStats(name="d0", role="decode"),
            ],
        )


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_ServingServicer_to_server(TinyServing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def collect(target: GrpcTarget, request: BenchRequest, timeout_s: float = 5.0) -> list:
    return list(target.stream(request, "t-1", timeout_s))


def test_grpc_target_streams_tokens_usage_and_phases(address: str) -> None:
    target = GrpcTarget(GrpcTargetConfig(address))
    target.wait_ready(5.0)
    chunks = collect(target, BenchRequest((1, 2, 3, 4), None, max_tokens=3))
    assert [c.token_ids for c in chunks] == [(0,), (1,), (2,)]
    assert [c.usage for c in chunks] == [None, None, Usage(4, 3, 2)]
    phases = chunks[-1].phases
    assert phases is not None and chunks[0].phases is None
    assert (phases.router_s, phases.transfer_s, phases.server_ttft_s) == pytest.approx(
        (0.0005, 0.003, 0.007)
    )
    assert phases.mode == "disaggregated"
    assert target.describe() == {
        "kind": "grpc",
        "address": address,
        "ignore_eos": True,
        "temperature": None,
        "mode": "disaggregated",
        "policy": "round_robin",
        "workers": ["decode:d0", "prefill:p0"],
    }
    target.close()


def test_grpc_target_maps_statuses_to_target_errors(address: str) -> None:
    target = GrpcTarget(GrpcTargetConfig(address))
    with pytest.raises(TargetError) as refused:
        collect(target, BenchRequest((999, 1), None, max_tokens=2))
    assert (refused.value.code, refused.value.message) == ("UNAVAILABLE", "no decode worker")
    start = time.perf_counter()
    with pytest.raises(TargetError) as late:
        collect(target, BenchRequest((998, 1), None, max_tokens=2), timeout_s=0.1)
    assert late.value.code == "DEADLINE_EXCEEDED"
    assert time.perf_counter() - start < 1.0
    target.close()


def test_wait_ready_names_the_address_when_nothing_serves() -> None:
    target = GrpcTarget(GrpcTargetConfig("127.0.0.1:1"))
    with pytest.raises(ValueError, match=r"no Baton router serving at 127\.0\.0\.1:1"):
        target.wait_ready(0.3)
    target.close()


def test_bench_cli_sweep_writes_results_and_report(address: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    argv = ["--address", address, "--dataset", "shared-prefix", "--num-groups", "2"]
    argv += ["--prompts-per-group", "3", "--system-prompt-len", "16", "--question-len", "4"]
    argv += ["--output-len", "3", "--sweep", "100,200", "--slo", "ttft_ms=1000", "tpot_ms=1000"]
    argv += ["--out", str(out), "--no-progress"]
    assert main(argv) == 0
    results = load_results(out / "results.json")
    assert results.label == "disaggregated"
    assert [run.rate_rps for run in results.runs] == [100.0, 200.0]
    for run in results.runs:
        s = run.summary
        assert (s.completed, s.failed, s.total_output_tokens) == (6, 0, 18)
        assert s.slo_attainment == 1.0
        assert s.modes == {"disaggregated": 6}
        assert s.phases["transfer"].mean_ms == pytest.approx(3.0)
        assert run.dataset["name"] == "shared_prefix"
    # Each run has its own request-id prefix (and cache-salt prefix).
    salts = {run.requests[0].request_id.rsplit("-", 1)[0] for run in results.runs}
    assert len(salts) == 2
    assert {p.name for p in out.iterdir()} == {"results.json", "summary.md", "cdf.png", "sweep.png"}

    report = tmp_path / "cmp"
    assert (
        main(
            ["--report", str(out / "results.json"), str(out / "results.json"), "--out", str(report)]
        )
        == 0
    )
    assert "B / A" in (report / "comparison.md").read_text()


def test_bench_cli_starts_a_cluster_from_config(address: str, tmp_path: Path) -> None:
    started: list[str] = []

    @contextlib.contextmanager
    def start_cluster(config: str) -> Iterator[str]:
        started.append(config)
        yield address

    argv = [
        "--config",
        "local.yaml",
        "--dataset",
        "random",
        "--num-requests",
        "4",
        "--input-len",
        "8",
    ]
    argv += [
        "--output-len",
        "2",
        "--concurrency",
        "2",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--label",
        "local",
    ]
    assert main(argv, start_cluster=start_cluster) == 0
    assert started == ["local.yaml"]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["label"] == "local" and doc["runs"][0]["arrival"] == {
        "kind": "closed_loop",
        "concurrency": 2,
    }
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "summary.md", "cdf.png"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "x.yaml", "--rate", "1"], "--config needs `baton bench`"),
        (["--rate", "1"], "exactly one of --address"),
        (["--address", "a:1", "--rate", "1", "--concurrency", "2"], "exactly one of --rate"),
        (["--address", "a:1", "--sweep", "1:2"], "--sweep must be"),
        (["--address", "a:1", "--rate", "1", "--slo", "ttft=5"], "unknown SLO"),
        (["--address", "a:1", "--rate", "1", "--dataset", "jsonl"], "--dataset-path"),
        (["--address", "a:1", "--rate", "1", "--token-range", "5"], "--token-range"),
    ],
)
def test_bench_cli_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_parse_sweep() -> None:
    assert parse_sweep("1,2,4", 1.0, 0).rates_rps == (1.0, 2.0, 4.0)
    assert parse_sweep("1:4:4", 0.5, 3).rates_rps == (1.0, 2.0, 3.0, 4.0)
    assert parse_sweep("1:8:4:geometric", 1.0, 0).rates_rps == pytest.approx((1.0, 2.0, 4.0, 8.0))
