#!/usr/bin/env bash
# Installs what is missing, checks formatting and lints, then runs every test
# (unit tests and the integration tests against real Consul, real etcd and
# real gRPC servers, in parallel on free loopback ports), then the demo
# (scripts/demo.sh), which must exit 0.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
echo "== build (tests and examples)"
cargo build --all-targets --quiet

echo "== tests"
tests=0
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast --all-targets "$@" || tests=$?
else
    cargo test --all-targets --no-fail-fast "$@" || tests=$?
fi

# The demo end to end (its own Consul, example service and tether): it must
# reach its end and exit 0.
echo "== demo (scripts/demo.sh)"
demo=0
bash scripts/demo.sh || demo=$?
[ "$demo" = 0 ] || echo "== demo FAILED: scripts/demo.sh exited with $demo" >&2
[ "$tests" = 0 ] || echo "== tests FAILED (exit $tests)" >&2
[ "$tests" = 0 ] && [ "$demo" = 0 ]
