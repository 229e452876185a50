"""Fixtures for the interop suite: start the broker under test and hand out clients.

``INTEROP_BROKER`` selects the broker:

* ``ferry`` (default): ``$FERRY_BIN serve --listen 127.0.0.1:0 --api-listen 127.0.0.1:0
  --data-dir <tmp> --log-level warn``
  (plus ``--config $FERRY_CONFIG`` when set); the address is read from the first
  stdout line matching ``listening on <addr>``.
* ``mosquitto``: ``/usr/sbin/mosquitto`` (or ``$MOSQUITTO_BIN``) on a free local port.

One broker process serves the whole session; tests isolate themselves with
unique client ids and topics. After each test the broker must still be running,
and the tail of its log is attached to failing test reports.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from interop_support import V5, V311, MosquittoSub, PahoClient

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 20.0
LISTEN_LINE = re.compile(r"listening on (\S+)")


@dataclass(frozen=True)
class Endpoint:
    kind: str
    host: str
    port: int


@dataclass
class BrokerProcess:
    endpoint: Endpoint
    proc: subprocess.Popen
    log_path: Path
    stdout_lines: list[str] = field(default_factory=list)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        combined = self.stdout_lines[-lines:] + text.splitlines()[-lines:]
        return "\n".join(combined) or "(empty)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; only ever signals our own child by PID."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


_current_broker: BrokerProcess | None = None


def _broker_kind() -> str:
    kind = os.environ.get("INTEROP_BROKER", "ferry").strip().lower()
    if kind not in ("ferry", "mosquitto"):
        raise pytest.UsageError(f"INTEROP_BROKER must be 'ferry' or 'mosquitto', not {kind!r}")
    return kind


def _ferry_binary() -> Path:
    if os.environ.get("FERRY_BIN"):
        return Path(os.environ["FERRY_BIN"])
    candidates = []
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "ferry")
    candidates.append(REPO_ROOT / "target" / "debug" / "ferry")
    return next((c for c in candidates if c.is_file()), candidates[0])


def _split_address(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with code {proc.returncode} during startup")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing accepts connections on {host}:{port} after {timeout}s")
            time.sleep(0.05)


def _start_ferry(workdir: Path) -> BrokerProcess:
    binary = _ferry_binary()
    if not binary.is_file():
        pytest.fail(f"Ferry binary not found at {binary}; build it (cargo build) or set FERRY_BIN",
                    pytrace=False)
    cmd = [str(binary), "serve", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0",
           "--queue-listen", "127.0.0.1:0",
           "--data-dir", str(workdir / "ferry-data"), "--log-level", "warn"]
    if os.environ.get("FERRY_CONFIG"):
        cmd += ["--config", os.environ["FERRY_CONFIG"]]
    log_path = workdir / "ferry.stderr.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=log)
    broker = BrokerProcess(Endpoint("ferry", "", 0), proc, log_path)

    # Keep draining stdout for the whole session so the broker never blocks on a full pipe.
    addresses: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        found = False
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            broker.stdout_lines.append(line)
            match = LISTEN_LINE.search(line)
            if match and not found:
                found = True
                addresses.put(match.group(1))
        addresses.put(None)

    threading.Thread(target=pump, name="ferry-stdout", daemon=True).start()
    try:
        addr = addresses.get(timeout=STARTUP_TIMEOUT)
    except queue.Empty:
        addr = None
    if addr is None:
        broker.stop()
        pytest.fail(
            f"Ferry did not print 'listening on <addr>' within {STARTUP_TIMEOUT:.0f}s "
            f"(exit code {proc.poll()}). Command: {' '.join(cmd)}\n{broker.log_tail()}",
            pytrace=False)
    host, port = _split_address(addr)
    broker.endpoint = Endpoint("ferry", host, port)
    try:
        _wait_for_port(host, port, proc, timeout=10.0)
    except RuntimeError as err:
        broker.stop()
        pytest.fail(f"Ferry announced {addr} but: {err}\n{broker.log_tail()}", pytrace=False)
    return broker


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_mosquitto(workdir: Path) -> BrokerProcess:
    binary = os.environ.get("MOSQUITTO_BIN", "/usr/sbin/mosquitto")
    if not Path(binary).is_file():
        pytest.fail(f"mosquitto not found at {binary}", pytrace=False)
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
    )
    log_path = workdir / "mosquitto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
    broker = BrokerProcess(Endpoint("mosquitto", "127.0.0.1", port), proc, log_path)
    try:
        _wait_for_port("127.0.0.1", port, proc, timeout=10.0)
    except RuntimeError as err:
        broker.stop()
        pytest.fail(f"mosquitto failed to start: {err}\n{broker.log_tail()}", pytrace=False)
    return broker


@pytest.fixture(scope="session")
def broker_process(tmp_path_factory) -> BrokerProcess:
    global _current_broker
    for tool in ("mosquitto_pub", "mosquitto_sub", "stdbuf"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not on PATH (install mosquitto-clients / coreutils)",
                        pytrace=False)
    workdir = tmp_path_factory.mktemp("broker")
    kind = _broker_kind()
    broker = _start_ferry(workdir) if kind == "ferry" else _start_mosquitto(workdir)
    _current_broker = broker
    try:
        yield broker
    finally:
        _current_broker = None
        broker.stop()


@pytest.fixture
def broker(broker_process: BrokerProcess) -> Endpoint:
    """The broker's address; also checks that the broker survives each test."""
    if broker_process.proc.poll() is not None:
        pytest.fail(f"broker is no longer running (exit code {broker_process.proc.returncode})",
                    pytrace=False)
    yield broker_process.endpoint
    if broker_process.proc.poll() is not None:
        pytest.fail(f"broker exited with code {broker_process.proc.returncode} during this test\n"
                    f"{broker_process.log_tail()}", pytrace=False)


@pytest.fixture(params=[V311, V5], ids=["v3.1.1", "v5"])
def version(request) -> int:
    """MQTT protocol version (paho constant) for tests that run under both."""
    return request.param


@pytest.fixture
def paho(broker):
    """Factory for PahoClient instances that are cleaned up after the test."""
    created: list[PahoClient] = []

    def make(version: int, client_id: str | None = None, **kwargs) -> PahoClient:
        client = PahoClient(broker, version, client_id, **kwargs)
        created.append(client)
        return client

    yield make
    for client in created:
        client.close()


@pytest.fixture
def mosquitto_sub(broker):
    """Factory that starts mosquitto_sub processes; any still running are SIGKILLed afterwards."""
    started: list[MosquittoSub] = []

    def start(version: int, topics, **kwargs) -> MosquittoSub:
        if isinstance(topics, str):
            topics = [topics]
        sub = MosquittoSub.start(broker, version, topics, **kwargs)
        started.append(sub)
        return sub

    yield start
    for sub in started:
        sub.kill()


def pytest_report_header(config):
    kind = os.environ.get("INTEROP_BROKER", "ferry")
    detail = f" ({_ferry_binary()})" if kind == "ferry" else ""
    return f"interop broker: {kind}{detail}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and _current_broker is not None:
        report.sections.append(("broker log (tail)", _current_broker.log_tail()))
    return report
