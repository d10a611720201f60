"""Routing policies: which prefill worker and which decode worker serve a request.

Every policy answers one question through `RoutingPolicy.choose`, from a snapshot of the
workers (`WorkerView`: the load they last reported plus what the router has in flight on
them, and how many of the prompt's tokens the router's prefix index expects them to hold).
`Route.prefill is None` means "prefill on the decode worker itself" (colocated mode, or the
conditional policy keeping a short prompt local).

    round_robin    each tier in turn
    least_loaded   lowest (queue + in flight + running), then most free KV blocks, then index
    prefix_aware   the worker with the longest cached prefix, unless it is overloaded
                   (SGLang's cache-aware rule: load > least + abs AND load > least * rel),
                   then least_loaded; on both tiers (a decode-side hit is not transferred)
    conditional    decode worker by the inner policy; prefill there when at most
                   `local_prefill_max_tokens` of the prompt are not in its prefix cache, or
                   when the inner policy's prefill worker has `max_prefill_queue_tokens`
                   pending and the decode worker none; else the inner policy's prefill worker

Policies are pure (no I/O) and deterministic given the views, so tests assert exact choices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from baton.config import PolicyName, RoutingConfig


@dataclass(frozen=True)
class WorkerView:
    index: int
    queue_depth: int = 0
    num_running: int = 0
    in_flight: int = 0  # requests the router sent there and has not seen finish
    num_free_blocks: int = 0
    prefix_match_tokens: int = 0  # prompt tokens the router expects the worker to hold
    healthy: bool = True
    # prompt tokens the router sent there to prefill that are not prefilled yet (exact: the
    # router's own count, not the polled load)
    pending_prefill_tokens: int = 0

    @property
    def load(self) -> int:
        return self.queue_depth + self.num_running + self.in_flight


@dataclass(frozen=True)
class RouteQuery:
    num_prompt_tokens: int


@dataclass(frozen=True)
class Route:
    decode: int
    prefill: int | None  # None: prefill on the decode worker


class NoWorker(Exception):
    """No healthy worker in a tier (maps to UNAVAILABLE)."""


def _healthy(views: Sequence[WorkerView], tier: str) -> list[WorkerView]:
    ok = [v for v in views if v.healthy]
    if not ok:
        raise NoWorker(f"no healthy {tier} worker")
    return ok


def least_loaded(views: Sequence[WorkerView]) -> WorkerView:
    return min(views, key=lambda v: (v.load, -v.num_free_blocks, v.index))


def prefix_or_least_loaded(views: Sequence[WorkerView], cfg: RoutingConfig) -> WorkerView:
    # Longest prefix; ties go to the lighter worker, then the lower index.
    best = max(views, key=lambda v: (v.prefix_match_tokens, -v.load, -v.index))
    lightest = least_loaded(views)
    if best.prefix_match_tokens == 0:
        return lightest
    overloaded = (
        best.load > lightest.load + cfg.balance_abs_threshold
        and best.load > lightest.load * cfg.balance_rel_threshold
    )
    return lightest if overloaded else best


class RoutingPolicy(ABC):
    """Contract: `choose` returns indexes of healthy workers from the given views; prefill
    is None exactly when the prefill tier is empty or the policy keeps the request local."""

    name: PolicyName

    def __init__(self, config: RoutingConfig) -> None:
        self.config = config

    @abstractmethod
    def choose(
        self, query: RouteQuery, prefill: Sequence[WorkerView], decode: Sequence[WorkerView]
    ) -> Route: ...


class RoundRobin(RoutingPolicy):
    name = PolicyName.ROUND_ROBIN

    def __init__(self, config: RoutingConfig) -> None:
        super().__init__(config)
        self._next = {"prefill": 0, "decode": 0}

    def _pick(self, views: Sequence[WorkerView], tier: str) -> int:
        ok = _healthy(views, tier)
        n = self._next[tier]
        self._next[tier] = n + 1
        return ok[n % len(ok)].index

    def choose(self, query, prefill, decode):  # noqa: ANN001, ANN201
        d = self._pick(decode, "decode")
        return Route(d, self._pick(prefill, "prefill") if prefill else None)


class LeastLoaded(RoutingPolicy):
    name = PolicyName.LEAST_LOADED

    def choose(self, query, prefill, decode):  # noqa: ANN001, ANN201
        d = least_loaded(_healthy(decode, "decode")).index
        p = least_loaded(_healthy(prefill, "prefill")).index if prefill else None
        return Route(d, p)


class PrefixAware(RoutingPolicy):
    name = PolicyName.PREFIX_AWARE

    def choose(self, query, prefill, decode):  # noqa: ANN001, ANN201
        d = prefix_or_least_loaded(_healthy(decode, "decode"), self.config).index
        p = None
        if prefill:
            p = prefix_or_least_loaded(_healthy(prefill, "prefill"), self.config).index
        return Route(d, p)


class Conditional(RoutingPolicy):
    name = PolicyName.CONDITIONAL

    def __init__(self, config: RoutingConfig) -> None:
        super().__init__(config)
        self.inner = make_policy(config, config.inner_policy)

    def choose(self, query, prefill, decode):  # noqa: ANN001, ANN201
        route = self.inner.choose(query, prefill, decode)
        d = next(v for v in decode if v.index == route.decode)
        uncached = query.num_prompt_tokens - d.prefix_match_tokens
        if uncached <= self.config.local_prefill_max_tokens:
            return Route(route.decode, None)
        backlog = self.config.max_prefill_queue_tokens
        if backlog and route.prefill is not None and d.pending_prefill_tokens == 0:
            p = next(v for v in prefill if v.index == route.prefill)
            if p.pending_prefill_tokens >= backlog:
                return Route(route.decode, None)
        return route


_POLICIES: dict[PolicyName, type[RoutingPolicy]] = {
    p.name: p for p in (RoundRobin, LeastLoaded, PrefixAware, Conditional)
}


def make_policy(config: RoutingConfig, name: PolicyName | None = None) -> RoutingPolicy:
    return _POLICIES[name or config.policy](config)
