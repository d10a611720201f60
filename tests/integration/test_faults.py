"""Faults injected into a running cluster on a local Ray; every one ends exact or clear.

One Ray session and one cluster for the module: 2 prefill + 2 decode workers, least-loaded
routing, `max_restarts` 3, 3 s leases. Both prefill workers carry `prefill_worker/faults.py`'s
`ChunkFaults`, which damage the KV chunks of a few named requests in chosen attempts only
(flip a byte, cut a byte, stall the sender), whichever worker runs them; every other
request's bytes are untouched.

    decode killed mid-stream    the stream resumes on the other decode worker from the
                                tokens already delivered: no token missing or twice
    prefill killed mid-transfer the decode side's reservation is freed (stream broken off,
                                the router's abort, the lease as backstop); the router
                                retries on the other prefill worker
    chunk corrupted / truncated the receiver's checksum / size check refuses it, the
                                request is retried; always-corrupt requests fail UNAVAILABLE
    worker restarted by Ray     it rejoins the pool by itself (new KV-transfer address
                                adopted, prefill workers connect to it) and serves
    router restarted            in-flight requests fail with a status; workers keep
                                running; a new router over them serves

After every scenario: every live worker's KV blocks are all free, no lease is active, no
request is queued or running, and the router has nothing in flight. The counts per
scenario go to results/faults.json (for docs/reliability.md), with a one-line summary.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

ray = pytest.importorskip("ray")

from baton.client import BatonClient, build_request  # noqa: E402
from baton.config import parse_config  # noqa: E402
from baton.launcher import Cluster, launch  # noqa: E402
from prefill_worker.faults import ChunkFaults, Fault, FaultRule  # noqa: E402

pytestmark = pytest.mark.timeout(150)  # the first test also launches the cluster

VOCAB = 320  # as the `checkpoint` fixture in conftest.py
MAX_LEN = 256
NUM_BLOCKS = 64
CALL_TIMEOUT_S = 60.0  # a client call still open after this counts as a hang
RESULTS = Path(__file__).resolve().parents[2] / "results" / "faults.json"

FAULT_RULES = (  # request id, fault, the router's attempts it hits
    FaultRule("flip-once", Fault.FLIP, (1,)),
    FaultRule("cut-once", Fault.TRUNCATE, (1,)),
    FaultRule("flip-always", Fault.FLIP, (1, 2, 3)),
    FaultRule("stall-once", Fault.STALL, (1,)),
)


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def counts() -> Iterator[dict[str, dict[str, int]]]:
    """Scenario -> faults_injected, requests_affected (of which requests_failed_clearly:
    ended with a gRPC status, the rest completed exactly), requests_lost, blocks_leaked,
    hangs."""
    table: dict[str, dict[str, int]] = {}
    yield table
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    total = {k: sum(s[k] for s in table.values()) for k in next(iter(table.values()), {})}
    print(  # noqa: T201 - the summary line the brief asks for
        f"\nfaults: {len(table)} scenarios, {total.get('faults_injected', 0)} faults, "
        f"{total.get('requests_affected', 0)} requests affected, "
        f"{total.get('requests_lost', 0)} lost, {total.get('blocks_leaked', 0)} blocks leaked, "
        f"{total.get('hangs', 0)} hangs -> {RESULTS}"
    )


@pytest.fixture(scope="module")
def cluster(checkpoint: tuple[Path, Any]) -> Iterator[Cluster]:
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    folder, _ = checkpoint
    cfg = {
        "model": {"path": str(folder)},
        "engine": {
            "dtype": "float32",
            "device": "cpu",
            "block_size": 16,
            "num_kv_blocks": NUM_BLOCKS,
            "max_num_seqs": 16,
            "max_num_batched_tokens": 128,
            "max_model_len": MAX_LEN,
        },
        "cluster": {
            "num_prefill": 2,
            "num_decode": 2,
            "max_restarts": 3,
            "routing": {"policy": "least_loaded"},
            "router": {"load_poll_interval_s": 0.05},
            "kv_transfer": {"lease_s": 3.0, "finish_timeout_s": 10.0},
            "limits": {"request_timeout_s": 45.0},
        },
    }
    faults = ChunkFaults(FAULT_RULES, stall_s=30.0)
    c = launch(parse_config(cfg), prefill_transport_factories={0: faults, 1: faults})
    yield c
    c.stop(grace_s=1.0)
    ray.shutdown()


def hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n
        )
    return out[0, len(prompt) :].tolist()


# ---- helpers ------------------------------------------------------------------------------


def router_state(cluster: Cluster) -> tuple[dict[str, tuple[bool, str]], int]:
    """Router's view: worker name -> (healthy, kv address), and its requests in flight."""

    async def get(router: Any) -> tuple[dict[str, tuple[bool, str]], int]:
        view = {
            s.client.name: (s.healthy, getattr(s.client, "kv_address", ""))
            for s in router.prefill + router.decode
        }
        return view, router.num_in_flight

    return cluster.server.call(get)  # type: ignore[attr-defined]


