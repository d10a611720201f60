"""Prefill side: stream each layer's KV to the decode worker as soon as it is computed.

A request, in order:

  add_request   Reserve on the decode side (its prefix hits come back: those blocks are
                never sent), open a transport session, queue the prompt in the engine with
                hold_kv=True and max_tokens=1
  step          `engine.step(on_layer_done=...)`: after layer i has written its K/V, the
                hook hands the session layer i's newly final blocks of every streamed
                request in the batch; they move in the background while layer i+1 computes
  finished      the step that samples the first token ends the prefill: wait for the
                session's last bytes, release the local blocks (every byte has landed),
                send Commit with the first token; the outcome comes when Commit answers
                (`complete`, on a gRPC thread), so the caller's next prefill step need not
                wait for the decode side. On any failure: Abort, report FAILED.

Which blocks are final after layer i of a step: the step computes tokens [c, c + n) of a
sequence; blocks wholly below c + n are final, and so is the last (partial) block once the
prompt's end is reached. Each layer keeps a cursor `sent_upto`, so a block is sent once,
including blocks the prefill side took from its own prefix cache.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from engine.engine import Engine
from engine.sampler import TokenLogprobs
from engine.sampling_params import SamplingParams
from kv_transfer.client import KVTransferClient, RemoteReservation
from kv_transfer.layout import KVLayout
from kv_transfer.metrics import TransferRecord
from kv_transfer.transport import KVTransport, SentBytes, TransferSession

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
        self._num_committing = 0  # Commits sent, not yet answered
        self._lock = threading.Lock()  # guards _num_committing (gRPC threads end Commits)
        # Aborts after a failed Commit: a blocking RPC has no place on gRPC's own thread.
        self._aborter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-abort")

    @property
    def num_in_flight(self) -> int:
        """Requests streaming or committing: the client must stay open while any is."""
        with self._lock:
            return len(self._streamed) + self._num_committing

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
        future = self.reserve_future(request_id, prompt_token_ids, params, cache_salt)
        reservation = self.client.reservation(request_id, future.result())
        self.add_reserved(reservation, prompt_token_ids, params, cache_salt)
        return reservation

    def reserve_future(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str = "",
    ) -> grpc.Future:
        """Send Reserve without waiting (a worker overlaps the Reserves of a batch); pass
        `client.reservation(request_id, future.result())` to `add_reserved`."""
        return self.client.reserve_future(
            request_id,
            prompt_token_ids,
            params,
            self.layout,
            cache_salt=cache_salt,
            lease_s=self.lease_s,
            transport=self.transport.rpc_transport,
        )

    def add_reserved(
        self,
        reservation: RemoteReservation,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str = "",
    ) -> None:
        """Queue the prefill of a reserved request. Raises ValueError (the reservation is
        aborted then)."""
        request_id = reservation.request_id
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
        """One engine step; outcomes of the streamed requests whose prefill ended in it
        (their Commits sent together, then waited for)."""
        outputs = self.engine.step(on_layer_done=self.on_layer_done)
        prefill_end_s = time.perf_counter()
        futures: list[Future[TransferOutcome]] = []
        for out in outputs:
            if out.request_id in self._streamed and out.finished:
                future: Future[TransferOutcome] = Future()
                self.complete(
                    out.request_id, out.new_token_ids[0], prefill_end_s, future.set_result
                )
                futures.append(future)
        return [f.result() for f in futures]

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
        except ValueError as e:  # the client was closed meanwhile: the lease frees them
            log.warning("abort of %s not delivered: %s", reservation.request_id, e)

    def close(self) -> None:
        """Close the transport and the client (once nothing is in flight)."""
        self._aborter.shutdown(wait=True)
        try:
            self.transport.close()
        finally:
            self.client.close()

    def complete(
        self,
        request_id: str,
        first_token_id: int,
        prefill_end_s: float,
        on_outcome: Callable[[TransferOutcome], None],
        first_token_logprobs: TokenLogprobs | None = None,
    ) -> None:
        """End a streamed request whose prefill is done (call on the engine's thread): wait
        for its last bytes, release its local blocks, send Commit. `on_outcome` runs once
        with the outcome: when Commit answers (on a gRPC thread), or here if the transfer
        failed before it. A failed Commit aborts the reservation (its lease would too)."""
        s = self._streamed.pop(request_id)
        try:
            sent = s.session.finish(self.finish_timeout_s)
            copied = list(range(self.layout.num_layers)) if sent.layer_digests else None
            commit = self.client.commit_future(
                s.reservation,
                first_token_id,
                copied,
                list(sent.layer_digests),
                first_token_logprobs,
            )
        except Exception as e:  # TransferError, grpc.RpcError, or a bug: never leak blocks
            detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
            self.engine.release(request_id)
            self._abort_remote(s.reservation, detail)
            on_outcome(self._outcome(request_id, first_token_id, prefill_end_s, None, detail))
            return
        self.engine.release(request_id)  # every byte has landed: the blocks are free to go
        with self._lock:
            self._num_committing += 1

        def committed(future: grpc.Future) -> None:
            if future.cancelled():  # exception() would raise: the outcome must still come
                detail = "CANCELLED: Commit cancelled"
            else:
                error = future.exception()
                detail = "" if error is None else f"{error.code().name}: {error.details()}"
            if detail:
                self._aborter.submit(self._abort_remote, s.reservation, detail)
            with self._lock:
                self._num_committing -= 1
            on_outcome(self._outcome(request_id, first_token_id, prefill_end_s, sent, detail))

        commit.add_done_callback(committed)

    def _outcome(
        self,
        request_id: str,
        first_token_id: int,
        prefill_end_s: float,
        sent: SentBytes | None,
        detail: str,
    ) -> TransferOutcome:
        done_s = time.perf_counter()
        record = TransferRecord(
            request_id=request_id,
            transport=self.transport.kind.value,
            num_bytes=0 if sent is None else sent.num_bytes,
            num_chunks=0 if sent is None else sent.num_chunks,
            duration_s=done_s - (prefill_end_s if sent is None else sent.first_send_s),
            exposed_s=done_s - prefill_end_s,
        )
        status = TransferStatus.FAILED if detail else TransferStatus.COMMITTED
        return TransferOutcome(request_id, status, first_token_id, record, detail)
