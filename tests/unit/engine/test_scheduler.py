"""Scheduler decisions with exact state: chunks, batch order, admission, preemption.

No model runs: `step` does what Engine.step does around the forward pass (advance the
computed tokens, append a token to every sequence that reached its end).
"""

from __future__ import annotations

from typing import Any

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.presets import preset
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence, SequenceStatus

BLOCK_SIZE = 4
SAMPLED_TOKEN = 7


def make_scheduler(**overrides: Any) -> Scheduler:
    settings: dict[str, Any] = {
        "model": preset("tiny"),
        "block_size": BLOCK_SIZE,
        "num_kv_blocks": 64,
        "max_model_len": 64,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 64,
    }
    settings.update(overrides)
    config = EngineConfig(**settings)
    assert config.num_kv_blocks is not None
    bm = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
    return Scheduler(config, bm)


def make_seq(request_id: str, num_tokens: int, base: int) -> Sequence:
    """A prompt of distinct tokens base, base+1, ... (no accidental prefix hits)."""
    return Sequence(request_id, list(range(base, base + num_tokens)), SamplingParams())


def step(sched: Scheduler) -> ScheduledBatch:
    batch = sched.schedule()
    sampling = [seq for i, seq in enumerate(batch.seqs) if batch.samples(i)]
    sched.advance(batch)
    for seq in sampling:
        seq.token_ids.append(SAMPLED_TOKEN)
    return batch


def step_sampling(sched: Scheduler) -> tuple[ScheduledBatch, list[str]]:
    """One step; also the ids of the sequences that sampled a token in it."""
    before = {seq.request_id: seq.num_tokens for seq in [*sched.running, *sched.waiting]}
    batch = step(sched)
    return batch, [s.request_id for s in batch.seqs if s.num_tokens > before[s.request_id]]


def ids(seqs: list[Sequence]) -> list[str]:
    return [s.request_id for s in seqs]


def finish_all(sched: Scheduler) -> None:
    for seq in [*sched.running, *sched.waiting]:
        sched.remove(seq)
    assert sched.num_unfinished == 0
    sched.block_manager.check_idle()


def test_empty_schedule() -> None:
    sched = make_scheduler()
    batch = sched.schedule()
    assert batch.is_empty and batch.num_tokens == 0 and batch.preempted == []


def test_long_prompt_is_split_into_budget_sized_chunks() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    a, b = make_seq("a", 40, base=0), make_seq("b", 4, base=100)
    sched.add(a)
    sched.add(b)

    batch = step(sched)
    assert ids(batch.seqs) == ["a"] and batch.num_new_tokens == [16]
    assert batch.num_prefill_seqs == 1 and batch.num_tokens == 16
    assert a.block_table == [0, 1, 2, 3]  # blocks for this chunk only
    assert a.num_computed_tokens == 16 and a.num_tokens == 40  # no token sampled yet
    assert ids(list(sched.waiting)) == ["b"]  # the budget is spent: b waits

    batch = step(sched)
    assert ids(batch.seqs) == ["a"] and batch.num_new_tokens == [16]
    assert a.block_table == list(range(8)) and a.num_computed_tokens == 32

    batch = step(sched)  # the last 8 prompt tokens, then b's prompt in the same budget
    assert ids(batch.seqs) == ["a", "b"] and batch.num_new_tokens == [8, 4]
    assert batch.num_prefill_seqs == 2
    assert a.block_table == list(range(10)) and b.block_table == [10]
    assert a.num_tokens == 41 and a.output_token_ids == [SAMPLED_TOKEN]

    batch = step(sched)
    assert ids(batch.seqs) == ["a", "b"] and batch.num_new_tokens == [1, 1]
    assert batch.num_prefill_seqs == 0
    assert a.block_table == list(range(10)) + [11]  # position 40 opens a's 11th block
    finish_all(sched)


def test_decodes_take_the_budget_first_and_prefills_are_listed_first() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    a = make_seq("a", 4, base=0)
    sched.add(a)
    step(sched)
    assert a.num_tokens == 5 and a.num_computed_tokens == 4

    b = make_seq("b", 40, base=100)
    sched.add(b)
    batch, sampled = step_sampling(sched)
    assert ids(batch.seqs) == ["b", "a"]  # prefill chunk first, then the decode
    assert batch.num_new_tokens == [15, 1]  # a's decode was budgeted before b's prefill
    assert batch.num_prefill_seqs == 1
    assert sampled == ["a"]

    batch = step(sched)  # b is running now, still a prefill: listed first
    assert ids(batch.seqs) == ["b", "a"] and batch.num_new_tokens == [15, 1]
    batch, sampled = step_sampling(sched)
    assert ids(batch.seqs) == ["b", "a"] and batch.num_new_tokens == [10, 1]
    assert sampled == ["b", "a"]

    batch = step(sched)  # both decode, oldest first
    assert ids(batch.seqs) == ["a", "b"] and batch.num_new_tokens == [1, 1]
    assert batch.num_prefill_seqs == 0
    finish_all(sched)


