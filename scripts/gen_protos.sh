#!/usr/bin/env bash
# Regenerate the Python for every .proto in protos/ (run from anywhere).
# Generated with grpcio-tools 1.84 so the code imports under grpcio 1.84 (the GPU image's)
# and newer. Paths are given as protos/<name>.proto with -I. so that the generated _grpc
# modules import `protos.<name>_pb2`.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import grpc_tools
from importlib.metadata import version
v = version("grpcio-tools")
assert v.startswith("1.84."), f"grpcio-tools {v}: generate with 1.84.x (see scripts/gen_protos.sh)"
PY
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/*.proto
# grpcio-tools 1.84 stamps its own protobuf (7.35.1) as the oldest runtime allowed, which
# would refuse protobuf 6.31..7.35. The generated code uses only the descriptor-pool and
# builder API that 6.31 already has, so lower the stamp to the floor in pyproject.toml.
python - <<'PY'
import re, pathlib
for p in pathlib.Path("protos").glob("*_pb2.py"):
    s = p.read_text()
    s2 = re.sub(r"(Domain\.PUBLIC,\n)\s*\d+,\n\s*\d+,\n\s*\d+,", r"\g<1>    6,\n    31,\n    0,", s)
    assert s2 != s or "    6,\n    31,\n    0," in s, f"no runtime-version guard found in {p}"
    p.write_text(s2)
PY
echo "generated: $(ls protos/*_pb2*.py* | tr '\n' ' ')"
