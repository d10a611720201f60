"""The runner end to end against the in-process fake target: records, deadlines, time limits,
multi-turn ordering, and the results JSON, Markdown and PNG written to a folder."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.arrivals import ClosedLoop, OpenLoop, RateSweep
from loadtest.datasets import MultiTurnDataset, RandomDataset, SharedPrefixDataset
from loadtest.metrics import SLO
from loadtest.report import markdown_comparison, write_report
from loadtest.results import ResultFile, build_result, load_results, save_results
from loadtest.runner import RunOptions, run, run_sweep
from loadtest.targets import FakeTarget, FakeTargetConfig, StreamChunk, Target
from loadtest.workload import BenchRequest

QUIET = RunOptions(progress=False, request_timeout_s=5.0, max_duration_s=10.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def shared_prefix() -> SharedPrefixDataset:
    return SharedPrefixDataset(
        num_groups=2,
        prompts_per_group=6,
        system_prompt_len=32,
        question_len=8,
        output_len=4,
        seed=3,
    )


def test_open_loop_end_to_end_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    dataset = shared_prefix()
    target = FakeTarget(
        FakeTargetConfig(base_ttft_s=0.002, itl_s=0.001, fail_request_ids=frozenset({"bench-5"}))
    )
    raw = run(target, dataset.generate(), OpenLoop(200.0, seed=1), QUIET)

    assert [r.index for r in raw.records] == list(range(12))
    assert raw.num_not_sent == 0
    failed = [r for r in raw.records if not r.completed]
    assert [(r.request_id, r.error_code) for r in failed] == [("bench-5", "UNAVAILABLE")]
    for r in raw.records:
        assert r.send_s >= r.due_s
        assert r.prompt_tokens == 40
        if r.completed:
            assert r.output_tokens == 4
            assert r.chunk_num_tokens == (1, 1, 1, 1)
            assert r.ttft_s >= 0.002
            assert r.phases is not None and r.phases.mode == "fake"
    assert raw.duration_s >= max(r.chunk_times_s[-1] for r in raw.records)

    result = build_result(
        raw, dataset.describe(), target.describe(), SLO(ttft_ms=1000, tpot_ms=1000)
    )
    s = result.summary
    assert (s.completed, s.failed, s.errors_by_code) == (11, 1, {"UNAVAILABLE": 1})
    assert s.slo_attainment == pytest.approx(11 / 12)
    assert s.request_goodput_rps == pytest.approx(s.request_throughput_rps)
    assert s.ttft and s.tpot and s.itl and s.e2el  # every latency present
    assert 0 < s.prefix_cache_hit_rate < 1  # type: ignore[operator]
    assert s.total_output_tokens == 44

    path = save_results(tmp_path / "run.json", ResultFile("fake", [result]))
    loaded = load_results(path)
    assert loaded == ResultFile("fake", [result])

    written = write_report([loaded], tmp_path / "report")
    assert sorted(p.name for p in written) == ["cdf.png", "summary.md", "sweep.png"]
    markdown = (tmp_path / "report" / "summary.md").read_text()
    for needle in [
        "# Load test: fake",
        "200 req/s",
        "| TTFT |",
        "| TPOT |",
        "| ITL |",
        "| E2EL |",
        "UNAVAILABLE: 1",
        "goodput",
    ]:
        assert needle in markdown
    for name in ("cdf.png", "sweep.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG_MAGIC


def test_prefix_cache_hits_are_exact_in_send_order() -> None:
    dataset = shared_prefix()
    requests = dataset.generate()
    raw = run(FakeTarget(), requests, ClosedLoop(1), QUIET)
    seen: set[str | None] = set()
    for request, r in zip(requests, raw.records, strict=True):
        # The first prompt of each tenant misses; the rest hit both 16-token system blocks.
        assert r.cached_tokens == (32 if request.tenant_id in seen else 0)
        seen.add(request.tenant_id)
    summary = build_result(raw, {}, {}).summary
    assert summary.prefix_cache_hit_rate == pytest.approx(10 * 32 / (12 * 40))


def test_closed_loop_keeps_concurrency_in_flight() -> None:
    requests = RandomDataset(8, input_len=4, output_len=5, seed=0).generate()
    raw = run(FakeTarget(FakeTargetConfig(itl_s=0.004)), requests, ClosedLoop(2), QUIET)
    summary = build_result(raw, {}, {}).summary
    assert summary.completed == 8
    assert summary.peak_concurrent_requests == 2
    assert raw.arrival == {"kind": "closed_loop", "concurrency": 2}


def test_request_deadline_fails_slow_requests_in_bounded_time() -> None:
    requests = RandomDataset(3, input_len=4, output_len=50, seed=0).generate()
    options = RunOptions(progress=False, request_timeout_s=0.05, max_duration_s=5.0)
    start = time.perf_counter()
    raw = run(FakeTarget(FakeTargetConfig(itl_s=0.01)), requests, OpenLoop(math.inf), options)
    assert time.perf_counter() - start < 1.0
    assert {r.error_code for r in raw.records} == {"DEADLINE_EXCEEDED"}


def test_on_all_sent_is_called_once_after_the_last_send_before_the_answers() -> None:
    requests = RandomDataset(10, input_len=4, output_len=20, seed=0).generate()
    calls: list[float] = []
    options = RunOptions(progress=False, request_timeout_s=5.0, on_all_sent=calls.append)
    raw = run(FakeTarget(FakeTargetConfig(itl_s=0.005)), requests, OpenLoop(200.0, math.inf),
              options)  # fmt: skip
    [at_s] = calls
    assert max(r.due_s for r in raw.records) <= at_s < raw.duration_s


def test_time_limit_stops_sending_and_bounds_the_run() -> None:
    requests = RandomDataset(50, input_len=4, output_len=2, seed=0).generate()
    options = RunOptions(progress=False, request_timeout_s=5.0, max_duration_s=0.3)
    raw = run(FakeTarget(), requests, OpenLoop(50.0, math.inf), options)  # one every 20 ms
    assert 0 < raw.num_not_sent < 50
    assert len(raw.records) == 50 - raw.num_not_sent
    assert raw.duration_s < 0.3 + 1.0
    assert all(r.due_s < 0.3 for r in raw.records)


def test_multi_turn_waits_for_the_previous_turn() -> None:
    dataset = MultiTurnDataset(num_conversations=2, num_turns=3, user_len=4, answer_len=3, seed=0)
    requests = dataset.generate()
    raw = run(FakeTarget(FakeTargetConfig(itl_s=0.003)), requests, OpenLoop(math.inf), QUIET)
    by_turn = {
        (q.turn.conversation_id, q.turn.index): r
        for q, r in zip(requests, raw.records, strict=True)
    }  # type: ignore[union-attr]
    for (conversation, index), r in by_turn.items():
        assert r.completed
        if index > 0:
            assert r.send_s >= by_turn[(conversation, index - 1)].chunk_times_s[-1]


class ScriptedTarget(Target):
    """Fails the way a broken target or server would: raising when called (not even a
    generator), or ending the stream without a token."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour

    def describe(self) -> dict[str, Any]:
        return {"kind": "scripted"}

    def stream(
        self, request: BenchRequest, request_id: str, timeout_s: float
    ) -> Iterator[StreamChunk]:
        if self.behaviour == "crash":
            raise RuntimeError("boom")
        return iter([StreamChunk(token_ids=(), text="")])