def commit_decoding(sched: Scheduler, seq: Sequence) -> None:
    """Put seq in `running` as Engine.commit leaves a transferred prompt: KV in place, first
    token sampled, decoding from the next step."""
    assert sched.block_manager.admit(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_prompt_tokens
    seq.token_ids.append(SAMPLED_TOKEN)
    seq.status = SequenceStatus.RUNNING
    sched.running.append(seq)


def test_a_chunked_prompt_leaves_budget_for_the_decodes_behind_it() -> None:
    # A local prompt chunked over several steps, and sequences handed over (Engine.commit)
    # after it started: they decode every step, the prompt's chunks shrink to make room.
    sched = make_scheduler(max_num_batched_tokens=16)
    a = make_seq("a", 40, base=0)
    sched.add(a)
    batch = step(sched)
    assert ids(batch.seqs) == ["a"] and batch.num_new_tokens == [16]
    b, c = make_seq("b", 3, base=100), make_seq("c", 5, base=200)
    commit_decoding(sched, b)
    commit_decoding(sched, c)

    batch, sampled = step_sampling(sched)
    assert ids(batch.seqs) == ["a", "b", "c"] and batch.num_new_tokens == [14, 1, 1]
    assert batch.num_prefill_seqs == 1 and sampled == ["b", "c"]
    batch = step(sched)
    assert batch.num_new_tokens == [10, 1, 1] and a.num_computed_tokens == 40
    batch = step(sched)  # all three decode
    assert ids(batch.seqs) == ["a", "b", "c"] and batch.num_new_tokens == [1, 1, 1]
    finish_all(sched)


def test_a_chunked_prompt_takes_one_token_when_decodes_fill_the_budget() -> None:
    # More decodes behind the prompt than the budget holds (a budget below max_num_seqs):
    # the prompt still advances, and the youngest decode waits a step, as before.
    sched = make_scheduler(max_num_batched_tokens=4)
    a = make_seq("a", 8, base=0)
    sched.add(a)
    step(sched)
    others = [make_seq(name, 2, base=100 * (i + 1)) for i, name in enumerate("bcde")]
    for seq in others:
        commit_decoding(sched, seq)
    batch = step(sched)
    assert ids(batch.seqs) == ["a", "b", "c", "d"] and batch.num_new_tokens == [1, 1, 1, 1]
    assert a.num_computed_tokens == 5
    finish_all(sched)


def test_decodes_beyond_the_token_budget_wait_a_step() -> None:
    sched = make_scheduler(max_num_batched_tokens=4)
    seqs = [make_seq(name, 1, base=10 * i) for i, name in enumerate("abcde")]
    for seq in seqs:
        sched.add(seq)
    batch = step(sched)
    assert ids(batch.seqs) == ["a", "b", "c", "d"]  # 4 one-token prompts fill the budget
    batch = step(sched)
    assert ids(batch.seqs) == ["a", "b", "c", "d"]  # decodes take it all; e keeps waiting
    assert batch.num_prefill_seqs == 0
    assert ids(list(sched.waiting)) == ["e"]
    finish_all(sched)


def test_max_num_seqs_is_respected() -> None:
    sched = make_scheduler(max_num_seqs=2)
    a, b, c = (make_seq(n, 4, base=10 * i) for i, n in enumerate("abc"))
    for seq in (a, b, c):
        sched.add(seq)

    batch = step(sched)
    assert ids(batch.seqs) == ["a", "b"] and ids(list(sched.waiting)) == ["c"]
    batch = step(sched)
    assert ids(batch.seqs) == ["a", "b"] and batch.num_new_tokens == [1, 1]
    assert c.status is SequenceStatus.WAITING and c.block_table == []

    sched.remove(a)
    assert a.status is SequenceStatus.FINISHED and a.block_table == []
    batch = step(sched)
    assert ids(batch.seqs) == ["c", "b"] and batch.num_new_tokens == [4, 1]
    assert ids(sched.running) == ["b", "c"]
    finish_all(sched)


def test_fifo_admission_stops_at_the_first_that_does_not_fit_the_pool() -> None:
    sched = make_scheduler(num_kv_blocks=8)
    a, b, c = make_seq("a", 20, base=0), make_seq("b", 16, base=100), make_seq("c", 4, base=200)
    for seq in (a, b, c):
        sched.add(seq)

    batch = step(sched)
    assert ids(batch.seqs) == ["a"]  # b needs 4 blocks, 3 are free; c (1 block) must not jump
    assert a.block_table == [0, 1, 2, 3, 4]
    assert ids(list(sched.waiting)) == ["b", "c"]
    assert b.block_table == [] and c.block_table == []
    assert sched.block_manager.num_free_blocks == 3

    sched.remove(a)
    batch = step(sched)
    assert ids(batch.seqs) == ["b", "c"] and batch.num_new_tokens == [16, 4]
    # The never-used blocks first, then a's (cached) blocks, its tail first.
    assert b.block_table == [5, 6, 7, 4] and c.block_table == [3]
    finish_all(sched)


def test_fifo_admission_stops_at_the_first_that_does_not_fit_the_budget() -> None:
    sched = make_scheduler(enable_chunked_prefill=False, max_num_batched_tokens=64)
    a, b, c = make_seq("a", 40, base=0), make_seq("b", 30, base=100), make_seq("c", 4, base=200)
    for seq in (a, b, c):
        sched.add(seq)
    batch = step(sched)
    assert ids(batch.seqs) == ["a"] and batch.num_new_tokens == [40]
    assert ids(list(sched.waiting)) == ["b", "c"]  # b (30 > 24 left) is not chunked; c waits
    batch = step(sched)
    assert ids(batch.seqs) == ["b", "c", "a"] and batch.num_new_tokens == [30, 4, 1]
    finish_all(sched)


def test_preemption_takes_the_youngest_and_requeues_it_at_the_head() -> None:
    sched = make_scheduler(num_kv_blocks=6, enable_prefix_caching=False)
    a, b, c = (make_seq(n, 8, base=100 * i) for i, n in enumerate("abc"))
    d = make_seq("d", 4, base=300)
    for seq in (a, b, c, d):
        sched.add(seq)

    batch = step(sched)
    assert ids(batch.seqs) == ["a", "b", "c"]  # d does not fit: the pool is full
    assert [a.block_table, b.block_table, c.block_table] == [[0, 1], [2, 3], [4, 5]]
    assert ids(list(sched.waiting)) == ["d"]

    # Every sequence now has 9 tokens and needs a third block for position 8.
    batch = step(sched)
    assert ids(batch.preempted) == ["c"]
    assert ids(batch.seqs) == ["a", "b"] and batch.num_new_tokens == [1, 1]
    assert a.block_table == [0, 1, 5] and b.block_table == [2, 3, 4]  # c's blocks, tail first
    assert ids(sched.running) == ["a", "b"]
    assert ids(list(sched.waiting)) == ["c", "d"]  # at the head, ahead of d
    assert c.status is SequenceStatus.WAITING
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert c.num_tokens == 9  # keeps its sampled token; it is recomputed with the prompt
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    assert sched.block_manager.num_free_blocks == 0

    sched.remove(a)
    sched.remove(b)
    batch, sampled = step_sampling(sched)
    assert ids(batch.seqs) == ["c", "d"] and batch.num_new_tokens == [9, 4]
    assert batch.num_prefill_seqs == 2 and sampled == ["c", "d"]
    assert c.output_token_ids == [SAMPLED_TOKEN, SAMPLED_TOKEN]
    finish_all(sched)


def test_the_youngest_preempts_itself_rather_than_an_older_one() -> None:
    sched = make_scheduler(num_kv_blocks=5, enable_prefix_caching=False)
    a, b = make_seq("a", 8, base=0), make_seq("b", 8, base=100)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert sched.block_manager.num_free_blocks == 1

    batch = step(sched)
    assert ids(batch.seqs) == ["a"] and ids(batch.preempted) == ["b"]
    assert a.block_table == [0, 1, 4]
    assert ids(list(sched.waiting)) == ["b"] and b.block_table == []
    assert sched.block_manager.num_free_blocks == 2

    batch = step(sched)  # b needs 3 blocks for its 9 tokens; 2 are free
    assert ids(batch.seqs) == ["a"] and batch.preempted == []
    assert ids(list(sched.waiting)) == ["b"]
    assert sched.num_preemptions == 1
    finish_all(sched)


def test_preempted_sequence_readmits_with_its_cached_prefix() -> None:
    sched = make_scheduler(num_kv_blocks=5, enable_prefix_caching=True)
    a, b = make_seq("a", 8, base=0), make_seq("b", 8, base=100)
    sched.add(a)
    sched.add(b)
    step(sched)
    batch = step(sched)
    assert ids(batch.preempted) == ["b"]
    assert a.block_table == [0, 1, 4]

    sched.remove(a)
    batch, sampled = step_sampling(sched)
    assert ids(batch.seqs) == ["b"]
    assert b.block_table == [2, 3, 4]  # its own two cached blocks, then a fresh one
    assert batch.num_new_tokens == [1]  # only the sampled token is recomputed
    assert batch.num_prefill_seqs == 1 and sampled == ["b"]
    assert b.num_cached_tokens == 0  # cache stats count the first admission only
    assert sched.block_manager.stats.hit_tokens == 0
    finish_all(sched)


def test_remove_a_waiting_sequence() -> None:
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_seq("a", 4, base=0), make_seq("b", 4, base=100)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.remove(b)
    assert b.status is SequenceStatus.FINISHED
    assert list(sched.waiting) == [] and ids(sched.running) == ["a"]
    finish_all(sched)


def test_running_past_max_num_seqs_schedules_the_oldest_only() -> None:
    # Engine.commit (disaggregated decode) appends to `running` without admission control.
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(f"r{i}", 3, 100 * i) for i in range(3)]
    for seq in seqs:
        commit_decoding(sched, seq)
    batch = step(sched)
    assert ids(batch.seqs) == ["r0", "r1"]
    assert batch.num_new_tokens == [1, 1]
    sched.remove(seqs[0])
    assert ids(step(sched).seqs) == ["r1", "r2"]
