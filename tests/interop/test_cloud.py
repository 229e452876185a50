"""Cloud-profile acceptance tests with third-party clients (paho-mqtt 2.x).

Each module run starts its own ``ferry serve`` (temporary data directory, port-0 listeners)
and sets it up with ``ferry ctl`` only: a ``cloud`` instance with a parent topic, a group,
an AccessKey, device credentials and tokens. Clients then log in in the three cloud modes
(Signature, Token, DeviceCredential) and check the outcomes of §2/§3 of the product
contract; a second part checks that two instances share nothing.

Every wait is bounded.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from interop_support import V5, V311, WAIT, PahoClient

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTANCE = "cloud-a"
PARENT = "ptest"
GROUP = "GID_test"

VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=["v3.1.1", "v5"])


# -- the server under test ------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


def _ferry_binary() -> Path:
    if os.environ.get("FERRY_BIN"):
        return Path(os.environ["FERRY_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    return target / "debug" / "ferry"


class Ferry:
    """A ``ferry serve`` child process and ``ferry ctl`` against it. ``extra`` goes to ``ferry
    serve``; ``listeners`` maps each announced listener (``mqtt``, ``mqtt-tls``, ``api``, ...) to
    its address once ``mqtt``, ``api`` and all of ``want`` are up."""

    def __init__(self, workdir: Path, extra: tuple[str, ...] = (),
                 want: tuple[str, ...] = ()) -> None:
        want = ("mqtt", "api", *want)
        self.binary = _ferry_binary()
        if not self.binary.is_file():
            pytest.fail(f"Ferry binary not found at {self.binary}; build it or set FERRY_BIN",
                        pytrace=False)
        self.data_dir = workdir / "data"
        self.log_path = workdir / "ferry.stderr.log"
        cmd = [str(self.binary), "serve", "--listen", "127.0.0.1:0",
               "--api-listen", "127.0.0.1:0", "--queue-listen", "127.0.0.1:0",
               "--data-dir", str(self.data_dir),
               "--log-level", "warn", *extra]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=log)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            for raw in self.proc.stdout:
                lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, name="ferry-cloud-stdout", daemon=True).start()
        self.listeners: dict[str, str] = {}
        deadline = time.monotonic() + 20
        while not all(w in self.listeners for w in want):
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                pytest.fail(f"ferry serve did not announce {', '.join(want)}: {self.log_tail()}",
                            pytrace=False)
            if m := re.match(r"ferry: ([\w-]+) listening on (\S+)$", line):
                self.listeners[m.group(1)] = m.group(2)
        self.endpoint = self.mqtt_endpoint("mqtt")
        self.api = self.listeners["api"]

    def mqtt_endpoint(self, name: str) -> Endpoint:
        host, _, port = self.listeners[name].rpartition(":")
        return Endpoint(host.strip("[]"), int(port))

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after 5 s."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def ctl_run(self, *args: str, instance: str | None = None) -> subprocess.CompletedProcess:
        cmd = [str(self.binary), "ctl", "--data-dir", str(self.data_dir)]
        if instance is not None:
            cmd += ["-i", instance]
        env = {k: v for k, v in os.environ.items()
               if k not in ("FERRY_API", "FERRY_KEY_ID", "FERRY_KEY_SECRET", "FERRY_INSTANCE")}
        return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=WAIT,
                              env=env, stdin=subprocess.DEVNULL)

    def ctl(self, *args: str, instance: str | None = None):
        """Runs ``ferry ctl --json ARGS``; returns the parsed document (None if empty)."""
        result = self.ctl_run("--json", *args, instance=instance)
        assert result.returncode == 0, (
            f"ferry ctl {' '.join(args)} exited with {result.returncode}: {result.stderr.strip()}")
        return json.loads(result.stdout) if result.stdout.strip() else None


@pytest.fixture(scope="module")
def ferry(tmp_path_factory):
    server = Ferry(tmp_path_factory.mktemp("cloud"))
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class Cloud:
    ferry: Ferry
    key_id: str
    key_secret: str

    @property
    def endpoint(self) -> Endpoint:
        return self.ferry.endpoint

    def token(self, actions: str, *resources: str, ttl: int = 600) -> str:
        args = ["tokens", "apply", "--actions", actions, "--ttl", str(ttl)]
        for r in resources:
            args += ["--resource", r]
        return self.ferry.ctl(*args, instance=INSTANCE)["token"]


@pytest.fixture(scope="module")
def cloud(ferry) -> Cloud:
    """The instance ``cloud-a`` (profile cloud) with a parent topic, a group and an AccessKey,
    all made with ``ferry ctl``."""
    inst = ferry.ctl("instances", "create", INSTANCE, "--profile", "cloud")
    assert inst["profile"] == "cloud"
    ferry.ctl("topics", "create", PARENT, instance=INSTANCE)
    ferry.ctl("groups", "create", GROUP, instance=INSTANCE)
    key = ferry.ctl("keys", "create", "--permission", "full", instance=INSTANCE)
    return Cloud(ferry, key["access_key_id"], key["access_key_secret"])


# -- clients --------------------------------------------------------------------------------


def sign(secret: str, client_id: str) -> str:
    """Base64(HMAC-SHA1(key = secret, msg = client id)): Signature and DeviceCredential modes."""
    digest = hmac.new(secret.encode(), client_id.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def test_signature_matches_the_contract_vectors():
    assert sign("XXXXX", "GID_Test@@@0001") == "vI009IZJZVGRwBwZvnbwjfuXxVM="
    assert sign("DC.BJMkn4eMQJK2vaApTS0000", "GID_test@@@test") == "UvBba3SccsvCdDGqimGy3IPs4VI="


class CloudClient(PahoClient):
    """A PahoClient with a user name and password, PUBACK reason codes and refusal checks."""

    def __init__(self, endpoint, version, client_id, username=None, password=None, **kwargs):
        super().__init__(endpoint, version, client_id, **kwargs)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._pubacks: dict[int, int] = {}
        self._client.on_publish = self._on_publish

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._cond:
            self._pubacks[mid] = int(reason_code.value)
            self._cond.notify_all()

    def try_connect(self) -> int | None:
        """Connect; return the CONNACK reason code (paho reports v3 return codes as their v5
        equivalents), or None if the server closed the connection without a CONNACK."""
        self._client.connect(self.endpoint.host, self.endpoint.port, keepalive=30)
        self._client.loop_start()
        self._loop_running = True
        self._wait_for(lambda: self._connack is not None or self._disconnect_reason is not None,
                       "CONNACK")
        return None if self._connack is None else self._connack.reason_code

    def publish_rc(self, topic: str, payload: bytes | str, qos: int = 1) -> int | None:
        """Publish at QoS 1; return the PUBACK reason code, or None if the server closed the
        connection instead."""
        info = self._client.publish(topic, payload, qos=qos)
        if info.rc != 0:
            return None
        with self._cond:
            self._cond.wait_for(lambda: info.mid in self._pubacks or not self._connected, WAIT)
            if info.mid in self._pubacks:
                return self._pubacks[info.mid]
        assert not self._connected, f"{self.client_id}: no PUBACK for {topic!r} within {WAIT}s"
        return None

    def wait_closed(self, timeout: float = WAIT) -> int | None:
        """Wait until the server closes the connection; return the DISCONNECT reason code."""
        self._wait_for(lambda: not self._connected, "close by the server", timeout)
        return self._disconnect_reason


@pytest.fixture
def clients():
    made: list[CloudClient] = []

    def make(endpoint, version, client_id, username=None, password=None, **kwargs):
        c = CloudClient(endpoint, version, client_id, username, password, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def vtag(version: int) -> str:
    return "5" if version == V5 else "3"


def signature_client(make, cloud: Cloud, version: int, client_id: str, **kwargs) -> CloudClient:
    return make(cloud.endpoint, version, client_id, f"Signature|{cloud.key_id}|{INSTANCE}",
                sign(cloud.key_secret, client_id), **kwargs)


def token_client(make, cloud: Cloud, version: int, client_id: str, password: str) -> CloudClient:
    return make(cloud.endpoint, version, client_id, f"Token|{cloud.key_id}|{INSTANCE}", password)


def raw_connack_v311(endpoint, client_id: str, username: str, password: str) -> int | None:
    """A bare MQTT 3.1.1 CONNECT; returns the CONNACK return code (None: closed without one)."""
    def s(text: str) -> bytes:
        data = text.encode()
        return struct.pack("!H", len(data)) + data

    body = s("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 30) + s(client_id) + s(username) \
        + s(password)
    assert len(body) < 128
    with socket.create_connection((endpoint.host, endpoint.port), timeout=WAIT) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        got = b""
        while len(got) < 4:
            chunk = sock.recv(4 - len(got))
            if not chunk:
                return None
            got += chunk
    assert got[0] == 0x20, f"not a CONNACK: {got!r}"
    return got[3]


# -- the three login modes --------------------------------------------------------------------


@VERSIONS
def test_three_login_modes_exchange_messages(cloud, clients, version):
    v = vtag(version)
    chat = f"{PARENT}/chat{v}"
    sig = signature_client(clients, cloud, version, f"{GROUP}@@@sig{v}").connect()

    tok = cloud.token("R,W", f"{chat}/#")
    tok_client = token_client(clients, cloud, version, f"{GROUP}@@@tok{v}", f"RW|{tok}").connect()

    dc_id = f"{GROUP}@@@dc{v}"
    cred = cloud.ferry.ctl("credentials", "register", dc_id, instance=INSTANCE)
    assert cred["device_access_key_id"].startswith("DC.")
    dc = clients(cloud.endpoint, version, dc_id,
                 f"DeviceCredential|{cred['device_access_key_id']}|{INSTANCE}",
                 sign(cred["device_access_key_secret"], dc_id)).connect()

    everyone = {"sig": sig, "tok": tok_client, "dc": dc}
    for c in everyone.values():
        assert c.subscribe(f"{chat}/#", qos=1) == [1]
    for name, c in everyone.items():
        c.publish(f"{chat}/{name}", f"hello from {name}".encode(), qos=1)
    for c in everyone.values():
        got = sorted((m.topic, m.payload) for m in c.expect_messages(3))
        assert got == sorted((f"{chat}/{n}", f"hello from {n}".encode()) for n in everyone)
        c.assert_silent(0.2)

    # The management API sees them in the instance.
    listed = {c["client_id"]: c for c in cloud.ferry.ctl("clients", "list", instance=INSTANCE)}
    for c in everyone.values():
        assert listed[c.client_id]["online"] is True
    assert cloud.ferry.ctl("subscribers", f"{chat}/x", instance=INSTANCE)["subscriber_count"] == 3
    online = cloud.ferry.ctl("groups", "online", GROUP, instance=INSTANCE)
    assert online["online_count"] >= 3


@VERSIONS
def test_p2p_reaches_exactly_its_target(cloud, clients, version):
    v = vtag(version)
    sender = signature_client(clients, cloud, version, f"{GROUP}@@@p2ps{v}").connect()
    target = signature_client(clients, cloud, version, f"{GROUP}@@@dev2{v}").connect()
    watcher = signature_client(clients, cloud, version, f"{GROUP}@@@p2pw{v}").connect()
    assert watcher.subscribe(f"{PARENT}/#", qos=1) == [1]

    topic = f"{PARENT}/p2p/{target.client_id}"
    assert sender.publish_rc(topic, b"just for you") == 0
    msg = target.expect_message(timeout=5)
    assert (msg.topic, msg.payload) == (topic, b"just for you")
    watcher.assert_silent()
    target.assert_silent(0.1)
    sender.assert_silent(0.1)


# -- refusals -----------------------------------------------------------------------------------


def test_wrong_signature_is_refused(cloud, clients):
    user = f"Signature|{cloud.key_id}|{INSTANCE}"
    cid = f"{GROUP}@@@bad3"
    assert raw_connack_v311(cloud.endpoint, cid, user, sign("not-the-secret", cid)) == 4
    assert raw_connack_v311(cloud.endpoint, cid, f"Signature|AK.unknown|{INSTANCE}",
                            sign(cloud.key_secret, cid)) == 4
    cid = f"{GROUP}@@@bad5"
    c = clients(cloud.endpoint, V5, cid, user, sign("not-the-secret", cid))
    assert c.try_connect() == 0x86
    # A signature made for another client id is wrong too.
    c = clients(cloud.endpoint, V5, cid, user, sign(cloud.key_secret, f"{GROUP}@@@other"))
    assert c.try_connect() == 0x86


def test_unknown_group_is_refused(cloud, clients):
    user = f"Signature|{cloud.key_id}|{INSTANCE}"
    cid = "GID_nope@@@dev"
    assert raw_connack_v311(cloud.endpoint, cid, user, sign(cloud.key_secret, cid)) == 2
    c = clients(cloud.endpoint, V5, cid, user, sign(cloud.key_secret, cid))
    assert c.try_connect() == 0x85


def test_device_credential_of_another_client_is_refused(cloud, clients):
    owner = f"{GROUP}@@@owner"
    cred = cloud.ferry.ctl("credentials", "register", owner, instance=INSTANCE)
    user = f"DeviceCredential|{cred['device_access_key_id']}|{INSTANCE}"
    thief = f"{GROUP}@@@thief"
    secret = cred["device_access_key_secret"]
    # Bad credentials (4) or not authorised (5): the contract names no code for this case.
    assert raw_connack_v311(cloud.endpoint, thief, user, sign(secret, thief)) in (4, 5)
    # A refreshed credential invalidates the old secret.
    cloud.ferry.ctl("credentials", "refresh", owner, instance=INSTANCE)
    assert raw_connack_v311(cloud.endpoint, owner, user, sign(secret, owner)) == 4


@VERSIONS
def test_subscribe_outside_the_token_resources(cloud, clients, version):
    v = vtag(version)
    tok = cloud.token("R", f"{PARENT}/allowed{v}/#")
    c = token_client(clients, cloud, version, f"{GROUP}@@@rsub{v}", f"R|{tok}").connect()
    assert c.subscribe(f"{PARENT}/other{v}/x", qos=1) == [0x80 if version == V311 else 0x87]
    assert c.subscribe(f"{PARENT}/allowed{v}/x", qos=1) == [1]
    assert c.connected


@VERSIONS
def test_publish_outside_the_write_token_resources(cloud, clients, version):
    v = vtag(version)
    tok = cloud.token("W", f"{PARENT}/w{v}/#")
    c = token_client(clients, cloud, version, f"{GROUP}@@@wpub{v}", f"W|{tok}").connect()
    assert c.publish_rc(f"{PARENT}/w{v}/ok", b"fine") == 0
    if version == V5:
        assert c.publish_rc(f"{PARENT}/elsewhere{v}/x", b"nope") == 0x87
        assert c.connected
        # An R-only subscription attempt with a W token is refused as well.
        assert c.subscribe(f"{PARENT}/w{v}/ok", qos=0) == [0x87]
    else:
        assert c.publish_rc(f"{PARENT}/elsewhere{v}/x", b"nope") is None
        c.wait_closed()


@VERSIONS
def test_revoked_token_gets_the_notice_and_is_disconnected(cloud, clients, version):
    v = vtag(version)
    tok = cloud.token("R", f"{PARENT}/rv{v}/#")
    c = token_client(clients, cloud, version, f"{GROUP}@@@rv{v}", f"R|{tok}").connect()
    assert c.subscribe(f"{PARENT}/rv{v}/#", qos=1) == [1]
    cloud.ferry.ctl("tokens", "revoke", tok, instance=INSTANCE)
    assert cloud.ferry.ctl("tokens", "show", tok, instance=INSTANCE)["revoked"] is True
    started = time.monotonic()
    notice = c.expect_message(timeout=3.5)
    assert notice.topic == "$SYS/tokenInvalidNotice"
    body = json.loads(notice.payload)
    assert body["code"] == 3, body
    c.wait_closed(timeout=max(0.5, 3.5 - (time.monotonic() - started)))
    assert time.monotonic() - started < 4.0
    # The revoked token cannot log in again.
    again = token_client(clients, cloud, version, f"{GROUP}@@@rv{v}", f"R|{tok}")
    assert again.try_connect() not in (None, 0)


@VERSIONS
def test_the_31st_subscription_fails(cloud, clients, version):
    v = vtag(version)
    c = signature_client(clients, cloud, version, f"{GROUP}@@@subs{v}").connect()
    for i in range(30):
        assert c.subscribe(f"{PARENT}/many{v}/{i}", qos=0) == [0], f"subscription {i + 1}"
    assert c.subscribe(f"{PARENT}/many{v}/30", qos=0) == [0x80 if version == V311 else 0x97]
    # Re-subscribing to an existing filter is not a new subscription.
    assert c.subscribe(f"{PARENT}/many{v}/0", qos=1) == [1]
    assert c.connected


@VERSIONS
def test_payload_over_64_kib_closes_the_connection(cloud, clients, version):
    v = vtag(version)
    c = signature_client(clients, cloud, version, f"{GROUP}@@@big{v}").connect()
    c.publish(f"{PARENT}/big{v}", b"x" * (64 * 1024), qos=1)  # exactly the limit is fine
    c._client.publish(f"{PARENT}/big{v}", b"x" * (65 * 1024), qos=0)
    reason = c.wait_closed()
    if version == V5:
        assert reason == 0x95


@VERSIONS
def test_topic_without_created_parent_is_refused(cloud, clients, version):
    v = vtag(version)
    c = signature_client(clients, cloud, version, f"{GROUP}@@@nopa{v}").connect()
    assert c.subscribe(f"noparent{v}/x", qos=1) == [0x80 if version == V311 else 0x87]
    if version == V5:
        assert c.publish_rc(f"noparent{v}/x", b"nope") == 0x87
        assert c.connected
    else:
        assert c.publish_rc(f"noparent{v}/x", b"nope") is None
        c.wait_closed()


@VERSIONS
def test_upload_token_extends_rights(cloud, clients, version):
    v = vtag(version)
    first = cloud.token("W", f"{PARENT}/up{v}a/#")
    c = token_client(clients, cloud, version, f"{GROUP}@@@up{v}", f"W|{first}").connect()
    watcher = signature_client(clients, cloud, version, f"{GROUP}@@@upw{v}").connect()
    assert watcher.subscribe(f"{PARENT}/up{v}b/#", qos=1) == [1]
    if version == V5:
        assert c.publish_rc(f"{PARENT}/up{v}b/x", b"not yet") == 0x87
    second = cloud.token("W", f"{PARENT}/up{v}b/#")
    upload = json.dumps({"token": second, "type": "W"})
    assert c.publish_rc("$SYS/uploadToken", upload) == 0
    assert c.publish_rc(f"{PARENT}/up{v}b/x", b"now allowed") == 0
    msg = watcher.expect_message()
    assert (msg.topic, msg.payload) == (f"{PARENT}/up{v}b/x", b"now allowed")
    assert c.connected


# -- isolation between instances ------------------------------------------------------------


def test_instances_share_nothing(ferry, clients):
    keys = {}
    for inst in ("iso-a", "iso-b"):
        ferry.ctl("instances", "create", inst, "--profile", "standard")
        key = ferry.ctl("keys", "create", instance=inst)
        keys[inst] = (key["access_key_id"], key["access_key_secret"])

    def client(inst, version, client_id, **kwargs):
        key_id, secret = keys[inst]
        return clients(ferry.endpoint, version, client_id, f"Signature|{key_id}|{inst}",
                       sign(secret, client_id), **kwargs)

    # The same client id in both instances: no takeover across them.
    a_sub = client("iso-a", V5, "same-sub").connect()
    b_sub = client("iso-b", V311, "same-sub").connect()
    assert a_sub.subscribe("iso/#", qos=1) == [1]
    assert b_sub.subscribe("iso/#", qos=1) == [1]
    a_pub = client("iso-a", V311, "pub-a").connect()
    b_pub = client("iso-b", V5, "pub-b").connect()
    time.sleep(0.2)
    assert a_sub.connected and b_sub.connected

    # Messages, retained ones included, stay in their instance.
    a_pub.publish("iso/t", b"from-a", qos=1, retain=True)
    assert a_sub.expect_message().payload == b"from-a"
    b_pub.publish("iso/t", b"from-b", qos=1, retain=True)
    assert b_sub.expect_message().payload == b"from-b"
    a_sub.assert_silent(0.3)
    b_sub.assert_silent(0.3)
    late_b = client("iso-b", V5, "late").connect()
    assert late_b.subscribe("iso/t", qos=1) == [1]
    got = late_b.expect_message()
    assert (got.payload, got.retain) == (b"from-b", True)
    late_b.assert_silent(0.3)
    # Nor does the default instance (anonymous plain login) see either.
    plain = clients(ferry.endpoint, V311, "same-sub").connect()
    assert plain.subscribe("iso/#", qos=1) == [1]
    plain.assert_silent(0.3)
    assert a_sub.connected and b_sub.connected

    # A persistent session in iso-a does not exist in iso-b.
    p = client("iso-a", V311, "persist", clean=False).connect()
    assert p.subscribe("iso/p", qos=1) == [1]
    p.disconnect()
    a_pub.publish("iso/p", b"while away", qos=1)
    pb = client("iso-b", V311, "persist", clean=False).connect()
    assert pb.connack.session_present is False
    pb.assert_silent(0.3)
    pb.disconnect()
    pa = client("iso-a", V311, "persist", clean=False).connect()
    assert pa.connack.session_present is True
    assert pa.expect_message().payload == b"while away"

    # Query results are per instance.
    in_a = {c["client_id"] for c in ferry.ctl("clients", "list", instance="iso-a")}
    in_b = {c["client_id"] for c in ferry.ctl("clients", "list", instance="iso-b")}
    assert {"same-sub", "pub-a", "persist"} <= in_a
    assert {"same-sub", "pub-b", "late", "persist"} <= in_b
    assert "pub-b" not in in_a and "late" not in in_a
    assert "pub-a" not in in_b
    shown = ferry.ctl_run("--json", "clients", "show", "pub-a", instance="iso-b")
    assert shown.returncode == 1 and "ClientNotFound" in shown.stderr, shown.stderr
    assert ferry.ctl("clients", "show", "same-sub", instance="iso-a")["protocol_level"] == 5
    assert ferry.ctl("clients", "show", "same-sub", instance="iso-b")["protocol_level"] == 4

    only_a = f"only-a/{uuid.uuid4().hex[:8]}"
    assert a_sub.subscribe(only_a, qos=0) == [0]
    assert ferry.ctl("subscribers", only_a, instance="iso-a")["subscriber_count"] == 1
    assert ferry.ctl("subscribers", only_a, instance="iso-b")["subscriber_count"] == 0
    assert ferry.ctl("subscribers", only_a)["subscriber_count"] == 0


# -- /metrics -------------------------------------------------------------------------------


def scrape(ferry: Ferry, auth: bool = True) -> tuple[int, str, str]:
    """GET /metrics as Prometheus does (HTTP Basic with the data directory's admin key):
    status, content type, body."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(ferry.api.rstrip("/") + "/metrics")
    if auth:
        key = json.loads((ferry.data_dir / "admin-key.json").read_text())
        token = base64.b64encode(
            f"{key['access_key_id']}:{key['access_key_secret']}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample, parsed by the Prometheus project's own Python parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP"
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_as_prometheus_text_and_count_a_real_exchange(cloud, clients):
    ferry = cloud.ferry
    status, _, body = scrape(ferry, auth=False)
    assert status == 401 and json.loads(body)["code"] == "Unauthorized"

    def now():
        status, ctype, text = scrape(ferry)
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, ctype)
        return samples(text)

    received = ("ferry_messages_received_total", ())
    sent = ("ferry_messages_sent_total", ())
    before = now()
    assert before[("ferry_build_info", (("version", "0.1.0"),))] == 1
    assert ("ferry_messages_dropped_total", (("reason", "qos0_outbox_full"),)) in before

    sub = signature_client(clients, cloud, V5, f"{GROUP}@@@metrics-sub").connect()
    assert sub.subscribe(f"{PARENT}/metrics/#", qos=1) == [1]
    pub = signature_client(clients, cloud, V311, f"{GROUP}@@@metrics-pub").connect()
    for i in range(5):
        pub.publish(f"{PARENT}/metrics/{i}", b"m", qos=1)
    assert len(sub.expect_messages(5)) == 5

    deadline = time.monotonic() + WAIT
    while True:  # the router publishes its counters after each batch
        after = now()
        if after[sent] - before[sent] == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert after[received] - before[received] == 5
    assert after[sent] - before[sent] == 5
    assert after[("ferry_connections", ())] >= 2

    # The CLI shows the same counters, as text and as JSON.
    text = ferry.ctl_run("metrics")
    assert text.returncode == 0, text.stderr
    assert samples(text.stdout)[received] == after[received]
    as_json = ferry.ctl("metrics")
    assert as_json["ferry_messages_received_total"] == after[received]
    assert as_json['ferry_messages_dropped_total{reason="queue_full"}'] == 0
