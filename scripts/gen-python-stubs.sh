#!/usr/bin/env bash
# Regenerates the Python SDK's gRPC stubs (sdk/python/forkd/v1) from proto/ with the pinned
# grpcio-tools; sdk/python/tests/test_stubs.py fails when they are stale.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/python-env.sh >/dev/null
target/py/bin/python -m grpc_tools.protoc -Iproto/proto --python_out=sdk/python --pyi_out=sdk/python \
    --grpc_python_out=sdk/python proto/proto/forkd/v1/forkd.proto
