#!/usr/bin/env bash
# Runs every test of the project: the Rust workspace (unit, property and integration tests,
# including the hostile-input suite against a real server), then the interoperability suite
# with third-party clients (Python paho-mqtt, mosquitto_pub/mosquitto_sub) against the real
# `ferry` binary. Needs: cargo, python3 with the packages of tests/interop/requirements.txt,
# and Debian's mosquitto-clients (`.ci/run` installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== interop (paho-mqtt, mosquitto clients) against target/debug/ferry"
cargo build -p ferry
FERRY_BIN="$target/debug/ferry" python3 -m pytest tests/interop -q
