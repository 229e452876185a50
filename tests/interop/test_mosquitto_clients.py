"""Interop with the Eclipse ``mosquitto_pub`` / ``mosquitto_sub`` command-line clients.

Each ``mosquitto_sub`` runs with ``-d`` (its SUBACK line tells us when it is
subscribed), ``-C`` (exit after N messages) and ``-W`` (hard timeout), and
prints messages in a tab-separated ``-F`` format with hex payloads. Covered:
QoS 0/1/2 round trips, retained messages, wills on SIGKILL, persistent
sessions, MQTT v5 properties, and traffic between paho and the CLI tools.
"""

import os

import pytest

from interop_support import (
    V5,
    mosquitto_pub,
    publish_properties,
    unique_id,
    unique_topic,
)

TIMED_OUT = 27  # mosquitto_sub exit code when -W expires (MOSQ_ERR_TIMEOUT)


@pytest.mark.parametrize("qos", (0, 1, 2), ids=lambda q: f"qos{q}")
def test_cli_publish_receive(broker, mosquitto_sub, version, qos):
    topic = unique_topic("cli")
    payloads = [b"hello from mosquitto_pub", os.urandom(4096), b""]
    sub = mosquitto_sub(version, topic, qos=qos, count=len(payloads))
    assert sub.wait_subscribed() == [qos]

    for payload in payloads:
        mosquitto_pub(broker, version, topic, payload or None, qos=qos)

    assert sub.finish() == 0, sub.describe()
    assert [m.payload for m in sub.messages] == payloads
    assert [(m.topic, m.qos, m.retain) for m in sub.messages] == [(topic, qos, False)] * 3


def test_cli_qos_downgrade(broker, mosquitto_sub, version):
    topic = unique_topic("down")
    sub = mosquitto_sub(version, topic, qos=1, count=1)
    assert sub.wait_subscribed() == [1]
    mosquitto_pub(broker, version, topic, b"sent at qos 2", qos=2)
    assert sub.finish() == 0, sub.describe()
    assert [(m.payload, m.qos) for m in sub.messages] == [(b"sent at qos 2", 1)]


def test_cli_retained(broker, mosquitto_sub, version):
    topic = unique_topic("cliret")
    mosquitto_pub(broker, version, topic, b"retained via cli", qos=1, retain=True)

    later = mosquitto_sub(version, topic, qos=1, count=1)
    assert later.finish() == 0, later.describe()
    assert [(m.payload, m.retain, m.qos) for m in later.messages] == [
        (b"retained via cli", True, 1)]

    mosquitto_pub(broker, version, topic, None, qos=1, retain=True)  # -r -n clears it
    after_clear = mosquitto_sub(version, topic, qos=1, count=1, timeout=1)
    assert after_clear.finish() == TIMED_OUT, after_clear.describe()
    assert after_clear.messages == []


def test_cli_will_on_sigkill(broker, mosquitto_sub, version):
    will_topic = unique_topic("cliwill")
    observer = mosquitto_sub(version, will_topic, qos=2, count=1)
    assert observer.wait_subscribed() == [2]

    doomed = mosquitto_sub(version, unique_topic("idle"), extra_args=[
        "--will-topic", will_topic, "--will-payload", "killed -9", "--will-qos", "1"])
    doomed.wait_subscribed()
    doomed.kill()  # SIGKILL: the kernel closes the socket, no DISCONNECT is sent

    assert observer.finish() == 0, observer.describe()
    assert [(m.topic, m.payload, m.qos) for m in observer.messages] == [
        (will_topic, b"killed -9", 1)]


def test_cli_no_will_on_normal_exit(broker, mosquitto_sub, version):
    will_topic = unique_topic("clinowill")
    observer = mosquitto_sub(version, will_topic, qos=1, count=1, timeout=2)
    assert observer.wait_subscribed() == [1]

    # -E: exit (with DISCONNECT) as soon as the subscription is acknowledged.
    polite = mosquitto_sub(version, unique_topic("idle"), extra_args=[
        "-E", "--will-topic", will_topic, "--will-payload", "unexpected"])
    assert polite.finish() == 0, polite.describe()

    assert observer.finish() == TIMED_OUT, observer.describe()
    assert observer.messages == []


