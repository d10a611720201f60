"""The serving API over gRPC (protos/serving.proto): one servicer method per RPC.

`RouterServer` runs a grpc.aio server and the `Router` on one asyncio loop in a thread of
its own, so the same object serves from `baton serve` (main thread waits for Ctrl-C) and
from tests (which call it with a blocking client). Reflection is on unless the config says
otherwise, so `grpcurl` lists and calls the service without the .proto files.

Statuses: validation -> INVALID_ARGUMENT / RESOURCE_EXHAUSTED (router/validation.py);
a Generate larger than limits.max_request_bytes -> RESOURCE_EXHAUSTED naming the limit (past
RECEIVE_LIMIT_FACTOR times it, gRPC's own receive limit answers first); missing or wrong API key -> UNAUTHENTICATED (with `tls` given, the port serves TLS,
so the key never crosses the wire in clear); no worker -> UNAVAILABLE; deadline ->
DEADLINE_EXCEEDED. A client that cancels (or whose deadline passes) cancels the handler,
and the router's cleanup aborts the request on every worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from protos import serving_pb2 as pb
from router.router import Router
from router.validation import RequestError, deserialize_generate

log = logging.getLogger(__name__)
RECEIVE_LIMIT_FACTOR = 4  # gRPC's own receive limit, in units of limits.max_request_bytes

SERVICE_NAME = "baton.v1.Serving"
AUTH_METADATA_KEY = "authorization"  # value: "Bearer <token>"


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes of the router's certificate chain and private key: the port serves TLS."""

    cert_chain_pem: bytes
    private_key_pem: bytes


class ServingServicer:
    def __init__(self, router: Router, auth_token: str | None) -> None:
        self.router = router
        self._token = auth_token.encode() if auth_token else None

    async def _check_auth(self, context: grpc.aio.ServicerContext) -> None:
        if self._token is None:
            return
        presented = ""
        for key, value in context.invocation_metadata() or ():
            if key == AUTH_METADATA_KEY:
                presented = value.removeprefix("Bearer ").strip()
        if not hmac.compare_digest(presented.encode(), self._token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")

    async def Generate(self, request, context: grpc.aio.ServicerContext):  # noqa: ANN001, ANN201, N802
        await self._check_auth(context)
        timeout_s = context.time_remaining()
        gen = self.router.generate(request, timeout_s)
        try:
            async with contextlib.aclosing(gen):
                async for resp in gen:
                    await context.write(resp)
        except RequestError as e:
            await context.abort(e.code, e.message)

    async def Health(self, request, context: grpc.aio.ServicerContext):  # noqa: ANN001, ANN201, N802
        await self._check_auth(context)
        return await self.router.health()

    async def Stats(self, request, context: grpc.aio.ServicerContext):  # noqa: ANN001, ANN201, N802
        await self._check_auth(context)
        return await self.router.stats()


def _handlers(servicer: ServingServicer, max_request_bytes: int) -> grpc.GenericRpcHandler:
    # As the generated add_ServingServicer_to_server, but Generate's deserializer never
    # raises (bad UTF-8 must be INVALID_ARGUMENT naming the field, not INTERNAL).
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Generate": grpc.unary_stream_rpc_method_handler(
                servicer.Generate,
                request_deserializer=functools.partial(
                    deserialize_generate, max_bytes=max_request_bytes
                ),
                response_serializer=pb.GenerateResponse.SerializeToString,
            ),
            "Health": grpc.unary_unary_rpc_method_handler(
                servicer.Health,
                request_deserializer=pb.ServingHealthRequest.FromString,
                response_serializer=pb.ServingHealthResponse.SerializeToString,
            ),
            "Stats": grpc.unary_unary_rpc_method_handler(
                servicer.Stats,
                request_deserializer=pb.StatsRequest.FromString,
                response_serializer=pb.StatsResponse.SerializeToString,
            ),
        },
    )


class RouterServer:
    """The router and its gRPC server on a private event loop thread."""

    def __init__(
        self,
        router_factory: Callable[[], Router],
        host: str = "127.0.0.1",
        port: int = 0,
        auth_token: str | None = None,
        max_request_bytes: int = 1 << 20,
        reflection_on: bool = True,
        tls: ServerTls | None = None,
    ) -> None:
        self._factory = router_factory
        self.host = host
        self._want_port = port
        self._token = auth_token
        self._max_request_bytes = max_request_bytes
        self._reflection = reflection_on
        self._tls = tls
        self.port = 0
        self.router: Router | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> str:
        ready: concurrent.futures.Future[str] = concurrent.futures.Future()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(ready))
            except BaseException as e:  # report start-up failures to start()
                if not ready.done():
                    ready.set_exception(e)
                else:
                    log.exception("router loop ended with an error")
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="baton-router", daemon=True)
        self._thread.start()
        return ready.result(timeout_s)

    async def _serve(self, ready: concurrent.futures.Future[str]) -> None:
        self._stopped = asyncio.Event()
        self.router = self._factory()
        await self.router.start()
        server = grpc.aio.server(
            options=[
                # gRPC refuses larger messages with its own text; up to this bound the
                # deserializer refuses them naming limits.max_request_bytes.
                ("grpc.max_receive_message_length", RECEIVE_LIMIT_FACTOR * self._max_request_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        servicer = ServingServicer(self.router, self._token)
        server.add_generic_rpc_handlers((_handlers(servicer, self._max_request_bytes),))
        if self._reflection:
            try:  # a pinned dependency; absent only on images that bring their own grpcio
                from grpc_reflection.v1alpha import reflection
            except ImportError:
                log.warning("grpcio-reflection is not installed: server reflection is off")
            else:
                reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
        bind = f"{self.host}:{self._want_port}"
        if self._tls is None:
            self.port = server.add_insecure_port(bind)
        else:
            creds = grpc.ssl_server_credentials(
                [(self._tls.private_key_pem, self._tls.cert_chain_pem)]
            )
            self.port = server.add_secure_port(bind, creds)
        if self.port == 0:
            raise ValueError(f"could not bind the router to {self.host}:{self._want_port}")
        await server.start()
        self._server = server
        ready.set_result(self.address)
        await self._stopped.wait()

    def call(
        self, coro_fn: Callable[[Router], Awaitable[object]], timeout_s: float = 30.0
    ) -> object:
        """Run a coroutine on the router's loop from another thread (tests, CLI)."""
        assert self._loop is not None and self.router is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(self.router), self._loop).result(timeout_s)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking requests, let running ones finish for grace_s, then stop the loop."""
        if self._loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                await self._server.stop(grace_s)
            if self.router is not None:
                await self.router.stop()
            assert self._stopped is not None
            self._stopped.set()

        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(grace_s + 10.0)
        self._thread.join(grace_s + 10.0)
