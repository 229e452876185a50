"""Will messages with paho-mqtt.

The will is published when the connection drops without DISCONNECT, not after
a normal DISCONNECT, and (v5) after a DISCONNECT with reason code 0x04
"Disconnect with Will Message". Retained wills and v5 will properties too.
"""

from paho.mqtt.packettypes import PacketTypes

from interop_support import V5, publish_properties, unique_topic

DISCONNECT_WITH_WILL = 0x04


def _observer(paho, version, topic, qos=2):
    observer = paho(version).connect()
    assert observer.subscribe(topic, qos) == [qos]
    return observer


def test_will_published_on_abrupt_close(paho, version):
    topic = unique_topic("will")
    observer = _observer(paho, version, topic)
    doomed = paho(version).will_set(topic, b"gone away", qos=1).connect()

    doomed.drop()
    message = observer.expect_message()
    assert (message.topic, message.payload, message.qos, message.retain) == (
        topic, b"gone away", 1, False)
    observer.assert_silent(0.3)


def test_no_will_on_clean_disconnect(paho, version):
    topic = unique_topic("nowill")
    observer = _observer(paho, version, topic)
    polite = paho(version).will_set(topic, b"should not appear", qos=1).connect()

    polite.disconnect()
    observer.assert_silent(1.0)


def test_retained_will(paho, version):
    topic = unique_topic("rwill")
    doomed = paho(version).will_set(topic, b"last words", qos=1, retain=True).connect()
    doomed.drop()

    # A subscriber arriving after the fact gets the will as a retained message.
    late = paho(version).connect()
    assert late.subscribe(topic, 1) == [1]
    message = late.expect_message()
    assert (message.payload, message.qos, message.retain) == (b"last words", 1, True)


def test_v5_disconnect_with_will_message(paho):
    topic = unique_topic("will04")
    observer = _observer(paho, V5, topic)
    client = paho(V5).will_set(topic, b"asked for it", qos=2).connect()

    client.disconnect(reason_code=DISCONNECT_WITH_WILL)
    message = observer.expect_message()
    assert (message.payload, message.qos) == (b"asked for it", 2)


def test_v5_will_properties_forwarded(paho):
    topic = unique_topic("willprops")
    observer = _observer(paho, V5, topic, qos=1)
    will_props = publish_properties(PacketTypes.WILLMESSAGE, ContentType="application/json",
                                    UserProperty=[("origin", "interop"), ("n", "1")])
    doomed = paho(V5).will_set(topic, b'{"state":"offline"}', qos=1,
                               properties=will_props).connect()

    doomed.drop()
    message = observer.expect_message()
    assert message.payload == b'{"state":"offline"}'
    assert message.properties.ContentType == "application/json"
    assert message.user_properties() == [("origin", "interop"), ("n", "1")]