def wait_pool_whole(cluster: Cluster, timeout_s: float = 45.0) -> None:
    """Every worker alive (restarted ones re-initialised) and up in the router, which knows
    each decode worker's current KV-transfer address."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            addresses = ray.get([a.ready.remote() for a in cluster.decode_actors], timeout=5)
            ray.get([a.ready.remote() for a in cluster.prefill_actors], timeout=5)
            view, _ = router_state(cluster)
            if (
                all(ok for ok, _ in view.values())
                and [view[f"decode-{i}"][1] for i in range(len(addresses))] == addresses
            ):
                return
        except (ray.exceptions.RayError, TimeoutError):
            pass
        assert time.monotonic() < deadline, f"pool not whole: {router_state(cluster)}"
        time.sleep(0.2)


def settle(cluster: Cluster, timeout_s: float = 15.0) -> int:
    """Wait until every worker is idle with all blocks free; returns the blocks still held
    (0 when settled) after asserting no request is queued, running or in flight."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = ray.get([a.load.remote() for a in cluster.actors], timeout=10)
        leases = ray.get([a.num_active_leases.remote() for a in cluster.decode_actors], timeout=10)
        _, in_flight = router_state(cluster)
        held = sum(x.num_total_blocks - x.num_free_blocks for x in loads)
        busy = sum(x.queue_depth + x.num_running for x in loads) + sum(leases) + in_flight
        if (held == 0 and busy == 0) or time.monotonic() > deadline:
            state = [(x.name, x.num_free_blocks, x.queue_depth, x.num_running) for x in loads]
            assert busy == 0, f"requests left: {state}, leases {leases}, in flight {in_flight}"
            assert all(x.num_total_blocks == NUM_BLOCKS for x in loads)
            return held
        time.sleep(0.1)


def record(
    counts: dict[str, dict[str, int]],
    scenario: str,
    *,
    faults: int,
    affected: int,
    lost: int,
    leaked: int,
    hangs: int,
    failed_clearly: int = 0,
) -> None:
    """A scenario's row; written only when its test passed (its asserts back the numbers:
    affected requests exact or failed with a status, blocks all free, every call bounded)."""
    counts[scenario] = {
        "faults_injected": faults,
        "requests_affected": affected,
        "requests_failed_clearly": failed_clearly,
        "requests_lost": lost,
        "blocks_leaked": leaked,
        "hangs": hangs,
    }


def actor_running(actors: list[Any]) -> int:
    """Index of the one worker with a request queued or running."""
    loads = ray.get([a.load.remote() for a in actors], timeout=10)
    busy = [i for i, x in enumerate(loads) if x.num_running or x.queue_depth]
    assert len(busy) == 1, [(x.name, x.num_running, x.queue_depth) for x in loads]
    return busy[0]


def generate(cluster: Cluster, prompt: list[int], n: int, rid: str = "") -> Any:
    with BatonClient(cluster.address) as c:
        return c.generate(
            prompt,
            request_id=rid,
            max_tokens=n,
            temperature=0.0,
            ignore_eos=True,
            timeout_s=CALL_TIMEOUT_S,
        )


# ---- scenarios ----------------------------------------------------------------------------


def test_decode_killed_mid_stream_resumes_without_gaps_or_repeats(
    cluster: Cluster, checkpoint: tuple[Path, Any], counts: dict[str, dict[str, int]]
) -> None:
    _, model = checkpoint
    wait_pool_whole(cluster)
    prompt, n = [(7 * i) % 250 + 1 for i in range(24)], 200
    expected = hf_greedy(model, prompt, n)
    with BatonClient(cluster.address) as c:
        retried_before = c.stats().attempts_retried
        call = c.stream(
            build_request(prompt, max_tokens=n, temperature=0.0, ignore_eos=True), CALL_TIMEOUT_S
        )
        it = iter(call)
        messages = [next(it)]
        victim = actor_running(cluster.decode_actors)
        before = sum(len(m.token_ids) for m in messages)
        ray.kill(cluster.decode_actors[victim], no_restart=False)
        messages.extend(it)
        assert c.stats().attempts_retried == retried_before + 1  # the resume, counted

    got = [t for m in messages for t in m.token_ids]
    last = messages[-1]
    assert before < n  # the kill landed mid-stream
    assert got == expected  # nothing missing, nothing twice, exact after the resume
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt), n)
    assert last.timings.decode_worker == f"decode-{1 - victim}"
    wait_pool_whole(cluster)  # the killed worker came back by itself
    leaked = settle(cluster)
    assert leaked == 0
    record(counts, "decode_killed_mid_stream", faults=1, affected=1, lost=0, leaked=0, hangs=0)


