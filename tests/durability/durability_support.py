"""Machinery of the crash test (tests/durability/test_crash.py).

* ``Settings``: every knob, read from ``DURABILITY_*`` environment variables;
* ``FerryBroker`` / ``MosquittoBroker``: a broker process that can be SIGKILLed and restarted on
  the same port with the same data directory (only ever our own child, by PID);
* ``Publisher``: a thread sending numbered QoS 1 messages, one fresh paho client per connection,
  recording a sequence number as acknowledged only when its PUBACK arrived with a success code;
* ``Subscriber``: a persistent-session paho client (3.1.1 clean session 0, or 5.0 clean start 0
  with a session expiry) that records everything it receives across connections;
* ``MetaWorker``: creates metadata with ``ferry ctl`` while the broker is being killed, recording
  which commands exited 0;
* the analysis helpers that turn all of that into lost / duplicate / ordering figures.

Every wait is bounded; nothing talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5
HOST = "127.0.0.1"
SESSION_EXPIRY = 86_400  # seconds; v5 persistent sessions
REPO_ROOT = Path(__file__).resolve().parents[2]
SUMMARY: list[str] = []  # lines printed by conftest.pytest_terminal_summary


# --------------------------------------------------------------------------------------------
# settings


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


@dataclass
class Settings:
    broker: str  # ferry | mosquitto
    kills: int  # SIGKILLs in one run
    seed: int
    kill_min: float  # seconds the broker runs before the next SIGKILL (uniform in [min, max])
    kill_max: float
    down_max: float  # extra random pause between the kill and the restart
    rate: float  # QoS 1 messages per second per queue publisher
    retain_rate: float  # messages per second per retained publisher
    window: int  # unacknowledged QoS 1 messages per publisher connection
    settle: float  # pause after creating the subscribers, before the first kill
    final_run: float  # publishing after the last restart, before the drain
    quiet: float  # the drain ends when everything arrived and then nothing for this long
    quiet_incomplete: float  # … or, with messages still missing, nothing for this long
    drain_max: float  # upper bound of the drain
    retained_wait: float  # after a restart, how long to wait for every retained topic
    budget: float  # upper bound of the kill phase
    meta_interval: float  # pause between two `ferry ctl` calls
    signal: str  # KILL (the test) or TERM (a control run with graceful restarts)

    @classmethod
    def from_env(cls) -> "Settings":
        broker = os.environ.get("DURABILITY_BROKER", "ferry").strip().lower() or "ferry"
        if broker not in ("ferry", "mosquitto"):
            raise ValueError(f"DURABILITY_BROKER must be 'ferry' or 'mosquitto', not {broker!r}")
        seed_raw = os.environ.get("DURABILITY_SEED", "").strip()
        return cls(
            broker=broker,
            kills=_env_int("DURABILITY_KILLS", 20),
            seed=int(seed_raw) if seed_raw else random.SystemRandom().randrange(1, 2**31),
            kill_min=_env_float("DURABILITY_KILL_MIN", 0.3),
            kill_max=_env_float("DURABILITY_KILL_MAX", 2.0),
            down_max=_env_float("DURABILITY_DOWN_MAX", 0.2),
            rate=_env_float("DURABILITY_RATE", 100.0),
            retain_rate=_env_float("DURABILITY_RETAIN_RATE", 40.0),
            window=_env_int("DURABILITY_WINDOW", 10),
            settle=_env_float("DURABILITY_SETTLE", 1.5),
            final_run=_env_float("DURABILITY_FINAL_RUN", 1.0),
            quiet=_env_float("DURABILITY_QUIET", 2.0),
            quiet_incomplete=_env_float("DURABILITY_QUIET_INCOMPLETE", 15.0),
            drain_max=_env_float("DURABILITY_DRAIN_MAX", 120.0),
            retained_wait=_env_float("DURABILITY_RETAINED_WAIT", 1.0),
            budget=_env_float("DURABILITY_BUDGET", 180.0),
            meta_interval=_env_float("DURABILITY_META_INTERVAL", 0.25),
            signal=_signal_name(),
        )


def _signal_name() -> str:
    name = os.environ.get("DURABILITY_SIGNAL", "KILL").strip().upper().removeprefix("SIG")
    if name not in ("KILL", "TERM"):
        raise ValueError(f"DURABILITY_SIGNAL must be KILL or TERM, not {name!r}")
    return name


# --------------------------------------------------------------------------------------------
# broker processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BrokerStartError(f"exited with code {proc.returncode} during start-up")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    f"nothing accepts connections on {HOST}:{port} after {timeout:.0f}s")
            time.sleep(0.02)


class BrokerStartError(RuntimeError):
    pass


class Broker:
    """A broker process restarted again and again on one port with one data directory."""

    kind = "?"
    START_TIMEOUT = 60.0  # recovery of a big store may take a while; still bounded

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.incarnation = -1  # bumped on every successful start
        self.ready = threading.Event()
        self.kill_times: list[float] = []  # monotonic time of kill k (it ended incarnation k)
        self.start_durations: list[float] = []
        self.log_path = workdir / f"{self.kind}.log"

    # subclasses: _spawn() -> Popen, _await_ready(proc)
    def start(self) -> None:
        attempts = 0
        while True:
            attempts += 1
            began = time.monotonic()
            self._note(f"=== start, incarnation {self.incarnation + 1}, attempt {attempts} ===")
            proc = self._spawn()
            try:
                self._await_ready(proc)
            except BrokerStartError as err:
                self._reap(proc)
                tail = self.log_tail(15)
                # A port briefly held after a SIGKILL is the harness's problem, not the broker's:
                # retry that a few times. Anything else (e.g. a store that no longer opens) fails.
                if attempts < 4 and re.search(r"in use|EADDRINUSE|cannot listen", tail, re.I):
                    time.sleep(0.5 * attempts)
                    continue
                raise BrokerStartError(f"{self.kind} did not start: {err}\n{tail}") from None
            self.proc = proc
            self.incarnation += 1
            self.start_durations.append(time.monotonic() - began)
            self.ready.set()
            return

    def kill(self, how: str = "KILL") -> None:
        """SIGKILL our broker process (by PID) and reap it; ``how="TERM"`` stops it gracefully
        instead (SIGTERM, SIGKILL after 10 s), for control runs."""
        assert self.proc is not None
        self.ready.clear()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM if how == "TERM" else signal.SIGKILL)
        self.kill_times.append(time.monotonic())
        if how == "TERM":
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._reap(self.proc)
        self._note(f"=== SIG{how} #{len(self.kill_times)} (pid {self.proc.pid}) ===")

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 5 s; only our own child, by PID."""
        self.ready.clear()
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _reap(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def _note(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(line + "\n")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def _spawn(self) -> subprocess.Popen:
        raise NotImplementedError

    def _await_ready(self, proc: subprocess.Popen) -> None:
        raise NotImplementedError


def ferry_source_binary() -> Path:
    if os.environ.get("FERRY_BIN"):
        return Path(os.environ["FERRY_BIN"])
    candidates = []
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "ferry")
    candidates.append(REPO_ROOT / "target" / "debug" / "ferry")
    return next((c for c in candidates if c.is_file()), candidates[0])


class FerryBroker(Broker):
    kind = "ferry"
    MQTT_LINE = re.compile(r"ferry: mqtt listening on (\S+)")
    API_LINE = re.compile(r"ferry: api listening on (\S+)")

    def __init__(self, workdir: Path, port: int, binary: Path) -> None:
        super().__init__(workdir, port)
        # A private copy, so a concurrent `cargo build` cannot swap the binary mid-run.
        self.binary = workdir / "ferry"
        shutil.copy2(binary, self.binary)
        self.data_dir = workdir / "ferry-data"
        self.api_port = free_port()
        self.api_url = f"http://{HOST}:{self.api_port}"
        self.extra_args = shlex.split(os.environ.get("DURABILITY_FERRY_ARGS", ""))
        if os.environ.get("FERRY_CONFIG"):
            self.extra_args += ["--config", os.environ["FERRY_CONFIG"]]
        help_text = subprocess.run([str(self.binary), "serve", "--help"], capture_output=True,
                                   text=True, timeout=30).stdout
        # The in-memory per-session queue cap of early builds would drop messages for reasons
        # that have nothing to do with crashes; lift it where the option still exists.
        if "--max-queued-messages" in help_text and "--max-queued-messages" not in self.extra_args:
            self.extra_args += ["--max-queued-messages", "100000000"]
        self.stdout_lines: list[str] = []

    def command(self) -> list[str]:
        return [str(self.binary), "serve", "--listen", f"{HOST}:{self.port}",
                "--api-listen", f"{HOST}:{self.api_port}", "--queue-listen", f"{HOST}:0",
                "--data-dir", str(self.data_dir),
                "--log-level", "warn", *self.extra_args]

    def _spawn(self) -> subprocess.Popen:
        log = open(self.log_path, "ab")
        try:
            proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=log)
        finally:
            log.close()
        proc._lines = []  # type: ignore[attr-defined]
        proc._announced = threading.Event()  # type: ignore[attr-defined]

        def pump() -> None:
            mqtt_seen = api_seen = False
            for raw in proc.stdout:  # type: ignore[union-attr]
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.stdout_lines.append(line)
                proc._lines.append(line)  # type: ignore[attr-defined]
                mqtt_seen = mqtt_seen or bool(self.MQTT_LINE.search(line))
                api_seen = api_seen or bool(self.API_LINE.search(line))
                if mqtt_seen and api_seen:
                    proc._announced.set()  # type: ignore[attr-defined]
            proc._announced.set()  # type: ignore[attr-defined]

        threading.Thread(target=pump, name="ferry-stdout", daemon=True).start()
        return proc

    def _await_ready(self, proc: subprocess.Popen) -> None:
        if not proc._announced.wait(self.START_TIMEOUT):  # type: ignore[attr-defined]
            raise BrokerStartError(
                f"no 'ferry: mqtt listening on' line in {self.START_TIMEOUT:.0f}s")
        lines = proc._lines  # type: ignore[attr-defined]
        addr = next((m.group(1) for m in map(self.MQTT_LINE.search, lines) if m), None)
        if addr is None:
            raise BrokerStartError(f"exited (code {proc.poll()}) before announcing its address")
        if not addr.endswith(f":{self.port}"):
            raise BrokerStartError(f"announced {addr}, expected port {self.port}")
        wait_for_port(self.port, proc, 10.0)

    # ferry ctl ---------------------------------------------------------------------------
    def ctl(self, *args: str, instance: str | None = None, timeout: float = 15.0
            ) -> subprocess.CompletedProcess:
        cmd = [str(self.binary), "ctl", "--api", self.api_url, "--data-dir", str(self.data_dir),
               "--json"]
        if instance:
            cmd += ["--instance", instance]
        cmd += list(args)
        env = {k: v for k, v in os.environ.items()
               if k not in ("FERRY_API", "FERRY_KEY_ID", "FERRY_KEY_SECRET", "FERRY_INSTANCE")}
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:  # run() killed its own child already
            return subprocess.CompletedProcess(cmd, -1, err.stdout or "",
                                               f"timeout after {timeout}s")


