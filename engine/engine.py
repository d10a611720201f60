"""The engine: add requests, step, stream outputs; colocated serving in one object.

One step is three moves: the scheduler picks the batch, the model runner computes it, and
the results are sampled and checked against each request's stop conditions
(engine/request.py). The pool's size is worked out at construction (engine/kv_sizing.py).

Besides plain colocated serving, the engine offers the two halves of disaggregation as
first-class operations on its blocks:

  prefill side   add_request(..., hold_kv=True)  the request stops after its first token and
                                                 keeps its blocks; `held_blocks()` names
                                                 them, `KVPool.read_blocks` reads them,
                                                 `release()` frees them.
  decode side    reserve()  -> block ids to write into (prefix-cache hits already filled)
                 commit()   -> the request joins the decode batch from its first token
                 cancel_reservation() frees the blocks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import gemv
from engine.attention import make_backend
from engine.block_manager import BlockManager, PrefixCacheStats
from engine.config import EngineConfig
from engine.kv_pool import KVPool, dtype_from_name
from engine.kv_sizing import num_kv_blocks
from engine.model import LlamaForCausalLM
from engine.model_runner import ModelRunner
from engine.request import EngineRequest, RequestOutput  # RequestOutput: importers use this path
from engine.sampler import Sampler, SamplingRow, TokenLogprobs, make_generator, token_seed
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import FinishReason, Sequence, SequenceStatus
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from engine.weights import init_dummy_weights, load_checkpoint

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _released(lock: threading.Lock | None) -> Iterator[None]:
    """Release a held lock for the block's duration (nothing if None), then take it back."""
    if lock is None:
        yield
        return
    lock.release()
    try:
        yield
    finally:
        lock.acquire()


class PoolExhausted(Exception):
    """The pool cannot hold this request now (retry later or elsewhere)."""


