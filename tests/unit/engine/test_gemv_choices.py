"""The host-wide record of batch-1 kernel choices: recorded once, read by every later engine,
taken under a lock by engines starting together, and never a reason for a start to fail."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from engine.gemv_choices import Choice, HostChoices, ShapeKey

QKV: ShapeKey = (6144, 4096, False)
O_PROJ: ShapeKey = (4096, 4096, False)
LM_HEAD: ShapeKey = (128256, 4096, False)
KEY = "NVIDIA H200; torch 2.x; triton 3.x; candidates [...]"


class Timer:
    """A stand-in for gemv.choose: counts what it times, answers from a table."""

    def __init__(self, answers: dict[ShapeKey, Choice], delay_s: float = 0.0) -> None:
        self.answers = answers
        self.delay_s = delay_s
        self.timed: list[ShapeKey] = []

    def __call__(self, shape: ShapeKey) -> Choice:
        time.sleep(self.delay_s)
        self.timed.append(shape)
        return self.answers[shape]


def never(shape: ShapeKey) -> Choice:
    raise AssertionError(f"{shape} was timed again")


def test_the_first_engine_records_and_later_ones_read(tmp_path: Path) -> None:
    first = Timer({QKV: (8, 512, 4), O_PROJ: (8, 1024, 8), LM_HEAD: None})
    got = HostChoices(KEY, tmp_path).choose([QKV, O_PROJ, LM_HEAD, QKV], first)
    assert got == {QKV: (8, 512, 4), O_PROJ: (8, 1024, 8), LM_HEAD: None}
    assert first.timed == [QKV, O_PROJ, LM_HEAD]  # each shape once
    assert HostChoices(KEY, tmp_path).choose([LM_HEAD, QKV], never) == {
        LM_HEAD: None,
        QKV: (8, 512, 4),
    }
    (path,) = tmp_path.glob("gemv-*.json")
    data = json.loads(path.read_text())
    assert data["key"] == KEY
    assert data["choices"] == {"6144x4096x0": [8, 512, 4], "4096x4096x0": [8, 1024, 8],
                               "128256x4096x0": None}  # fmt: skip


def test_only_shapes_not_recorded_are_timed_and_added(tmp_path: Path) -> None:
    HostChoices(KEY, tmp_path).choose([QKV], Timer({QKV: None}))
    second = Timer({O_PROJ: (16, 512, 8)})
    got = HostChoices(KEY, tmp_path).choose([QKV, O_PROJ], second)
    assert got == {QKV: None, O_PROJ: (16, 512, 8)} and second.timed == [O_PROJ]
    assert HostChoices(KEY, tmp_path).choose([QKV, O_PROJ], never) == got


def test_another_gpu_or_software_times_again(tmp_path: Path) -> None:
    HostChoices(KEY, tmp_path).choose([QKV], Timer({QKV: None}))
    other = Timer({QKV: (8, 512, 4)})
    assert HostChoices("NVIDIA H100; ...", tmp_path).choose([QKV], other) == {QKV: (8, 512, 4)}
    assert other.timed == [QKV] and len(list(tmp_path.glob("gemv-*.json"))) == 2


@pytest.mark.parametrize(
    "content",
    [
        '{"key": "',
        "[]",
        json.dumps({"key": KEY, "choices": {"6144x4096x0": [8]}}),
        '{"key": "someone else", "choices": {}}',
    ],  # fmt: skip
    ids=["truncated", "not an object", "bad choice", "another combination"],
)
def test_a_bad_file_is_ignored_and_rewritten(tmp_path: Path, content: str) -> None:
    store = HostChoices(KEY, tmp_path)
    store.path.write_text(content)
    timer = Timer({QKV: (8, 512, 4)})
    assert store.choose([QKV], timer) == {QKV: (8, 512, 4)} and timer.timed == [QKV]
    assert HostChoices(KEY, tmp_path).choose([QKV], never) == {QKV: (8, 512, 4)}


def test_engines_starting_together_take_the_first_ones_choices(tmp_path: Path) -> None:
    # Each engine would time its own way (different answers); the lock makes one time and
    # the others read what it recorded.
    timers = [Timer({QKV: (8, 512, 4) if i % 2 else None, O_PROJ: (4, 1024, 4)}, 0.02)
              for i in range(6)]  # fmt: skip
    results: list[dict[ShapeKey, Choice]] = [{} for _ in timers]

    def start(i: int) -> None:
        results[i] = HostChoices(KEY, tmp_path).choose([QKV, O_PROJ], timers[i])

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(timers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(r == results[0] for r in results) and len(results[0]) == 2
    assert sum(len(t.timed) for t in timers) == 2  # one engine timed both shapes


def test_an_unusable_folder_falls_back_to_timing_here(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    timer = Timer({QKV: (8, 512, 4)})
    assert HostChoices(KEY, blocker).choose([QKV], timer) == {QKV: (8, 512, 4)}
    assert timer.timed == [QKV]


def test_the_folder_comes_from_the_environment(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("BATON_CACHE_DIR", str(tmp_path / "cache"))
    assert HostChoices(KEY).path.parent == tmp_path / "cache"


def test_without_a_home_directory_the_temp_folder_serves(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.delenv("BATON_CACHE_DIR", raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert HostChoices(KEY).path.parent.name == "baton-cache"


def test_a_lock_held_too_long_is_given_up_and_timed_here(tmp_path: Path) -> None:
    import fcntl

    store = HostChoices(KEY, tmp_path, lock_timeout_s=0.2)
    with open(store.path.with_suffix(".lock"), "a") as held:  # another engine, stuck
        fcntl.flock(held, fcntl.LOCK_EX)
        timer = Timer({QKV: (8, 512, 4)})
        start = time.monotonic()
        assert store.choose([QKV], timer) == {QKV: (8, 512, 4)} and timer.timed == [QKV]
        assert time.monotonic() - start < 5
    assert not store.path.exists()  # nothing recorded without the lock
