"""The decode side's end of a transfer: where the servicer reserves, writes and commits.

`KVSink` is the boundary between the gRPC servicer and whatever owns the blocks;
`EngineSink` puts it over `engine.Engine`. The engine is not thread-safe: the decode
worker's loop thread steps it while gRPC threads reserve, commit and cancel, so every call
that touches the engine's bookkeeping takes `EngineSink.lock`, and the loop thread steps
through `EngineSink.step()` (same lock).

Chunk writes (`write_blocks`) do not take the lock: they copy into blocks that the lease
owns and no running sequence reads, and the lease's own lock keeps the blocks from being
freed mid-write.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.engine import Engine, PoolExhausted, RequestOutput
from engine.kv_pool import KVPool
from engine.sampler import TokenLogprobs
from engine.sampling_params import SamplingParams
from kv_transfer.layout import KVLayout, write_kv


class SinkFull(Exception):
    """The sink has no room for this request now (maps to RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class ReserveSpec:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    cache_salt: str = ""


@dataclass(frozen=True)
class SinkReservation:
    block_ids: tuple[int, ...]  # the whole block table for the prompt, in order
    num_cached_blocks: int  # leading blocks already filled (prefix-cache hits)


class KVSink(ABC):
    """Blocks that receive a request's KV, then join a decode batch.

    Contract: `reserve` is all or nothing (raises SinkFull or ValueError and holds nothing);
    after it, exactly one of `commit` or `cancel` is called for the request, and either
    leaves no block owned by the reservation. `write_blocks` is only called between the two,
    for blocks of that reservation.
    """

    @property
    @abstractmethod
    def layout(self) -> KVLayout: ...

    @property
    @abstractmethod
    def num_free_blocks(self) -> int: ...

    @abstractmethod
    def reserve(self, spec: ReserveSpec) -> SinkReservation: ...

    @abstractmethod
    def write_blocks(self, layer_idx: int, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        """kv: [2, len(block_ids), block_size, Hkv, D] on any device."""

    @abstractmethod
    def commit(
        self, request_id: str, first_token_id: int, logprobs: TokenLogprobs | None = None
    ) -> None: ...

    @abstractmethod
    def cancel(self, request_id: str) -> None: ...

    @abstractmethod
    def pool_tensor(self) -> torch.Tensor:
        """The whole KV pool, [L, 2, num_blocks, block_size, Hkv, D] (same-host GPU path)."""


class EngineSink(KVSink):
    """A decode engine as a sink; first tokens of committed requests queue in `outputs`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.outputs: list[RequestOutput] = []  # commit outputs not yet taken by the loop
        self._layout = KVLayout.of_pool(engine.pool)

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def num_free_blocks(self) -> int:
        with self.lock:
            return self.engine.num_free_blocks

    def reserve(self, spec: ReserveSpec) -> SinkReservation:
        with self.lock:
            try:
                r = self.engine.reserve(
                    spec.request_id, list(spec.prompt_token_ids), spec.params, spec.cache_salt
                )
            except PoolExhausted as e:
                raise SinkFull(str(e)) from e
        assert r.num_cached_tokens % self.engine.config.block_size == 0
        return SinkReservation(
            tuple(r.block_ids), r.num_cached_tokens // self.engine.config.block_size
        )

    def write_blocks(self, layer_idx: int, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        write_kv(self.engine.pool, layer_idx, block_ids, kv)

    def commit(
        self, request_id: str, first_token_id: int, logprobs: TokenLogprobs | None = None
    ) -> None:
        with self.lock:
            self.outputs.append(self.engine.commit(request_id, first_token_id, logprobs))

    def cancel(self, request_id: str) -> None:
        with self.lock:
            self.engine.cancel_reservation(request_id)

    def pool_tensor(self) -> torch.Tensor:
        return self.engine.pool.cache

    def step(self) -> list[RequestOutput]:
        """One engine step, preceded by the first tokens of new commits. The lock is held
        but for the step's GPU time (Engine.step), so Reserve and Commit wait for the step's
        bookkeeping only, not for the whole decode step."""
        with self.lock:
            outputs, self.outputs = self.outputs, []
            return outputs + self.engine.step(lock=self.lock)


class PoolSink(KVSink):
    """A bare KV pool as a sink, for benchmarks and transport tests: no model behind it.

    Reserve takes free blocks (no prefix cache); commit keeps them as `committed` until
    `release`, which frees them (at once with release_on_commit: a benchmark's receiver).
    """

    def __init__(self, pool: KVPool, release_on_commit: bool = False) -> None:
        self.pool = pool
        self.release_on_commit = release_on_commit
        self._layout = KVLayout.of_pool(pool)
        self._lock = threading.Lock()
        self._free: list[int] = list(range(pool.num_blocks))
        self._reserved: dict[str, tuple[int, ...]] = {}
        self.committed: dict[str, tuple[int, ...]] = {}

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def num_free_blocks(self) -> int:
        with self._lock:
            return len(self._free)

    def reserve(self, spec: ReserveSpec) -> SinkReservation:
        bs = self.pool.block_size
        needed = (len(spec.prompt_token_ids) + bs - 1) // bs
        with self._lock:
            if spec.request_id in self._reserved or spec.request_id in self.committed:
                raise ValueError(f"request_id {spec.request_id!r} is already in use")
            if needed > len(self._free):
                raise SinkFull(f"{len(self._free)} free KV blocks; request needs {needed}")
            blocks = tuple(self._free[:needed])
            del self._free[:needed]
            self._reserved[spec.request_id] = blocks
        return SinkReservation(blocks, 0)

    def write_blocks(self, layer_idx: int, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        write_kv(self.pool, layer_idx, block_ids, kv)

    def commit(
        self, request_id: str, first_token_id: int, logprobs: TokenLogprobs | None = None
    ) -> None:
        with self._lock:
            blocks = self._reserved.pop(request_id)
            if self.release_on_commit:
                self._free.extend(blocks)
            else:
                self.committed[request_id] = blocks

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._free.extend(self._reserved.pop(request_id, ()))

    def release(self, request_id: str) -> None:
        with self._lock:
            self._free.extend(self.committed.pop(request_id, ()))

    def pool_tensor(self) -> torch.Tensor:
        return self.pool.cache
