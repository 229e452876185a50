#!/usr/bin/env python3
"""Throughput of Ferry's embedded queue with the official RocketMQ 5 Python SDK.

Starts ``ferry serve`` ($FERRY_BIN, default target/release/ferry, else target/debug/ferry) on
loopback ports 0 with a temporary data directory, then:

* send: ``--senders`` threads, each with its own Producer, send ``--count`` messages in total
  (``--size`` bytes each), synchronously (each send waits for the stored acknowledgement,
  durability = sync);
* receive: one SimpleConsumer receives batches of 32 and acknowledges each message, until all
  ``--count`` messages are consumed.

Bounded: stops after ``--max-seconds`` per phase whatever the count. Prints msgs/s. Not a test.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from pathlib import Path

import logging

from rocketmq import ClientConfiguration, Credentials, FilterExpression, Message, Producer, SimpleConsumer

ROOT = Path(__file__).resolve().parents[1]


def binary() -> str:
    if os.environ.get("FERRY_BIN"):
        return os.environ["FERRY_BIN"]
    for kind in ("release", "debug"):
        p = ROOT / "target" / kind / "ferry"
        if p.is_file():
            return str(p)
    sys.exit("no ferry binary: cargo build --release -p ferry, or set FERRY_BIN")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--senders", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=60)
    args = ap.parse_args()
    logging.getLogger("rocketmq-python-client").setLevel(logging.ERROR)

    work = Path(tempfile.mkdtemp(prefix="ferry-qbench-"))
    proc = subprocess.Popen(
        [binary(), "serve", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0",
         "--queue-listen", "127.0.0.1:0", "--data-dir", str(work / "data"), "--log-level", "warn"],
        stdout=subprocess.PIPE, stderr=open(work / "ferry.log", "wb"), stdin=subprocess.DEVNULL)
    try:
        endpoint = None
        deadline = time.monotonic() + 30
        while endpoint is None and time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            m = re.search(r"ferry: queue listening on (\S+)", line)
            if m:
                endpoint = m.group(1)
        if endpoint is None:
            sys.exit("ferry did not start")
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        cfg = ClientConfiguration(endpoint, Credentials(), request_timeout=10)
        topic, group = "bench", "bench-group"
        consumer = SimpleConsumer(cfg, group, {topic: FilterExpression("*")}, await_duration=2)
        consumer.startup()
        body = b"x" * args.size

        sent = [0]
        lock = threading.Lock()
        stop_at = time.monotonic() + args.max_seconds

        def sender(n: int) -> None:
            p = Producer(cfg, (topic,))
            p.startup()
            try:
                for _ in range(n):
                    if time.monotonic() > stop_at:
                        break
                    m = Message()
                    m.topic = topic
                    m.body = body
                    p.send(m)
                    with lock:
                        sent[0] += 1
            finally:
                p.shutdown()

        per = args.count // args.senders
        threads = [threading.Thread(target=sender, args=(per,)) for _ in range(args.senders)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        send_s = time.monotonic() - t0
        print(f"send:    {sent[0]} messages of {args.size} B with {args.senders} producers in "
              f"{send_s:.2f} s = {sent[0] / send_s:,.0f} msgs/s")

        received = 0
        acks = []
        pool = ThreadPoolExecutor(8)
        t0 = time.monotonic()
        stop_at = t0 + args.max_seconds
        while received < sent[0] and time.monotonic() < stop_at:
            batch = consumer.receive(32, 30)
            for m in batch:
                acks.append(pool.submit(consumer.ack, m))
            received += len(batch)
        for f in acks:
            f.result(timeout=30)
        recv_s = time.monotonic() - t0
        pool.shutdown()
        print(f"receive: {received} messages (receive 32, ack each from 8 threads) in {recv_s:.2f} s = "
              f"{received / recv_s:,.0f} msgs/s")
        consumer.shutdown()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
        if os.environ.get("KEEP"):
            print("ferry log:", work / "ferry.log")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
