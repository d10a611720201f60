"""The prefill worker's links to decode workers: one `LayerStreamer` per decode worker.

Each streamer owns a KV-transfer client and a transport towards one decode worker, keyed
by that worker's KV address. It is opened when a request first goes there and closed
(retired) after a failed transfer or `STREAMER_IDLE_CLOSE_S` without a request, unless
transfers to it are still in flight. Only the prefill loop's thread opens, retires and
hooks streamers; `transport_kinds` may read from any thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from engine.engine import Engine
from engine.kv_pool import KVPool
from kv_transfer.client import ClientConfig, KVTransferClient
from kv_transfer.layer_stream import LayerStreamer
from kv_transfer.transport import KVTransport, TransportKind

log = logging.getLogger(__name__)

# A decode worker's client and transport are closed after this long without a request.
STREAMER_IDLE_CLOSE_S = 300.0

# Builds the transport towards one decode worker: `make_transport`, or a wrapper of it
# (prefill_worker/faults.py injects transfer faults this way).
TransportFactory = Callable[[TransportKind, KVTransferClient, KVPool], KVTransport]


class StreamerPool:
    def __init__(
        self,
        name: str,
        engine: Engine,
        kv_auth_token: str,
        transport: TransportKind,
        transport_factory: TransportFactory,
        lease_s: float,
        finish_timeout_s: float,
        kv_tls_root_pem: bytes | None,
        kv_tls_server_name: str | None,
    ) -> None:
        """name: the prefill worker's, for log lines. kv_tls_root_pem set: connections use
        TLS and trust these roots."""
        self.name = name
        self.engine = engine
        self._token = kv_auth_token
        self._transport_kind = transport
        self._make_transport = transport_factory
        self._lease_s = lease_s
        self._finish_timeout_s = finish_timeout_s
        self._tls_root_pem = kv_tls_root_pem
        self._tls_server_name = kv_tls_server_name
        self._streamers: dict[str, LayerStreamer] = {}  # kv address -> streamer
        self._last_used_s: dict[str, float] = {}  # kv address -> when a request last used it

    def get(self, kv_address: str) -> LayerStreamer:
        """The streamer to this decode worker, opened if need be; closes idle ones."""
        now = time.monotonic()
        self._last_used_s[kv_address] = now
        for addr, last_s in list(self._last_used_s.items()):
            if now - last_s > STREAMER_IDLE_CLOSE_S:
                self.retire(addr)
        s = self._streamers.get(kv_address)
        if s is None:
            client = KVTransferClient(
                ClientConfig(
                    target=kv_address,
                    auth_token=self._token,
                    tls_root_certs_pem=self._tls_root_pem,
                    tls_server_name=self._tls_server_name,
                )
            )
            transport = self._make_transport(self._transport_kind, client, self.engine.pool)
            s = LayerStreamer(self.engine, client, transport, self._lease_s, self._finish_timeout_s)
            self._streamers[kv_address] = s
        return s

    def retire(self, kv_address: str) -> None:
        """Close the client and transport to a decode worker that failed or went unused
        (a restarted decode worker has a new address; the GPU path would otherwise keep
        the dead worker's pool mapped), unless transfers to it are still in flight."""
        s = self._streamers.get(kv_address)
        if s is not None and s.num_in_flight:
            return
        self._last_used_s.pop(kv_address, None)
        if s is None:
            return
        del self._streamers[kv_address]
        try:
            s.close()
        except Exception:  # a failed unmap must not take the prefill loop down
            log.exception("%s: closing the transport to %s failed", self.name, kv_address)
        log.info("%s: closed the KV-transfer client to %s", self.name, kv_address)

    def retire_all(self) -> None:
        """`retire` every streamer (those with transfers in flight stay open)."""
        for addr in list(self._streamers):
            self.retire(addr)

    def on_layer_done(self, layer_idx: int) -> None:
        """The engine step's hook: fan layer layer_idx out to every streamer with work."""
        for s in self._streamers.values():
            if s.num_in_flight:
                s.on_layer_done(layer_idx)

    def transport_kinds(self) -> dict[str, str]:
        """Decode worker KV address -> transport in use ("grpc", "cuda_ipc")."""
        return {addr: s.transport.kind.value for addr, s in list(self._streamers.items())}
