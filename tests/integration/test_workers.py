"""PrefillWorker and DecodeWorker as plain classes (no Ray), the KV over gRPC loopback.

Covers what the cluster test cannot time precisely: a full decode pool makes the prefill
side wait and retry (not fail), an abort that overtakes its Commit undoes it, and every
scenario ends with all blocks free on both sides.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from decode_worker.messages import PrefillStatus, PrefillTask, TokenChunk
from decode_worker.worker import DecodeWorker, KVServiceSpec
from engine.config import EngineConfig
from engine.engine import Engine
from engine.presets import preset
from engine.sampling_params import SamplingParams
from kv_transfer.client import ClientConfig, KVTransferClient
from kv_transfer.layout import KVLayout
from kv_transfer.transport import TransportKind
from prefill_worker.worker import PrefillWorker

pytestmark = pytest.mark.timeout(120)

TOKEN = "test-token"
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def engine(num_kv_blocks: int) -> Engine:
    return Engine(
        EngineConfig(model=preset("tiny"), num_kv_blocks=num_kv_blocks, max_model_len=256)
    )


@pytest.fixture
def pair() -> Iterator[tuple[PrefillWorker, DecodeWorker]]:
    # Decode pool of 5 blocks: one 40-token prompt (3 blocks) decoding to 60 tokens (4 blocks)
    # fits; two prompts reserved at once (6 blocks) do not.
    decode = DecodeWorker("d", engine(5), KVServiceSpec(TOKEN, "127.0.0.1"))
    prefill = PrefillWorker("p", engine(32), TOKEN, TransportKind.GRPC)
    decode.start()
    prefill.start()
    yield prefill, decode
    prefill.stop()
    decode.stop()


def collect(decode: DecodeWorker, rid: str, timeout_s: float = 30.0) -> list[TokenChunk]:
    chunks: list[TokenChunk] = []
    decode.streams.attach(rid, lambda: None)  # a subscription of its own
    decode.streams.watch(rid, rid, timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        taken = decode.streams.take_ready(rid)
        if not taken:
            time.sleep(0.005)
            continue
        chunks += taken
        if taken[-1].finished:
            return chunks
    raise AssertionError(f"{rid} did not finish")


def wait_until(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def all_free(prefill: PrefillWorker, decode: DecodeWorker) -> bool:
    p, d = prefill.load(), decode.load()
    return (
        p.num_free_blocks == p.num_total_blocks
        and d.num_free_blocks == d.num_total_blocks
        and decode.num_active_leases() == 0
    )


def test_full_decode_pool_defers_the_second_request(
    pair: tuple[PrefillWorker, DecodeWorker],
) -> None:
    prefill, decode = pair
    prompts = {"a": list(range(1, 41)), "b": list(range(101, 141))}
    expected = engine(64).generate(list(prompts.values()), GREEDY)
    futures = {
        rid: prefill.submit(PrefillTask(rid, tuple(p), GREEDY, "", decode.kv_address, 30.0))
        for rid, p in prompts.items()
    }
    outputs = {rid: [t for c in collect(decode, rid) for t in c.token_ids] for rid in prompts}
    results = {rid: f.result(30) for rid, f in futures.items()}

    assert [outputs["a"], outputs["b"]] == expected
    assert {r.status for r in results.values()} == {PrefillStatus.COMMITTED}
    assert results["a"].first_token_id == expected[0][0]
    # b waited for a's blocks: its queue time covers a's whole decode.
    assert results["b"].queue_s > results["a"].queue_s
    wait_until(lambda: all_free(prefill, decode))
    # The step counters: two prefills apart; decode stepped each token after the first.
    p, d = prefill.load(), decode.load()
    assert p.num_steps == 2 and p.step_rows == 2 and p.step_s > 0
    assert d.num_steps >= 19 and 2 * 19 >= d.step_rows >= 19 and d.step_s > 0


def test_abort_before_the_commit_undoes_it(pair: tuple[PrefillWorker, DecodeWorker]) -> None:
    prefill, decode = pair
    assert decode.abort("early", "router gave up") is False  # nothing held yet
    result = prefill.submit(
        PrefillTask("early", tuple(range(1, 30)), GREEDY, "", decode.kv_address, 30.0)
    ).result(30)
    assert result.status is PrefillStatus.COMMITTED  # the transfer itself succeeded...
    wait_until(lambda: all_free(prefill, decode))  # ...but the decode side dropped it
    assert decode.load().num_running == 0


def test_abort_while_deferred_and_deadline(pair: tuple[PrefillWorker, DecodeWorker]) -> None:
    prefill, decode = pair
    # Another sender holds 4 of the 5 decode blocks under a lease: 3-block prompts must wait.
    with KVTransferClient(ClientConfig(decode.kv_address, TOKEN)) as other:
        held = other.reserve(
            "held", list(range(1, 61)), GREEDY, KVLayout.of_pool(decode.engine.pool), lease_s=30
        )
        assert len(held.block_ids) == 4
        y = prefill.submit(
            PrefillTask("y", tuple(range(50, 90)), GREEDY, "", decode.kv_address, 30.0)
        )
        z = prefill.submit(
            PrefillTask("z", tuple(range(60, 100)), GREEDY, "", decode.kv_address, 0.3)
        )
        wait_until(lambda: prefill.load().queue_depth == 2)  # both deferred
        assert prefill.abort("y", "client went away").result(10) is True
        assert y.result(10).status is PrefillStatus.ABORTED
        assert z.result(10).status is PrefillStatus.DEADLINE
        assert other.abort(held, "test over") is True
    wait_until(lambda: all_free(prefill, decode))


def test_decode_abort_mid_stream_frees_blocks(pair: tuple[PrefillWorker, DecodeWorker]) -> None:
    prefill, decode = pair
    params = SamplingParams(max_tokens=70, temperature=0.0, ignore_eos=True)  # 79 of 80 slots
    res = prefill.submit(PrefillTask("m", tuple(range(1, 10)), params, "", decode.kv_address, 30.0))
    assert res.result(30).status is PrefillStatus.COMMITTED
    decode.streams.attach("router", lambda: None)
    decode.streams.watch("router", "m", 30.0)
    wait_until(lambda: decode.load().num_running == 1)
    assert decode.abort("m", "aborted") is True
    wait_until(lambda: all_free(prefill, decode))
    chunks = decode.streams.take_ready("router")
    assert chunks[-1].finished and chunks[-1].error == "aborted"


def test_local_prefill_on_the_decode_worker(pair: tuple[PrefillWorker, DecodeWorker]) -> None:
    prefill, decode = pair
    prompt = list(range(5, 25))
    decode.submit_local("loc", prompt, GREEDY)
    tokens = [t for c in collect(decode, "loc") for t in c.token_ids]
    assert tokens == engine(64).generate([prompt], GREEDY)[0]
    with pytest.raises(ValueError, match="prompt is empty"):
        decode.submit_local("bad", [], GREEDY)
    wait_until(lambda: all_free(prefill, decode))


def test_unreachable_decode_worker_is_refused_and_its_client_closed(
    pair: tuple[PrefillWorker, DecodeWorker],
) -> None:
    prefill, decode = pair
    with socket.socket() as sock:  # a port nobody listens on: a decode worker that died
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    result = prefill.submit(PrefillTask("gone", (1, 2, 3), GREEDY, "", dead, 10.0)).result(30)
    assert (result.status, result.code) == (PrefillStatus.REJECTED, "UNAVAILABLE")
    wait_until(lambda: dead not in prefill.transport_kinds())
    # The live decode worker is still served, through a client of its own.
    ok = prefill.submit(PrefillTask("alive", (1, 2, 3), GREEDY, "", decode.kv_address, 30.0))
    collect(decode, "alive")
    assert ok.result(30).status is PrefillStatus.COMMITTED
    assert set(prefill.transport_kinds()) == {decode.kv_address}
    wait_until(lambda: all_free(prefill, decode))


def test_the_prefill_loop_does_not_wait_for_a_commit() -> None:
    """A slow Commit on the decode side holds up neither the next prefill nor its tokens:
    the loop sends Commit and goes on; the answer resolves the first request later."""
    decode = DecodeWorker("d", engine(16), KVServiceSpec(TOKEN, "127.0.0.1"))
    prefill = PrefillWorker("p", engine(32), TOKEN, TransportKind.GRPC)
    commit = decode.sink.commit
    committing = threading.Event()

    def slow_commit(request_id: str, first_token_id: int, logprobs: object = None) -> None:
        if request_id == "a":
            committing.set()
            time.sleep(1.0)
        commit(request_id, first_token_id, logprobs)  # type: ignore[arg-type]

    decode.sink.commit = slow_commit  # type: ignore[method-assign]
    decode.start()
    prefill.start()
    try:
        prompts = {"a": list(range(1, 41)), "b": list(range(101, 141))}
        outputs = engine(64).generate(list(prompts.values()), GREEDY)
        expected = dict(zip(prompts, outputs, strict=True))
        tasks = {rid: PrefillTask(rid, tuple(p), GREEDY, "", decode.kv_address, 30.0)
                 for rid, p in prompts.items()}  # fmt: skip
        a = prefill.submit(tasks["a"])
        wait_until(committing.is_set)  # a is prefilled, its Commit sleeping
        b = prefill.submit(tasks["b"])
        result_b = b.result(10)
        assert not a.done()  # b went through while a's Commit was still sleeping
        result_a = a.result(10)
        assert result_b.status is result_a.status is PrefillStatus.COMMITTED
        assert result_b.queue_s < 0.5
        assert result_a.transfer_s >= 1.0 > result_b.transfer_s
        for rid in prompts:
            assert [t for c in collect(decode, rid) for t in c.token_ids] == expected[rid]
        wait_until(lambda: all_free(prefill, decode))
    finally:
        prefill.stop()
        decode.stop()
