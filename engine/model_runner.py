"""Turns a scheduled batch into tensors, runs the model, returns the logits to sample from.

On CUDA, decode-only steps replay CUDA graphs captured at start-up for batch-size buckets
(1, 2, 4, 8, 16, 24, ... up to `cuda_graph_max_batch`): one graph launch replaces the
~10 kernel launches per layer that otherwise dominate a small decode step. The graph ends
with the logits, so a decode step is: fill two pinned host buffers (ids, positions, slots;
seq_lens, block tables), two host-to-device copies into the graph's static inputs, one
replay, the sampler. Padding rows of a bucket write their K/V to a scratch slot of a
reserved block and are never read back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import AttentionBackend, AttentionMetadata
from engine.config import EngineConfig
from engine.kv_pool import KVPool
from engine.model import LlamaForCausalLM
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of hidden states to sample from
    sampling_rows: list[int]  # batch index of each sampled sequence, aligned with logits


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 8))
    return [s for s in sizes if s <= max_batch]


@dataclass
class _DecodeGraph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [bs, vocab] fp32 output buffer


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model: LlamaForCausalLM,
        pool: KVPool,
        backend: AttentionBackend,
        scratch_block: int | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.pool = pool
        self.backend = backend
        self.device = pool.device
        self.max_blocks = config.max_blocks_per_seq
        # A block nobody else uses, where padding rows of a graph bucket may write.
        self.scratch_block = scratch_block
        self._graphs: dict[int, _DecodeGraph] = {}

    # ---- batch preparation ---------------------------------------------------------------

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        bs = self.pool.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        query_lens: list[int] = []
        tables: list[list[int]] = []
        logits_indices: list[int] = []
        sampling_rows: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            query_lens.append(n)
            tables.append(table)
            if end == seq.num_tokens:
                logits_indices.append(qsl[-1] - 1)
                sampling_rows.append(i)
        width = max(len(t) for t in tables)
        table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=table_tensor.to(dev, non_blocking=True),
            num_prefill_seqs=batch.num_prefill_seqs,
            num_prefill_tokens=qsl[batch.num_prefill_seqs],
            max_query_len=max(query_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return PreparedBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long).to(dev, non_blocking=True),
            positions=torch.tensor(positions, dtype=torch.long).to(dev, non_blocking=True),
            meta=meta,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long).to(
                dev, non_blocking=True
            ),
            sampling_rows=sampling_rows,
        )

    # ---- execution -----------------------------------------------------------------------

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, on_layer_done: Callable[[int], None] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Forward the batch; returns (logits [S, vocab] fp32, batch index of each row)."""
        n = len(batch.seqs)
        if (
            on_layer_done is None
            and batch.num_prefill_seqs == 0
            and self._graph_bucket(n) is not None
        ):
            return self._replay(batch), list(range(n))  # every decode row samples
        prepared = self.prepare(batch)
        hidden = self.model(
            prepared.input_ids, prepared.positions, self.backend, prepared.meta, on_layer_done
        )
        logits = self.model.compute_logits(hidden[prepared.logits_indices])
        return logits, prepared.sampling_rows

    # ---- start-up -------------------------------------------------------------------------

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run eager forwards of dummy mixed batches once, before serving (CUDA only).

        Triton compiles a kernel variant the first time a launch needs it, which stalls the
        whole engine for 0.4 to 1 s; measured (`python -m loadtest.step_trace`, H100): the
        first minute of 2k-prompt traffic hit 11 such steps, TTFT p90 630 ms cold against
        106 ms warm. The kernels do not specialize on what varies per batch (see
        triton_*_attention.py), so the variants left are few: prefill tiles for short and long
        queries, decode with and without split-K and the reduce's padded split counts, and
        the elementwise kernels at 1, 16k and other token counts. These batches reach each
        of them: prefill queries of 0, 17, 100 and 2048 tokens beside 0 to 40 decode rows,
        at block-table widths of 8 (split-K capped at 2 tiles) and 129 blocks. Every row
        reads and writes the scratch block only. Cost: ~55 forwards, a second or two once
        Triton's on-disk cache holds the variants (the first start compiles them).
        """
        if self.device.type != "cuda" or self.scratch_block is None:
            return
        bs = self.pool.block_size
        budget = self.config.max_num_batched_tokens
        for width in (8, 129):
            width = min(width, self.max_blocks)
            for query in (0, 17, 100, 2048):
                for rows in (0, 1, 2, 3, 5, 8, 17, 40):
                    q = min(query, width * bs, budget)
                    r = max(0, min(rows, budget - q, self.config.max_num_seqs - (q > 0)))
                    if q > 0 or r > 0:
                        self._warm_batch(q, r, width)
        torch.cuda.synchronize(self.device)

    def _warm_batch(self, query: int, rows: int, width: int) -> None:
        """One eager `run`: a prefill of `query` tokens (none if 0), then `rows` decode rows
        at a context of width * block_size - 1 tokens, every block the scratch block (run
        before the graphs are captured, so a decode-only batch is eager too)."""
        context = width * self.pool.block_size - 1
        table = [self.scratch_block] * width
        params = SamplingParams(max_tokens=1)
        batch = ScheduledBatch(num_prefill_seqs=1 if query else 0)
        if query:
            batch.seqs.append(Sequence("warm-up", [0] * query, params, block_table=table))
            batch.num_new_tokens.append(query)
        for i in range(rows):
            batch.seqs.append(Sequence(f"warm-up-{i}", [0] * context, params,
                                       num_computed_tokens=context - 1, block_table=table))  # fmt: skip
            batch.num_new_tokens.append(1)
        self.run(batch)

    # ---- CUDA graphs ---------------------------------------------------------------------

    def _graph_bucket(self, n: int) -> int | None:
        for size in self._graphs:
            if size >= n:
                return size
        return None

    @torch.inference_mode()
    def capture_decode_graphs(self) -> None:
        """Capture one decode graph per batch-size bucket (CUDA only, needs scratch_block)."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        assert self.scratch_block is not None
        max_bs = min(self.config.cuda_graph_max_batch, self.config.max_num_seqs)
        sizes = graph_batch_sizes(max_bs)
        dev = self.device
        bs = self.pool.block_size
        # The inputs live in two packed device tensors (int64: ids, positions, slots; int32:
        # seq_lens, block tables) filled from pinned twins by two copies per replay.
        w = self.max_blocks
        self._host64 = torch.zeros((3, max_bs), dtype=torch.long).pin_memory()
        self._host32 = torch.zeros(max_bs * (1 + w), dtype=torch.int32).pin_memory()
        self._host64[2] = self.scratch_block * bs
        self._host32[:max_bs] = 1
        self._host32[max_bs:] = self.scratch_block
        self._dev64 = self._host64.to(dev)
        self._dev32 = self._host32.to(dev)
        self._copied = torch.cuda.Event()
        st = {
            "input_ids": self._dev64[0],
            "positions": self._dev64[1],
            "slot_mapping": self._dev64[2],
            "seq_lens": self._dev32[:max_bs],
            "query_start_loc": torch.arange(max_bs + 1, dtype=torch.int32, device=dev),
            "block_tables": self._dev32[max_bs:].view(max_bs, w),
        }
        pool_handle = None
        for size in sorted(sizes, reverse=True):  # largest first so smaller ones share memory
            meta = AttentionMetadata(
                slot_mapping=st["slot_mapping"][:size],
                query_start_loc=st["query_start_loc"][: size + 1],
                seq_lens=st["seq_lens"][:size],
                block_tables=st["block_tables"][:size],
                num_prefill_seqs=0,
                num_prefill_tokens=0,
                max_query_len=1,
                query_lens_cpu=[1] * size,
                seq_lens_cpu=[1] * size,
            )
            args = (st["input_ids"][:size], st["positions"][:size], self.backend, meta)
            for _ in range(2):  # warm up (Triton compiles, cuBLAS picks kernels)
                self.model(*args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool_handle):
                logits = self.model.compute_logits(self.model(*args))
            pool_handle = graph.pool()
            self._graphs[size] = _DecodeGraph(graph=graph, logits=logits)
        self._graphs = dict(sorted(self._graphs.items()))
        log.info("captured decode CUDA graphs for batch sizes %s", sorted(self._graphs))

    def _replay(self, batch: ScheduledBatch) -> torch.Tensor:
        """Decode-only batch through its bucket's graph; returns logits [n, vocab] (a view
        of the graph's output, valid until the next replay)."""
        n = len(batch.seqs)
        size = self._graph_bucket(n)
        assert size is not None
        bs, w, max_bs = self.pool.block_size, self.max_blocks, self._host64.shape[1]
        self._copied.synchronize()  # the last replay's copies have read the pinned buffers
        h64 = self._host64.numpy()
        h32 = self._host32.numpy()
        tables = h32[max_bs:].reshape(max_bs, w)
        for i, seq in enumerate(batch.seqs):
            pos = seq.num_computed_tokens
            table = seq.block_table
            h64[0, i] = seq.token_ids[pos]
            h64[1, i] = pos
            h64[2, i] = table[pos // bs] * bs + pos % bs
            h32[i] = pos + 1
            tables[i, : len(table)] = table
        # Rows n..size of the bucket write to and attend to the scratch block only.
        h64[2, n:size] = self.scratch_block * bs
        h32[n:size] = 1
        tables[n:size] = self.scratch_block
        self._dev64.copy_(self._host64, non_blocking=True)  # 3 x max_bs: small, contiguous
        self._dev32[: max_bs + size * w].copy_(self._host32[: max_bs + size * w], non_blocking=True)
        self._copied.record()
        self._graphs[size].graph.replay()
        return self._graphs[size].logits[:n]
