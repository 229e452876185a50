"""Retained messages with paho-mqtt.

A retained message reaches later subscribers with the RETAIN flag set, a newer
one replaces it, a zero-length retained publish clears it, and established
subscriptions see the flag cleared (unless v5 Retain As Published is used).
The v5 Retain Handling subscription option is checked as well.
"""

from interop_support import V5, unique_topic


def test_new_subscriber_gets_latest_retained(paho, version):
    topic = unique_topic("retained")
    publisher = paho(version).connect()
    publisher.publish(topic, b"first", qos=1, retain=True)
    publisher.publish(topic, b"second", qos=1, retain=True)

    subscriber = paho(version).connect()
    assert subscriber.subscribe(topic, 2) == [2]
    message = subscriber.expect_message()
    assert (message.topic, message.payload, message.retain) == (topic, b"second", True)
    assert message.qos == 1
    subscriber.assert_silent()  # only the latest retained message is kept


def test_wildcard_subscription_gets_retained(paho, version):
    prefix = unique_topic("retwild")
    publisher = paho(version).connect()
    expected = {f"{prefix}/a": b"A", f"{prefix}/b/c": b"BC"}
    for topic, payload in expected.items():
        publisher.publish(topic, payload, qos=1, retain=True)

    subscriber = paho(version).connect()
    assert subscriber.subscribe(f"{prefix}/#", 1) == [1]
    received = subscriber.expect_messages(2)
    assert {m.topic: m.payload for m in received} == expected
    assert all(m.retain for m in received)


def test_empty_payload_clears_retained(paho, version):
    topic = unique_topic("clear")
    publisher = paho(version).connect()
    publisher.publish(topic, b"to be cleared", qos=1, retain=True)

    first = paho(version).connect()
    assert first.subscribe(topic, 1) == [1]
    message = first.expect_message()
    assert (message.payload, message.retain) == (b"to be cleared", True)

    publisher.publish(topic, b"", qos=1, retain=True)
    # The clearing publish is still forwarded to existing subscribers, as a normal message.
    cleared = first.expect_message()
    assert (cleared.payload, cleared.retain) == (b"", False)

    late = paho(version).connect()
    assert late.subscribe(topic, 1) == [1]
    late.assert_silent()


def test_live_subscriber_sees_retain_flag_cleared(paho, version):
    topic = unique_topic("live")
    subscriber = paho(version).connect()
    assert subscriber.subscribe(topic, 1) == [1]
    paho(version).connect().publish(topic, b"live", qos=1, retain=True)
    message = subscriber.expect_message()
    assert (message.payload, message.retain) == (b"live", False)


def test_v5_retain_as_published(paho):
    topic = unique_topic("rap")
    subscriber = paho(V5).connect()
    assert subscriber.subscribe(topic, 1, retain_as_published=True) == [1]
    publisher = paho(V5).connect()
    publisher.publish(topic, b"kept-flag", qos=1, retain=True)
    publisher.publish(topic, b"plain", qos=1, retain=False)
    received = subscriber.expect_messages(2)
    assert [(m.payload, m.retain) for m in received] == [(b"kept-flag", True), (b"plain", False)]


def test_v5_retain_handling(paho):
    topic = unique_topic("rh")
    paho(V5).connect().publish(topic, b"stored", qos=1, retain=True)

    never = paho(V5).connect()
    assert never.subscribe(topic, 1, retain_handling=2) == [1]
    never.assert_silent()

    if_new = paho(V5).connect()
    assert if_new.subscribe(topic, 1, retain_handling=1) == [1]
    assert if_new.expect_message().payload == b"stored"
    assert if_new.subscribe(topic, 1, retain_handling=1) == [1]  # subscription exists now
    if_new.assert_silent()

    always = paho(V5).connect()
    assert always.subscribe(topic, 1, retain_handling=0) == [1]
    assert always.expect_message().payload == b"stored"
    assert always.subscribe(topic, 1, retain_handling=0) == [1]
    message = always.expect_message()
    assert (message.payload, message.retain) == (b"stored", True)
