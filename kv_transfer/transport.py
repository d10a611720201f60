"""How the bytes of one reservation travel from the prefill pool to the decode pool.

Control always goes through gRPC (Reserve, Commit, Abort: see client.py); a transport
only moves the bytes. Two exist, picked per (prefill, decode) pair by `make_transport`:

    grpc       chunks in a client stream (any pair; the only one on CPU)
    cuda_ipc   the prefill GPU writes into the decode pool, mapped through CUDA IPC: one
               kernel launch per send (both pools on GPUs of one host; see cuda_ipc.py)
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import torch

from engine.kv_pool import KVPool
from kv_transfer.client import KVTransferClient, RemoteReservation
from kv_transfer.wire import EncodedChunk, encode_layer
from protos import kv_transfer_pb2 as pb

log = logging.getLogger(__name__)


class TransferError(Exception):
    """The bytes of a transfer did not all land; the reservation must be aborted."""


class TransportKind(enum.Enum):
    AUTO = "auto"  # cuda_ipc when both pools are GPUs of one host, else grpc
    GRPC = "grpc"
    CUDA_IPC = "cuda_ipc"


@dataclass(frozen=True)
class SentBytes:
    num_bytes: int
    num_chunks: int  # gRPC messages, or peer-copy calls on the GPU path
    first_send_s: float  # time.perf_counter() of the first byte handed over
    layer_digests: tuple[int, ...] = ()  # GPU path: per layer, what Commit must check


class TransferSession(ABC):
    """The bytes of one reservation.

    Contract: `send_layer` is called from the thread that computes the KV, once the
    layer's blocks are final in the local pool; it returns quickly (the bytes move in the
    background) and every (layer, block) is sent exactly once over the session. `finish`
    blocks until everything landed, or raises TransferError (after its deadline too);
    `abort` stops the session and may be called at any time. The local blocks must stay
    allocated until finish or abort returns.
    """

    @abstractmethod
    def send_layer(self, layer_idx: int, first_block: int, local_block_ids: Sequence[int]) -> None:
        """Send blocks local_block_ids of one layer, which sit at first_block onwards in the
        request's block table."""

    def send_all_layers(self, first_block: int, local_block_ids: Sequence[int]) -> None:
        """Send the blocks in every layer at once (the KV is already complete)."""
        for layer_idx in range(self.num_layers):
            self.send_layer(layer_idx, first_block, local_block_ids)

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @abstractmethod
    def finish(self, timeout_s: float) -> SentBytes: ...

    @abstractmethod
    def abort(self) -> None: ...


class KVTransport(ABC):
    """Opens sessions towards one decode worker."""

    kind: TransportKind
    rpc_transport: int  # the proto enum value sent in Reserve

    @abstractmethod
    def open(self, reservation: RemoteReservation) -> TransferSession: ...

    def close(self) -> None:  # noqa: B027 - most transports hold nothing to release
        """Release what the transport holds (the GPU path: its mapping of the decode pool);
        every session must have finished or aborted."""


# ---- grpc: chunks in a client stream ----------------------------------------------------

_POLL_S = 0.05  # how often the request thread checks for a stopped session while idle


@dataclass(frozen=True)
class _LayerRange:
    layer_idx: int
    first_block: int
    local_block_ids: tuple[int, ...]
    ready: torch.cuda.Event | None  # GPU pool: recorded after the layer's compute


class _End(enum.Enum):
    FINISH = "finish"
    ABORT = "abort"


class GrpcTransport(KVTransport):
    kind = TransportKind.GRPC
    rpc_transport = pb.TRANSPORT_GRPC

    def __init__(self, client: KVTransferClient, pool: KVPool) -> None:
        self.client = client
        self.pool = pool

    def open(self, reservation: RemoteReservation) -> TransferSession:
        return _GrpcSession(self.client, self.pool, reservation)


