"""The cluster on a local Ray: workers as actors, the router's gRPC API, the client.

One Ray session for the module, made of two nodes on this machine
(`ray.cluster_utils.Cluster`), and three clusters launched on it, each on first use:

    disagg     1 prefill + 1 decode, placement spread: P and D on different nodes
    colocated  1 engine replica
    prefix     2 prefill + 2 decode, prefix-aware routing
    gpu_pack   1 prefill + 1 decode with gpus_per_worker 1 and placement pack, on the head
               node's two fake GPUs (the engines still run on CPU)

All serve one random-weight Llama checkpoint saved by transformers, so greedy tokens are
compared with transformers' `generate`. After every scenario, every worker's KV pool is
back to all blocks free (cached blocks count as free) and no reservation is left.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster as RayTestCluster  # noqa: E402

from baton.client import BatonClient, build_request  # noqa: E402
from baton.config import parse_config  # noqa: E402
from baton.launcher import Cluster, launch  # noqa: E402
from engine.tokenizer import ByteTokenizer  # noqa: E402
from protos import serving_pb2 as pb  # noqa: E402

pytestmark = pytest.mark.timeout(240)

VOCAB = 320  # as the `checkpoint` fixture in conftest.py
MAX_LEN = 256
NUM_BLOCKS = 64


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_two_nodes() -> Iterator[RayTestCluster]:
    if ray.is_initialized():
        ray.shutdown()
    nodes = RayTestCluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 2, "include_dashboard": False},  # fake GPUs
    )
    nodes.add_node(num_cpus=2)
    ray.init(address=nodes.address, logging_level="WARNING", log_to_driver=False)
    nodes.wait_for_nodes()
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n
        )
    return out[0, len(prompt) :].tolist()


def cluster_config(folder: Path, **cluster: Any) -> dict[str, Any]:
    return {
        "model": {"path": str(folder)},
        "engine": {
            "dtype": "float32",
            "device": "cpu",
            "block_size": 16,
            "num_kv_blocks": NUM_BLOCKS,
            "max_num_seqs": 16,
            "max_num_batched_tokens": 128,  # prompts above it are chunked
            "max_model_len": MAX_LEN,
        },
        "cluster": {"router": {"load_poll_interval_s": 0.05}, **cluster},
    }


@pytest.fixture(scope="module")
def clusters(
    ray_two_nodes: RayTestCluster, checkpoint: tuple[Path, Any]
) -> Iterator[Callable[[str], Cluster]]:
    folder, _ = checkpoint
    layouts = {
        # KV over gRPC between nodes, with the malloc settings that path can opt into
        "disagg": {
            "placement": "spread",
            "kv_transfer": {"bind_host": "node_ip", "keep_freed_memory": True},
        },
        "colocated": {"mode": "colocated", "num_decode": 1},
        "prefix": {"num_prefill": 2, "num_decode": 2, "routing": {"policy": "prefix_aware"}},
        "gpu_pack": {"gpus_per_worker": 1, "placement": "pack"},
        "conditional": {
            "routing": {
                "policy": "conditional",
                "inner_policy": "least_loaded",
                "local_prefill_max_tokens": 16,
                "max_prefill_queue_tokens": 64,
            }
        },
    }
    running: dict[str, Cluster] = {}

    def get(name: str) -> Cluster:
        if name not in running:
            cfg = cluster_config(folder, **layouts[name])
            running[name] = launch(parse_config(cfg))
        return running[name]

    yield get
    for c in running.values():
        c.stop(grace_s=1.0)


def wait_all_blocks_free(cluster: Cluster, timeout_s: float = 15.0) -> None:
    """Every worker: all KV blocks free (or cached), nothing reserved, nothing running."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = ray.get([a.load.remote() for a in cluster.actors], timeout=10)
        leases = ray.get([a.num_active_leases.remote() for a in cluster.decode_actors], timeout=10)
        state = [(x.name, x.num_free_blocks, x.num_total_blocks, x.num_running) for x in loads]
        if all(f == t == NUM_BLOCKS and r == 0 for _, f, t, r in state) and not any(leases):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks not freed: {state}, active leases {leases}")
        time.sleep(0.1)


PROMPTS = [
    list(range(1, 6)),
    [(7 * i) % 250 + 1 for i in range(40)],
    [(13 * i) % 250 + 3 for i in range(150)],  # chunked: above max_num_batched_tokens
    [42] * 17,
    [(5 * i + 2) % 300 for i in range(64)],
    [299, 3, 77],
]