def test_cli_persistent_session(broker, mosquitto_sub, version):
    topic = unique_topic("clisess")
    client_id = unique_id("clis")
    session_args = ["-c"] + (["-x", "300"] if version == V5 else [])

    parked = mosquitto_sub(version, topic, qos=1, client_id=client_id,
                           extra_args=session_args + ["-E"])
    assert parked.finish() == 0, parked.describe()

    payloads = [f"offline-{i}".encode() for i in range(5)]
    for payload in payloads:
        mosquitto_pub(broker, version, topic, payload, qos=1)

    resumed = mosquitto_sub(version, topic, qos=1, count=len(payloads), client_id=client_id,
                            extra_args=session_args)
    assert resumed.finish() == 0, resumed.describe()
    assert [m.payload for m in resumed.messages] == payloads
    assert all(m.qos == 1 for m in resumed.messages)


def test_cli_v5_properties(broker, mosquitto_sub, paho):
    topic = unique_topic("cliprops")
    sub = mosquitto_sub(V5, topic, qos=1, count=1)
    assert sub.wait_subscribed() == [1]
    paho_sub = paho(V5).connect()
    assert paho_sub.subscribe(topic, 1) == [1]

    mosquitto_pub(broker, V5, topic, b'{"t":21.5}', qos=1, extra_args=[
        "-D", "publish", "content-type", "application/json",
        "-D", "publish", "response-topic", f"{topic}/reply",
        "-D", "publish", "correlation-data", "req-42",
        "-D", "publish", "user-property", "unit", "celsius",
        "-D", "publish", "user-property", "unit", "kelvin",
    ])

    assert sub.finish() == 0, sub.describe()
    [cli_msg] = sub.messages
    assert cli_msg.payload == b'{"t":21.5}'
    assert cli_msg.content_type == "application/json"
    assert cli_msg.response_topic == f"{topic}/reply"
    assert cli_msg.correlation_data == "req-42"
    assert cli_msg.user_properties == "unit:celsius unit:kelvin"

    paho_msg = paho_sub.expect_message()
    assert paho_msg.payload == b'{"t":21.5}'
    assert paho_msg.properties.ContentType == "application/json"
    assert paho_msg.properties.ResponseTopic == f"{topic}/reply"
    assert paho_msg.properties.CorrelationData == b"req-42"
    # Repeated keys must be kept, in order.
    assert paho_msg.user_properties() == [("unit", "celsius"), ("unit", "kelvin")]


def test_paho_to_cli(broker, mosquitto_sub, paho, version):
    topic = unique_topic("p2c")
    sub = mosquitto_sub(version, topic, qos=2, count=2)
    assert sub.wait_subscribed() == [2]
    publisher = paho(version).connect()
    payloads = [bytes(range(255, -1, -1)), b"second"]
    for payload in payloads:
        publisher.publish(topic, payload, qos=2)
    assert sub.finish() == 0, sub.describe()
    assert [(m.payload, m.qos) for m in sub.messages] == [(p, 2) for p in payloads]


def test_cli_to_paho(broker, paho, version):
    topic = unique_topic("c2p")
    subscriber = paho(version).connect()
    assert subscriber.subscribe(topic, 2) == [2]
    payload = os.urandom(2048)
    mosquitto_pub(broker, version, topic, payload, qos=2)
    message = subscriber.expect_message()
    assert (message.payload, message.qos, message.retain) == (payload, 2, False)


def test_paho_v5_properties_to_cli(broker, mosquitto_sub, paho):
    topic = unique_topic("p2cprops")
    sub = mosquitto_sub(V5, topic, qos=1, count=1)
    assert sub.wait_subscribed() == [1]
    props = publish_properties(ContentType="text/plain", ResponseTopic=f"{topic}/r",
                               CorrelationData=b"abc", UserProperty=[("k", "v")])
    paho(V5).connect().publish(topic, b"with props", qos=1, properties=props)
    assert sub.finish() == 0, sub.describe()
    [message] = sub.messages
    assert (message.payload, message.content_type, message.response_topic,
            message.correlation_data, message.user_properties) == (
        b"with props", "text/plain", f"{topic}/r", "abc", "k:v")
