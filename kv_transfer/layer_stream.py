"""Prefill side: stream each layer's KV to the decode worker as soon as it is computed.

A request, in order:

  add_request   Reserve on the decode side (its prefix hits come back: those blocks are
                never sent), open a transport session, queue the prompt in the engine with
                hold_kv=True and max_tokens=1
  step          `engine.step(on_layer_done=...)`: after layer i has written its K/V, the
                hook hands the session layer i's newly final blocks of every streamed
                request in the batch; they move in the background while layer i+1 computes
  finished      the step that samples the first token ends the prefill: wait for the
                session's last bytes (the exposed time), Commit with the first token, then
                release the local blocks. On any failure: Abort, release, report FAILED.

Which blocks are final after layer i of a step: the step computes tokens [c, c + n) of a
sequence; blocks wholly below c + n are final, and so is the last (partial) block once the
prompt's end is reached. Each layer keeps a cursor `sent_upto`, so a block is sent once,
including blocks the prefill side took from its own prefix cache.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from dataclasses import dataclass

import grpc

from engine.engine import Engine
from engine.sampling_params import SamplingParams
from kv_transfer.client import KVTransferClient, RemoteReservation
from kv_transfer.metrics import TransferRecord
from kv_transfer.transport import KVTransport, TransferError, TransferSession
from kv_transfer.wire import KVLayout

log = logging.getLogger(__name__)


class TransferStatus(enum.Enum):
    COMMITTED = "committed"  # the decode side owns the KV and continues the request
    FAILED = "failed"  # nothing kept on either side


@dataclass(frozen=True)
class TransferOutcome:
    request_id: str
    status: TransferStatus
    first_token_id: int
    record: TransferRecord  # bytes and timings (of what was sent, also on failure)
    detail: str = ""  # why it failed


@dataclass(eq=False)
class _Streamed:
    reservation: RemoteReservation
    session: TransferSession
    sent_upto: list[int]  # per layer: blocks [0, sent_upto) are sent or held by the receiver


class LayerStreamer:
    """Drives a prefill engine and streams its held requests' KV, layer by layer."""

    def __init__(
        self,
        engine: Engine,
        client: KVTransferClient,
        transport: KVTransport,
        lease_s: float = 10.0,
        finish_timeout_s: float = 30.0,
    ) -> None:
        self.engine = engine
        self.client = client
        self.transport = transport
        self.lease_s = lease_s
        self.finish_timeout_s = finish_timeout_s
        self.layout = KVLayout.of_pool(engine.pool)
        self._streamed: dict[str, _Streamed] = {}

    @property
    def num_in_flight(self) -> int:
        return len(self._streamed)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str = "",
    ) -> RemoteReservation:
        """Reserve on the decode side, then queue the prefill.

        Raises grpc.RpcError (RESOURCE_EXHAUSTED: the decode side is full) or ValueError;
        nothing is held on either side then.
        """
        reservation = self.client.reserve(
            request_id,
            prompt_token_ids,
            params,
            self.layout,
            cache_salt=cache_salt,
            lease_s=self.lease_s,
            transport=self.transport.rpc_transport,
        )
        try:
            first_token_params = dataclasses.replace(params, max_tokens=1)
            self.engine.add_request(
                request_id, prompt_token_ids, first_token_params, cache_salt, hold_kv=True
            )
            session = self.transport.open(reservation)
        except Exception:
            self.engine.abort(request_id)
            self.client.abort(reservation, "prefill side could not start")
            raise
        start = reservation.num_cached_blocks
        self._streamed[request_id] = _Streamed(
            reservation, session, [start] * self.layout.num_layers
        )
        return reservation

    def on_layer_done(self, layer_idx: int) -> None:
        batch = self.engine.current_batch
        bs = self.layout.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            s = self._streamed.get(seq.request_id)
            if s is None:
                continue
            end = seq.num_computed_tokens + n  # not yet advanced: this step's chunk end
            if end >= seq.num_prompt_tokens:
                final = (seq.num_prompt_tokens + bs - 1) // bs
            else:
                final = end // bs
            first = s.sent_upto[layer_idx]
            if final > first:
                s.session.send_layer(layer_idx, first, seq.block_table[first:final])
                s.sent_upto[layer_idx] = final

    def step(self) -> list[TransferOutcome]:
        """One engine step; outcomes of the streamed requests whose prefill ended in it."""
        outputs = self.engine.step(on_layer_done=self.on_layer_done)
        prefill_end_s = time.perf_counter()
        outcomes = []
        for out in outputs:
            if out.request_id in self._streamed and out.finished:
                outcomes.append(self._complete(out.request_id, out.new_token_ids[0], prefill_end_s))
        return outcomes

    def abort(self, request_id: str, reason: str) -> bool:
        """Stop a streamed request anywhere; frees its blocks on both sides."""
        s = self._streamed.pop(request_id, None)
        if s is None:
            return False
        s.session.abort()
        self.engine.abort(request_id)
        self._abort_remote(s.reservation, reason)
        return True

    def _abort_remote(self, reservation: RemoteReservation, reason: str) -> None:
        try:
            self.client.abort(reservation, reason)
        except grpc.RpcError as e:  # the lease frees the blocks when it expires
            log.warning("abort of %s not delivered: %s", reservation.request_id, e.code().name)

    def _complete(
        self, request_id: str, first_token_id: int, prefill_end_s: float
    ) -> TransferOutcome:
        s = self._streamed.pop(request_id)
        status, detail = TransferStatus.COMMITTED, ""
        num_bytes = num_chunks = 0
        first_send_s = prefill_end_s
        try:
            sent = s.session.finish(self.finish_timeout_s)
            num_bytes, num_chunks, first_send_s = sent.num_bytes, sent.num_chunks, sent.first_send_s
            copied = list(range(self.layout.num_layers)) if sent.layer_digests else None
            self.client.commit(s.reservation, first_token_id, copied, list(sent.layer_digests))
        except TransferError as e:
            status, detail = TransferStatus.FAILED, str(e)
            self._abort_remote(s.reservation, detail)
        except grpc.RpcError as e:
            status, detail = TransferStatus.FAILED, f"{e.code().name}: {e.details()}"
            self._abort_remote(s.reservation, detail)
        finally:
            self.engine.release(request_id)
        done_s = time.perf_counter()
        record = TransferRecord(
            request_id=request_id,
            transport=self.transport.kind.value,
            num_bytes=num_bytes,
            num_chunks=num_chunks,
            duration_s=done_s - first_send_s,
            exposed_s=done_s - prefill_end_s,
        )
        return TransferOutcome(request_id, status, first_token_id, record, detail)
