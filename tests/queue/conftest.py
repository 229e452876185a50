"""Fixtures for the queue suite: the real ``ferry`` binary and the official RocketMQ 5 Python SDK.

``$FERRY_BIN`` names the binary (default: ``$CARGO_TARGET_DIR/debug/ferry`` or
``target/debug/ferry``). Each server runs ``ferry serve`` on ports 0 with a temporary data
directory and a config file (``queue.max_attempts = 2`` so the dead-letter test is quick); the
addresses are read from its ``ferry: ... listening on <addr>`` lines. Processes are stopped by
their PID only. Each server's log goes to ``ferry.stderr.log`` in its test's directory, at
level ``$FERRY_TEST_LOG`` (default ``warn``; e.g. ``debug`` to follow a flaky test).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 30.0
WAIT = 15.0  # upper bound of any single wait in the suite
LINE = re.compile(r"^ferry: (\w+) listening on (\S+)")

CONFIG = """
[queue]
max_attempts = 2
"""


def ferry_binary() -> Path:
    if os.environ.get("FERRY_BIN"):
        return Path(os.environ["FERRY_BIN"])
    candidates = []
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "ferry")
    candidates.append(REPO_ROOT / "target" / "debug" / "ferry")
    return next((c for c in candidates if c.is_file()), candidates[0])


class Ferry:
    """One ``ferry serve`` process; ``restart()`` keeps the data directory."""

    def __init__(self, workdir: Path, config: str = CONFIG) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "ferry-data"
        self.config_path = workdir / "ferry.toml"
        self.config_path.write_text(config)
        self.binary = ferry_binary()
        if not self.binary.is_file():
            pytest.fail(f"ferry binary not found at {self.binary}; build it or set FERRY_BIN",
                        pytrace=False)
        self.proc: subprocess.Popen | None = None
        self.addresses: dict[str, str] = {}
        self.stdout_lines: list[str] = []
        self.start()

    def start(self) -> None:
        cmd = [str(self.binary), "serve", "--config", str(self.config_path),
               "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0",
               "--queue-listen", "127.0.0.1:0", "--data-dir", str(self.data_dir),
               "--log-level", os.environ.get("FERRY_TEST_LOG", "warn")]
        self.log_path = self.workdir / "ferry.stderr.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=log)
        log.close()
        found: queue.Queue[tuple[str, str] | None] = queue.Queue()
        proc = self.proc

        def pump() -> None:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.stdout_lines.append(line)
                m = LINE.match(line)
                if m:
                    found.put((m.group(1), m.group(2)))
            found.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self.addresses = {}
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while "queue" not in self.addresses:
            try:
                item = found.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                item = None
            if item is None:
                self.stop()
                pytest.fail(f"ferry did not print 'queue listening on' in time:\n{self.log_tail()}",
                            pytrace=False)
            self.addresses[item[0]] = item[1]

    @property
    def queue_endpoint(self) -> str:
        return self.addresses["queue"]

    def log_tail(self, n: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        return "\n".join(self.stdout_lines[-n:] + text.splitlines()[-n:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def ctl(self, *args: str, instance: str = "default"):
        cmd = [str(self.binary), "ctl", "--data-dir", str(self.data_dir), "--json",
               "-i", instance, *args]
        env = {k: v for k, v in os.environ.items()
               if k not in ("FERRY_API", "FERRY_KEY_ID", "FERRY_KEY_SECRET", "FERRY_INSTANCE")}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT, env=env,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"ferry ctl {' '.join(args)}: {r.stderr.strip()}"
        return json.loads(r.stdout) if r.stdout.strip() else None


@pytest.fixture(scope="session")
def ferry(tmp_path_factory):
    server = Ferry(tmp_path_factory.mktemp("queue"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_ferry(tmp_path):
    """A server of the test's own (for restarts)."""
    server = Ferry(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def unique(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:12]}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for name in ("ferry", "fresh_ferry"):
            server = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if isinstance(server, Ferry):
                report.sections.append((f"{name} log (tail)", server.log_tail()))
    return report
