#!/usr/bin/env bash
# QoS 1 throughput to a persistent subscriber with durability = sync vs async, and to a clean
# session, in one run: ferry serve (release) pinned to CPU 0, `ferry bench pubsub` to CPU 1,
# 1 publisher → 1 subscriber, 64-byte payloads. Bounded in time; stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"
count="${COUNT:-100000}"
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -p ferry >/dev/null
ferry="$target/release/ferry"
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-durability.XXXXXX")
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
pin_broker=(); pin_load=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then pin_broker=(taskset -c 0); pin_load=(taskset -c 1); fi

run() { # name durability persistent-flag
    local name=$1 durability=$2 flag=$3 port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    printf 'durability = "%s"\n' "$durability" >"$work/$name.toml"
    "${pin_broker[@]}" "$ferry" serve --config "$work/$name.toml" --listen "127.0.0.1:$port" \
        --api-listen 127.0.0.1:0 --queue-listen 127.0.0.1:0 --data-dir "$work/$name" --log-level warn >"$work/$name.log" 2>&1 &
    pid=$!
    for _ in $(seq 50); do grep -q "mqtt listening" "$work/$name.log" && break; sleep 0.1; done
    timeout 300 "${pin_load[@]}" "$ferry" bench pubsub --port "$port" --count "$count" --qos 1 $flag --json \
        >"$work/$name.json"
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    python3 -c "import json,sys; r=json.load(open('$work/$name.json')); print(f\"{sys.argv[1]:<28} {r['throughput']:>10.0f} msg/s   lost {r['lost']:>6}   p99 {r['latency_p99_us']:>8.0f} us\")" "$name"
}
echo "QoS 1, 1 → 1, 64-byte payloads, $count messages (broker: CPU 0, load: CPU 1)"
run clean-session sync ""
run persistent-sync sync --persistent
run persistent-async async --persistent
