#!/usr/bin/env bash
# Quick throughput comparison, Ferry vs Mosquitto, in one run: one publisher -> one subscriber,
# 64-byte payloads, MQTT 3.1.1, QoS 0 (1,000,000 messages) and QoS 1 (200,000 messages).
#
# Each broker in turn is started on 127.0.0.1 on a free port, pinned to CPU 0; the load
# generator (`ferry bench pubsub`) is pinned to CPU 1; the broker is stopped by its PID.
# Every bench run is bounded (no progress for 5 s ends it; a hard limit kills it after 300 s),
# and everything started here is stopped on exit.
#
# Usage: bench/quick-compare.sh
# Environment:
#   RUNS=N            repeat the whole comparison N times; the table shows medians (default 1)
#   CARGO_TARGET_DIR  where cargo builds (default: target)
#   MOSQUITTO=path    the mosquitto binary (default: /usr/sbin/mosquitto)
#   SKIP_BUILD=1      use the already built release binary
set -euo pipefail

cd "$(dirname "$0")/.."
RUNS=${RUNS:-1}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
FERRY="$TARGET_DIR/release/ferry"
MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
SIZE=64
PROTOCOL=4
NO_PROGRESS_SECS=5
HARD_LIMIT_SECS=300
# name qos count
SCENARIOS=("qos0 0 1000000" "qos1 1 200000")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ferry-compare.XXXXXX")
BROKER_PID=""

stop_broker() {
    if [[ -n "$BROKER_PID" ]]; then
        kill -TERM "$BROKER_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$BROKER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
        BROKER_PID=""
    fi
}
cleanup() {
    stop_broker
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "$*" >&2; }

# CPU pinning: broker on CPU 0, load generator on CPU 1, when there are two CPUs to pin to.
if command -v taskset >/dev/null && [[ $(nproc) -ge 2 ]]; then
    PIN_BROKER=(taskset -c 0)
    PIN_BENCH=(taskset -c 1)
else
    log "warning: taskset or a second CPU is missing; running unpinned"
    PIN_BROKER=()
    PIN_BENCH=()
fi

can_connect() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    local port
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % 40000))
        if ! can_connect "$port"; then
            echo "$port"
            return 0
        fi
    done
    log "error: no free port found"
    return 1
}

wait_listening() {
    local port=$1
    for _ in $(seq 100); do
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            return 1
        fi
        can_connect "$port" && return 0
        sleep 0.1
    done
    return 1
}

start_broker() {
    local broker=$1 port=$2
    case $broker in
        ferry)
            "${PIN_BROKER[@]}" "$FERRY" serve --listen "127.0.0.1:$port" --api-listen 127.0.0.1:0 --queue-listen 127.0.0.1:0 --data-dir "$WORK/ferry-data" --log-level warn \
                >"$WORK/ferry.log" 2>&1 &
            ;;
        mosquitto)
            printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" \
                >"$WORK/mosquitto.conf"
            "${PIN_BROKER[@]}" "$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
            ;;
    esac
    BROKER_PID=$!
    if ! wait_listening "$port"; then
        log "error: $broker did not start listening on port $port:"
        cat "$WORK/$broker.log" >&2 || true
        stop_broker
        return 1
    fi
}

# Extracts a number field from the bench's flat JSON object.
field() { sed -nE "s/.*\"$1\":([-0-9.eE+]+).*/\\1/p" <<<"$2"; }

median() {
    sort -g | awk '{ v[NR] = $1 }
        END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2];
              else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

if [[ -z "${SKIP_BUILD:-}" ]]; then
    log "building ferry (release)..."
    cargo build --release -p ferry >&2
fi
[[ -x "$FERRY" ]] || { log "error: $FERRY not found"; exit 1; }
BROKERS=(ferry)
if [[ -x "$MOSQUITTO" ]]; then
    BROKERS+=(mosquitto)
else
    log "warning: $MOSQUITTO not found; measuring Ferry alone"
fi

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
for run in $(seq "$RUNS"); do
    for broker in "${BROKERS[@]}"; do
        port=$(free_port)
        start_broker "$broker" "$port"
        for scenario in "${SCENARIOS[@]}"; do
            read -r name qos count <<<"$scenario"
            if json=$(timeout "$HARD_LIMIT_SECS" "${PIN_BENCH[@]}" "$FERRY" bench pubsub \
                --host 127.0.0.1 --port "$port" --count "$count" --size "$SIZE" \
                --qos "$qos" --protocol "$PROTOCOL" --timeout "$NO_PROGRESS_SECS" --json); then
                tput=$(field throughput "$json")
                lost=$(field lost "$json")
                sent=$(field sent "$json")
                p99=$(field latency_p99_us "$json")
                printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$broker" "$name" "$tput" "$lost" "$sent" "$p99" \
                    >>"$RESULTS"
                log "run $run/$RUNS $broker $name: $(printf '%.0f' "$tput") msgs/s, lost $lost/$sent, p99 $(printf '%.0f' "$p99") µs"
            else
                log "run $run/$RUNS $broker $name: bench failed"
            fi
        done
        stop_broker
    done
done

# One value per (broker, scenario): the median over the runs.
summary() {
    local broker=$1 name=$2 col=$3
    awk -F'\t' -v b="$broker" -v s="$name" -v c="$col" '$1 == b && $2 == s { print $c }' \
        "$RESULTS" | median
}

echo
echo "pubsub 1 publisher -> 1 subscriber, ${SIZE}-byte payloads, MQTT 3.1.1; median of $RUNS run(s)"
printf '%-22s %13s %13s %7s %16s %16s %10s %10s\n' scenario "ferry msg/s" "mosq msg/s" ratio \
    "ferry lost" "mosq lost" "ferry p99" "mosq p99"
for scenario in "${SCENARIOS[@]}"; do
    read -r name qos count <<<"$scenario"
    ft=$(summary ferry "$name" 3)
    mt=$(summary mosquitto "$name" 3)
    awk -v n="$name" -v count="$count" -v ft="$ft" -v mt="$mt" \
        -v fl="$(summary ferry "$name" 4)" -v ml="$(summary mosquitto "$name" 4)" \
        -v fs="$(summary ferry "$name" 5)" -v ms="$(summary mosquitto "$name" 5)" \
        -v fp="$(summary ferry "$name" 6)" -v mp="$(summary mosquitto "$name" 6)" '
        function num(x) { return x != "nan" && x != "" }
        function rate(x) { return num(x) ? sprintf("%.0f", x) : "n/a" }
        function loss(l, s) { return num(l) && s > 0 ? sprintf("%d (%.1f%%)", l, 100 * l / s) : "n/a" }
        function lat(x) { return num(x) ? (x >= 10000 ? sprintf("%.0f ms", x / 1000) : sprintf("%.0f us", x)) : "n/a" }
        BEGIN {
            ratio = num(ft) && num(mt) && mt > 0 ? sprintf("%.2f", ft / mt) : "n/a"
            printf "%-22s %13s %13s %7s %16s %16s %10s %10s\n", n " x" count, rate(ft), rate(mt),
                ratio, loss(fl, fs), loss(ml, ms), lat(fp), lat(mp)
        }'
done
echo
echo "msg/s: messages received per second, first send to last receipt. Both brokers run with"
echo "their default limits: at QoS 0 either one may drop messages for a subscriber that cannot"
echo "keep up (and Mosquitto also drops QoS 1 beyond max_queued_messages), hence the loss columns."
