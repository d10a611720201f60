"""The checked-in generated code matches protos/*.proto (regenerated into a temp dir)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[3]


def test_generated_code_is_current(tmp_path: Path):
    pytest.importorskip("grpc_tools")
    work = tmp_path / "repo"
    (work / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gen_protos.sh", work / "scripts")
    shutil.copytree(
        ROOT / "protos", work / "protos", ignore=shutil.ignore_patterns("*_pb2*", "__pycache__")
    )
    subprocess.run(["bash", "scripts/gen_protos.sh"], cwd=work, check=True, capture_output=True)
    for generated in sorted((ROOT / "protos").glob("*_pb2*.py*")):
        fresh = work / "protos" / generated.name
        assert fresh.read_text() == generated.read_text(), (
            f"{generated.name} is stale: run scripts/gen_protos.sh"
        )


def test_generated_code_accepts_protobuf_6_31_and_up():
    text = (ROOT / "protos" / "kv_transfer_pb2.py").read_text()
    assert "Domain.PUBLIC,\n    6,\n    31,\n    0," in text
    assert (
        "from protos import kv_transfer_pb2"
        in (ROOT / "protos" / "kv_transfer_pb2_grpc.py").read_text()
    )
