#!/usr/bin/env bash
# Makes the venv the Python test suites run in (target/py): the SDK installed from sdk/python,
# pytest, grpcio-tools (for the stub check) and the official MCP client. Nothing is installed
# globally. Prints the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/py
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
fi
"$venv/bin/pip" install -q --disable-pip-version-check "./sdk/python[test]" "mcp==2.3.0" >&2
echo "$PWD/$venv/bin/python"
