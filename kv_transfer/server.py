"""The decode side's KV-transfer gRPC server: configuration, auth, TLS, start and stop.

`start_server(sink, config)` serves `KVTransferServicer` (kv_transfer/servicer.py: what each
RPC does) on a thread pool, with message-size limits from the chunk size, the shared token
checked on every call (`AuthInterceptor`: UNAUTHENTICATED without it), TLS when
`ServerConfig.tls` is set, and unary requests parsed by deserializers that never raise (a
malformed request gets INVALID_ARGUMENT, not INTERNAL). StreamChunks receives the raw message
bytes, viewed in place by `split_chunk`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from kv_transfer import ipc_handle
from kv_transfer.servicer import KVTransferServicer
from kv_transfer.sink import KVSink
from kv_transfer.wire import DEFAULT_CHUNK_BYTES, TOKEN_METADATA_KEY
from protos import kv_transfer_pb2 as pb

log = logging.getLogger(__name__)


MESSAGE_OVERHEAD_BYTES = 64 * 2**10  # headers of a chunk beyond its data


@dataclass(frozen=True)
class TlsConfig:
    cert_chain_pem: bytes
    private_key_pem: bytes


@dataclass(frozen=True)
class ServerConfig:
    auth_token: str
    bind: str = "127.0.0.1:0"  # port 0: the OS picks; the bound port is reported
    default_lease_s: float = 10.0
    max_lease_s: float = 120.0
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_workers: int = 64  # each open chunk stream holds one
    tls: TlsConfig | None = None
    host_id: str = field(default_factory=ipc_handle.host_id)

    def __post_init__(self) -> None:
        if not self.auth_token:
            raise ValueError("auth_token must be set: KV-transfer peers authenticate with it")
        if not 0 < self.default_lease_s <= self.max_lease_s:
            raise ValueError(
                f"need 0 < default_lease_s ({self.default_lease_s}) <= max_lease_s "
                f"({self.max_lease_s})"
            )
        if self.max_chunk_bytes <= 0:
            raise ValueError(f"max_chunk_bytes must be > 0, got {self.max_chunk_bytes}")

    @property
    def max_message_bytes(self) -> int:
        return self.max_chunk_bytes + MESSAGE_OVERHEAD_BYTES


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose metadata lacks the shared token (UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001, ANN201
        presented = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                presented = value if isinstance(value, str) else value.decode("utf-8", "replace")
        handler = continuation(handler_call_details)
        if handler is None or hmac.compare_digest(presented.encode(), self._token):
            return handler

        def deny(request: object, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong KV-transfer token")

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.request_streaming:  # never reads the stream: no chunk is accepted
            return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


@dataclass
class KVTransferServer:
    server: grpc.Server
    port: int
    servicer: KVTransferServicer

    def stop(self, grace_s: float = 1.0) -> None:
        self.server.stop(grace_s).wait(grace_s + 1.0)
        self.servicer.leases.stop_sweeper()
        # Anything still reserved will never complete: free it.
        for lease in self.servicer.leases.active():
            with lease.lock:
                self.servicer.fail_lease(lease, "server stopping")


@dataclass(frozen=True)
class _Undecodable:
    """What a unary request that protobuf could not parse becomes (instead of raising)."""

    message: str


def _tolerant(message_cls: Any) -> Callable[[bytes], Any]:
    """`FromString` that never raises: gRPC would answer a raising deserializer INTERNAL."""

    def parse(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except DecodeError as e:
            return _Undecodable(f"not a valid {message_cls.DESCRIPTOR.full_name}: {e}")

    return parse


def _refusing_undecodable(method: Callable[[Any, grpc.ServicerContext], Any]) -> Callable:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return method(request, context)

    return handler


def _add_servicer(servicer: KVTransferServicer, server: grpc.Server) -> None:
    """`add_KVTransferServicer_to_server`, except that StreamChunks gets each message as
    the bytes gRPC received: protobuf would copy every 4 MiB payload into a new bytes
    object, on the server's polling thread; `split_chunk` views it in place instead."""
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        "Reserve": unary(
            _refusing_undecodable(servicer.Reserve),
            request_deserializer=_tolerant(pb.ReserveRequest),
            response_serializer=pb.ReserveResponse.SerializeToString,
        ),
        "StreamChunks": grpc.stream_unary_rpc_method_handler(
            servicer.StreamChunks,
            request_deserializer=None,
            response_serializer=pb.StreamSummary.SerializeToString,
        ),
        "Commit": unary(
            _refusing_undecodable(servicer.Commit),
            request_deserializer=_tolerant(pb.CommitRequest),
            response_serializer=pb.CommitResponse.SerializeToString,
        ),
        "Abort": unary(
            _refusing_undecodable(servicer.Abort),
            request_deserializer=_tolerant(pb.AbortRequest),
            response_serializer=pb.AbortResponse.SerializeToString,
        ),
        "Health": unary(
            _refusing_undecodable(servicer.Health),
            request_deserializer=_tolerant(pb.HealthRequest),
            response_serializer=pb.HealthResponse.SerializeToString,
        ),
        "OpenPool": unary(
            _refusing_undecodable(servicer.OpenPool),
            request_deserializer=_tolerant(pb.OpenPoolRequest),
            response_serializer=pb.PoolHandle.SerializeToString,
        ),
    }
    assert set(handlers) == set(pb.DESCRIPTOR.services_by_name["KVTransfer"].methods_by_name)
    service = pb.DESCRIPTOR.services_by_name["KVTransfer"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def start_server(sink: KVSink, config: ServerConfig) -> KVTransferServer:
    """Start serving; returns the server and the port actually bound."""
    servicer = KVTransferServicer(sink, config)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="kv-rpc"),
        interceptors=[AuthInterceptor(config.auth_token)],
        options=options,
    )
    _add_servicer(servicer, server)
    if config.tls is None:
        port = server.add_insecure_port(config.bind)
    else:
        creds = grpc.ssl_server_credentials(
            [(config.tls.private_key_pem, config.tls.cert_chain_pem)]
        )
        port = server.add_secure_port(config.bind, creds)
    if port == 0:
        raise ValueError(f"could not bind the KV-transfer server to {config.bind}")
    server.start()
    servicer.leases.start_sweeper()
    log.info("KV-transfer server on port %d (tls=%s)", port, config.tls is not None)
    return KVTransferServer(server, port, servicer)
