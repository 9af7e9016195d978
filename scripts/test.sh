#!/usr/bin/env bash
# Runs the whole test suite. Prepares what the integration tests need first (host packages,
# release build, static agent, guest kernel, images), then `cargo test` over the workspace, then
# the Python SDK and forkd-mcp suites with their real clients.
# Integration tests boot real KVM microVMs: they need root and /dev/kvm and fail loudly without.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --no-demo

export FORKD_TEST_IMAGES="${FORKD_STATE_DIR:-/var/lib/forkd}/images"
export FORKD_VMM="$PWD/target/release/forkd-vmm"
export FORKD_BIN="$PWD/target/release/forkd"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
python3 scripts/check-imports.py
cargo test --workspace --release -- --test-threads=4

# The Python SDK (against a real daemon) and forkd-mcp (driven by the official MCP client), in
# a venv under target/ (nothing is installed globally).
py=$(scripts/python-env.sh)
export FORKD_MCP_BIN="$PWD/target/release/forkd-mcp"
"$py" -m pytest -q sdk/python/tests forkd-mcp/tests
