#!/usr/bin/env python3
"""MQTT → queue → consumer latency of an outflow rule, with MQTT → MQTT as the baseline in the
same run (a benchmark, not a test).

Starts ``ferry serve`` (``$FERRY_BIN``, default the release build) on free loopback ports with a
temporary data directory, creates an outflow rule ``<parent> → <queue topic>``, and has one
paho-mqtt publisher send ``--count`` QoS 1 messages at ``--rate`` per second, each carrying its
send time. Two receivers measure the time to arrival: a paho subscriber of the same topic (the
baseline: what MQTT alone costs) and an official RocketMQ 5 Python SDK SimpleConsumer of the
rule's queue topic (long polling, batches of 32). Prints p50 / p90 / p99 / max of both and how
many arrived. Bounded: stops after the count or ``--timeout`` seconds, and stops the server by
its PID.

Usage: bench/outflow_latency.py [--count 2000] [--rate 200] [--durability sync|async]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from rocketmq import ClientConfiguration, Credentials, FilterExpression, SimpleConsumer

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^ferry: (\w+) listening on (\S+)")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]


def start_ferry(binary: Path, workdir: Path, durability: str):
    config = workdir / "ferry.toml"
    config.write_text(f'durability = "{durability}"\n')
    proc = subprocess.Popen(
        [str(binary), "serve", "--config", str(config), "--listen", "127.0.0.1:0",
         "--api-listen", "127.0.0.1:0", "--queue-listen", "127.0.0.1:0",
         "--data-dir", str(workdir / "data"), "--log-level", "warn"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    addresses = {}
    deadline = time.monotonic() + 30
    while "queue" not in addresses and time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            break
        m = LINE.match(line)
        if m:
            addresses[m.group(1)] = m.group(2)
    if "queue" not in addresses:
        proc.kill()
        raise SystemExit("ferry did not start")
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
    return proc, addresses


def ctl(binary: Path, workdir: Path, *args: str) -> None:
    subprocess.run([str(binary), "ctl", "--data-dir", str(workdir / "data"), *args],
                   check=True, capture_output=True, timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=200.0, help="messages per second")
    ap.add_argument("--durability", choices=["sync", "async"], default="sync")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    binary = Path(os.environ.get("FERRY_BIN", target / "release" / "ferry"))
    if not binary.is_file():
        raise SystemExit(f"no ferry binary at {binary}: cargo build --release -p ferry, or set FERRY_BIN")

    with tempfile.TemporaryDirectory(prefix="ferry-outflow-") as tmp:
        workdir = Path(tmp)
        proc, addr = start_ferry(binary, workdir, args.durability)
        try:
            run(args, binary, workdir, addr)
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)


def run(args, binary: Path, workdir: Path, addr: dict) -> None:
    parent, queue_topic = f"Bench{uuid.uuid4().hex[:8]}", f"BenchQ{uuid.uuid4().hex[:8]}"
    ctl(binary, workdir, "rules", "create", "bench-out", "--type", "outflow",
        "--source", parent, "--target", queue_topic)
    host, port = addr["mqtt"].rsplit(":", 1)
    topic = f"{parent}/latency"

    mqtt_lat: list[float] = []
    queue_lat: list[float] = []
    lock = threading.Lock()

    def on_message(_c, _u, msg):
        sent = struct.unpack(">d", msg.payload[:8])[0]
        with lock:
            mqtt_lat.append(time.time() - sent)

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub")
    sub.on_message = on_message
    sub.connect(host, int(port))
    sub.loop_start()
    sub.subscribe(topic, qos=1)

    consumer = SimpleConsumer(ClientConfiguration(addr["queue"], Credentials("", ""), request_timeout=10),
                              "bench-group", {queue_topic: FilterExpression("*")}, await_duration=2)
    consumer.startup()
    consumer.receive(32, 30)  # creates the group (it starts at the end of the topic)
    stop = threading.Event()

    def consume():
        while not stop.is_set():
            for m in consumer.receive(32, 30):
                sent = struct.unpack(">d", m.body[:8])[0]
                with lock:
                    queue_lat.append(time.time() - sent)
                consumer.ack(m)

    t = threading.Thread(target=consume, daemon=True)
    t.start()

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub")
    pub.connect(host, int(port))
    pub.loop_start()
    time.sleep(0.5)
    interval = 1.0 / args.rate
    started = time.monotonic()
    for i in range(args.count):
        at = started + i * interval
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pub.publish(topic, struct.pack(">d", time.time()) + b"x" * 56, qos=1)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        with lock:
            if len(queue_lat) >= args.count and len(mqtt_lat) >= args.count:
                break
        time.sleep(0.1)
    stop.set()
    t.join(5)
    pub.loop_stop()
    sub.loop_stop()
    consumer.shutdown()

    print(f"ferry outflow latency: {args.count} QoS 1 messages of 64 B at {args.rate:g}/s, "
          f"durability = {args.durability}")
    print(f"{'path':<28}{'arrived':>9}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, lat in (("MQTT -> MQTT (baseline)", mqtt_lat), ("MQTT -> queue -> consumer", queue_lat)):
        ms = [x * 1000 for x in lat]
        print(f"{name:<28}{len(ms):>9}{percentile(ms, 50):>10.2f}{percentile(ms, 90):>10.2f}"
              f"{percentile(ms, 99):>10.2f}{max(ms) if ms else float('nan'):>10.2f}")


if __name__ == "__main__":
    main()
