"""Helpers shared by the interop tests.

* unique client ids and topic prefixes, so tests never see each other's traffic;
* ``PahoClient``: a small blocking wrapper around a paho-mqtt 2.x client whose
  network loop runs in a background thread;
* ``MosquittoSub`` / ``mosquitto_pub``: wrappers around the Debian
  ``mosquitto-clients`` command-line tools.

Every wait is bounded (``WAIT`` seconds at most) so a misbehaving broker makes
a test fail instead of hanging the suite.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5

WAIT = 10.0  # upper bound for any single wait, in seconds
QUIET = 0.5  # how long "nothing else arrives" has to hold, in seconds


def unique_id(kind: str = "client") -> str:
    """A client id that no other test uses (23 chars max, as 3.1.1 servers may require)."""
    return f"it-{kind[:6]}-{uuid.uuid4().hex[:12]}"


def unique_topic(name: str = "t") -> str:
    """A topic under a prefix that belongs to the calling test only."""
    return f"interop/{uuid.uuid4().hex}/{name}"


def publish_properties(packet_type: int = PacketTypes.PUBLISH, **values) -> Properties:
    """Build PUBLISH (or will) properties, e.g. ``publish_properties(ContentType="text/plain")``."""
    props = Properties(packet_type)
    for name, value in values.items():
        setattr(props, name, value)
    return props


@dataclass(frozen=True)
class Received:
    """One application message as delivered to a paho client."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None = None

    def user_properties(self) -> list[tuple[str, str]]:
        return list(getattr(self.properties, "UserProperty", None) or [])


@dataclass(frozen=True)
class Connack:
    reason_code: int
    session_present: bool
    properties: Properties | None


