#!/usr/bin/env sh
# Regenerates the Python modules of the API contract next to their .proto files:
#   proto/storyfarm/v1/render_pb2.py, render_pb2.pyi, render_pb2_grpc.py
# Run from anywhere: `proto/generate.sh` (uses .venv/bin/python when present, else $PYTHON or
# python3; needs grpcio-tools, pinned in the dev extra so every checkout generates the same bytes).
# An optional argument writes into another folder instead (tests/unit/test_proto.py uses it to
# check that the checked-in files are up to date).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-"$root/proto"}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
cd "$root"
mkdir -p "$out"
"$PYTHON" -m grpc_tools.protoc -Iproto --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  proto/storyfarm/v1/render.proto
