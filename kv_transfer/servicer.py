"""The decode side's KV-transfer servicer: reservations, chunk streams, commit, abort, health.

A transfer, as the servicer sees it:

  Reserve       check protocol version, layout and sizes, reserve blocks in the sink (all
                or nothing, else RESOURCE_EXHAUSTED), open a lease with a deadline, answer
                epoch + blocks
  StreamChunks  one stream per reservation; each chunk is checked (reservation and epoch,
                layout, block range, size, checksum) and written straight into the reserved
                blocks. Any bad chunk ends the lease (blocks freed) and the stream with a
                status; a stream that breaks off (peer gone, cancelled: it ends without the
                sender's END_OF_STREAM message) ends it too.
  Commit        every (layer, block) must have arrived (or, on the GPU path, the digests of
                what landed must match the sender's); then the sink's engine owns the blocks
  Abort         frees the blocks; idempotent

The lease sweeper frees reservations whose deadline passes first. Every RPC needs the
shared token in metadata (`AuthInterceptor`, kv_transfer/server.py, which also starts and stops
the server); TLS is on when `ServerConfig.tls` is set.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import torch

from engine.sampler import TokenLogprobs
from engine.sampling_params import MAX_LOGPROBS
from kv_transfer import ipc_handle, ipc_plan
from kv_transfer.chunk_error import ChunkError
from kv_transfer.chunk_writer import CHUNK_ERROR_CODES, ChunkWriter
from kv_transfer.layout import KVLayout
from kv_transfer.lease import Lease, LeaseNotFound, LeaseState, LeaseTable
from kv_transfer.metrics import TransferCounters
from kv_transfer.sampling_options import sampling_from_pb
from kv_transfer.sink import KVSink, ReserveSpec, SinkFull
from kv_transfer.wire import END_OF_STREAM, PROTOCOL_VERSION, split_chunk
from protos import kv_transfer_pb2 as pb
from protos import kv_transfer_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from kv_transfer.server import ServerConfig

log = logging.getLogger(__name__)


def _beside_engine(device: torch.device) -> contextlib.AbstractContextManager:
    """A side stream of a GPU (the engine's steps stay on theirs), or nothing on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device))


class KVTransferServicer(pb_grpc.KVTransferServicer):
    def __init__(self, sink: KVSink, config: ServerConfig) -> None:
        self.sink = sink
        self.config = config
        self.counters = TransferCounters()
        self.leases = LeaseTable(on_expire=self._on_expire)
        self._epochs = itertools.count(1)
        self._epoch_lock = threading.Lock()

    # ---- lease endings -------------------------------------------------------------------

    def _on_expire(self, lease: Lease) -> None:
        log.warning("KV reservation %s expired; freeing its blocks", lease.request_id)
        self.counters.add("leases_expired")
        self.sink.cancel(lease.request_id)

    def fail_lease(self, lease: Lease, reason: str) -> bool:
        """End an active lease as ABORTED and free its blocks. Caller holds lease.lock."""
        if not self.leases.end(lease, LeaseState.ABORTED):
            return False
        log.info("KV transfer %s aborted: %s", lease.request_id, reason)
        self.counters.add("transfers_failed")
        self.sink.cancel(lease.request_id)
        return True

    # ---- RPCs ----------------------------------------------------------------------------

    def Reserve(self, request: pb.ReserveRequest, context: grpc.ServicerContext):  # noqa: N802
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if request.protocol_version != PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"KV-transfer protocol differs: sender v{request.protocol_version} (0: a version "
                f"without one), receiver v{PROTOCOL_VERSION}; run one Baton version on both tiers",
            )
        if not request.request_id:
            context.abort(invalid, "request_id is empty")
        if not request.HasField("layout"):
            context.abort(invalid, "layout is missing")
        try:
            layout = KVLayout.from_pb(request.layout)
            params = sampling_from_pb(request.sampling)
        except (ValueError, ChunkError) as e:
            context.abort(invalid, str(e))
        if layout != self.sink.layout:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"KV layout differs: sender {layout}, receiver {self.sink.layout}",
            )
        bs = layout.block_size
        num_prompt_blocks = (len(request.prompt_token_ids) + bs - 1) // bs
        if request.num_blocks != num_prompt_blocks:
            context.abort(
                invalid,
                f"num_blocks {request.num_blocks} does not match a prompt of "
                f"{len(request.prompt_token_ids)} tokens ({num_prompt_blocks} blocks of {bs})",
            )
        lease_s = request.lease_ms / 1000 if request.lease_ms else self.config.default_lease_s
        lease_s = min(lease_s, self.config.max_lease_s)
        spec = ReserveSpec(
            request.request_id, tuple(request.prompt_token_ids), params, request.cache_salt
        )
        try:
            r = self.sink.reserve(spec)
        except SinkFull as e:
            self.counters.add("reservations_refused")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ValueError as e:
            context.abort(invalid, str(e))
        with self._epoch_lock:
            epoch = next(self._epochs)
        lease = Lease(
            request_id=request.request_id,
            epoch=epoch,
            block_ids=r.block_ids,
            num_cached_blocks=r.num_cached_blocks,
            num_layers=layout.num_layers,
            deadline_s=time.monotonic() + lease_s,
        )
        self.leases.add(lease)
        return pb.ReserveResponse(
            epoch=epoch,
            num_cached_blocks=r.num_cached_blocks,
            block_ids=list(r.block_ids),
            lease_ms=int(lease_s * 1000),
        )

    def StreamChunks(self, request_iterator, context: grpc.ServicerContext):  # noqa: N802
        """Receive on this thread, check and write on the stream's `_ChunkWriter`."""
        stream = _StreamState()

        def on_rpc_done() -> None:
            if not stream.ended_ok:
                self._fail_stream(stream, "chunk stream broke off")

        context.add_callback(on_rpc_done)
        writer: ChunkWriter | None = None
        try:
            for message in request_iterator:  # serialized KVChunks (see _add_servicer)
                if writer is not None and writer.failure is not None:
                    break
                if stream.end_marked:
                    self._fail_stream(stream, "a message after the end of the stream")
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "a message after the end of the stream"
                    )
                if message == END_OF_STREAM:
                    stream.end_marked = True
                    continue
                try:
                    received = split_chunk(message)
                except ChunkError as e:
                    self.counters.add("chunks_rejected")
                    self._fail_stream(stream, str(e))
                    context.abort(CHUNK_ERROR_CODES[e.kind], str(e))
                chunk = received.header
                if stream.lease is None:
                    try:
                        stream.lease = self.leases.get(chunk.request_id, chunk.epoch)
                    except LeaseNotFound as e:
                        self.counters.add("chunks_rejected")
                        context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
                    writer = ChunkWriter(stream.lease, self.sink, self.counters, self.fail_lease)
                elif (chunk.request_id, chunk.epoch) != (
                    stream.lease.request_id,
                    stream.lease.epoch,
                ):
                    self._fail_stream(stream, "stream mixed two reservations")
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "one chunk stream carries one reservation"
                    )
                assert writer is not None
                writer.put(received)  # blocks while the writer is WRITE_AHEAD_CHUNKS behind
                stream.num_chunks += 1
                stream.num_bytes += len(received.data)
        finally:
            if writer is not None:
                writer.close()  # every chunk handed over is written (or dropped after a failure)
        if writer is not None and writer.failure is not None:
            context.abort(*writer.failure)
        if not stream.end_marked or not context.is_active():
            # The peer went away: gRPC can end the request iterator as if the stream had
            # finished, but only a sender that finished sends END_OF_STREAM. Free the
            # blocks now rather than when the lease expires.
            self._fail_stream(stream, "chunk stream broke off (no end marker: peer gone)")
            context.abort(grpc.StatusCode.CANCELLED, "chunk stream broke off")
        stream.ended_ok = True
        self.counters.add("bytes_received", stream.num_bytes)
        return pb.StreamSummary(num_chunks=stream.num_chunks, num_bytes=stream.num_bytes)

    def _fail_stream(self, stream: _StreamState, reason: str) -> None:
        """Fail the stream's lease (its blocks freed), if it has one yet."""
        if stream.lease is not None:
            with stream.lease.lock:
                self.fail_lease(stream.lease, reason)

    def Commit(self, request: pb.CommitRequest, context: grpc.ServicerContext):  # noqa: N802
        try:
            lease = self.leases.get(request.request_id, request.epoch)
        except LeaseNotFound as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
        with lease.lock:
            if lease.state is not LeaseState.ACTIVE:
                context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"reservation {lease.request_id!r} is {lease.state.value}",
                )
            try:
                logprobs = first_token_logprobs(request)
            except ValueError as e:
                self.fail_lease(lease, str(e))
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            if request.copied_layers:  # same-host GPU path: nothing was streamed
                problem = self._check_gpu_copy(lease, request)
                if problem:
                    self.fail_lease(lease, problem)
                    context.abort(grpc.StatusCode.DATA_LOSS, problem)
                lease.mark_all_received()
                lease.num_bytes_received = lease.num_blocks_to_send * (
                    lease.num_layers * self.sink.layout.layer_block_bytes
                )
            if not lease.is_complete:
                problem = f"commit of {lease.request_id!r} before every block arrived"
                self.fail_lease(lease, problem)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
            self.leases.end(lease, LeaseState.COMMITTED)
            try:
                self.sink.commit(lease.request_id, int(request.first_token_id), logprobs)
            except ValueError as e:  # the engine freed the blocks already
                lease.state = LeaseState.ABORTED
                self.counters.add("transfers_failed")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.counters.add("transfers_committed")
        return pb.CommitResponse(num_bytes_received=lease.num_bytes_received)

    def _check_gpu_copy(self, lease: Lease, request: pb.CommitRequest) -> str:
        """'' if the GPU copy is whole and its per-layer digests match what landed."""
        layers = sorted(request.copied_layers)
        if layers != list(range(lease.num_layers)):
            return f"GPU copy covered layers {layers}, expected all {lease.num_layers}"
        if len(request.layer_digests) != lease.num_layers:
            return f"{len(request.layer_digests)} layer digests, expected {lease.num_layers}"
        ids = lease.block_ids[lease.num_cached_blocks :]
        pool = self.sink.pool_tensor()
        with _beside_engine(pool.device):  # on a GPU: one kernel launch, reads in place
            landed_list = ipc_plan.layer_digests(
                pool, range(lease.num_layers), ids, lease.num_cached_blocks
            ).tolist()
        bad = [
            i
            for i, (a, b) in enumerate(zip(landed_list, request.layer_digests, strict=True))
            if a != b
        ]
        return f"GPU copy digest mismatch on layers {bad}" if bad else ""

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext):  # noqa: N802
        try:
            lease = self.leases.get(request.request_id, request.epoch)
        except LeaseNotFound:
            return pb.AbortResponse(released=False)
        with lease.lock:
            released = self.fail_lease(
                lease, f"peer aborted: {request.reason or 'no reason given'}"
            )
        return pb.AbortResponse(released=released)

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext):  # noqa: N802
        return pb.HealthResponse(
            serving=True,
            num_free_blocks=self.sink.num_free_blocks,
            num_active_reservations=len(self.leases),
            layout=self.sink.layout.to_pb(),
        )

    def OpenPool(self, request: pb.OpenPoolRequest, context: grpc.ServicerContext):  # noqa: N802
        precondition = grpc.StatusCode.FAILED_PRECONDITION
        if request.host_id != self.config.host_id:
            context.abort(precondition, "peer is on another host: use the grpc transport")
        try:
            layout = KVLayout.from_pb(request.layout)
        except ChunkError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if layout != self.sink.layout:
            context.abort(precondition, f"KV layout differs: {layout} vs {self.sink.layout}")
        pool = self.sink.pool_tensor()
        if pool.device.type != "cuda":
            context.abort(precondition, "the receiver's KV pool is not on a GPU")
        with _beside_engine(pool.device):  # compile the Commit check's kernel now, not then
            ipc_plan.layer_digests(pool, range(1), [0], 0).tolist()
        return ipc_handle.export_pool(pool)


@dataclass
class _StreamState:
    lease: Lease | None = None
    end_marked: bool = False  # END_OF_STREAM arrived: the sender finished on purpose
    ended_ok: bool = False
    num_chunks: int = 0
    num_bytes: int = 0


def first_token_logprobs(request: pb.CommitRequest) -> TokenLogprobs | None:
    """The Commit's first-token logprobs, checked; ValueError names what is wrong."""
    if not request.HasField("first_token_logprobs"):
        return None
    lp = request.first_token_logprobs
    ids, values = list(lp.top_token_ids), list(lp.top_logprobs)
    if len(ids) != len(values):
        raise ValueError(f"first_token_logprobs: {len(ids)} top ids but {len(values)} logprobs")
    if len(ids) > MAX_LOGPROBS:
        raise ValueError(f"first_token_logprobs: {len(ids)} alternatives, at most {MAX_LOGPROBS}")
    if any(t < 0 for t in ids) or not all(x <= 0.0 for x in [lp.logprob, *values]):
        raise ValueError("first_token_logprobs: negative token id, or a logprob > 0 or NaN")
    return TokenLogprobs(
        int(request.first_token_id), lp.logprob, tuple(zip(ids, values, strict=True))
    )