@dataclass(frozen=True)
class Reservation:
    request_id: str
    block_ids: list[int]  # the sequence's whole block table, in order
    num_cached_tokens: int  # leading tokens already present (prefix-cache hits): not sent


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        model_path: str | Path | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = dtype_from_name(config.dtype)
        self.tokenizer = tokenizer
        # The model's EOS ids plus any the tokenizer's generation config adds (<|eot_id|>).
        self.eos_token_ids = frozenset(config.model.eos_token_ids) | frozenset(
            tokenizer.eos_token_ids if tokenizer is not None else ()
        )
        max_len = config.resolved_max_model_len
        self.model = LlamaForCausalLM(config.model, self.dtype, self.device, max_len=max_len)
        if model_path is None:
            init_dummy_weights(self.model, seed=config.seed)
        else:
            load_checkpoint(self.model, Path(model_path))
        self.model.eval()
        gemv.tune(self.model)  # CUDA: cuBLAS or a GEMV for each batch-1 product shape
        num_blocks = num_kv_blocks(config, self.model, self.dtype, self.device)
        # One extra block beyond the manager's range: scratch space for graph padding rows.
        self.pool = KVPool(config.model, num_blocks + 1, config.block_size, self.dtype, self.device)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config, self.block_manager)
        backend = make_backend(self.pool, config.model.num_attention_heads, config.model.head_dim)
        self.runner = ModelRunner(config, self.model, self.pool, backend, scratch_block=num_blocks)
        self.runner.warm_up()  # CUDA: compile the eager steps' kernel variants now
        self.runner.capture_decode_graphs()
        self.sampler = Sampler(make_generator(config.seed, self.device))
        self._requests: dict[str, EngineRequest] = {}
        self._held: dict[str, Sequence] = {}
        self._reserved: dict[str, EngineRequest] = {}
        # The batch of the step in progress (or the last one): on_layer_done hooks read it to
        # know which tokens of which sequences the finished layer has just written.
        self.current_batch = ScheduledBatch()
        # While a step's batch computes (see `step`'s lock): its request ids, and aborts of
        # them that wait for the step's end.
        self._in_flight: frozenset[str] = frozenset()
        self._aborts_after_step: set[str] = set()
        log.info(
            "engine ready: %s, %s on %s, KV capacity %d tokens",
            config.model.architecture,
            config.dtype,
            self.device,
            num_blocks * config.block_size,
        )

    # ---- requests ------------------------------------------------------------------------

    def _new_sequence(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str,
    ) -> Sequence:
        if request_id in self._requests or request_id in self._held or request_id in self._reserved:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        vocab = self.config.model.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        max_len = self.config.resolved_max_model_len
        if len(prompt_token_ids) >= max_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens; the context holds {max_len}, "
                "and at least one must be left to generate"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none")
        longest = min(len(prompt_token_ids) + params.max_tokens, max_len)
        needed = self.block_manager.blocks_for(longest)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"request needs {needed} KV blocks at its longest ({longest} tokens), but the "
                f"pool has {self.block_manager.num_blocks}; lower max_tokens or the prompt"
            )
        generator = None if params.seed is None else make_generator(params.seed, self.device)
        return Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            cache_salt=cache_salt,
            generator=generator,
        )

    def _detokenizer(self, prompt: list[int]) -> IncrementalDetokenizer | None:
        return None if self.tokenizer is None else IncrementalDetokenizer(self.tokenizer, prompt)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str = "",
        hold_kv: bool = False,
    ) -> None:
        """Queue a request. Raises ValueError if it can never be served.

        hold_kv: keep the blocks after the request finishes, for export (prefill side).
        """
        seq = self._new_sequence(request_id, prompt_token_ids, params, cache_salt)
        self._requests[request_id] = EngineRequest(seq, self._detokenizer(seq.token_ids), hold_kv)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. False if unknown.

        A request of the batch that a step is computing (another thread, the step's lock
        released) is stopped when that step ends: its blocks are being written."""
        if request_id in self._in_flight:
            self._aborts_after_step.add(request_id)
            return True
        req = self._requests.pop(request_id, None)
        if req is not None:
            self.scheduler.remove(req.seq)
            req.seq.finish_reason = FinishReason.ABORT
            return True
        return self.release(request_id) or self.cancel_reservation(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.block_manager.stats

    # ---- stepping ------------------------------------------------------------------------

    def bind_thread(self) -> None:
        """Make this engine's GPU the calling thread's current CUDA device. CUDA keeps the
        current device per thread, and Triton launches on it: a worker's loop thread on
        cuda:1 would otherwise launch every kernel on cuda:0's stream."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def step(
        self,
        on_layer_done: Callable[[int], None] | None = None,
        lock: threading.Lock | None = None,
    ) -> list[RequestOutput]:
        """Schedule a batch, compute it, sample a token for each sequence that reached the
        end of its tokens, and return those tokens.

        lock: a lock the caller holds, that other threads take around every other call
        into this engine (a decode worker's reserve, commit, add, abort and load reports).
        The step releases it from the forward to the host read of the sampled tokens (the
        wait for the GPU) and takes it back to apply the results, so a Reserve or Commit
        waits for the step's bookkeeping, not for its GPU time. Meanwhile the batch's own
        sequences are not touched: an abort of one is applied at the step's end.
        """
        batch = self.scheduler.schedule()
        self.current_batch = batch
        if batch.is_empty:
            return []
        self._in_flight = frozenset(s.request_id for s in batch.seqs)
        try:
            with _released(lock):
                logits, rows = self.runner.run(batch, on_layer_done)
                sampled = [batch.seqs[i] for i in rows]
                for s in sampled:
                    if s.generator is not None:  # a seeded draw depends on (seed, position)
                        assert s.params.seed is not None
                        s.generator.manual_seed(token_seed(s.params.seed, s.num_output_tokens))
                result = self.sampler(
                    logits,
                    [
                        # Token histories are only read for penalties; skip the copies otherwise.
                        SamplingRow(s.params, s.prompt_token_ids, s.output_token_ids, s.generator)
                        if s.params.has_penalties
                        else SamplingRow(s.params, (), (), s.generator)
                        for s in sampled
                    ],
                )
        finally:
            self._in_flight = frozenset()
            aborted, self._aborts_after_step = self._aborts_after_step, set()
        self.scheduler.advance(batch)
        outputs = []
        for seq, token, lp in zip(sampled, result.token_ids, result.logprobs, strict=True):
            if seq.request_id not in aborted:
                outputs.append(self._append_token(self._requests[seq.request_id], token, lp))
        for request_id in aborted:
            self.abort(request_id)
        return outputs

    def _append_token(
        self, req: EngineRequest, token: int, logprobs: TokenLogprobs | None
    ) -> RequestOutput:
        new_text, reason = req.append_token(
            token, self.eos_token_ids, self.config.resolved_max_model_len
        )
        if reason is not None:
            self._finish(req, reason)
        return req.output(token, new_text, reason, logprobs)

    def _finish(self, req: EngineRequest, reason: FinishReason) -> None:
        seq = req.seq
        seq.finish_reason = reason
        del self._requests[seq.request_id]
        if req.hold_kv:
            if seq in self.scheduler.running:
                self.scheduler.running.remove(seq)
            seq.status = SequenceStatus.FINISHED
            self._held[seq.request_id] = seq
        else:
            self.scheduler.remove(seq)

    # ---- prefill side: export ------------------------------------------------------------

    def held_blocks(self, request_id: str) -> tuple[list[int], int]:
        """(block ids, number of prompt tokens with KV in them) of a held request."""
        seq = self._held[request_id]
        return list(seq.block_table), seq.num_prompt_tokens

    def release(self, request_id: str) -> bool:
        seq = self._held.pop(request_id, None)
        if seq is None:
            return False
        self.block_manager.free(seq)
        return True

    # ---- decode side: import -------------------------------------------------------------

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str = "",
    ) -> Reservation:
        """Allocate blocks for a prompt whose KV will arrive from a prefill worker.

        Raises ValueError for a request that can never be served, PoolExhausted when the
        pool cannot hold it now.
        """
        seq = self._new_sequence(request_id, prompt_token_ids, params, cache_salt)
        if not self.block_manager.admit(seq, seq.num_tokens):
            raise PoolExhausted(
                f"{self.block_manager.num_free_blocks} free KV blocks; request needs "
                f"{self.block_manager.blocks_for(seq.num_tokens)}"
            )
        self._reserved[request_id] = EngineRequest(seq, self._detokenizer(seq.token_ids), False)
        return Reservation(request_id, list(seq.block_table), seq.num_computed_tokens)

    def commit(
        self, request_id: str, first_token_id: int, logprobs: TokenLogprobs | None = None
    ) -> RequestOutput:
        """The reserved blocks now hold the prompt's KV; decode from first_token_id on
        (`logprobs`: the first token's, computed where it was sampled)."""
        req = self._reserved.pop(request_id)
        seq = req.seq
        if not 0 <= first_token_id < self.config.model.vocab_size:
            self.block_manager.free(seq)
            raise ValueError(f"first_token_id {first_token_id} is outside the vocabulary")
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.block_manager.cache_computed_blocks(seq)
        seq.status = SequenceStatus.RUNNING
        self.scheduler.running.append(seq)
        self._requests[request_id] = req
        return self._append_token(req, first_token_id, logprobs)

    def cancel_reservation(self, request_id: str) -> bool:
        req = self._reserved.pop(request_id, None)
        if req is None:
            return False
        self.block_manager.free(req.seq)
        return True

    # ---- convenience ---------------------------------------------------------------------

    def generate(
        self,
        prompts: Iterable[list[int]],
        params: SamplingParams | list[SamplingParams],
    ) -> list[list[int]]:
        """Run prompts to completion (offline); returns output token ids per prompt."""
        prompts = list(prompts)
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        batch_id = uuid.uuid4().hex[:8]
        ids = [f"generate-{batch_id}-{i}" for i in range(len(prompts))]
        outputs: dict[str, list[int]] = {rid: [] for rid in ids}
        for rid, prompt, p in zip(ids, prompts, params_list, strict=True):
            self.add_request(rid, prompt, p)
        while self.has_unfinished():
            for out in self.step():
                outputs[out.request_id].extend(out.new_token_ids)
        return [outputs[rid] for rid in ids]