@pytest.mark.parametrize(("behaviour", "code"), [("crash", "INTERNAL"), ("empty", "NO_TOKENS")])
def test_target_failures_become_failed_records(behaviour: str, code: str) -> None:
    requests = RandomDataset(2, input_len=4, output_len=2, seed=0).generate()
    raw = run(ScriptedTarget(behaviour), requests, OpenLoop(math.inf), QUIET)
    assert [r.error_code for r in raw.records] == [code, code]
    assert build_result(raw, {}, {}).summary.completed == 0


def test_sweep_and_comparison_report(tmp_path: Path) -> None:
    dataset = RandomDataset(6, input_len=8, output_len=3, seed=0)
    sweep = RateSweep((100.0, 300.0), seed=2)
    files = []
    for label, itl_s in (("colocated", 0.002), ("disaggregated", 0.001)):
        target = FakeTarget(FakeTargetConfig(itl_s=itl_s))
        runs = [
            build_result(raw, dataset.describe(), target.describe(), SLO(tpot_ms=1.5))
            for raw in run_sweep(target, dataset.generate(), sweep, QUIET)
        ]
        assert [r.rate_rps for r in runs] == [100.0, 300.0]
        files.append(
            load_results(save_results(tmp_path / f"{label}.json", ResultFile(label, runs)))
        )

    comparison = markdown_comparison(files[0], files[1])
    assert "# colocated vs disaggregated" in comparison
    assert "## 100 req/s" in comparison and "## 300 req/s" in comparison
    assert "| metric | A: colocated | B: disaggregated | B / A |" in comparison
    written = write_report(files, tmp_path / "cmp")
    assert sorted(p.name for p in written) == ["cdf.png", "comparison.md", "sweep.png"]
    assert (tmp_path / "cmp" / "sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_load_results_rejects_other_files(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text('{"schema": "something-else"}')
    with pytest.raises(ValueError, match="not a Baton results file"):
        load_results(other)
    with pytest.raises(ValueError, match="cannot read"):
        load_results(tmp_path / "absent.json")


def test_progress_falls_back_to_a_line_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    from loadtest.runner import Progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    stream = io.StringIO()
    progress = Progress(2, enabled=True, desc="4 req/s", stream=stream)
    progress.update()
    progress.update()
    progress.close()
    assert stream.getvalue() == "\r4 req/s: 1/2 requests\r4 req/s: 2/2 requests\n"


class RecordingTarget(FakeTarget):
    """The fake server, remembering the prompt of every request it was sent."""

    def __init__(self, config: FakeTargetConfig | None = None) -> None:
        super().__init__(config)
        self.prompts: dict[str, tuple[int, ...]] = {}

    def stream(
        self, request: BenchRequest, request_id: str, timeout_s: float
    ) -> Iterator[StreamChunk]:
        assert request.prompt_token_ids is not None
        self.prompts[request_id] = tuple(request.prompt_token_ids)
        return super().stream(request, request_id, timeout_s)


def test_multi_turn_sends_the_streamed_answers_as_history() -> None:
    dataset = MultiTurnDataset(
        num_conversations=2, num_turns=3, user_len=4, answer_len=3, system_prompt_len=5, seed=1
    )
    requests = dataset.generate()
    target = RecordingTarget(FakeTargetConfig(itl_s=0.001))
    raw = run(target, requests, OpenLoop(math.inf), QUIET)
    assert all(r.completed for r in raw.records)
    sent = {
        (q.turn.conversation_id, q.turn.index): target.prompts[r.request_id]
        for q, r in zip(requests, raw.records, strict=True)
    }  # type: ignore[union-attr]
    for q in requests:
        assert q.turn is not None and q.prompt_token_ids is not None
        key = (q.turn.conversation_id, q.turn.index)
        if q.turn.index == 0:
            assert sent[key] == tuple(q.prompt_token_ids)
            continue
        # The fake answers 0, 1, 2: the history is those tokens, not the placeholders.
        previous = sent[(key[0], key[1] - 1)]
        assert sent[key] == previous + (0, 1, 2) + tuple(q.prompt_token_ids[-4:])
    assert len(sent[(0, 2)]) == 5 + 3 * 4 + 2 * 3


def test_multi_turn_keeps_the_placeholder_answer_after_a_failed_turn() -> None:
    dataset = MultiTurnDataset(num_conversations=1, num_turns=2, user_len=2, answer_len=3, seed=2)
    requests = dataset.generate()
    target = RecordingTarget(FakeTargetConfig(fail_request_ids=frozenset({"bench-0"})))
    raw = run(target, requests, OpenLoop(math.inf), QUIET)
    assert not raw.records[0].completed and raw.records[1].completed
    assert target.prompts["bench-1"] == tuple(requests[1].prompt_token_ids or ())
