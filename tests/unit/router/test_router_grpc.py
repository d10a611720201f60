"""The router's gRPC server over loopback, with in-process fake workers (no Ray, no engine)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from baton.client import BatonClient, build_request
from baton.config import ClusterMode, Limits, PolicyName, RoutingConfig
from engine.tokenizer import ByteTokenizer
from protos import serving_pb2 as pb
from router.fake_workers import FakeDecode, FakePrefill
from router.policies import make_policy
from router.router import Router
from router.server import RouterServer

pytestmark = pytest.mark.timeout(60)


@dataclass
class Setup:
    server: RouterServer
    prefill: list[FakePrefill]
    decode: list[FakeDecode]

    @property
    def address(self) -> str:
        return self.server.address


@pytest.fixture
def make_setup() -> Iterator[Callable[..., Setup]]:
    servers: list[RouterServer] = []

    def make(
        token_delay_s: float = 0.0,
        prefill_delay_s: float = 0.0,
        refuse: tuple[str, str] | None = None,
        policy: PolicyName = PolicyName.ROUND_ROBIN,
        limits: Limits | None = None,
        auth_token: str | None = None,
        max_prefill_queue_tokens: int = 0,
    ) -> Setup:
        holder: dict[str, list] = {}

        def factory() -> Router:
            # Fakes use asyncio objects: build them on the router's loop.
            d = [FakeDecode("d0", token_delay_s, "d0:1"), FakeDecode("d1", token_delay_s, "d1:1")]
            p = [FakePrefill(d, "p0", prefill_delay_s, refuse)]
            holder["d"], holder["p"] = d, p
            return Router(
                mode=ClusterMode.DISAGGREGATED,
                policy=make_policy(
                    RoutingConfig(
                        policy=policy,
                        local_prefill_max_tokens=4,
                        max_prefill_queue_tokens=max_prefill_queue_tokens,
                    )
                ),
                prefill=p,
                decode=d,
                tokenizer=ByteTokenizer(),
                vocab_size=320,
                max_model_len=128,
                block_size=16,
                limits=limits or Limits(),
                load_poll_interval_s=0.05,
            )

        server = RouterServer(
            factory,
            auth_token=auth_token,
            max_request_bytes=(limits or Limits()).max_request_bytes,
        )
        server.start()
        servers.append(server)
        return Setup(server, holder["p"], holder["d"])

    yield make
    for s in servers:
        s.stop(grace_s=0.5)


def client_ids(worker_ids: list[str]) -> set[str]:
    """Workers see `<client id>@<attempt>`."""
    return {w.split("@")[0] for w in worker_ids}


def wait_until(pred: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_stream_in_order_with_usage_and_timings_last(make_setup: Callable[..., Setup]) -> None:
    s = make_setup()
    with BatonClient(s.address) as c:
        msgs = list(c.generate_stream("abcdef", max_tokens=5))
    assert [m.token_ids[0] for m in msgs] == [256, 97, 98, 99, 100]
    assert "".join(m.text for m in msgs) == "abcd"
    assert [m.finish_reason for m in msgs] == [0, 0, 0, 0, pb.FINISH_REASON_LENGTH]
    last = msgs[-1]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (7, 5)
    assert last.timings.mode == "disaggregated" and last.timings.prefill_worker == "p0"
    assert len({m.request_id for m in msgs}) == 1
    task = s.prefill[0].tasks[0]
    assert task.kv_address == "d0:1" and task.prompt_token_ids == (256, 97, 98, 99, 100, 101, 102)


def test_client_cancel_aborts_on_the_decode_worker(make_setup: Callable[..., Setup]) -> None:
    s = make_setup(token_delay_s=0.02)
    with BatonClient(s.address) as c:
        call = c.stream(build_request("hello", request_id="r1", max_tokens=100))
        next(iter(call))
        call.cancel()
    wait_until(lambda: "r1" in client_ids(s.decode[0].aborted))
    assert s.prefill[0].aborted == []  # committed already: only the decode side holds it
    wait_until(lambda: s.server.router.num_in_flight == 0)


def test_cancel_during_prefill_aborts_both_sides(make_setup: Callable[..., Setup]) -> None:
    s = make_setup(prefill_delay_s=1.0)
    with BatonClient(s.address) as c:
        call = c.stream(build_request("hello", request_id="r2", max_tokens=3))
        wait_until(lambda: len(s.prefill[0].tasks) == 1)
        call.cancel()
    wait_until(
        lambda: "r2" in client_ids(s.prefill[0].aborted) and "r2" in client_ids(s.decode[0].aborted)
    )


def test_deadline_exceeded_aborts_everywhere(make_setup: Callable[..., Setup]) -> None:
    s = make_setup(token_delay_s=0.05)
    with BatonClient(s.address) as c, pytest.raises(grpc.RpcError) as err:
        c.generate("hello", request_id="slow", max_tokens=100, timeout_s=0.3)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: "slow" in client_ids(s.decode[0].aborted))


def test_prefill_refusal_reaches_the_client_and_frees_the_decode_side(
    make_setup: Callable[..., Setup],
) -> None:
    s = make_setup(refuse=("RESOURCE_EXHAUSTED", "3 free KV blocks; request needs 9"))
    with BatonClient(s.address) as c, pytest.raises(grpc.RpcError) as err:
        c.generate("hello", request_id="full", max_tokens=3)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 free KV blocks" in err.value.details()
    wait_until(lambda: "full" in client_ids(s.decode[0].aborted))


def test_duplicate_request_id_in_flight(make_setup: Callable[..., Setup]) -> None:
    s = make_setup(token_delay_s=0.02)
    with BatonClient(s.address) as c:
        call = c.stream(build_request("hello", request_id="same", max_tokens=50))
        next(iter(call))
        with pytest.raises(grpc.RpcError) as err:
            c.generate("hello", request_id="same", max_tokens=2)
        call.cancel()
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id 'same' is already in flight" in err.value.details()


def test_in_flight_limit(make_setup: Callable[..., Setup]) -> None:
    s = make_setup(token_delay_s=0.02, limits=Limits(max_in_flight=1))
    with BatonClient(s.address) as c:
        call = c.stream(build_request("hello", max_tokens=50))
        next(iter(call))
        with pytest.raises(grpc.RpcError) as err:
            c.generate("hello", max_tokens=2)
        call.cancel()
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_in_flight" in err.value.details()


def test_request_larger_than_the_limit(make_setup: Callable[..., Setup]) -> None:
    s = make_setup(limits=Limits(max_request_bytes=1000))
    with BatonClient(s.address) as c, pytest.raises(grpc.RpcError) as err:
        c.generate("x" * 2000, max_tokens=2)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limits.max_request_bytes is 1000" in err.value.details()


def test_invalid_utf8_over_the_wire(make_setup: Callable[..., Setup]) -> None:
    s = make_setup()
    raw = pb.GenerateRequest(text="ab").SerializeToString().replace(b"ab", b"\xff\xfe")
    with grpc.insecure_channel(s.address) as ch:
        call = ch.unary_stream(
            "/baton.v1.Serving/Generate",
            request_serializer=lambda b: b,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            list(call(raw, timeout=5))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "text: invalid UTF-8 in a string field"
    assert s.prefill[0].tasks == []


def test_api_key(make_setup: Callable[..., Setup]) -> None:
    s = make_setup(auth_token="sesame")
    with BatonClient(s.address) as c, pytest.raises(grpc.RpcError) as err:
        c.generate("hi", max_tokens=1)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with BatonClient(s.address, api_key="sesame") as c:
        assert c.generate("hi", max_tokens=2).token_ids == [256, 104]


def test_reflection_lists_the_service(make_setup: Callable[..., Setup]) -> None:
    s = make_setup()
    with grpc.insecure_channel(s.address) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert "baton.v1.Serving" in services
        file = db.FindFileContainingSymbol("baton.v1.Serving")
        assert file.name == "protos/serving.proto"


def test_health_and_stats(make_setup: Callable[..., Setup]) -> None:
    s = make_setup()
    with BatonClient(s.address) as c:
        c.generate("hi", max_tokens=2)
        health = c.health()
        stats = c.stats()
    assert health.serving and [w.name for w in health.workers] == ["p0", "d0", "d1"]
    assert (stats.requests_total, stats.requests_failed, stats.policy) == (1, 0, "round_robin")
    assert stats.attempts_retried == 0
    assert [w.role for w in stats.workers] == ["prefill", "decode", "decode"]


def test_conditional_policy_prefills_short_prompts_on_the_decode_worker(
    make_setup: Callable[..., Setup],
) -> None:
    s = make_setup(policy=PolicyName.CONDITIONAL)
    with BatonClient(s.address) as c:
        short = c.generate("ab", max_tokens=2)  # 3 tokens <= local_prefill_max_tokens 4
        long = c.generate("abcdefgh", max_tokens=2)
    assert short.timings.mode == "decode_local" and short.timings.prefill_worker == ""
    assert long.timings.mode == "disaggregated"
    assert sum(len(d.local) for d in s.decode) == 1
    assert len(s.prefill[0].tasks) == 1


def test_conditional_policy_prefills_locally_while_the_prefill_worker_is_backed_up(
    make_setup: Callable[..., Setup],
) -> None:
    s = make_setup(policy=PolicyName.CONDITIONAL, prefill_delay_s=0.5, max_prefill_queue_tokens=8)
    results: dict[int, object] = {}

    def one(i: int) -> None:
        with BatonClient(s.address) as c:
            results[i] = c.generate("abcdefgh", max_tokens=2)  # 9 tokens, > 4: not short

    threads = []
    for i in range(3):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
        time.sleep(0.1)  # in order: the first reaches the prefill worker before the others
    for t in threads:
        t.join(30)
    modes = [results[i].timings.mode for i in range(3)]  # type: ignore[attr-defined]
    # The first goes to P (nothing pending); P then has 9 tokens pending >= 8, so the next
    # ones prefill on a decode worker with no local prefill of its own pending.
    assert modes[0] == "disaggregated" and "decode_local" in modes[1:], modes
    assert len(s.prefill[0].tasks) + sum(len(d.local) for d in s.decode) == 3
    router = s.server.router
    wait_until(lambda: router.num_in_flight == 0)
    assert [w.pending_prefill_tokens for w in router.prefill + router.decode] == [0, 0, 0]


def test_many_concurrent_streams(make_setup: Callable[..., Setup]) -> None:
    s = make_setup(token_delay_s=0.001)
    results: list[list[int]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        with BatonClient(s.address) as c:
            r = c.generate([i + 1, i + 2], max_tokens=6)
        with lock:
            results.append(r.token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted([[i + 1, i + 2] * 3 for i in range(32)])
    assert s.server.router.num_in_flight == 0


def test_a_reused_request_id_is_a_new_attempt_for_the_workers(
    make_setup: Callable[..., Setup],
) -> None:
    s = make_setup(token_delay_s=0.02)
    with BatonClient(s.address) as c:
        call = c.stream(build_request("hello", request_id="again", max_tokens=50))
        next(iter(call))
        call.cancel()
        wait_until(lambda: s.server.router.num_in_flight == 0)
        r = c.generate("hello", request_id="again", max_tokens=3)
    assert r.request_id == "again" and len(r.token_ids) == 3
    first, second = (t.request_id for t in s.prefill[0].tasks)
    assert first != second and first.startswith("again@") and second.startswith("again@")
    wait_until(lambda: first in s.decode[0].aborted + s.decode[1].aborted)