def generate_all(client: BatonClient, prompts: list[list[int]], n: int) -> list[Any]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(
            pool.map(
                lambda p: client.generate(p, max_tokens=n, temperature=0.0, ignore_eos=True),
                prompts,
            )
        )


# ---- scenarios ----------------------------------------------------------------------------


def test_disaggregated_equals_colocated_and_transformers(
    clusters: Callable[[str], Cluster], checkpoint: tuple[Path, Any]
) -> None:
    _, model = checkpoint
    n = 12
    expected = [hf_greedy(model, p, n) for p in PROMPTS]
    disagg, colocated = clusters("disagg"), clusters("colocated")
    with BatonClient(disagg.address) as c:
        got_disagg = generate_all(c, PROMPTS, n)
    with BatonClient(colocated.address) as c:
        got_colocated = generate_all(c, PROMPTS, n)

    assert [r.token_ids for r in got_disagg] == expected
    assert [r.token_ids for r in got_colocated] == expected
    for r, p in zip(got_disagg, PROMPTS, strict=True):
        assert r.finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(p), n)
        assert r.timings.mode == "disaggregated"
        assert r.timings.prefill_ms > 0 and r.timings.ttft_ms >= r.timings.prefill_ms
    assert {r.timings.mode for r in got_colocated} == {"colocated"}
    wait_all_blocks_free(disagg)
    wait_all_blocks_free(colocated)


def hf_greedy_logprobs(
    model: Any, prompt: list[int], n: int, k: int
) -> list[tuple[int, float, list[int]]]:
    """Per generated token: (id, log_softmax of the raw logits at it, the k best ids)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            output_logits=True,
            return_dict_in_generate=True,
        )
    result = []
    for token, logits in zip(out.sequences[0, len(prompt) :].tolist(), out.logits, strict=True):
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        result.append((token, logprobs[token].item(), logprobs.topk(k).indices.tolist()))
    return result


@pytest.mark.parametrize("layout", ["disagg", "colocated"])
def test_logprobs_equal_transformers(
    clusters: Callable[[str], Cluster], checkpoint: tuple[Path, Any], layout: str
) -> None:
    """The first token's logprobs come from the prefill worker (through Commit when
    disaggregated), the rest from the decode engine: all as transformers computes them."""
    _, model = checkpoint
    n, k = 6, 3
    cluster = clusters(layout)
    with BatonClient(cluster.address) as c:
        for prompt in (PROMPTS[1], PROMPTS[2]):
            r = c.generate(prompt, max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=k)
            want = hf_greedy_logprobs(model, prompt, n, k)
            assert r.token_ids == [t for t, _, _ in want]
            assert [x.token_id for x in r.logprobs] == r.token_ids
            for got, (_, logprob, top) in zip(r.logprobs, want, strict=True):
                assert got.logprob == pytest.approx(logprob, abs=1e-4)
                assert [t.token_id for t in got.top] == top
                assert got.top[0].logprob == pytest.approx(got.logprob, abs=1e-6)  # greedy
        plain = c.generate(PROMPTS[1], max_tokens=2, temperature=0.0, ignore_eos=True)
        assert plain.logprobs == []  # only when asked for
        with pytest.raises(grpc.RpcError) as err:
            c.generate(PROMPTS[1], max_tokens=2, logprobs=21)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    wait_all_blocks_free(cluster)


def test_conditional_routing_is_exact_on_both_paths(
    clusters: Callable[[str], Cluster], checkpoint: tuple[Path, Any]
) -> None:
    """Short prompts, and long ones while the prefill worker is backed up, prefill on the
    decode worker; the rest go through the prefill worker: every answer as transformers'."""
    _, model = checkpoint
    n = 8
    prompts = PROMPTS * 2  # a burst: the prefill worker has >= 64 tokens pending at once
    cluster = clusters("conditional")
    with BatonClient(cluster.address) as c:
        got = generate_all(c, prompts, n)
    assert [r.token_ids for r in got] == [hf_greedy(model, p, n) for p in prompts]
    modes = {(len(p) <= 16, r.timings.mode) for p, r in zip(prompts, got, strict=True)}
    assert (True, "decode_local") in modes and (False, "disaggregated") in modes, modes
    assert (True, "disaggregated") not in modes  # short prompts never leave the decode worker
    wait_all_blocks_free(cluster)


