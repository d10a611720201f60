"""The disaggregation report's plan, sweeps and driver, with in-process fake servers (no Ray):
which configuration starts once for which sweeps, what the time budget and saturation skip,
that a failing configuration does not end the report, and what is written."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from loadtest import disagg_comparisons, disagg_outputs, disagg_report
from loadtest.disagg_plan import (
    Comparison,
    ConfigSpec,
    Kind,
    deep_merge,
    figures_for,
    parse_settings,
    plan,
)
from loadtest.metrics import SLO, RequestRecord
from loadtest.results import ResultFile, RunResult, build_result, load_results
from loadtest.runner import RunRecords
from loadtest.server_process import (
    ServerError,
    ServerOptions,
    client_address,
    server_env,
    start_server,
)
from loadtest.sweeps import Budget, Notes, RandomWorkload, SweepSpec, run_config_sweeps
from loadtest.targets import FakeTarget, FakeTargetConfig, Target

LOCAL = "cluster_configs/local.yaml"
LOOSE = SLO(ttft_ms=5000.0, tpot_ms=1000.0)


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


@contextlib.contextmanager
def fake_server(started: list[str], label: str) -> Iterator[Target]:
    started.append(label)
    yield FakeTarget(FakeTargetConfig(base_ttft_s=0.001, itl_s=0.0005))


def sweep_spec(tmp_path: Path, rates: tuple[float, ...], slo: SLO = LOOSE) -> SweepSpec:
    return SweepSpec(
        name="interference",
        workload=RandomWorkload(input_len=8, output_len=3, arrival_s=0.1, min_requests=3),
        rates_rps=rates,
        slo=slo,
        out_path=tmp_path / "interference" / "results-a.json",
        tail_s=1.0,
        max_run_s=10.0,
    )


def test_deep_merge_replaces_leaves_and_merges_mappings() -> None:
    base = {"engine": {"dtype": "float32", "num_kv_blocks": 256}, "cluster": {"num_decode": 1}}
    merged = deep_merge(base, {"engine": {"enable_prefix_caching": False}, "cluster": 3})
    assert merged == {
        "engine": {"dtype": "float32", "num_kv_blocks": 256, "enable_prefix_caching": False},
        "cluster": 3,
    }
    assert base["engine"] == {"dtype": "float32", "num_kv_blocks": 256}  # not modified


def test_plan_starts_each_configuration_once_with_every_sweep_that_uses_it(
    tmp_path: Path,
) -> None:
    comps = disagg_comparisons.gpu_comparisons()
    names = ("interference", "decode-heavy", "prefix-cache")
    planned = plan([comps[n] for n in names], tmp_path, LOOSE, seed=3, bases={})
    assert [(p.spec.label, [s.name for s in p.sweeps], p.num_workers) for p in planned] == [
        ("disagg-1p1d", ["interference", "decode-heavy", "prefix-cache"], 2),
        ("colocated-2", ["interference", "decode-heavy"], 2),
        ("disagg-1p1d-conditional", ["interference"], 2),
        ("disagg-1p1d-nocache", ["prefix-cache"], 2),
    ]
    sweep = planned[1].sweeps[0]
    assert sweep.out_path == tmp_path / "interference" / "results-colocated-2.json"
    assert (sweep.seed, sweep.rates_rps, sweep.slo) == (3, (8, 12, 16, 20, 24, 28), LOOSE)
    nocache = (tmp_path / "configs" / "disagg-1p1d-nocache.yaml").read_text()
    assert "enable_prefix_caching: false" in nocache
    conditional = (tmp_path / "configs" / "disagg-1p1d-conditional.yaml").read_text()
    assert "max_prefill_queue_tokens: 8192" in conditional


def test_settings_go_into_every_configuration(tmp_path: Path) -> None:
    settings = parse_settings(["cluster.kv_transfer.transport=grpc", "engine.enforce_eager=true"])
    assert settings == {
        "cluster": {"kv_transfer": {"transport": "grpc"}},
        "engine": {"enforce_eager": True},
    }
    comp = disagg_comparisons.gpu_comparisons()["interference"]
    for p in plan([comp], tmp_path, LOOSE, 0, {}, settings):
        raw = yaml.safe_load(p.config_path.read_text())
        assert raw["cluster"]["kv_transfer"]["transport"] == "grpc"
        assert raw["engine"]["enforce_eager"] is True
    with pytest.raises(ValueError, match="--set takes SECTION.KEY=VALUE"):
        parse_settings(["enforce_eager"])


def test_the_four_gpu_splits_share_engine_limits(tmp_path: Path) -> None:
    from baton.config import load_config

    comps = disagg_comparisons.gpu_comparisons()
    planned = plan([comps["splits"]], tmp_path, LOOSE, 0, {})
    assert comps["splits"].baseline == planned[0].spec.label == "colocated-4"
    layouts = []
    for p in planned[1:]:
        cfg = load_config(p.config_path)
        c = cfg.cluster
        layouts.append((c.num_prefill, c.num_decode, cfg.prefill.max_num_seqs))
        assert cfg.decode.max_num_batched_tokens == 2048 and c.num_workers == 4
    assert layouts == [(1, 3, 32), (2, 2, 32), (3, 1, 32)]


def test_the_four_gpu_baseline_is_the_two_gpu_one_with_four_replicas(tmp_path: Path) -> None:
    from baton.config import ClusterMode, load_config

    comps = disagg_comparisons.gpu_comparisons()
    four = plan([comps["splits"]], tmp_path / "4", LOOSE, 0, {})[0]
    two = plan([comps["interference"]], tmp_path / "2", LOOSE, 0, {})[1]
    assert (four.spec.label, four.spec.key) == ("colocated-4", "colocated4")
    assert two.spec.label == "colocated-2"
    raw_four = yaml.safe_load(four.config_path.read_text())
    raw_two = yaml.safe_load(two.config_path.read_text())
    assert raw_four["cluster"].pop("num_decode") == 4 and raw_two["cluster"].pop("num_decode") == 2
    assert raw_four == raw_two  # the same replica: engine limits, routing, everything else
    cfg = load_config(four.config_path)
    assert cfg.cluster.mode is ClusterMode.COLOCATED and four.num_workers == 4
    assert cfg.decode.max_num_batched_tokens == 8192  # not the splits' decode_engine limit


def test_a_run_that_does_not_fit_the_budget_is_skipped_and_said_so(tmp_path: Path) -> None:
    clock = FakeClock()
    budget = Budget(30.0, clock)
    notes = Notes(budget)
    started: list[str] = []
    sweep = sweep_spec(tmp_path, rates=(30.0, 2.0))  # 3 requests: 3 / rate + 1 s tail

    @contextlib.contextmanager
    def connect() -> Iterator[Target]:
        with fake_server(started, "a") as target:
            clock.now_s = 28.5  # the start took most of the budget: 1.5 s are left
            yield target

    assert run_config_sweeps("a", [sweep], connect, budget, notes, 10.0, num_workers=2)
    (run,) = load_results(sweep.out_path).runs  # 30 req/s needs 1.1 s: it ran
    assert run.rate_rps == 30.0 and run.summary.completed == 3
    assert any("skipped 2 req/s" in line for line in notes.lines)  # needs 2.5 s

    notes = Notes(Budget(5.0, clock))  # a start (10 s estimated) does not fit 5 s
    assert not run_config_sweeps("b", [sweep], connect, notes.budget, notes, 10.0, 2)
    assert started == ["a"]
    assert "b: not started (for interference)" in notes.lines[0]


def test_a_saturated_sweep_stops_at_the_first_rate_below_the_attainment_floor(
    tmp_path: Path,
) -> None:
    notes = Notes(Budget(None))
    sweep = sweep_spec(tmp_path, rates=(30.0, 60.0, 90.0), slo=SLO(ttft_ms=0.01))  # never met
    connect = lambda: fake_server([], "a")  # noqa: E731
    assert run_config_sweeps("a", [sweep], connect, notes.budget, notes, 0.0, num_workers=1)
    assert [r.rate_rps for r in load_results(sweep.out_path).runs] == [30.0]
    assert any("saturated at 30 req/s" in line and "skipped 60, 90" in line for line in notes.lines)


def test_a_tpot_miss_alone_is_not_saturation(tmp_path: Path) -> None:
    notes = Notes(Budget(None))
    slow_decode = SLO(ttft_ms=5000.0, tpot_ms=0.001)  # TTFT met, TPOT never
    sweep = sweep_spec(tmp_path, rates=(30.0, 60.0), slo=slow_decode)
    connect = lambda: fake_server([], "a")  # noqa: E731
    assert run_config_sweeps("a", [sweep], connect, notes.budget, notes, 0.0, num_workers=1)
    runs = load_results(sweep.out_path).runs
    assert [r.rate_rps for r in runs] == [30.0, 60.0]
    assert all(r.summary.slo_attainment == 0.0 for r in runs)


def test_figures_name_what_is_missing(tmp_path: Path) -> None:
    comp = Comparison(
        "interference",
        Kind.PAIR,
        RandomWorkload(8, 3, 0.1),
        (30.0,),
        (ConfigSpec("d", LOCAL), ConfigSpec("c", LOCAL)),
        0,
        1.0,
        10.0,
    )
    missing: list[str] = []
    assert figures_for(comp, {"d": ResultFile("d", [])}, LOOSE, missing) == []
    assert missing == ["bench.interference_*: d, c did not run"]


def _run(rate: float, num_good: int, num_late: int = 0) -> RunResult:
    """A 10-s run at `rate`: num_good requests within LOOSE, num_late past its TTFT."""
    records = [
        RequestRecord(
            index=i,
            request_id=f"r{i}",
            due_s=0.0,
            send_s=0.0,
            chunk_times_s=(ttft_s, ttft_s + 0.1),
            chunk_num_tokens=(1, 2),
            output_tokens=3,
            prompt_tokens=8,
        )
        for i, ttft_s in enumerate([0.1] * num_good + [9.0] * num_late)
    ]
    arrival = {"kind": "open_loop", "rate_rps": rate, "burstiness": 1.0, "seed": 0}
    raw = RunRecords(arrival, records, 10.0, num_not_sent=0, started_at_unix_s=0.0)
    return build_result(raw, {"name": "random"}, {"kind": "fake"}, LOOSE)


def test_splits_are_compared_with_their_baseline_each_at_its_best_rate() -> None:
    specs = tuple(ConfigSpec(label, LOCAL, key=label) for label in "cab")
    comp = Comparison("splits", Kind.SPLITS, RandomWorkload(8, 3, 0.1), (10.0, 20.0), specs,
                      0, 1.0, 10.0, baseline="c")  # fmt: skip
    files = {
        "c": ResultFile("c", [_run(10, 10), _run(20, 30, 10)]),  # best 3 req/s, at 20
        "a": ResultFile("a", [_run(10, 15), _run(20, 5, 35)]),  # best 1.5 req/s, at 10
    }
    missing: list[str] = []
    figures = {f.name: f for f in figures_for(comp, files, LOOSE, missing)}
    assert set(figures) == {
        "bench.split_goodput_c",
        "bench.split_output_tps_c",
        "bench.split_goodput_a",
        "bench.split_output_tps_a",
        "bench.split_goodput_ratio_a",
    }
    assert figures["bench.split_goodput_c"].value == 3.0
    assert figures["bench.split_goodput_a"].value == 1.5
    ratio = figures["bench.split_goodput_ratio_a"]
    assert (ratio.value, ratio.unit, ratio.target) == (0.5, "ratio", "report")
    assert ratio.basis == "a 1.50 req/s at 10 req/s vs c 3.00 req/s at 20 req/s"
    assert missing == ["bench.split_*_b: b did not run"]

    missing = []
    names = [f.name for f in figures_for(comp, {"a": files["a"]}, LOOSE, missing)]
    assert names == ["bench.split_goodput_a", "bench.split_output_tps_a"]
    assert "bench.split_goodput_ratio_*: c did not run" in missing
    with pytest.raises(ValueError, match="baseline 'x' must be one of the configs"):
        replace(comp, baseline="x")
    with pytest.raises(ValueError, match="of a SPLITS comparison"):
        replace(comp, kind=Kind.PAIR)


def test_client_address_dials_loopback_for_a_wildcard_bind() -> None:
    assert client_address("0.0.0.0:5001") == "127.0.0.1:5001"
    assert client_address("10.0.0.7:5001") == "10.0.0.7:5001"


def test_server_env_selects_gpus_and_never_joins_another_ray() -> None:
    env = server_env({"RAY_ADDRESS": "10.0.0.1:6379", "PYTHONPATH": "/bundle"}, (2, 3))
    assert "RAY_ADDRESS" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["PYTHONPATH"].endswith(":/bundle")
    assert "CUDA_VISIBLE_DEVICES" not in server_env({}, None)


@pytest.fixture(autouse=True)
def no_plots(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """write_report without matplotlib (seconds per chart; the smoke test draws them): the
    Markdown it would write, and an empty sweep.png; returns the labels of each call."""
    calls: list[list[str]] = []

    def write_report(files: list[ResultFile], out_dir: Path) -> list[Path]:
        calls.append([f.label for f in files])
        name = "comparison.md" if len(files) == 2 else "summary.md"
        (out_dir / name).write_text("report\n")
        (out_dir / "sweep.png").write_bytes(b"")
        return [out_dir / name, out_dir / "sweep.png"]

    monkeypatch.setattr(disagg_outputs, "write_report", write_report)
    return calls


def test_a_server_that_exits_before_it_is_ready_fails_with_its_log(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model: {default: true}\ncluster: {num_decode: 0}\n")
    options = ServerOptions(config, tmp_path / "logs" / "server.log", start_timeout_s=60.0)
    expected = r"exited with code 2 before it was ready"
    with pytest.raises(ServerError, match=expected) as error, start_server(options):
        pass
    assert "cluster.num_decode must be >= 1" in str(error.value)  # the log's tail


def _fake_served(started: list[str], fail: set[str]):  # noqa: ANN202
    @contextlib.contextmanager
    def served_target(options: ServerOptions) -> Iterator[Target]:
        label = options.config_path.stem
        if label in fail:
            raise ServerError(f"{label} ran out of GPU memory")
        with fake_server(started, label) as target:
            yield target

    return served_target


FAST = ["--profile", "cpu", "--arrival-s", "0.1", "--start-estimate-s", "1"]
FAST += ["--rates", "interference=40,80", "--rates", "decode-heavy=40,80"]
FAST += ["--rates", "prefix-cache=40,80", "--rates", "splits=40,80"]


def test_the_whole_report_against_fake_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: list[list[str]]
) -> None:
    started: list[str] = []
    monkeypatch.setattr(disagg_report, "served_target", _fake_served(started, set()))
    bench_json = tmp_path / "benchmarks.json"
    out = tmp_path / "out"
    argv = [*FAST, "--comparison", "interference,decode-heavy,splits", "--out", str(out)]
    argv += ["--record", "--benchmarks-json", str(bench_json)]
    assert disagg_report.main(argv) == 0

    splits = ["colocated-4", "disagg-1p3d", "disagg-2p2d", "disagg-3p1d"]
    assert started == ["disagg-1p1d", "colocated-2", *splits]  # one start per configuration
    for comparison, files in (
        ("interference", ["results-disagg-1p1d.json", "results-colocated-2.json", "comparison.md"]),
        ("decode-heavy", ["results-disagg-1p1d.json", "results-colocated-2.json", "comparison.md"]),
        ("splits", ["results-colocated-4.json", "results-disagg-3p1d.json", "summary.md"]),
    ):
        for name in files:
            assert (out / comparison / name).is_file(), (comparison, name)
        assert (out / comparison / "sweep.png").is_file()
    assert no_plots == [  # plots once, at the end, every configuration on one chart
        ["disagg-1p1d", "colocated-2"],
        ["disagg-1p1d", "colocated-2"],
        splits,
    ]
    entries = json.loads((out / "figures.json").read_text())
    names = {e["name"] for e in entries}
    assert {
        "bench.interference_goodput_ratio",
        "bench.interference_tpot_p90_ratio",
        "bench.decode_heavy_goodput_ratio",
    } <= names
    split_names = [e["name"] for e in entries if e["name"].startswith("bench.split_")]
    assert split_names == [
        f"bench.split_{figure}_{key}"
        for key in ("colocated4", "1p3d", "2p2d", "3p1d")
        for figure in ("goodput", "output_tps")
    ] + [f"bench.split_goodput_ratio_{key}" for key in ("1p3d", "2p2d", "3p1d")]
    by_name = {e["name"]: e for e in entries}
    ratio = by_name["bench.split_goodput_ratio_2p2d"]
    assert ratio["unit"] == "ratio" and ratio["target"] == "report" and ratio["value"] > 0
    assert ratio["baseline"].startswith("disagg-2p2d ") and " vs colocated-4 " in ratio["baseline"]
    assert by_name["bench.split_goodput_colocated4"]["unit"] == "req/s"
    assert by_name["bench.split_output_tps_colocated4"]["unit"] == "tokens/s"
    for e in entries:
        assert math.isfinite(e["value"]) and e["card"] == "CPU dev box"
        assert e["command"].startswith("python -m loadtest.disagg_report --profile cpu")
    goodput = next(e for e in entries if e["name"] == "bench.interference_goodput_ratio")
    assert goodput["target"] == ">= 1.3"
    assert json.loads(bench_json.read_text()) == entries
    report = (out / "report.md").read_text()
    assert "| bench.interference_goodput_ratio |" in report
    assert "| 80 | colocated-2 | 8/8 |" in report
    assert "| bench.split_goodput_ratio_2p2d |" in report
    splits_section = report[report.index("## splits") : report.index("## What ran")]
    head = "| config | best goodput req/s (at rate) | best out tok/s (at rate) | goodput / "
    assert head + "colocated-4 |" in splits_section
    assert "| colocated-4 | **" in splits_section and "| baseline |" in splits_section
    g = by_name["bench.split_goodput_2p2d"]["value"]
    assert f"| disagg-2p2d | **{g:g}** (" in splits_section
    assert f"| **{ratio['value']:g}** |" in splits_section
    assert "| 80 | colocated-4 | 8/8 |" in splits_section

    # --report-only rebuilds the same from the files (say, the plots where matplotlib is).
    (out / "splits" / "sweep.png").unlink()
    (out / "report.md").unlink()
    assert disagg_report.main(["--report-only", "--out", str(out)]) == 0
    assert (out / "splits" / "sweep.png").is_file()
    assert (out / "report.md").read_text() == report
    assert json.loads((out / "figures.json").read_text()) == entries


def test_a_failing_configuration_is_reported_and_the_rest_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []
    served = _fake_served(started, {"colocated-2"})
    monkeypatch.setattr(disagg_report, "served_target", served)
    out = tmp_path / "out"
    argv = [*FAST, "--comparison", "interference,prefix-cache", "--out", str(out)]
    assert disagg_report.main(argv) == 1
    assert started == ["disagg-1p1d", "disagg-1p1d-nocache"]
    report = (out / "report.md").read_text()
    assert "FAILED: colocated-2: ServerError: colocated-2 ran out of GPU memory" in report
    assert "missing: bench.interference_*: colocated-2 did not run" in report
    assert "| 40 | colocated-2 | not run |" in report
    names = {e["name"] for e in json.loads((out / "figures.json").read_text())}
    assert names == {"bench.prefix_cache_throughput_ratio", "bench.prefix_cache_ttft_ratio"}


def test_cli_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path)]
    assert disagg_report.main(["--comparison", "splits", "--gpus", "0,1", *out]) == 2
    assert "splits needs 4 GPUs; --gpus names 2" in capsys.readouterr().err
    assert disagg_report.main(["--comparison", "colocation", *out]) == 2
    assert disagg_report.main(["--rates", "interference=fast", *out]) == 2
    assert disagg_report.main(["--profile", "cpu", "--record", *out]) == 2
    assert "smoke test, not benchmarks" in capsys.readouterr().err
    assert disagg_report.main(["--config", "disagg-9p9d=x.yaml", *out]) == 2
    assert "--config takes LABEL=YAML with LABEL in ['colocated-2'" in capsys.readouterr().err
    assert disagg_report.main(["--dry-run", "--comparison", "splits", *out]) == 0
    err = capsys.readouterr().err
    assert "colocated-4 (4 workers): splits @ 16/24/32/40 req/s" in err
    assert "disagg-2p2d (4 workers): splits @ 16/24/32/40 req/s" in err
    assert "plan: about 464 s" in err  # 4 x (60 s start + 4 x (8 s + 6 s tail))