class _GrpcSession(TransferSession):
    """Block ranges queued by the compute thread, encoded on an encoder thread a message or
    two ahead of gRPC's request thread (`ClientConfig.encode_ahead`, default 1):

        send_layer ─ranges─▶ [queue] ─encoder thread: encode_layer─▶ [ready] ─▶ gRPC

    `send_layer` (the compute thread) only queues a block range. The encoder thread takes the
    next range and encodes its chunks one at a time (`encode_layer`: one hash pass and one
    copy each) while gRPC's request thread hands the previous message to gRPC core, so with
    spare cores encoding overlaps sending. With `encode_ahead=0` the request thread encodes
    each message itself when gRPC asks for it, serially with sending.

    Measured (`loadtest/kv_transfer_bench.py --cpu`, 256 MB, alternating with a bare gRPC
    stream, 15 trials a run): on a 16-core host, 0.82 and 0.89 of the bare stream with
    `encode_ahead=1` against 0.76 and 0.57 encoding on the request thread; on 2 cores (both
    processes sharing them, so the ratio follows CPU work) 0.63 to 0.69 either way.

    `_reading` is held while a chunk is read from the pool; `finish` and `abort` take it
    after stopping the session, so that once they return the local blocks are free to go.
    """

    def __init__(
        self, client: KVTransferClient, pool: KVPool, reservation: RemoteReservation
    ) -> None:
        self._client = client
        self._pool = pool
        self._reservation = reservation
        self._ranges: queue.Queue[_LayerRange | _End] = queue.Queue()
        self._stop = threading.Event()
        self._reading = threading.Lock()
        self._num_bytes = 0
        self._num_chunks = 0
        self._first_send_s = 0.0
        messages = self._messages()
        if client.config.encode_ahead:
            messages = self._encoded_ahead(messages, client.config.encode_ahead)
        self._future = client.stream_future(self._handed_over(messages))
        self._future.add_done_callback(lambda _: self._stop.set())

    # ---- gRPC's request thread -----------------------------------------------------------

    def _messages(self) -> Iterator[bytes]:
        while True:
            try:
                item = self._ranges.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    raise TransferError("transfer stopped") from None
                continue
            if item is _End.FINISH:
                return
            if item is _End.ABORT:
                raise TransferError("transfer aborted by the sender")
            for chunk in self._encode(item):
                self._num_chunks += 1
                self._num_bytes += chunk.num_data_bytes
                yield chunk.message

    def _handed_over(self, messages: Iterator[bytes]) -> Iterator[bytes]:
        """`messages` as gRPC takes them; `_first_send_s` is when it takes the first."""
        for i, message in enumerate(messages):
            if i == 0:
                self._first_send_s = time.perf_counter()
            yield message

    def _encoded_ahead(self, messages: Iterator[bytes], depth: int) -> Iterator[bytes]:
        """`messages` produced on an encoder thread, at most `depth` ahead of the caller
        (gRPC's request thread), so that encoding a chunk overlaps sending the previous one
        where the cores allow. An error of the encoder is raised here, in order."""
        ready: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=depth)

        def put(item: bytes | BaseException | None) -> bool:
            while not self._stop.is_set():
                try:
                    ready.put(item, timeout=_POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        def encode() -> None:
            try:
                for message in messages:
                    if not put(message):
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the request thread
                put(e)
            else:
                put(None)

        encoder = threading.Thread(target=encode, name="kv-encode", daemon=True)
        encoder.start()
        while True:
            try:
                item = ready.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set() and not encoder.is_alive():
                    raise TransferError("transfer stopped") from None
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _encode(self, item: _LayerRange) -> Iterator[EncodedChunk]:
        """The range's chunks, each read from the pool under `_reading`."""
        if item.ready is not None:
            item.ready.synchronize()
        r = self._reservation
        chunks = encode_layer(
            self._pool,
            r.request_id,
            r.epoch,
            item.layer_idx,
            item.local_block_ids,
            item.first_block,
            self._client.config.max_chunk_bytes,
        )
        while True:
            with self._reading:
                if self._stop.is_set():
                    raise TransferError("transfer stopped")
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk

    def _wait_for_reads(self) -> None:
        """Stop the session; return once no chunk is being read from the pool."""
        self._stop.set()
        with self._reading:
            pass

    # ---- caller's thread -----------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self._pool.num_layers

    def send_layer(self, layer_idx: int, first_block: int, local_block_ids: Sequence[int]) -> None:
        ready = None
        if self._pool.device.type == "cuda":  # the request thread reads once this layer is computed
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self._pool.device))
        self._ranges.put(_LayerRange(layer_idx, first_block, tuple(local_block_ids), ready))

    def finish(self, timeout_s: float) -> SentBytes:
        self._ranges.put(_End.FINISH)
        try:
            summary = self._future.result(timeout=timeout_s)
        except grpc.FutureCancelledError:
            raise TransferError("chunk stream cancelled (transfer aborted)") from None
        except grpc.FutureTimeoutError:
            self._future.cancel()
            raise TransferError(f"chunk stream not done after {timeout_s:.1f} s") from None
        except grpc.RpcError as e:
            raise TransferError(f"chunk stream failed: {e.code().name}: {e.details()}") from e
        finally:
            self._wait_for_reads()
        assert summary.num_bytes == self._num_bytes, "receiver counted other bytes than sent"
        return SentBytes(self._num_bytes, self._num_chunks, self._first_send_s)

    def abort(self) -> None:
        self._stop.set()
        self._ranges.put(_End.ABORT)
        self._future.cancel()  # the receiver frees the blocks when the stream breaks off
        self._wait_for_reads()  # after the chunk in hand: the local blocks are free to go
        try:  # and in case no chunk reached it yet
            self._client.abort(self._reservation, "sender aborted")
        except grpc.RpcError as e:
            log.warning("abort of %s not delivered (%s); its lease will expire",
                        self._reservation.request_id, e.code().name)  # fmt: skip


def make_transport(kind: TransportKind, client: KVTransferClient, pool: KVPool) -> KVTransport:
    """The transport for one (prefill pool, decode service) pair.

    AUTO tries the same-host GPU path when the local pool is on a GPU and falls back to grpc
    when the decode side refuses it (another host, a CPU pool, a different layout).
    """
    if kind is TransportKind.GRPC or (kind is TransportKind.AUTO and pool.device.type != "cuda"):
        return GrpcTransport(client, pool)
    from kv_transfer.cuda_ipc import CudaIpcTransport, GpuPathUnavailable

    try:
        return CudaIpcTransport.connect(client, pool)
    except GpuPathUnavailable as e:
        if kind is TransportKind.CUDA_IPC:
            raise
        log.info("same-host GPU path unavailable (%s); using grpc", e)
        return GrpcTransport(client, pool)
