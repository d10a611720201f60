"""Continuous batching under a token budget, with chunked prefill and preemption.

There is no separate prefill phase and decode phase: every sequence has tokens whose KV is
computed (`num_computed_tokens`) and tokens still to compute, and each step lets computed
tokens catch up. A decoding sequence needs one token a step; a prompt needs all of its
uncached tokens, in one go if the budget allows, else in chunks over several steps.

One step, in order:
  1. running sequences, oldest first, each take their next chunk (decodes take 1 token).
     A prompt still being chunked leaves one token of the budget for every decoding
     sequence behind it, taking at least one token itself (stall-free batching, as in
     Sarathi-Serve): a sequence that Engine.commit hands over while a long local prompt is
     chunked decodes at once instead of waiting out the prompt. When the pool has no block
     for one, the youngest running sequence is preempted: its blocks are freed and it goes
     back to the head of the waiting queue to be recomputed later (its prefix may still
     hit the cache). A sequence never preempts an older one.
  2. waiting sequences, first come first served, are admitted while the token budget,
     `max_num_seqs` and the pool allow; the first that does not fit stops admission, so
     arrival order is kept.

The batch lists prefill chunks first, then decodes (the order `AttentionMetadata` expects).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)  # prefills first, then decodes
    num_new_tokens: list[int] = field(default_factory=list)
    num_prefill_seqs: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Whether seq i reaches its last token this step (and so samples a new one)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and release its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        prefills: list[tuple[Sequence, int]] = []
        decodes: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []

        # 1. Running sequences, oldest first, at most max_num_seqs of them (sequences handed
        #    over by Engine.commit can push `running` past it; the rest wait their turn).
        i = 0
        while i < len(self.running) and budget > 0 and i < self.config.max_num_seqs:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._is_decoding(seq):  # a chunk: room for the decodes behind it, >= 1
                behind = self.running[i + 1 : self.config.max_num_seqs]
                num_new = max(1, min(num_new, budget - sum(map(self._is_decoding, behind))))
            while not self.block_manager.grow(seq, num_new):
                victim = self.running.pop()  # the youngest
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            is_decode = seq.num_computed_tokens >= seq.num_prompt_tokens and num_new == 1
            (decodes if is_decode else prefills).append((seq, num_new))
            budget -= num_new
            i += 1

        # 2. Waiting sequences, in order, unless this step already had to preempt.
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            remaining = seq.num_tokens  # upper bound before prefix hits are known
            if remaining > budget and not self.config.enable_chunked_prefill:
                break
            if not self.block_manager.admit(seq, min(remaining, budget)):
                break
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            prefills.append((seq, num_new))
            budget -= num_new

        batch = ScheduledBatch(preempted=preempted, num_prefill_seqs=len(prefills))
        for seq, n in prefills + decodes:
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
        return batch

    @staticmethod
    def _is_decoding(seq: Sequence) -> bool:
        """Every prompt token computed: the next step takes one token."""
        return seq.num_tokens - seq.num_computed_tokens == 1 and (
            seq.num_computed_tokens >= seq.num_prompt_tokens
        )

    def advance(self, batch: ScheduledBatch) -> None:
        """After the forward pass: the scheduled tokens now have KV in the pool."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.block_manager.cache_computed_blocks(seq)