def test_prefill_killed_mid_transfer_frees_the_reservation_and_retries(
    cluster: Cluster, checkpoint: tuple[Path, Any], counts: dict[str, dict[str, int]]
) -> None:
    _, model = checkpoint
    wait_pool_whole(cluster)
    prompt, n = [(13 * i) % 250 + 3 for i in range(70)], 8
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(generate(cluster, prompt, n, "stall-once")))
    t.start()
    # The stalled transfer: one prefill worker holds the request, one decode worker a lease.
    deadline = time.monotonic() + 20
    while True:
        leases = ray.get([a.num_active_leases.remote() for a in cluster.decode_actors])
        loads = ray.get([a.load.remote() for a in cluster.prefill_actors])
        busy = [i for i, x in enumerate(loads) if x.num_running]
        if sum(leases) == 1 and len(busy) == 1:
            break
        assert time.monotonic() < deadline, f"the stalled transfer never started: {loads}"
        time.sleep(0.02)
    (victim,) = busy
    ray.kill(cluster.prefill_actors[victim], no_restart=False)
    t.join(CALL_TIMEOUT_S)
    assert not t.is_alive()
    (r,) = result
    assert r.token_ids == hf_greedy(model, prompt, n)
    assert r.timings.prefill_worker == f"prefill-{1 - victim}"
    # The lease on the decode side ended (broken stream or abort) well before it would expire.
    assert sum(ray.get([a.num_active_leases.remote() for a in cluster.decode_actors])) == 0
    wait_pool_whole(cluster)
    leaked = settle(cluster)
    assert leaked == 0
    record(counts, "prefill_killed_mid_transfer", faults=1, affected=1, lost=0, leaked=0, hangs=0)


def test_corrupted_or_truncated_chunks_are_refused_and_retried(
    cluster: Cluster, checkpoint: tuple[Path, Any], counts: dict[str, dict[str, int]]
) -> None:
    _, model = checkpoint
    wait_pool_whole(cluster)
    rejected_before = sum(
        x["chunks_rejected"]
        for x in ray.get([a.kv_counters.remote() for a in cluster.decode_actors])
    )
    prompt, n = [(5 * i + 2) % 300 for i in range(40)], 10
    expected = hf_greedy(model, prompt, n)
    flipped = generate(cluster, prompt, n, "flip-once")
    cut = generate(cluster, prompt, n, "cut-once")
    assert flipped.token_ids == expected  # never decoded from the damaged KV
    assert cut.token_ids == expected
    with pytest.raises(grpc.RpcError) as err:  # damaged on every attempt: a clear failure
        generate(cluster, prompt, n, "flip-always")
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "after 3 attempts" in err.value.details()
    rejected = (
        sum(
            x["chunks_rejected"]
            for x in ray.get([a.kv_counters.remote() for a in cluster.decode_actors])
        )
        - rejected_before
    )
    assert rejected == 5  # 1 flipped + 1 cut + 3 flipped: each caught by the receiver
    leaked = settle(cluster)
    assert leaked == 0
    record(
        counts,
        "chunk_corrupted_or_truncated",
        faults=5,
        affected=3,
        lost=0,
        leaked=0,
        hangs=0,
        failed_clearly=1,
    )


def test_restarted_workers_rejoin_the_pool(
    cluster: Cluster, checkpoint: tuple[Path, Any], counts: dict[str, dict[str, int]]
) -> None:
    _, model = checkpoint
    wait_pool_whole(cluster)
    view_before, _ = router_state(cluster)
    ray.kill(cluster.decode_actors[1], no_restart=False)
    ray.kill(cluster.prefill_actors[1], no_restart=False)
    wait_pool_whole(cluster)  # no cluster restart, no call from the test to the router
    view_after, _ = router_state(cluster)
    assert view_after["decode-1"][1] != view_before["decode-1"][1]  # a new KV service

    prompts = [[(17 * i + 5 * j) % 300 + 1 for j in range(30 + i)] for i in range(6)]
    n = 6
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: generate(cluster, p, n), prompts))
    assert [r.token_ids for r in results] == [hf_greedy(model, p, n) for p in prompts]
    used = {(r.timings.prefill_worker, r.timings.decode_worker) for r in results}
    assert {d for _, d in used} == {"decode-0", "decode-1"}
    assert {p for p, _ in used} == {"prefill-0", "prefill-1"}
    leaked = settle(cluster)
    assert leaked == 0
    record(counts, "worker_restarted_rejoins", faults=2, affected=0, lost=0, leaked=0, hangs=0)


def test_router_restart_fails_in_flight_clearly_and_workers_keep_serving(
    cluster: Cluster, checkpoint: tuple[Path, Any], counts: dict[str, dict[str, int]]
) -> None:
    _, model = checkpoint
    wait_pool_whole(cluster)
    pids = ray.get([a.ready.remote() for a in cluster.decode_actors])
    prompt = list(range(1, 30))
    with BatonClient(cluster.address) as c:
        call = c.stream(
            build_request(prompt, max_tokens=200, temperature=0.0, ignore_eos=True),
            CALL_TIMEOUT_S,
        )
        it = iter(call)
        assert next(it).token_ids
        cluster.restart_router()
        with pytest.raises(grpc.RpcError) as err:
            for _ in it:
                pass
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert ray.get([a.ready.remote() for a in cluster.decode_actors]) == pids  # same workers
    r = generate(cluster, prompt, 8)
    assert r.token_ids == hf_greedy(model, prompt, 8)
    leaked = settle(cluster)
    assert leaked == 0
    record(
        counts,
        "router_restarted",
        faults=1,
        affected=1,
        lost=0,
        leaked=0,
        hangs=0,
        failed_clearly=1,
    )
