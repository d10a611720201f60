"""TLS switched on from the config, for the serving API and the KV-transfer service at once.

A 1P1D cluster whose config names certificate files under `cluster.router` and
`cluster.kv_transfer`: a TLS client is served, a plaintext one cannot connect, and the
prompt's KV reaches the decode worker over the TLS-protected KV-transfer connection.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

ray = pytest.importorskip("ray")

from baton.config import parse_config  # noqa: E402
from baton.launcher import Cluster, launch  # noqa: E402
from protos import serving_pb2 as pb  # noqa: E402
from protos import serving_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def self_signed(folder: Path) -> tuple[Path, Path]:
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def tls_config(cert: Path, key: Path) -> dict:
    return {
        "model": {"preset": "tiny"},
        "engine": {"dtype": "float32", "device": "cpu", "num_kv_blocks": 64, "max_model_len": 256},
        "cluster": {
            "router": {"tls_cert_file": str(cert), "tls_key_file": str(key)},
            "kv_transfer": {"tls_cert_file": str(cert), "tls_key_file": str(key)},
        },
    }


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path]]:
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    cluster = launch(parse_config(tls_config(cert, key)))
    try:
        yield cluster, cert
    finally:
        cluster.stop(grace_s=0.0)
        ray.shutdown()


def test_config_turns_on_tls_for_serving_and_kv_transfer(
    tls_cluster: tuple[Cluster, Path],
) -> None:
    cluster, cert = tls_cluster
    address = cluster.address
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(address, creds) as channel:
        stub = pb_grpc.ServingStub(channel)
        request = pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=list(range(1, 41))),
            sampling=pb.Sampling(max_tokens=4, temperature=0),
        )
        responses = list(stub.Generate(request, timeout=60))
        assert responses[-1].usage.completion_tokens == 4
        # Served disaggregated: the KV went through the TLS KV-transfer service.
        stats = stub.Stats(pb.StatsRequest(), timeout=10)
        decode = [w for w in stats.workers if w.name.startswith("decode")]
        assert decode and sum(w.num_requests_done for w in decode) >= 1
    with grpc.insecure_channel(address) as plain:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ServingStub(plain).Health(pb.ServingHealthRequest(), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE


def test_tls_settings_are_validated(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    bad = tls_config(cert, key)
    del bad["cluster"]["kv_transfer"]["tls_key_file"]
    with pytest.raises(ValueError, match="cluster.kv_transfer: set both tls_cert_file"):
        parse_config(bad)
    bad = tls_config(cert, tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="tls_key_file: no file at"):
        parse_config(bad)
