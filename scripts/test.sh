#!/usr/bin/env bash
# Installs what is missing, checks formatting and lints, then runs every test
# (unit tests and the integration tests against real Consul, real etcd and
# real gRPC servers, in parallel on free loopback ports).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "== build (tests and examples)"
cargo build --all-targets --quiet

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast --all-targets "$@"
else
    cargo test --all-targets --no-fail-fast "$@"
fi
