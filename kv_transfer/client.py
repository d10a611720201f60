"""The prefill side's stub for one decode worker's KV-transfer service.

Every call carries the shared token and a deadline; failures surface as `grpc.RpcError`
with the server's status code and message.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from engine.sampler import TokenLogprobs
from engine.sampling_params import SamplingParams
from kv_transfer.layout import KVLayout
from kv_transfer.sampling_options import sampling_to_pb
from kv_transfer.wire import (
    DEFAULT_CHUNK_BYTES,
    END_OF_STREAM,
    PROTOCOL_VERSION,
    TOKEN_METADATA_KEY,
)
from protos import kv_transfer_pb2 as pb
from protos import kv_transfer_pb2_grpc as pb_grpc

MESSAGE_OVERHEAD_BYTES = 64 * 2**10


@dataclass(frozen=True)
class ClientConfig:
    target: str  # host:port of the decode worker's service
    auth_token: str
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    rpc_timeout_s: float = 10.0  # Reserve, Commit, Abort, Health, OpenPool
    stream_timeout_s: float = 120.0  # a whole chunk stream
    tls_root_certs_pem: bytes | None = None  # set: TLS on
    tls_server_name: str | None = None  # override the name checked against the certificate
    # chunk messages encoded ahead of gRPC's request thread on an encoder thread (0: encode
    # on the request thread itself, serially with sending; see transport._GrpcSession)
    encode_ahead: int = 1

    def __post_init__(self) -> None:
        if self.rpc_timeout_s <= 0 or self.stream_timeout_s <= 0:
            raise ValueError("rpc_timeout_s and stream_timeout_s must be > 0")
        if self.encode_ahead < 0:
            raise ValueError(f"encode_ahead must be >= 0, got {self.encode_ahead}")


@dataclass(frozen=True)
class RemoteReservation:
    """What the decode side granted for one request."""

    request_id: str
    epoch: int
    block_ids: tuple[int, ...]  # the decode side's block table (GPU path writes here)
    num_cached_blocks: int  # leading blocks the decode side already holds: not sent
    lease_s: float


class KVTransferClient:
    def __init__(self, config: ClientConfig, max_send_message_bytes: int | None = None) -> None:
        """max_send_message_bytes: override the send limit (tests send oversized chunks)."""
        self.config = config
        limit = config.max_chunk_bytes + MESSAGE_OVERHEAD_BYTES
        options = [
            ("grpc.max_send_message_length", max_send_message_bytes or limit),
            ("grpc.max_receive_message_length", limit),
        ]
        if config.tls_server_name:
            options.append(("grpc.ssl_target_name_override", config.tls_server_name))
        if config.tls_root_certs_pem is None:
            self._channel = grpc.insecure_channel(config.target, options=options)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=config.tls_root_certs_pem)
            self._channel = grpc.secure_channel(config.target, creds, options=options)
        self._stub = pb_grpc.KVTransferStub(self._channel)
        # StreamChunks takes messages already serialized (wire.encode_layer builds each in
        # one copy from the pool); the stub's serializer would copy the payload again.
        self._stream_chunks = self._channel.stream_unary(
            "/baton.v1.KVTransfer/StreamChunks",
            request_serializer=None,
            response_deserializer=pb.StreamSummary.FromString,
            _registered_method=True,
        )
        self._metadata = ((TOKEN_METADATA_KEY, config.auth_token),)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KVTransferClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        layout: KVLayout,
        cache_salt: str = "",
        lease_s: float = 0.0,
        transport: int = pb.TRANSPORT_GRPC,
    ) -> RemoteReservation:
        """Raises grpc.RpcError RESOURCE_EXHAUSTED when the decode side has no room now."""
        future = self.reserve_future(
            request_id, prompt_token_ids, params, layout, cache_salt, lease_s, transport
        )
        return self.reservation(request_id, future.result())

    def reserve_future(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        layout: KVLayout,
        cache_salt: str = "",
        lease_s: float = 0.0,
        transport: int = pb.TRANSPORT_GRPC,
    ) -> grpc.Future:
        """`reserve` without waiting: several Reserves overlap their round trips. The
        future's result is the ReserveResponse (`reservation` reads it); a refusal raises
        from `result()`."""
        bs = layout.block_size
        return self._stub.Reserve.future(
            pb.ReserveRequest(
                request_id=request_id,
                prompt_token_ids=prompt_token_ids,
                sampling=sampling_to_pb(params),
                cache_salt=cache_salt,
                layout=layout.to_pb(),
                num_blocks=(len(prompt_token_ids) + bs - 1) // bs,
                lease_ms=int(lease_s * 1000),
                transport=transport,
                protocol_version=PROTOCOL_VERSION,
            ),
            timeout=self.config.rpc_timeout_s,
            metadata=self._metadata,
        )

    @staticmethod
    def reservation(request_id: str, resp: pb.ReserveResponse) -> RemoteReservation:
        return RemoteReservation(
            request_id,
            resp.epoch,
            tuple(resp.block_ids),
            resp.num_cached_blocks,
            resp.lease_ms / 1000,
        )

    def stream_future(self, messages: Iterator[bytes]) -> grpc.Future:
        """Start a chunk stream of serialized KVChunk messages; result: StreamSummary.

        gRPC's request thread pulls the next message once the previous one is handed to the
        transport. When `messages` ends, `END_OF_STREAM` follows it: the receiver's proof
        that the stream ended on purpose. If `messages` raises, gRPC cancels the stream and
        no end marker goes out.
        """
        return self._stream_chunks.future(
            itertools.chain(messages, (END_OF_STREAM,)),
            timeout=self.config.stream_timeout_s,
            metadata=self._metadata,
        )

    def stream(self, messages: Iterator[bytes]) -> pb.StreamSummary:
        return self.stream_future(messages).result()

    def commit(
        self,
        reservation: RemoteReservation,
        first_token_id: int,
        copied_layers: list[int] | None = None,
        layer_digests: list[int] | None = None,
        first_token_logprobs: TokenLogprobs | None = None,
    ) -> pb.CommitResponse:
        return self.commit_future(
            reservation, first_token_id, copied_layers, layer_digests, first_token_logprobs
        ).result()

    def commit_future(
        self,
        reservation: RemoteReservation,
        first_token_id: int,
        copied_layers: list[int] | None = None,
        layer_digests: list[int] | None = None,
        first_token_logprobs: TokenLogprobs | None = None,
    ) -> grpc.Future:
        """`commit` without waiting (result: the CommitResponse; a failure raises from it)."""
        lp = first_token_logprobs
        return self._stub.Commit.future(
            pb.CommitRequest(
                request_id=reservation.request_id,
                epoch=reservation.epoch,
                first_token_id=first_token_id,
                copied_layers=copied_layers or [],
                layer_digests=layer_digests or [],
                first_token_logprobs=None
                if lp is None
                else pb.FirstTokenLogprobs(
                    logprob=lp.logprob,
                    top_token_ids=[t for t, _ in lp.top],
                    top_logprobs=[x for _, x in lp.top],
                ),
            ),
            timeout=self.config.rpc_timeout_s,
            metadata=self._metadata,
        )

    def abort(self, reservation: RemoteReservation, reason: str) -> bool:
        resp = self._stub.Abort(
            pb.AbortRequest(
                request_id=reservation.request_id, epoch=reservation.epoch, reason=reason
            ),
            timeout=self.config.rpc_timeout_s,
            metadata=self._metadata,
        )
        return resp.released

    def health(self) -> pb.HealthResponse:
        return self._stub.Health(
            pb.HealthRequest(), timeout=self.config.rpc_timeout_s, metadata=self._metadata
        )

    def open_pool(self, host_id: str, layout: KVLayout) -> pb.PoolHandle:
        return self._stub.OpenPool(
            pb.OpenPoolRequest(host_id=host_id, layout=layout.to_pb()),
            timeout=self.config.rpc_timeout_s,
            metadata=self._metadata,
        )