def test_burst_larger_than_the_decode_pool_waits_and_stays_exact(
    clusters: Callable[[str], Cluster], checkpoint: tuple[Path, Any]
) -> None:
    """24 requests x 4 blocks at their longest against 64-block pools: reservations wait
    on the prefill side, the decode side preempts and recomputes; every answer is exact."""
    _, model = checkpoint
    prompts = [[(17 * i + 5 * j) % 300 + 1 for j in range(40 + i % 7)] for i in range(24)]
    n = 10
    cluster = clusters("disagg")
    with BatonClient(cluster.address) as c:
        got = generate_all(c, prompts, n)
    assert [r.token_ids for r in got] == [hf_greedy(model, p, n) for p in prompts]
    wait_all_blocks_free(cluster)


def test_streaming_order_and_text(clusters: Callable[[str], Cluster]) -> None:
    cluster = clusters("disagg")
    prompt = "Streaming, in order: \u00e9t\u00e9 \u2713"
    with BatonClient(cluster.address) as c:
        messages = list(c.generate_stream(prompt, max_tokens=24, temperature=0.0, ignore_eos=True))
        whole = c.generate(prompt, max_tokens=24, temperature=0.0, ignore_eos=True)

    ids = [t for m in messages for t in m.token_ids]
    assert len(messages) >= 2
    assert ids == whole.token_ids and len(ids) == 24
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    last = messages[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 24
    assert last.usage.prompt_tokens == len(ByteTokenizer().encode(prompt))
    # Text deltas add up to the decoded tokens (the byte tokenizer's decode is context-free).
    assert "".join(m.text for m in messages) == ByteTokenizer().decode(ids)
    t = last.timings
    assert t.prefill_worker == "prefill-0" and t.decode_worker == "decode-0"
    assert t.ttft_ms <= t.total_ms
    wait_all_blocks_free(cluster)


def test_cancellation_frees_blocks_on_both_sides(clusters: Callable[[str], Cluster]) -> None:
    cluster = clusters("disagg")
    with BatonClient(cluster.address) as c:
        # Cancelled mid-decode, after the first tokens arrived.
        call = c.stream(
            build_request(list(range(1, 60)), max_tokens=200, temperature=0.0, ignore_eos=True)
        )
        first = next(iter(call))
        assert first.token_ids
        call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:
                pass
        assert err.value.code() is grpc.StatusCode.CANCELLED
        wait_all_blocks_free(cluster)

        # Cancelled while the prompt is still being prefilled or transferred: several at once.
        calls = [
            c.stream(build_request([i + 1] * 200, max_tokens=50, temperature=0.0, ignore_eos=True))
            for i in range(4)
        ]
        time.sleep(0.05)
        for call in calls:
            call.cancel()
        wait_all_blocks_free(cluster)

        # A deadline that passes mid-request: DEADLINE_EXCEEDED, and nothing is left behind.
        with pytest.raises(grpc.RpcError) as err:
            c.generate(
                list(range(1, 100)), max_tokens=240, temperature=0.0, ignore_eos=True, timeout_s=0.3
            )
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        wait_all_blocks_free(cluster)

        # The cluster still serves afterwards.
        assert len(c.generate([5, 6, 7], max_tokens=3, temperature=0.0).token_ids) == 3
    wait_all_blocks_free(cluster)


def test_prefix_aware_keeps_a_shared_prefix_on_one_prefill_worker(
    clusters: Callable[[str], Cluster], checkpoint: tuple[Path, Any]
) -> None:
    _, model = checkpoint
    cluster = clusters("prefix")
    shared = [(11 * i) % 250 + 1 for i in range(96)]  # 6 full blocks
    prompts = [shared + [200 + i, 3 + i] for i in range(6)]
    with BatonClient(cluster.address) as c:
        results = [c.generate(p, max_tokens=4, temperature=0.0, ignore_eos=True) for p in prompts]
        # Unrelated traffic is balanced away from the busy... here idle, worker: no prefix.
        stats = c.stats()

    assert [r.token_ids for r in results] == [hf_greedy(model, p, 4) for p in prompts]
    workers = {r.timings.prefill_worker for r in results}
    assert len(workers) == 1, workers
    assert results[0].usage.cached_tokens == 0
    assert [r.usage.cached_tokens for r in results[1:]] == [96] * 5
    by_name = {w.name: w for w in stats.workers}
    (chosen,) = workers
    other = "prefill-1" if chosen == "prefill-0" else "prefill-0"
    assert by_name[chosen].prefix_hit_tokens == 96 * 5
    assert by_name[other].prefix_queried_tokens == 0
    wait_all_blocks_free(cluster)


def test_two_nodes_put_prefill_and_decode_apart_over_grpc(
    clusters: Callable[[str], Cluster],
) -> None:
    cluster = clusters("disagg")
    (p_actor,), (d_actor,) = cluster.prefill_actors, cluster.decode_actors
    with BatonClient(cluster.address) as c:
        r = c.generate(list(range(1, 40)), max_tokens=4, temperature=0.0)
        stats = c.stats()
    assert r.usage.completion_tokens == 4
    nodes = {w.name: w.node_id for w in stats.workers}
    assert nodes["prefill-0"] != nodes["decode-0"]
    kinds = ray.get(p_actor.transport_kinds.remote())
    kv_address = {w.name: w.kv_address for w in stats.workers}["decode-0"]
    assert kinds == {kv_address: "grpc"}
    counters = ray.get(d_actor.kv_counters.remote())
    assert counters["bytes_received"] > 0 and counters["transfers_committed"] >= 1
    # kv_transfer.keep_freed_memory (on in this layout, off by default): both applied it
    applied = [
        a.__ray_call__.remote(lambda actor: actor.keeps_freed_memory) for a in (p_actor, d_actor)
    ]
    assert ray.get(applied) == [True, True]
    (other,) = clusters("colocated").decode_actors
    assert ray.get(other.__ray_call__.remote(lambda actor: actor.keeps_freed_memory)) is False
    wait_all_blocks_free(cluster)


def test_invalid_requests_touch_no_worker(
    clusters: Callable[[str], Cluster], requests_done: Callable
) -> None:
    cluster = clusters("disagg")
    with BatonClient(cluster.address) as c:
        before = requests_done(c)  # an earlier test's request may still count
        for kwargs, needle in (
            ({"prompt": [VOCAB + 5]}, "token_ids.ids"),
            ({"prompt": [1] * MAX_LEN}, "context"),
            ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
            ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ):
            prompt = kwargs.pop("prompt")
            with pytest.raises(grpc.RpcError) as err:
                c.generate(prompt, **kwargs)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert needle in err.value.details()
        after = requests_done(c)
    assert after == before


def test_concurrent_duplicate_request_id_is_refused(clusters: Callable[[str], Cluster]) -> None:
    cluster = clusters("disagg")
    errors: list[grpc.StatusCode] = []
    with BatonClient(cluster.address) as c:
        call = c.stream(build_request([1, 2, 3], request_id="dup", max_tokens=100, ignore_eos=True))
        next(iter(call))

        def again() -> None:
            try:
                c.generate([1, 2, 3], request_id="dup", max_tokens=2)
            except grpc.RpcError as e:
                errors.append(e.code())

        t = threading.Thread(target=again)
        t.start()
        t.join(30)
        call.cancel()
    assert errors == [grpc.StatusCode.INVALID_ARGUMENT]
    wait_all_blocks_free(cluster)


def test_gpu_placement_packs_a_pair_on_one_node(clusters: Callable[[str], Cluster]) -> None:
    cluster = clusters("gpu_pack")
    with BatonClient(cluster.address) as c:
        r = c.generate([1, 2, 3, 4], max_tokens=3, temperature=0.0)
        stats = c.stats()
    assert len(r.token_ids) == 3
    nodes = {w.name: w.node_id for w in stats.workers}
    assert nodes["prefill-0"] == nodes["decode-0"]
    assert ray.available_resources().get("GPU", 0) == 0  # both fake GPUs are taken
    wait_all_blocks_free(cluster)


def test_layout_needing_more_gpus_than_the_cluster_is_refused(
    ray_two_nodes: RayTestCluster, checkpoint: tuple[Path, Any]
) -> None:
    folder, _ = checkpoint
    cfg = parse_config(cluster_config(folder, num_prefill=2, num_decode=2, gpus_per_worker=1))
    with pytest.raises(ValueError, match=r"needs 4 GPUs .*cluster.gpus_per_worker 1.* has 2"):
        launch(cfg)