class PahoClient:
    """A paho-mqtt client with blocking connect/subscribe/publish/disconnect.

    Incoming messages are queued in arrival order; use ``expect_messages`` /
    ``assert_silent`` to check them. The client never reconnects on its own.
    """

    def __init__(
        self,
        endpoint,
        version: int,
        client_id: str | None = None,
        *,
        clean: bool = True,
        session_expiry: int | None = None,
        keepalive: int = 30,
        tls: dict | None = None,
        websocket_path: str | None = None,
    ) -> None:
        """``tls``: keyword arguments for paho's ``tls_set`` (MQTT over TLS), and
        ``insecure=True`` to skip the host name check. ``websocket_path``: MQTT over WebSocket
        on that path."""
        self.endpoint = endpoint
        self.version = version
        self.client_id = client_id or unique_id("paho")
        self._clean = clean
        self._session_expiry = session_expiry
        self._keepalive = keepalive

        extra = {} if version == V5 else {"clean_session": clean}
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=version,
            reconnect_on_failure=False,
            transport="websockets" if websocket_path else "tcp",
            **extra,
        )
        if websocket_path:
            self._client.ws_set_options(path=websocket_path)
        if tls is not None:
            tls = dict(tls)
            insecure = tls.pop("insecure", False)
            self._client.tls_set(**tls)
            self._client.tls_insecure_set(insecure)
        self.messages: queue.Queue[Received] = queue.Queue()
        self._cond = threading.Condition()
        self._connack: Connack | None = None
        self._connected = False
        self._disconnect_reason: int | None = None
        self._subacks: dict[int, list[int]] = {}
        self._unsubacks: set[int] = set()
        self._loop_running = False

        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = self._on_unsubscribe
        self._client.on_message = self._on_message

    # -- paho callbacks (run in the network thread) ---------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            self._connack = Connack(
                reason_code=int(reason_code.value),
                session_present=bool(flags.session_present),
                properties=properties,
            )
            self._connected = not reason_code.is_failure
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            self._connected = False
            self._disconnect_reason = int(reason_code.value)
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            self._subacks[mid] = [int(rc.value) for rc in reason_codes]
            self._cond.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            self._unsubacks.add(mid)
            self._cond.notify_all()

    def _on_message(self, client, userdata, message):
        self.messages.put(
            Received(
                topic=message.topic,
                payload=bytes(message.payload),
                qos=message.qos,
                retain=bool(message.retain),
                properties=getattr(message, "properties", None),
            )
        )

    # -- helpers ----------------------------------------------------------------

    def _wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT,
                  *, while_connected: bool = False) -> None:
        """Wait for ``predicate``; with ``while_connected``, give up early if the broker
        closes the connection (it then can no longer become true)."""
        with self._cond:
            done = self._cond.wait_for(
                lambda: predicate() or (while_connected and not self._connected), timeout)
            if done and predicate():
                return
        if not done:
            raise AssertionError(f"{self.client_id}: no {what} within {timeout:.1f}s")
        raise AssertionError(f"{self.client_id}: connection closed by the broker "
                             f"({self._describe_disconnect()}) while waiting for {what}")

    def _describe_disconnect(self) -> str:
        if self._disconnect_reason is None:
            return "no reason known"
        return f"reason code {self._disconnect_reason:#04x}"

    @property
    def connack(self) -> Connack:
        assert self._connack is not None, f"{self.client_id} has not connected"
        return self._connack

    @property
    def connected(self) -> bool:
        return self._connected

    # -- operations -------------------------------------------------------------

    def will_set(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                 properties: Properties | None = None) -> PahoClient:
        self._client.will_set(topic, payload, qos=qos, retain=retain, properties=properties)
        return self

    def connect(self) -> PahoClient:
        """Connect and wait for a successful CONNACK."""
        kwargs = {}
        if self.version == V5:
            kwargs["clean_start"] = self._clean
            if self._session_expiry is not None:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self._session_expiry
                kwargs["properties"] = props
        self._client.connect(self.endpoint.host, self.endpoint.port,
                             keepalive=self._keepalive, **kwargs)
        self._client.loop_start()
        self._loop_running = True
        self._wait_for(lambda: self._connack is not None or self._disconnect_reason is not None,
                       "CONNACK")
        assert self._connack is not None, (
            f"{self.client_id}: connection closed before CONNACK ({self._describe_disconnect()})")
        assert self._connack.reason_code == 0, (
            f"{self.client_id}: CONNACK refused with reason code {self._connack.reason_code:#04x}")
        return self

    def subscribe(self, topic: str, qos: int = 0, *, retain_as_published: bool = False,
                  retain_handling: int = 0, no_local: bool = False) -> list[int]:
        """Subscribe to one filter; return the SUBACK return/reason codes."""
        if self.version == V5:
            options = SubscribeOptions(qos=qos, noLocal=no_local,
                                       retainAsPublished=retain_as_published,
                                       retainHandling=retain_handling)
            rc, mid = self._client.subscribe(topic, options=options)
        else:
            rc, mid = self._client.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe({topic!r}) failed locally: {rc}"
        self._wait_for(lambda: mid in self._subacks, f"SUBACK for {topic!r}",
                       while_connected=True)
        return self._subacks[mid]

    def unsubscribe(self, topic: str) -> None:
        rc, mid = self._client.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"unsubscribe({topic!r}) failed locally: {rc}"
        self._wait_for(lambda: mid in self._unsubacks, f"UNSUBACK for {topic!r}",
                       while_connected=True)

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False,
                properties: Properties | None = None) -> None:
        """Publish and wait until the QoS flow with the broker is complete."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            raise AssertionError(f"{self.client_id}: cannot publish to {topic!r}, not connected "
                                 f"({self._describe_disconnect()})")
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish to {topic!r} failed locally: {info.rc}"
        deadline = time.monotonic() + WAIT
        while not info.is_published():
            if not self._connected:
                raise AssertionError(
                    f"{self.client_id}: connection closed by the broker "
                    f"({self._describe_disconnect()}) before the QoS {qos} publish to "
                    f"{topic!r} completed")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.client_id}: QoS {qos} publish to {topic!r} "
                                     f"not acknowledged within {WAIT}s")
            info.wait_for_publish(timeout=0.05)

    def expect_messages(self, count: int, timeout: float = WAIT) -> list[Received]:
        """Return the next ``count`` messages, failing if they do not all arrive in time."""
        got: list[Received] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                got.append(self.messages.get(timeout=0.05))
                continue
            except queue.Empty:
                pass
            if not self._connected:
                problem = f"the connection was closed ({self._describe_disconnect()})"
            elif time.monotonic() > deadline:
                problem = f"timed out after {timeout:.1f}s"
            else:
                continue
            raise AssertionError(f"{self.client_id}: expected {count} messages, {problem}; "
                                 f"got {len(got)}: {got!r}")
        return got

    def expect_message(self, timeout: float = WAIT) -> Received:
        return self.expect_messages(1, timeout)[0]

    def assert_silent(self, duration: float = QUIET) -> None:
        """Fail if any message arrives within ``duration`` seconds."""
        try:
            extra = self.messages.get(timeout=duration)
        except queue.Empty:
            return
        raise AssertionError(f"{self.client_id}: unexpected message {extra!r}")

    def drain(self) -> list[Received]:
        """Everything queued so far, without waiting."""
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def disconnect(self, reason_code: int | None = None,
                   properties: Properties | None = None) -> None:
        """Send DISCONNECT (optionally with a v5 reason code) and wait for the close."""
        rc_obj = None
        if reason_code is not None:
            rc_obj = ReasonCode(PacketTypes.DISCONNECT, identifier=reason_code)
        self._client.disconnect(reasoncode=rc_obj, properties=properties)
        self._wait_for(lambda: not self._connected, "disconnect")
        self._stop_loop()

    def drop(self) -> None:
        """Close the TCP connection abruptly, without sending DISCONNECT."""
        sock = self._client.socket()
        assert sock is not None, f"{self.client_id} has no socket to drop"
        sock.shutdown(socket.SHUT_RDWR)
        self._wait_for(lambda: not self._connected, "connection loss after dropping the socket")
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop_running:
            self._client.loop_stop()
            self._loop_running = False

    def close(self) -> None:
        """Best-effort cleanup for fixture teardown."""
        try:
            if self._connected:
                self._client.disconnect()
                with self._cond:
                    self._cond.wait_for(lambda: not self._connected, 2.0)
        finally:
            self._stop_loop()
            sock = self._client.socket()
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass


def collect_across(clients: Sequence[PahoClient], total: int,
                   timeout: float = WAIT) -> list[list[Received]]:
    """Wait until ``clients`` together received ``total`` messages; return them per client."""
    per_client: list[list[Received]] = [[] for _ in clients]
    deadline = time.monotonic() + timeout
    while sum(map(len, per_client)) < total:
        if time.monotonic() > deadline:
            counts = [len(c) for c in per_client]
            raise AssertionError(
                f"expected {total} messages across {len(clients)} clients within "
                f"{timeout:.1f}s, got {counts}")
        for bucket, client in zip(per_client, clients):
            bucket.extend(client.drain())
        time.sleep(0.01)
    return per_client


# -- mosquitto command-line clients --------------------------------------------

# Tab-separated so that parsing is unambiguous; the payload is printed as hex.
_SUB_FIELDS = ("%q", "%r", "%t", "%x")
_V5_SUB_FIELDS = ("%C", "%R", "%D", "%P")
_MARK = "MSG"
_GRANTED = re.compile(r"^Subscribed \(mid: \d+\): (.*)$")


def cli_connection_args(endpoint, version: int, client_id: str) -> list[str]:
    return [
        "-h", endpoint.host,
        "-p", str(endpoint.port),
        "-V", "mqttv5" if version == V5 else "mqttv311",
        "-i", client_id,
    ]


@dataclass(frozen=True)
class CliMessage:
    """One message as printed by ``mosquitto_sub``."""

    qos: int
    retain: bool
    topic: str
    payload: bytes
    content_type: str = ""
    response_topic: str = ""
    correlation_data: str = ""
    user_properties: str = ""


@dataclass
class MosquittoSub:
    """A running ``mosquitto_sub`` process (line-buffered, with ``-d`` to see SUBACK)."""

    proc: subprocess.Popen
    client_id: str
    messages: list[CliMessage] = field(default_factory=list)
    output: list[str] = field(default_factory=list)
    granted: list[int] | None = None
    _subscribed: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, endpoint, version: int, topics: Iterable[str], *, qos: int = 0,
              count: int | None = None, timeout: int = 10, client_id: str | None = None,
              extra_args: Sequence[str] = ()) -> MosquittoSub:
        client_id = client_id or unique_id("msub")
        fields = _SUB_FIELDS + (_V5_SUB_FIELDS if version == V5 else ())
        args = ["stdbuf", "-oL", "mosquitto_sub", *cli_connection_args(endpoint, version, client_id),
                "-d", "-q", str(qos), "-W", str(timeout),
                "-F", "\\t".join((_MARK, *fields))]
        for topic in topics:
            args += ["-t", topic]
        if count is not None:
            args += ["-C", str(count)]
        args += list(extra_args)
        # stderr is merged so that one reader thread owns all output.
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        sub = cls(proc=proc, client_id=client_id)
        sub._reader = threading.Thread(target=sub._read, daemon=True)
        sub._reader.start()
        return sub

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.output.append(line)
            if line.startswith(_MARK + "\t"):
                self.messages.append(_parse_cli_message(line))
                continue
            granted = _GRANTED.match(line)
            if granted:
                self.granted = [int(x) for x in granted.group(1).split(",")]
                self._subscribed.set()

    def wait_subscribed(self, timeout: float = WAIT) -> list[int]:
        """Block until the SUBACK has been printed; return the granted QoS list."""
        deadline = time.monotonic() + timeout
        while not self._subscribed.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._reader.join(1.0)
                if self._subscribed.is_set():
                    break
                raise AssertionError(
                    f"mosquitto_sub {self.client_id} did not report a SUBACK "
                    f"(exit code {self.proc.poll()}); output: {self.output!r}")
        return self.granted

    def finish(self, timeout: float = WAIT + 5) -> int:
        """Wait for the process to exit on its own (-C / -W); return its exit code."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"mosquitto_sub {self.client_id} did not exit within {timeout}s")
        self._reader.join(WAIT)  # the reader has seen every line once it hits EOF
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the process (by PID) if it is still running."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def describe(self) -> str:
        return f"mosquitto_sub {self.client_id} output: {self.output!r}"


