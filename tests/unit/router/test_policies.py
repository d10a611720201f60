"""Each routing policy's exact decisions on hand-built worker views."""

from __future__ import annotations

import pytest

from baton.config import PolicyName, RoutingConfig
from router.policies import (
    Conditional,
    LeastLoaded,
    NoWorker,
    PrefixAware,
    RoundRobin,
    Route,
    RouteQuery,
    WorkerView,
    make_policy,
)
from router.prefix_index import PrefixIndex, prompt_block_hashes

Q = RouteQuery(num_prompt_tokens=100)


def views(*specs: dict) -> list[WorkerView]:
    return [WorkerView(index=i, **s) for i, s in enumerate(specs)]


def test_round_robin_cycles_each_tier_and_skips_unhealthy() -> None:
    rr = RoundRobin(RoutingConfig())
    p, d = views({}, {}, {}), views({}, {})
    assert [rr.choose(Q, p, d) for _ in range(4)] == [
        Route(0, 0),
        Route(1, 1),
        Route(0, 2),
        Route(1, 0),
    ]
    sick = views({}, {"healthy": False}, {})
    assert [rr.choose(Q, sick, d).prefill for _ in range(3)] == [0, 2, 0]  # counter at 4


def test_round_robin_colocated_has_no_prefill() -> None:
    rr = RoundRobin(RoutingConfig())
    assert rr.choose(Q, [], views({}, {})) == Route(0, None)


def test_least_loaded_counts_queue_running_and_in_flight_then_free_blocks() -> None:
    ll = LeastLoaded(RoutingConfig())
    p = views(
        {"queue_depth": 3}, {"in_flight": 1, "num_running": 1}, {"queue_depth": 1, "in_flight": 1}
    )
    d = views({"num_running": 2, "num_free_blocks": 10}, {"num_running": 2, "num_free_blocks": 50})
    assert ll.choose(Q, p, d) == Route(1, 1)  # P: loads 3, 2, 2 -> lowest index; D: more free KV


def test_no_healthy_worker_raises() -> None:
    with pytest.raises(NoWorker, match="decode"):
        LeastLoaded(RoutingConfig()).choose(Q, views({}), views({"healthy": False}))


def test_prefix_aware_prefers_longest_prefix() -> None:
    pa = PrefixAware(RoutingConfig())
    p = views({"prefix_match_tokens": 16}, {"prefix_match_tokens": 64, "queue_depth": 2}, {})
    d = views({}, {"prefix_match_tokens": 32})
    assert pa.choose(Q, p, d) == Route(1, 1)


def test_prefix_aware_falls_back_to_load_when_imbalanced() -> None:
    cfg = RoutingConfig(balance_abs_threshold=4, balance_rel_threshold=1.5)
    pa = PrefixAware(cfg)
    # load 6 vs least 1: 6 > 1 + 4 and 6 > 1.5 -> imbalanced, go to the least loaded.
    p = views({"prefix_match_tokens": 64, "queue_depth": 6}, {"queue_depth": 1}, {"queue_depth": 3})
    assert pa.choose(Q, p, views({})).prefill == 1
    # load 5 vs 1: 5 > 1 + 4 is false -> keep the cache hit.
    p = views({"prefix_match_tokens": 64, "queue_depth": 5}, {"queue_depth": 1})
    assert pa.choose(Q, p, views({})).prefill == 0


def test_prefix_aware_without_any_hit_is_least_loaded() -> None:
    pa = PrefixAware(RoutingConfig())
    p = views({"queue_depth": 2}, {"queue_depth": 1}, {"queue_depth": 1})
    assert pa.choose(Q, p, views({})).prefill == 1


def test_conditional_keeps_short_uncached_prompts_on_the_decode_worker() -> None:
    cond = Conditional(
        RoutingConfig(local_prefill_max_tokens=32, inner_policy=PolicyName.LEAST_LOADED)
    )
    p = views({}, {})
    d = views({"num_running": 1}, {"prefix_match_tokens": 80})
    # Least-loaded picks D1 (load 0); 100 - 80 = 20 uncached <= 32: prefill there.
    assert cond.choose(Q, p, d) == Route(1, None)
    assert cond.choose(RouteQuery(33), p, views({})) == Route(0, 0)  # 33 > 32: disaggregate
    assert cond.choose(RouteQuery(32), p, views({})) == Route(0, None)


def test_conditional_prefills_locally_when_the_prefill_tier_is_backed_up() -> None:
    cond = Conditional(
        RoutingConfig(
            local_prefill_max_tokens=0,
            inner_policy=PolicyName.LEAST_LOADED,
            max_prefill_queue_tokens=4096,
        )
    )
    d = views({})
    # P0 has less than the backlog pending: disaggregate.
    assert cond.choose(Q, views({"pending_prefill_tokens": 4095}), d) == Route(0, 0)
    # At the backlog: prefill on the decode worker, which has nothing pending.
    assert cond.choose(Q, views({"pending_prefill_tokens": 4096}), d) == Route(0, None)
    # ... unless the decode worker already has a local prefill pending.
    busy_d = views({"pending_prefill_tokens": 1})
    assert cond.choose(Q, views({"pending_prefill_tokens": 9999}), busy_d) == Route(0, 0)
    # The backlog is the inner policy's chosen prefill worker's, not the tier's worst.
    p = views({"pending_prefill_tokens": 9999, "in_flight": 5}, {"pending_prefill_tokens": 10})
    assert cond.choose(Q, p, d) == Route(0, 1)
    # 0: the rule is off.
    off = Conditional(
        RoutingConfig(local_prefill_max_tokens=0, inner_policy=PolicyName.LEAST_LOADED)
    )
    assert off.choose(Q, views({"pending_prefill_tokens": 10**6}), d) == Route(0, 0)


def test_make_policy_by_name() -> None:
    for name, cls in (
        (PolicyName.ROUND_ROBIN, RoundRobin),
        (PolicyName.LEAST_LOADED, LeastLoaded),
        (PolicyName.PREFIX_AWARE, PrefixAware),
        (PolicyName.CONDITIONAL, Conditional),
    ):
        assert type(make_policy(RoutingConfig(policy=name))) is cls


def test_prefix_index_matches_leading_blocks_and_evicts_lru() -> None:
    a = prompt_block_hashes(list(range(50)), 16, "")  # 49 hashable tokens: 3 blocks
    b = prompt_block_hashes(list(range(32)) + [999] * 18, 16, "")
    salted = prompt_block_hashes(list(range(50)), 16, "tenant")
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    idx = PrefixIndex(capacity_blocks=4)
    idx.insert(a)
    assert idx.match_blocks(a) == 3
    assert idx.match_blocks(b) == 2
    assert idx.match_blocks(salted) == 0
    idx.insert(b[2:])  # 4 blocks now
    idx.insert(prompt_block_hashes([7] * 17, 16, ""))  # evicts a[0], the oldest
    assert len(idx) == 4
    assert idx.match_blocks(a) == 0
