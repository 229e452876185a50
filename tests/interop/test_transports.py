"""MQTT over TLS, WebSocket and WebSocket over TLS with third-party clients: paho-mqtt (3.1.1
and 5, its TCP and websockets transports) and Debian's mosquitto_pub / mosquitto_sub, against
``ferry serve --tls-listen --ws-listen --wss-listen``.

Two servers per module run: one with a certificate made here by ``openssl`` (clients verify
it against that CA file), one with no certificate configured (Ferry makes a self-signed one:
a verifying client must refuse it, a client told not to verify gets through). Every wait is
bounded.
"""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from paho.mqtt.client import WebsocketConnectionError

from interop_support import (V5, V311, WAIT, MosquittoSub, PahoClient, mosquitto_pub,
                             unique_topic)
from test_cloud import Ferry

VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=["v3.1.1", "v5"])


class TlsFerry(Ferry):
    """``ferry serve`` with TCP, TLS, WebSocket and WSS listeners on 127.0.0.1 port 0, with
    ``cert`` and ``key`` (else its self-signed certificate); stopped by PID."""

    def __init__(self, workdir: Path, cert: Path | None, key: Path | None) -> None:
        extra = ["--tls-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0",
                 "--wss-listen", "127.0.0.1:0"]
        if cert is not None:
            conf = workdir / "ferry.toml"
            conf.write_text(f'[mqtt]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
            extra += ["--config", str(conf)]
        super().__init__(workdir, tuple(extra), want=("mqtt-tls", "mqtt-ws", "mqtt-wss"))
        self.tcp, self.tls = self.endpoint, self.mqtt_endpoint("mqtt-tls")
        self.ws, self.wss = self.mqtt_endpoint("mqtt-ws"), self.mqtt_endpoint("mqtt-wss")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (it is its own CA), and its key."""
    d = tmp_path_factory.mktemp("pki")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=WAIT)
    return cert, key


@pytest.fixture(scope="module")
def ferry(tmp_path_factory, certs):
    server = TlsFerry(tmp_path_factory.mktemp("tls"), *certs)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    server = TlsFerry(tmp_path_factory.mktemp("tls-self"), None, None)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clients():
    made: list[PahoClient] = []

    def make(endpoint, version, **kwargs) -> PahoClient:
        c = PahoClient(endpoint, version, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@VERSIONS
def test_paho_over_tls_exchanges_messages_with_tcp_clients(ferry, certs, clients, version):
    tls = {"ca_certs": str(certs[0])}
    topic = unique_topic("tls")
    secure = clients(ferry.tls, version, tls=tls).connect()
    plain = clients(ferry.tcp, version).connect()
    assert secure.subscribe(f"{topic}/#", qos=1) == [1]
    assert plain.subscribe(f"{topic}/#", qos=1) == [1]
    big = bytes(range(256)) * 400  # 100 KiB: several TLS records
    secure.publish(f"{topic}/from-tls", big, qos=1)
    plain.publish(f"{topic}/from-tcp", b"hello over tcp", qos=1)
    for c in (secure, plain):
        got = {m.topic: m.payload for m in c.expect_messages(2)}
        assert got == {f"{topic}/from-tls": big, f"{topic}/from-tcp": b"hello over tcp"}


def test_mosquitto_clients_over_tls(ferry, certs):
    topic = unique_topic("mosq")
    tls_args = ["--cafile", str(certs[0])]
    sub = MosquittoSub.start(ferry.tls, V311, [topic], qos=1, count=1, extra_args=tls_args)
    try:
        assert sub.wait_subscribed() == [1]
        mosquitto_pub(ferry.tls, V5, topic, b"over tls", qos=1, extra_args=tls_args)
        assert sub.finish() == 0, sub.describe()
    finally:
        sub.kill()
    assert [(m.topic, m.payload) for m in sub.messages] == [(topic, b"over tls")]


def test_a_client_that_does_not_trust_the_certificate_is_refused_by_its_own_check(
        self_signed, clients):
    c = clients(self_signed.tls, V5, tls={})  # the system's CAs only
    with pytest.raises(ssl.SSLCertVerificationError):
        c.connect()


def test_the_self_signed_certificate_serves_a_client_that_skips_verification(
        self_signed, clients):
    c = clients(self_signed.tls, V5, tls={"cert_reqs": ssl.CERT_NONE, "insecure": True})
    c.connect()
    topic = unique_topic("self")
    assert c.subscribe(topic, qos=1) == [1]
    c.publish(topic, b"unverified but encrypted", qos=1)
    assert c.expect_message().payload == b"unverified but encrypted"


@VERSIONS
def test_paho_over_websocket_and_wss_exchange_messages_with_tcp_clients(ferry, certs, clients,
                                                                        version):
    topic = unique_topic("ws")
    ws = clients(ferry.ws, version, websocket_path="/mqtt").connect()
    wss = clients(ferry.wss, version, websocket_path="/mqtt",
                  tls={"ca_certs": str(certs[0])}).connect()
    plain = clients(ferry.tcp, version).connect()
    for c in (ws, wss, plain):
        assert c.subscribe(f"{topic}/#", qos=1) == [1]
    big = bytes(range(256)) * 300  # 75 KiB: longer than a 16-bit WebSocket frame length
    ws.publish(f"{topic}/ws", big, qos=1)
    wss.publish(f"{topic}/wss", b"over wss", qos=1)
    plain.publish(f"{topic}/tcp", b"over tcp", qos=1)
    want = {f"{topic}/ws": big, f"{topic}/wss": b"over wss", f"{topic}/tcp": b"over tcp"}
    for c in (ws, wss, plain):
        assert {m.topic: m.payload for m in c.expect_messages(3)} == want


def test_a_websocket_client_on_another_path_is_refused(ferry, clients):
    c = clients(ferry.ws, V5, websocket_path="/elsewhere")
    with pytest.raises(WebsocketConnectionError, match="not upgraded"):
        c.connect()
