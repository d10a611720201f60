"""The decode worker's output buffers: subscriptions, coalescing, ending, deadlines, orphans."""

from __future__ import annotations

import time

from decode_worker.streams import OutputStreams
from engine.engine import RequestOutput
from engine.sequence import FinishReason


def out(rid: str, token: int, n: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(
        rid, [token], chr(token), finished, FinishReason.LENGTH if finished else None, 3, 1, n, []
    )


def test_outputs_before_the_watch_are_kept_and_coalesced() -> None:
    s = OutputStreams()
    woken: list[int] = []
    s.attach("r", lambda: woken.append(1))
    assert woken == [1]
    s.mark_start("a")
    s.publish([out("a", 65, 1), out("b", 90, 1)])
    s.publish([out("a", 66, 2)])
    assert woken == [1] and s.take_ready("r") == []  # nobody watches them yet
    s.watch("r", "a", 60.0)
    assert woken == [1, 1]
    [chunk] = s.take_ready("r")
    assert (chunk.request_id, chunk.token_ids, chunk.text, chunk.finished) == (
        "a",
        (65, 66),
        "AB",
        False,
    )
    assert chunk.num_output_tokens == 2 and chunk.decode_queue_s >= 0
    assert s.take_ready("r") == []
    s.publish([out("a", 67, 3, finished=True)])
    assert woken == [1, 1, 1]
    [last] = s.take_ready("r")
    assert last.finished and last.finish_reason == "length" and last.error == ""
    assert last.decode_queue_s == 0.0  # only the first chunk carries the queue time
    assert len(s) == 1  # only "b" is left


def test_one_wake_and_one_take_per_step_for_many_requests() -> None:
    s = OutputStreams()
    woken: list[int] = []
    s.attach("r", lambda: woken.append(1))
    for i in range(50):
        s.watch("r", f"q{i}", 60.0)
    woken.clear()
    s.publish([out(f"q{i}", 65, 1) for i in range(50)])
    assert woken == [1]
    chunks = s.take_ready("r")
    assert [c.request_id for c in chunks] == [f"q{i}" for i in range(50)]
    assert all(c.token_ids == (65,) for c in chunks)


def test_subscriptions_only_see_their_own_requests() -> None:
    s = OutputStreams()
    s.attach("r1", lambda: None)
    s.attach("r2", lambda: None)
    s.watch("r1", "a", 60.0)
    s.watch("r2", "b", 60.0)
    s.publish([out("a", 65, 1), out("b", 66, 1)])
    assert [c.request_id for c in s.take_ready("r1")] == ["a"]
    assert [c.request_id for c in s.take_ready("r2")] == ["b"]
    assert s.take_ready("nobody") == []


def test_close_ends_a_watched_stream_with_the_error() -> None:
    s = OutputStreams()
    s.attach("r", lambda: None)
    s.watch("r", "a", 60.0)
    s.publish([out("a", 65, 1)])
    s.close("a", "aborted")
    [chunk] = s.take_ready("r")
    assert chunk.finished and chunk.error == "aborted" and chunk.token_ids == (65,)
    assert len(s) == 0


def test_a_watch_after_the_abort_still_gets_the_error() -> None:
    s = OutputStreams()
    s.close("a", "aborted")  # the abort overtook the watch
    s.attach("r", lambda: None)
    s.watch("r", "a", 60.0)
    [chunk] = s.take_ready("r")
    assert chunk.finished and chunk.error == "aborted"
    assert len(s) == 0


def test_expired_lists_open_watched_streams_past_their_deadline() -> None:
    s = OutputStreams()
    s.attach("r", lambda: None)
    s.watch("r", "late", 0.0)
    s.watch("r", "early", 60.0)
    s.watch("r", "closed", 0.0)
    s.close("closed", "aborted")
    assert s.expired("r", time.monotonic()) == ["late"]
    assert s.expired("other", time.monotonic()) == []


def test_detach_returns_the_unfinished_requests_and_unwatches_them() -> None:
    s = OutputStreams(orphan_ttl_s=0.0)
    s.attach("r", lambda: None)
    s.watch("r", "a", 60.0)
    s.watch("r", "b", 60.0)
    s.publish([out("b", 65, 1, finished=True)])
    assert s.take_ready("r")[0].finished
    assert s.detach("r") == ["a"]
    assert s.detach("r") == []
    assert s.drop_orphans() == ["a"]  # nobody watches it now: swept like any orphan


def test_unwatched_streams_expire_closed_ones_silently() -> None:
    s = OutputStreams(orphan_ttl_s=0.0)
    s.publish([out("a", 65, 1)])
    s.close("gone", "aborted")
    s.attach("r", lambda: None)
    s.watch("r", "b", 60.0)
    assert s.drop_orphans() == ["a"]
    assert len(s) == 1


def test_logprobs_follow_their_tokens_through_coalescing() -> None:
    from engine.sampler import TokenLogprobs

    s = OutputStreams()
    s.attach("r", lambda: None)
    s.watch("r", "a", 60.0)
    lp = [TokenLogprobs(65 + i, -0.1 * i, ((65 + i, -0.1 * i), (3, -4.0))) for i in range(3)]
    s.publish([RequestOutput("a", [65], "A", False, None, 3, 1, 1, [lp[0]])])
    s.publish([RequestOutput("a", [66], "B", False, None, 3, 1, 2, [lp[1]])])
    [first] = s.take_ready("r")
    assert first.logprobs == tuple((x.logprob, x.top) for x in lp[:2])
    s.publish([RequestOutput("a", [67], "C", True, FinishReason.LENGTH, 3, 1, 3, [lp[2]])])
    [last] = s.take_ready("r")
    both = first.then(last)
    assert both.token_ids == (65, 66, 67) and len(both.logprobs) == 3 and both.finished