class MosquittoBroker(Broker):
    kind = "mosquitto"

    def __init__(self, workdir: Path, port: int) -> None:
        super().__init__(workdir, port)
        self.binary = os.environ.get("MOSQUITTO_BIN", "/usr/sbin/mosquitto")
        self.persist_dir = workdir / "mosquitto-data"
        self.persist_dir.mkdir(parents=True, exist_ok=True)
        self.autosave = _env_int("DURABILITY_MOSQUITTO_AUTOSAVE", 1)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {port} {HOST}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.persist_dir}/\n"
            "persistence_file mosquitto.db\n"
            f"autosave_interval {self.autosave}\n"
            "max_queued_messages 0\n"  # no per-client cap: losses must come from crashes only
            "max_inflight_messages 20\n"
            "log_dest stderr\n"  # unbuffered: the lines before a SIGKILL are not lost
            "log_type error\nlog_type warning\nlog_type notice\n"
            # Started as root, mosquitto switches to the `mosquitto` user, which cannot write
            # into pytest's private tmp directory ("Error: Permission denied" on every save).
            + ("user root\n" if os.geteuid() == 0 else "")
        )

    def _spawn(self) -> subprocess.Popen:
        log = open(self.log_path, "ab")
        try:
            return subprocess.Popen([self.binary, "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def _await_ready(self, proc: subprocess.Popen) -> None:
        wait_for_port(self.port, proc, self.START_TIMEOUT)


# --------------------------------------------------------------------------------------------
# MQTT clients


def new_client(client_id: str, protocol: int, clean_session: bool = True) -> mqtt.Client:
    kwargs: dict = dict(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=protocol, reconnect_on_failure=False)
    if protocol != V5:
        kwargs["clean_session"] = clean_session
    client = mqtt.Client(**kwargs)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    return client


def connect_props(session_expiry: int | None) -> Properties | None:
    if session_expiry is None:
        return None
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry
    return props


def shutdown_client(client: mqtt.Client, connected: bool) -> None:
    try:
        if connected:
            client.disconnect()
    except Exception:  # noqa: BLE001 - the socket may be gone already
        pass
    try:
        client.loop_stop()
    except Exception:  # noqa: BLE001
        pass


@dataclass
class Ack:
    t: float  # monotonic time the PUBACK was processed
    incarnation: int  # broker incarnation at that moment


class Publisher(threading.Thread):
    """Sends ``<name>:<seq>`` at QoS 1, seq = 0, 1, 2, … to ``topics[seq % len(topics)]``.

    Every (re)connection uses a fresh clean-session paho client, so an acknowledgement can only
    come from a PUBACK on the connection that carried the message.
    """

    def __init__(self, name: str, protocol: int, topics: list[str], retain: bool, rate: float,
                 window: int, broker: Broker, stop: threading.Event, run_id: str) -> None:
        super().__init__(name=f"pub-{name}", daemon=True)
        self.pub_name = name
        self.protocol = protocol
        self.topics = topics
        self.retain = retain
        self.rate = rate
        self.window = max(1, window)
        self.broker = broker
        self.stop_event = stop
        self.client_id = f"dur-{run_id}-{name}"
        self.lock = threading.Lock()
        self.next_seq = 0
        self.acked: dict[int, Ack] = {}
        self.nacked: dict[int, int] = {}  # seq -> failure reason code (v5 PUBACK >= 0x80)
        self.connections = 0
        self.connect_failures = 0
        self.error: BaseException | None = None
        # When set by the test, (re)connect only while this is set: the retained publishers
        # stay away after a restart until the retained messages have been checked, so fresh
        # publishes cannot hide a lost one.
        self.gate: threading.Event | None = None

    def topic_of(self, seq: int) -> str:
        return self.topics[seq % len(self.topics)]

    def payload(self, seq: int) -> bytes:
        return f"{self.pub_name}:{seq}".encode()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                if not self.broker.ready.wait(0.2):
                    continue
                if self.gate is not None and not self.gate.wait(0.2):
                    continue
                if not self._one_connection():
                    self.connect_failures += 1
                    time.sleep(0.05)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err

    def _record_ack(self, seq: int, reason: int) -> None:
        if reason >= 0x80:
            self.nacked[seq] = reason
        else:
            self.acked[seq] = Ack(time.monotonic(), self.broker.incarnation)

    def _one_connection(self) -> bool:
        cond = threading.Condition(self.lock)
        state = {"connected": False, "closed": False, "outstanding": 0}
        mids: dict[int, int] = {}
        early: dict[int, int] = {}  # PUBACKs that beat publish() returning its mid

        client = new_client(self.client_id, self.protocol, clean_session=True)

        def on_connect(_c, _u, _flags, reason, _props) -> None:
            with cond:
                if reason.is_failure:
                    state["closed"] = True
                else:
                    state["connected"] = True
                cond.notify_all()

        def on_disconnect(_c, _u, _flags, _reason, _props) -> None:
            with cond:
                state["closed"] = True
                cond.notify_all()

        def on_publish(_c, _u, mid, reason, _props) -> None:
            code = reason.value if reason is not None else 0
            with cond:
                seq = mids.pop(mid, None)
                if seq is None:
                    early[mid] = code
                else:
                    state["outstanding"] -= 1
                    self._record_ack(seq, code)
                cond.notify_all()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        try:
            if self.protocol == V5:
                client.connect(HOST, self.broker.port, keepalive=30, clean_start=True)
            else:
                client.connect(HOST, self.broker.port, keepalive=30)
        except OSError:
            return False
        client.loop_start()
        with cond:
            cond.wait_for(lambda: state["connected"] or state["closed"], timeout=5.0)
            ok = state["connected"] and not state["closed"]
        if not ok:
            shutdown_client(client, connected=False)
            return False
        self.connections += 1

        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            with cond:
                cond.wait_for(lambda: state["closed"] or state["outstanding"] < self.window
                              or self.stop_event.is_set(), timeout=0.5)
                if state["closed"]:
                    break
                if state["outstanding"] >= self.window or self.stop_event.is_set():
                    continue
                seq = self.next_seq
                self.next_seq += 1
            info = client.publish(self.topic_of(seq), self.payload(seq), qos=1, retain=self.retain)
            with cond:
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break  # never counted as acknowledged; the client is thrown away
                if info.mid in early:
                    self._record_ack(seq, early.pop(info.mid))
                else:
                    mids[info.mid] = seq
                    state["outstanding"] += 1
            if interval:
                next_at += interval
                pause = next_at - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                elif pause < -0.2:
                    next_at = time.monotonic()  # do not burst to catch up after an outage
        # Stopping: give the PUBACKs still on their way a moment, then leave cleanly.
        with cond:
            cond.wait_for(lambda: state["closed"] or state["outstanding"] == 0, timeout=3.0)
            connected = not state["closed"]
        shutdown_client(client, connected)
        return True


@dataclass
class Delivery:
    t: float
    topic: str
    payload: bytes
    dup: bool
    retain: bool
    connection: int


class Subscriber:
    """A persistent session; records every message it ever receives."""

    def __init__(self, name: str, protocol: int, filters: list[str], run_id: str,
                 broker: Broker, session_expiry: int = SESSION_EXPIRY,
                 create_clean_start: bool = False) -> None:
        self.name = name
        self.session_expiry = session_expiry
        # v5 only: the clean start flag of the very first CONNECT (the session is new either
        # way, the client ids being unique); every later CONNECT has clean start 0.
        self.create_clean_start = create_clean_start
        self.protocol = protocol
        self.filters = filters
        self.client_id = f"dur-{run_id}-{name}"
        self.broker = broker
        self.lock = threading.Lock()
        self.received: list[Delivery] = []
        self.session_present: list[bool] = []
        self.connections = 0
        self.client: mqtt.Client | None = None
        self.connected = threading.Event()
        self.closed = threading.Event()

    @property
    def label(self) -> str:
        proto = "v5" if self.protocol == V5 else "v3.1.1"
        return f"{self.name} ({proto}, {' '.join(self.filters)})"

    def last_receive(self) -> float:
        with self.lock:
            return self.received[-1].t if self.received else 0.0

    def connect(self, first: bool = False, timeout: float = 5.0) -> bool:
        """Connect with clean session 0 (v3.1.1) / clean start 0 and the session expiry (v5;
        ``create_clean_start`` on the ``first`` connect); True once CONNACKed."""
        self.close()
        client = new_client(self.client_id, self.protocol, clean_session=False)
        connected, closed = threading.Event(), threading.Event()
        number = self.connections + 1

        def on_connect(_c, _u, flags, reason, _props) -> None:
            if reason.is_failure:
                closed.set()
                return
            with self.lock:
                self.session_present.append(bool(flags.session_present))
            connected.set()

        def on_disconnect(*_args) -> None:
            closed.set()

        def on_message(_c, _u, msg) -> None:
            with self.lock:
                self.received.append(Delivery(time.monotonic(), msg.topic, bytes(msg.payload),
                                              bool(msg.dup), bool(msg.retain), number))

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        try:
            if self.protocol == V5:
                client.connect(HOST, self.broker.port, keepalive=30,
                               clean_start=first and self.create_clean_start,
                               properties=connect_props(self.session_expiry))
            else:
                client.connect(HOST, self.broker.port, keepalive=30)
        except OSError:
            return False
        client.loop_start()
        self.client, self.connected, self.closed = client, connected, closed
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not connected.is_set() and not closed.is_set():
            time.sleep(0.01)
        if connected.is_set() and not closed.is_set():
            self.connections = number
            return True
        self.close()
        return False

    def subscribe(self, timeout: float = 5.0) -> list[int]:
        """Subscribe to every filter at QoS 1; returns the granted codes."""
        assert self.client is not None
        done = threading.Event()
        codes: list[int] = []

        def on_subscribe(_c, _u, _mid, reasons, _props) -> None:
            codes.extend(r.value for r in reasons)
            done.set()

        self.client.on_subscribe = on_subscribe
        rc, _mid = self.client.subscribe([(f, 1) for f in self.filters])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not done.wait(timeout):
            return []
        return codes

    def close(self) -> None:
        if self.client is not None:
            shutdown_client(self.client, self.connected.is_set() and not self.closed.is_set())
            self.client = None


class DrainTracker:
    """Counts, incrementally, the acknowledged messages a subscriber has not received yet."""

    def __init__(self, sub: Subscriber, publishers: list[Publisher]) -> None:
        self.sub = sub
        self.remaining = {
            f"{p.pub_name}:{s}".encode()
            for p in publishers
            if any(mqtt.topic_matches_sub(f, t) for f in sub.filters for t in p.topics)
            for s in p.acked
        }
        self.done = 0

    def missing(self) -> int:
        with self.sub.lock:
            fresh = self.sub.received[self.done:]
            self.done += len(fresh)
        for d in fresh:
            self.remaining.discard(d.payload)
        return len(self.remaining)


class Roamer(threading.Thread):
    """Keeps one persistent subscriber coming and going while the broker is being killed, so
    messages in flight to a connected session at the moment of a kill are covered too."""

    def __init__(self, sub: Subscriber, broker: Broker, stop: threading.Event, seed: int) -> None:
        super().__init__(name=f"roam-{sub.name}", daemon=True)
        self.sub = sub
        self.broker = broker
        self.stop_event = stop
        self.rng = random.Random(seed)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            seen = -1
            while not self.stop_event.is_set():
                if not self.broker.ready.wait(0.2):
                    continue
                incarnation = self.broker.incarnation
                if incarnation != seen:
                    seen = incarnation
                    if self.rng.random() < 0.6:
                        time.sleep(self.rng.uniform(0, 0.5))
                        if self.sub.connect():
                            while (not self.stop_event.is_set() and not self.sub.closed.is_set()
                                   and self.rng.random() < 0.995):
                                time.sleep(0.01)
                        self.sub.close()
                time.sleep(0.02)
            self.sub.close()
        except BaseException as err:  # noqa: BLE001
            self.error = err


# --------------------------------------------------------------------------------------------
# metadata through `ferry ctl`


@dataclass
class MetaOp:
    kind: str  # instance | topic | group | key | credential | token | admin-key
    instance: str | None
    ident: str | None  # what to look for afterwards (None: exit 0 but no id in the output)
    t: float
    incarnation: int
    args: list[str]


class MetaWorker(threading.Thread):
    """Creates metadata with `ferry ctl` while the broker is killed and restarted; keeps the
    commands that exited 0."""

    def __init__(self, broker: FerryBroker, stop: threading.Event, run_id: str,
                 interval: float) -> None:
        super().__init__(name="meta", daemon=True)
        self.broker = broker
        self.stop_event = stop
        self.run_id = run_id
        self.interval = interval
        self.ok: list[MetaOp] = []
        self.failed = Counter()  # kind -> failed commands
        self.failure_samples: list[str] = []
        self.error: BaseException | None = None

    def _call(self, kind: str, args: list[str], instance: str | None, ident_of) -> MetaOp | None:
        if self.stop_event.is_set():
            return None
        incarnation = self.broker.incarnation
        result = self.broker.ctl(*args, instance=instance)
        op = None
        if result.returncode == 0:
            try:
                ident = ident_of(result.stdout)
            except (ValueError, KeyError, TypeError):
                ident = None
            op = MetaOp(kind, instance, ident, time.monotonic(), incarnation, args)
            self.ok.append(op)
        else:
            self.failed[kind] += 1
            if len(self.failure_samples) < 5:
                self.failure_samples.append(
                    f"{kind} {' '.join(args)}: exit {result.returncode}: "
                    f"{(result.stderr or result.stdout).strip()[:200]}")
        time.sleep(self.interval)
        return op

    def run(self) -> None:
        try:
            i = 0
            while not self.stop_event.is_set():
                if not self.broker.ready.wait(0.2):
                    continue
                inst = f"dur-{self.run_id}-{i}"
                made = self._call("instance", ["instances", "create", inst], None,
                                  lambda out: json.loads(out)["id"])
                if made is not None:
                    self._call("topic", ["topics", "create", f"ptopic{i}"], inst,
                               lambda _out, i=i: f"ptopic{i}")
                    self._call("group", ["groups", "create", f"GID_dur{i}"], inst,
                               lambda _out, i=i: f"GID_dur{i}")
                    self._call("key", ["keys", "create", "--permission", "full"], inst,
                               lambda out: json.loads(out)["access_key_id"])
                    self._call("credential", ["credentials", "register", f"dev{i}"], inst,
                               lambda out: json.loads(out)["client_id"])
                    self._call("token", ["tokens", "apply", "--resource", "dur/#", "--actions",
                                         "R,W", "--ttl", "3600"], inst,
                               lambda out: json.loads(out)["token"])
                if i % 4 == 0:
                    self._call("admin-key", ["admin-keys", "create"], None,
                               lambda out: json.loads(out)["access_key_id"])
                i += 1
        except BaseException as err:  # noqa: BLE001
            self.error = err


def verify_metadata(broker: FerryBroker, ops: list[MetaOp]) -> tuple[list[str], list[str]]:
    """Look every acknowledged creation up with `ferry ctl … --json`.

    Returns (missing, problems): descriptions of what was acknowledged but is gone, and of list
    commands that failed outright."""
    missing: list[str] = []
    problems: list[str] = []

    def listing(args: list[str], instance: str | None):
        res = broker.ctl(*args, instance=instance, timeout=30)
        if res.returncode != 0:
            problems.append(f"`ferry ctl{' -i ' + instance if instance else ''} {' '.join(args)}`"
                            f" exit {res.returncode}: {(res.stderr or res.stdout).strip()[:160]}")
            return None
        return json.loads(res.stdout)

    def describe(op: MetaOp) -> str:
        where = f" in {op.instance}" if op.instance else ""
        return f"{op.kind} {op.ident}{where} (acknowledged in incarnation {op.incarnation})"

    instances = listing(["instances", "list"], None)
    instance_ids = {x["id"] for x in instances} if instances is not None else set()
    admin = listing(["admin-keys", "list"], None)
    admin_ids = {x["access_key_id"] for x in admin} if admin is not None else set()
    per_instance: dict[str, dict[str, set]] = {}
    for op in ops:
        if op.ident is None:
            problems.append(f"{op.kind} `{' '.join(op.args)}` exited 0 without the expected id")
            continue
        if op.kind == "instance":
            if op.ident not in instance_ids:
                missing.append(describe(op))
        elif op.kind == "admin-key":
            if op.ident not in admin_ids:
                missing.append(describe(op))
        elif op.kind == "token":
            res = broker.ctl("tokens", "show", op.ident, instance=op.instance, timeout=30)
            if res.returncode != 0:
                missing.append(describe(op) + f": `tokens show` exit {res.returncode}")
        else:
            inst = op.instance or "default"
            if inst not in per_instance:
                if inst not in instance_ids:
                    per_instance[inst] = {"topic": set(), "group": set(), "key": set(),
                                          "credential": set()}
                else:
                    topics = listing(["topics", "list"], inst) or []
                    groups = listing(["groups", "list"], inst) or []
                    keys = listing(["keys", "list"], inst) or []
                    creds = listing(["credentials", "list"], inst) or {}
                    per_instance[inst] = {
                        "topic": {x["name"] for x in topics},
                        "group": {x["group_id"] for x in groups},
                        "key": {x["access_key_id"] for x in keys},
                        "credential": set(creds.get("client_ids", [])),
                    }
            if op.ident not in per_instance[inst][op.kind]:
                missing.append(describe(op))
    return missing, problems


# --------------------------------------------------------------------------------------------
# analysis


def parse_payload(payload: bytes) -> tuple[str, int] | None:
    try:
        name, seq = payload.decode().rsplit(":", 1)
        return name, int(seq)
    except (UnicodeDecodeError, ValueError):
        return None


@dataclass
class SubscriberReport:
    label: str
    expected: int = 0  # acknowledged messages that match its filters
    deliveries: int = 0
    unique: int = 0
    delivered_acked: int = 0
    delivered_unacked: int = 0  # delivered although the publisher never saw the PUBACK
    duplicates: int = 0
    dup_flagged: int = 0
    out_of_order: int = 0  # first deliveries with a seq below one already seen, per publisher
    lost: list[tuple[str, int]] = field(default_factory=list)
    phantoms: list[str] = field(default_factory=list)  # never sent / wrong topic / garbage
    session_present: bool | None = None


def analyse_queue(publishers: list[Publisher], subscribers: list[Subscriber]
                  ) -> list[SubscriberReport]:
    by_name = {p.pub_name: p for p in publishers}
    reports = []
    for sub in subscribers:
        rep = SubscriberReport(sub.label)
        rep.session_present = sub.session_present[-1] if sub.session_present else None
        matching = [p for p in publishers
                    if any(mqtt.topic_matches_sub(f, t) for f in sub.filters for t in p.topics)]
        expected = {(p.pub_name, s) for p in matching for s in p.acked}
        rep.expected = len(expected)
        seen: Counter = Counter()
        high: dict[str, int] = {}
        with sub.lock:
            received = list(sub.received)
        for d in received:
            rep.deliveries += 1
            parsed = parse_payload(d.payload)
            pub = by_name.get(parsed[0]) if parsed else None
            if parsed is None or pub is None:
                rep.phantoms.append(f"unparsable payload {d.payload[:40]!r} on {d.topic}")
                continue
            name, seq = parsed
            if seq >= pub.next_seq or pub.topic_of(seq) != d.topic or pub not in matching:
                rep.phantoms.append(f"{name}:{seq} on {d.topic} was never sent there")
                continue
            key = (name, seq)
            seen[key] += 1
            if seen[key] > 1:
                rep.duplicates += 1
                rep.dup_flagged += d.dup
                continue
            if seq < high.get(name, -1):
                rep.out_of_order += 1
            high[name] = max(high.get(name, -1), seq)
        rep.unique = len(seen)
        rep.delivered_acked = sum(1 for k in seen if k in expected)
        rep.delivered_unacked = rep.unique - rep.delivered_acked
        rep.lost = sorted(expected - set(seen))
        reports.append(rep)
    return reports


def loss_timing(lost: list[tuple[str, int]], publishers: list[Publisher], broker: Broker
                ) -> tuple[Counter, list[float]]:
    """For lost messages: which incarnation acknowledged them, and how long before the kill
    that ended it the PUBACK came (seconds)."""
    by_name = {p.pub_name: p for p in publishers}
    per_incarnation: Counter = Counter()
    before_kill: list[float] = []
    for name, seq in lost:
        ack = by_name[name].acked[seq]
        per_incarnation[ack.incarnation] += 1
        if ack.incarnation < len(broker.kill_times):
            # A PUBACK already on the wire is read just after the kill: count that as 0 s.
            before_kill.append(max(0.0, broker.kill_times[ack.incarnation] - ack.t))
    return per_incarnation, before_kill


def collect_retained(port: int, filter_: str, topics: list[str], run_id: str,
                     wait: float = 2.0) -> tuple[dict[str, bytes], int]:
    """A new clean subscriber; returns {topic: retained payload} and the SUBACK code. Waits
    until every topic in ``topics`` has been seen, at most ``wait`` seconds after the SUBACK."""
    sub = Subscriber("retained-check", V5, [filter_], run_id, _PortOnly(port), session_expiry=0,
                     create_clean_start=True)
    got: dict[str, bytes] = {}
    if not sub.connect(first=True):
        return got, -1
    codes = sub.subscribe()
    deadline = time.monotonic() + wait
    while True:
        with sub.lock:
            got = {d.topic: d.payload for d in sub.received if d.retain}
        if set(topics) <= set(got) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    sub.close()
    return got, codes[0] if codes else -1


def last_acked_per_topic(retainers: list[Publisher]) -> dict[str, tuple[Publisher, int]]:
    out: dict[str, tuple[Publisher, int]] = {}
    for r in retainers:
        for seq in list(r.acked):
            topic = r.topic_of(seq)
            if topic not in out or out[topic][1] < seq:
                out[topic] = (r, seq)
    return out


def check_retained(got: dict[str, bytes], snapshot: dict[str, tuple[Publisher, int]],
                   broker: Broker) -> list[str]:
    """Each topic of ``snapshot`` must hold a retained message at least as new as the last one
    acknowledged (newer ones may come from publishers already back at work)."""
    bad = []
    for topic, (r, last) in sorted(snapshot.items()):
        ack = r.acked[last]
        when = (f"PUBACK {max(0.0, broker.kill_times[ack.incarnation] - ack.t):.2f}s before kill "
                f"#{ack.incarnation + 1}" if ack.incarnation < len(broker.kill_times)
                else "acknowledged after the last restart")
        payload = got.get(topic)
        parsed = parse_payload(payload) if payload is not None else None
        if payload is None:
            bad.append(f"{topic}: no retained message; last acknowledged {r.pub_name}:{last} "
                       f"({when})")
        elif (parsed is None or parsed[0] != r.pub_name or parsed[1] >= r.next_seq
              or r.topic_of(parsed[1]) != topic):
            bad.append(f"{topic}: retained {payload[:40]!r} was never sent there")
        elif parsed[1] < last:
            bad.append(f"{topic}: retained {r.pub_name}:{parsed[1]} is older than the last "
                       f"acknowledged {r.pub_name}:{last} ({when})")
    return bad


class _PortOnly:
    def __init__(self, port: int) -> None:
        self.port = port


def kill_schedule_text(broker: Broker) -> str:
    durations = broker.start_durations
    if not durations:
        return "no start"
    return (f"start-up {min(durations):.2f}-{max(durations):.2f}s "
            f"(mean {sum(durations) / len(durations):.2f}s)")


def per_incarnation_acks(publishers: list[Publisher]) -> Counter:
    counts: Counter = Counter()
    for p in publishers:
        for ack in p.acked.values():
            counts[ack.incarnation] += 1
    return counts


def group_lost(lost: list[tuple[str, int]], limit: int = 10) -> str:
    by_pub: dict[str, list[int]] = defaultdict(list)
    for name, seq in lost:
        by_pub[name].append(seq)
    parts = []
    for name in sorted(by_pub):
        seqs = sorted(by_pub[name])
        shown = ", ".join(map(str, seqs[:limit])) + (" …" if len(seqs) > limit else "")
        parts.append(f"{name}: {len(seqs)} [{shown}]")
    return "; ".join(parts)
