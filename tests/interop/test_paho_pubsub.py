"""paho-mqtt publish/subscribe round trips through the broker.

Covers the full publish-QoS x subscribe-QoS matrix (granted QoS in SUBACK,
delivered QoS = min of the two, payloads byte-for-byte, per-publisher order),
a payload larger than a typical socket read, and topic wildcard matching.
"""

import os

import pytest

from interop_support import unique_topic

QOS_LEVELS = (0, 1, 2)


@pytest.mark.parametrize("sub_qos", QOS_LEVELS, ids=lambda q: f"sub{q}")
@pytest.mark.parametrize("pub_qos", QOS_LEVELS, ids=lambda q: f"pub{q}")
def test_publish_receive_qos_matrix(paho, version, pub_qos, sub_qos):
    topic = unique_topic("qos")
    subscriber = paho(version).connect()
    assert subscriber.subscribe(topic, sub_qos) == [sub_qos]
    publisher = paho(version).connect()

    payloads = [
        bytes(range(256)),                       # every byte value
        b"",                                     # zero-length payload
        f"pub={pub_qos} sub={sub_qos} \u00e9\u6f22".encode(),  # UTF-8 text
    ]
    for payload in payloads:
        publisher.publish(topic, payload, qos=pub_qos)

    received = subscriber.expect_messages(len(payloads))
    assert [m.payload for m in received] == payloads
    assert [m.topic for m in received] == [topic] * len(payloads)
    assert [m.qos for m in received] == [min(pub_qos, sub_qos)] * len(payloads)
    assert not any(m.retain for m in received)
    subscriber.assert_silent(0.2)  # no duplicates


def test_large_payload(paho, version):
    topic = unique_topic("large")
    subscriber = paho(version).connect()
    assert subscriber.subscribe(topic, 1) == [1]
    payload = os.urandom(100_000)
    paho(version).connect().publish(topic, payload, qos=1)
    message = subscriber.expect_message()
    assert len(message.payload) == len(payload)
    assert message.payload == payload
    assert message.qos == 1


def test_wildcard_subscriptions(paho, version):
    prefix = unique_topic("wild")
    single = paho(version).connect()
    multi = paho(version).connect()
    assert single.subscribe(f"{prefix}/+/temp", 1) == [1]
    assert multi.subscribe(f"{prefix}/sensors/#", 1) == [1]

    publisher = paho(version).connect()
    topics = [
        f"{prefix}/kitchen/temp",          # single only
        f"{prefix}/sensors/temp",          # both
        f"{prefix}/sensors",               # multi only ('#' matches the parent level)
        f"{prefix}/sensors/a/b/c",         # multi only
        f"{prefix}/kitchen/temp/extra",    # neither
        f"{prefix}/kitchen/humidity",      # neither
    ]
    for index, topic in enumerate(topics):
        publisher.publish(topic, f"m{index}".encode(), qos=1)

    assert [(m.topic, m.payload) for m in single.expect_messages(2)] == [
        (topics[0], b"m0"), (topics[1], b"m1")]
    assert [(m.topic, m.payload) for m in multi.expect_messages(3)] == [
        (topics[1], b"m1"), (topics[2], b"m2"), (topics[3], b"m3")]
    single.assert_silent(0.3)
    multi.assert_silent(0.0)


def test_unsubscribe_stops_delivery(paho, version):
    topic = unique_topic("unsub")
    subscriber = paho(version).connect()
    assert subscriber.subscribe(topic, 1) == [1]
    publisher = paho(version).connect()
    publisher.publish(topic, b"before", qos=1)
    assert subscriber.expect_message().payload == b"before"

    subscriber.unsubscribe(topic)
    publisher.publish(topic, b"after", qos=1)
    subscriber.assert_silent()
