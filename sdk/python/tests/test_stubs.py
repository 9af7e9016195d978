"""The checked-in gRPC stubs match proto/ (regenerate with scripts/gen-python-stubs.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def test_stubs_are_current():
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [
                sys.executable, "-m", "grpc_tools.protoc", "-Iproto/proto",
                f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
                "proto/proto/forkd/v1/forkd.proto",
            ],
            cwd=REPO,
            check=True,
        )
        for name in ["forkd_pb2.py", "forkd_pb2.pyi", "forkd_pb2_grpc.py"]:
            with open(os.path.join(out, "forkd", "v1", name)) as fresh:
                with open(os.path.join(REPO, "sdk", "python", "forkd", "v1", name)) as kept:
                    assert fresh.read() == kept.read(), f"{name} is stale: run scripts/gen-python-stubs.sh"
