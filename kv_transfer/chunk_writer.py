"""The decode side's chunk writer: checks and writes one chunk stream on a thread of its own.

gRPC asks for a stream's next message only when the handler asks, so a handler that hashed
and copied each chunk itself would leave the connection idle meanwhile. Instead:

    handler thread: receive, split, find the lease ─▶ [≤ WRITE_AHEAD_CHUNKS] ─▶
    writer thread:  under the lease's lock: check (layout, range, size, xxh3), copy into
                    the reserved blocks, mark them received

The first failure ends the lease (blocks freed) and is kept in `failure` for the handler to
answer with; chunks after it are dropped. `close` returns once every chunk handed over has
been written or dropped, so a stream that ends OK has landed all its bytes before its
answer (and so before any Commit).
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
from collections.abc import Callable

import grpc

from kv_transfer.chunk_error import ChunkError, ChunkErrorKind
from kv_transfer.lease import Lease, LeaseState
from kv_transfer.metrics import TransferCounters
from kv_transfer.sink import KVSink
from kv_transfer.wire import ReceivedChunk, decode_chunk

log = logging.getLogger(__name__)

WRITE_AHEAD_CHUNKS = 2  # received chunks the writer may be behind the receiving (4 MiB each)

CHUNK_ERROR_CODES = {
    ChunkErrorKind.BAD_LAYOUT: grpc.StatusCode.INVALID_ARGUMENT,
    ChunkErrorKind.BAD_RANGE: grpc.StatusCode.INVALID_ARGUMENT,
    ChunkErrorKind.BAD_SIZE: grpc.StatusCode.INVALID_ARGUMENT,
    ChunkErrorKind.BAD_CHECKSUM: grpc.StatusCode.DATA_LOSS,
    ChunkErrorKind.BAD_MESSAGE: grpc.StatusCode.INVALID_ARGUMENT,
    ChunkErrorKind.UNKNOWN_RESERVATION: grpc.StatusCode.NOT_FOUND,
}

Failure = tuple[grpc.StatusCode, str]  # the status the stream ends with


class _End(enum.Enum):
    END = "end"  # no more chunks in this stream


class ChunkWriter:
    """One stream's writer thread (see the module doc).

    fail_lease(lease, reason) ends an active lease and frees its blocks; the caller holds
    lease.lock.
    """

    def __init__(
        self,
        lease: Lease,
        sink: KVSink,
        counters: TransferCounters,
        fail_lease: Callable[[Lease, str], bool],
    ) -> None:
        self._lease = lease
        self._sink = sink
        self._layout = sink.layout
        self._counters = counters
        self._fail_lease = fail_lease
        self._queue: queue.Queue[ReceivedChunk | _End] = queue.Queue(WRITE_AHEAD_CHUNKS)
        self.failure: Failure | None = None
        self._thread = threading.Thread(target=self._run, name="kv-write", daemon=True)
        self._thread.start()

    def put(self, chunk: ReceivedChunk) -> None:
        """Hand over a chunk; blocks while the writer is WRITE_AHEAD_CHUNKS behind."""
        self._queue.put(chunk)

    def close(self) -> None:
        self._queue.put(_End.END)
        self._thread.join()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not _End.END:  # drains even after a failure
            if self.failure is not None:
                continue
            try:
                self.failure = self._write(chunk)
            except Exception as e:  # a bug or a sink failure: end the stream, keep draining
                log.exception("writing a KV chunk of %s failed", self._lease.request_id)
                with self._lease.lock:
                    self._fail_lease(self._lease, f"writing a chunk failed: {e!r}")
                self.failure = grpc.StatusCode.INTERNAL, f"writing a chunk failed: {e!r}"

    def _write(self, chunk: ReceivedChunk) -> Failure | None:
        lease = self._lease
        with lease.lock:
            if lease.state is not LeaseState.ACTIVE:
                self._counters.add("chunks_rejected")
                return grpc.StatusCode.NOT_FOUND, (
                    f"reservation {lease.request_id!r} is {lease.state.value}"
                )
            try:
                got = decode_chunk(
                    chunk, self._layout, len(lease.block_ids), lease.num_cached_blocks
                )
            except ChunkError as e:
                self._counters.add("chunks_rejected")
                self._fail_lease(lease, str(e))
                return CHUNK_ERROR_CODES[e.kind], str(e)
            ids = lease.block_ids[got.first_block : got.first_block + got.num_blocks]
            self._sink.write_blocks(got.layer_idx, ids, got.kv)
            lease.mark_received(got.layer_idx, got.first_block, got.num_blocks)
            lease.num_bytes_received += len(chunk.data)
        return None
