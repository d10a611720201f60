"""Security at the cluster's edges: API key, KV-transfer token, tenant isolation, no pickle.

One local Ray and one 1P1D cluster (the shipped default model on CPU) with an API key on the
serving API and no KV-transfer token in the config (the launcher then makes a random one,
so a peer that does not hold it is refused all the same).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

ray = pytest.importorskip("ray")

from baton.client import BatonClient  # noqa: E402
from baton.config import parse_config  # noqa: E402
from baton.launcher import Cluster, launch  # noqa: E402
from kv_transfer.wire import TOKEN_METADATA_KEY  # noqa: E402
from protos import kv_transfer_pb2 as kvpb  # noqa: E402
from protos import kv_transfer_pb2_grpc as kvpb_grpc  # noqa: E402
from protos import serving_pb2 as pb  # noqa: E402
from protos import serving_pb2_grpc as pb_grpc  # noqa: E402
from router.server import RouterServer, ServerTls  # noqa: E402

pytestmark = pytest.mark.timeout(240)

API_KEY = "serving-api-key-for-tests"
NUM_BLOCKS = 64
REPO = Path(__file__).resolve().parents[2]
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    cfg = {
        "model": {"default": True},
        "engine": {
            "dtype": "float32",
            "device": "cpu",
            "block_size": 16,
            "num_kv_blocks": NUM_BLOCKS,
            "max_num_seqs": 8,
            "max_num_batched_tokens": 256,
            "max_model_len": 256,
        },
        "cluster": {"router": {"load_poll_interval_s": 0.05, "auth_token": API_KEY}},
    }
    c = launch(parse_config(cfg))
    yield c
    c.stop(grace_s=1.0)
    ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Iterator[BatonClient]:
    with BatonClient(cluster.address, api_key=API_KEY, timeout_s=60) as c:
        yield c


def code_of(fn: object) -> grpc.StatusCode:
    try:
        result = fn()  # type: ignore[operator]
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            list(result)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


# ---- the serving API's key ---------------------------------------------------------------


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong-key"),)])
def test_serving_api_refuses_a_missing_or_wrong_key(
    cluster: Cluster, client: BatonClient, metadata: tuple, requests_done: Callable
) -> None:
    channel = grpc.insecure_channel(cluster.address)
    stub = pb_grpc.ServingStub(channel)
    request = pb.GenerateRequest(text="hello", sampling=pb.Sampling(max_tokens=2))
    before = requests_done(client)  # the previous test's request may still count
    for call in (
        lambda: stub.Generate(request, metadata=metadata, timeout=10),
        lambda: stub.Health(pb.ServingHealthRequest(), metadata=metadata, timeout=10),
        lambda: stub.Stats(pb.StatsRequest(), metadata=metadata, timeout=10),
    ):
        assert code_of(call) is UNAUTHENTICATED
    channel.close()
    assert requests_done(client) == before
    # With the key: served.
    assert client.generate("hello", max_tokens=2).usage.completion_tokens == 2


def test_serving_api_over_tls(cluster: Cluster, tmp_path: Path) -> None:
    """A second router over the same workers, serving TLS: a TLS client with the key is
    served, a plaintext client cannot connect."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    server = RouterServer(
        cluster.server._factory,  # type: ignore[attr-defined]
        auth_token=API_KEY,
        tls=ServerTls(cert.read_bytes(), key.read_bytes()),
    )
    address = server.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(address, creds) as channel:
            stub = pb_grpc.ServingStub(channel)
            md = (("authorization", f"Bearer {API_KEY}"),)
            request = pb.GenerateRequest(text="tls", sampling=pb.Sampling(max_tokens=3))
            responses = list(stub.Generate(request, metadata=md, timeout=30))
            assert responses[-1].usage.completion_tokens == 3
            assert code_of(lambda: stub.Health(pb.ServingHealthRequest(), timeout=10)) is (
                UNAUTHENTICATED
            )
        with grpc.insecure_channel(address) as plain:
            stub = pb_grpc.ServingStub(plain)
            assert code_of(lambda: stub.Health(pb.ServingHealthRequest(), timeout=5)) is (
                grpc.StatusCode.UNAVAILABLE
            )
    finally:
        server.stop(grace_s=1.0)


# ---- the KV-transfer token ----------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", "guessed-token"])
def test_kv_transfer_refuses_a_peer_without_the_token(
    client: BatonClient, token: str | None
) -> None:
    (decode,) = [w for w in client.stats().workers if w.role == "decode"]
    channel = grpc.insecure_channel(decode.kv_address)
    stub = kvpb_grpc.KVTransferStub(channel)
    md = () if token is None else ((TOKEN_METADATA_KEY, token),)
    reserve = kvpb.ReserveRequest(
        request_id="intruder",
        prompt_token_ids=[1, 2, 3],
        sampling=kvpb.SamplingOptions(max_tokens=2, top_p=1.0, repetition_penalty=1.0),
        num_blocks=1,
    )
    chunk = kvpb.KVChunk(request_id="intruder", epoch=1, data=b"\0" * 64)
    assert code_of(lambda: stub.Health(kvpb.HealthRequest(), metadata=md, timeout=10)) is (
        UNAUTHENTICATED
    )
    assert code_of(lambda: stub.Reserve(reserve, metadata=md, timeout=10)) is UNAUTHENTICATED
    assert code_of(lambda: stub.StreamChunks(iter([chunk]), metadata=md, timeout=10)) is (
        UNAUTHENTICATED
    )
    assert code_of(
        lambda: stub.Abort(kvpb.AbortRequest(request_id="x"), metadata=md, timeout=10)
    ) is (UNAUTHENTICATED)
    channel.close()
    free = {w.name: (w.num_free_blocks, w.num_total_blocks) for w in client.stats().workers}
    assert all(f == t == NUM_BLOCKS for f, t in free.values()), free


# ---- tenants: the prefix cache is salted ---------------------------------------------------


def test_tenant_b_gets_no_cache_hit_on_tenant_a_prompt(client: BatonClient) -> None:
    prompt = [(29 * i) % 250 + 1 for i in range(80)]  # 5 full blocks

    def cached(salt: str) -> int:
        r = client.generate(prompt, max_tokens=2, temperature=0.0, cache_salt=salt)
        return r.usage.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-a") > 0  # A's repeat hits A's blocks
    assert cached("tenant-b") == 0  # B, same prompt, other salt: nothing of A's
    assert cached("") == 0  # nor an unsalted request
    assert cached("tenant-b") > 0  # B's own blocks serve B


# ---- nothing is unpickled from a socket ---------------------------------------------------

NETWORK_PACKAGES = ("kv_transfer", "router", "decode_worker", "prefill_worker")
UNSAFE_CALLS = re.compile(r"\b(?:c?pickle\.loads?|cloudpickle\.loads?|marshal\.loads?)\(")
TORCH_LOAD = re.compile(r"\btorch\.load\((?P<args>[^)]*)\)")


def test_no_network_module_unpickles() -> None:
    found = []
    files = [p for pkg in NETWORK_PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) >= 10, files  # the scan saw the packages
    for path in files:
        text = path.read_text()
        for lineno, line in enumerate(text.splitlines(), 1):
            if UNSAFE_CALLS.search(line) or "import pickle" in line or "import cloudpickle" in line:
                found.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
        for m in TORCH_LOAD.finditer(text):
            if "weights_only=True" not in m.group("args"):
                found.append(f"{path.relative_to(REPO)}: torch.load without weights_only=True")
    assert not found, "\n".join(found)
