#!/usr/bin/env bash
# Runs every test of the project: the Rust workspace (unit, property and integration tests,
# including the hostile-input suite against a real server), then the interoperability suite
# with third-party clients (Python paho-mqtt, mosquitto_pub/mosquitto_sub, the cloud's official
# Python SDK, npm mqtt over TCP / WebSocket / WSS) against the real `ferry` binary, and the
# crash test (20 SIGKILLs, nothing acknowledged may be lost). Needs: cargo, python3 with the packages of tests/interop/requirements.txt,
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
(cd tests/interop/node && FERRY_BIN="$target/debug/ferry" node --test --test-concurrency=1 test/)
echo "== queue (official RocketMQ 5 Python and Node.js SDKs) against target/debug/ferry"
FERRY_BIN="$target/debug/ferry" python3 -m pytest tests/queue -q
(cd tests/queue/node && FERRY_BIN="$target/debug/ferry" node --test --test-concurrency=1 test/)
echo "== durability: SIGKILL crash test against target/debug/ferry"
FERRY_BIN="$target/debug/ferry" python3 -m pytest tests/durability -q
