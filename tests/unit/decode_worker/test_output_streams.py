"""The decode worker's per-request output buffers: coalescing, ending, orphans."""

from __future__ import annotations

from decode_worker.streams import OutputStreams
from engine.engine import RequestOutput
from engine.sequence import FinishReason


def out(rid: str, token: int, n: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(
        rid, [token], chr(token), finished, FinishReason.LENGTH if finished else None, 3, 1, n, []
    )


def test_outputs_before_the_consumer_are_kept_and_coalesced() -> None:
    s = OutputStreams()
    s.mark_start("a")
    s.publish([out("a", 65, 1), out("b", 90, 1)])
    s.publish([out("a", 66, 2)])
    woken: list[int] = []
    s.claim("a", lambda: woken.append(1))
    assert woken == [1]
    chunk = s.take("a")
    assert chunk is not None
    assert (chunk.token_ids, chunk.text, chunk.finished, chunk.num_output_tokens) == (
        (65, 66),
        "AB",
        False,
        2,
    )
    assert chunk.decode_queue_s >= 0
    assert s.take("a") is None
    s.publish([out("a", 67, 3, finished=True)])
    assert woken == [1, 1]
    last = s.take("a")
    assert (
        last is not None and last.finished and last.finish_reason == "length" and last.error == ""
    )
    assert len(s) == 1  # only "b" is left


def test_close_ends_a_claimed_stream_with_the_error() -> None:
    s = OutputStreams()
    s.claim("a", lambda: None)
    s.close("a", "aborted")
    chunk = s.take("a")
    assert (
        chunk is not None and chunk.finished and chunk.error == "aborted" and chunk.token_ids == ()
    )
    assert len(s) == 0


def test_unclaimed_streams_expire() -> None:
    s = OutputStreams(orphan_ttl_s=0.0)
    s.publish([out("a", 65, 1)])
    s.claim("b", lambda: None)
    assert s.drop_orphans() == ["a"]
    assert len(s) == 1
