#!/usr/bin/env bash
# Regenerate adapter_fusion/v1/ from protos/ (checked in; tests/test_proto.py checks it is current).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
python -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" protos/adapter_fusion/v1/adapter_fusion.proto