def _parse_cli_message(line: str) -> CliMessage:
    parts = line.split("\t")[1:]
    qos, retain, topic, payload_hex = parts[:4]
    extra = dict(zip(("content_type", "response_topic", "correlation_data", "user_properties"),
                     parts[4:]))
    return CliMessage(qos=int(qos), retain=retain == "1", topic=topic,
                      payload=bytes.fromhex(payload_hex), **extra)


def mosquitto_pub(endpoint, version: int, topic: str, payload: bytes | None, *, qos: int = 0,
                  retain: bool = False, extra_args: Sequence[str] = (),
                  client_id: str | None = None) -> None:
    """Run ``mosquitto_pub`` once; ``payload=None`` sends a zero-length message (-n).

    The payload is passed on stdin (-s) so arbitrary bytes survive intact.
    """
    client_id = client_id or unique_id("mpub")
    args = ["mosquitto_pub", *cli_connection_args(endpoint, version, client_id),
            "-t", topic, "-q", str(qos)]
    if retain:
        args.append("-r")
    args += ["-n"] if payload is None else ["-s"]
    args += list(extra_args)
    result = subprocess.run(args, input=payload or b"", capture_output=True, timeout=WAIT)
    assert result.returncode == 0, (
        f"mosquitto_pub exited with {result.returncode}: "
        f"stdout={result.stdout!r} stderr={result.stderr!r}")
