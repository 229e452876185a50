"""Persistent sessions with paho-mqtt.

A client with a persistent session (3.1.1 clean_session=0; 5.0 clean_start=0
with Session Expiry Interval > 0) subscribes, goes away, and on reconnecting
with the same client id gets session-present=1 and every QoS 1 message that
was published meanwhile, in order. A clean start discards that state, and a
v5 session with expiry 0 does not outlive its connection.
"""

from interop_support import V5, unique_id, unique_topic

QUEUED = 10
SESSION_EXPIRY = 300


def _persistent(paho, version, client_id):
    if version == V5:
        return paho(version, client_id, clean=False, session_expiry=SESSION_EXPIRY)
    return paho(version, client_id, clean=False)


def _park_session(paho, version, topic):
    """Create a session subscribed to ``topic`` at QoS 1 and disconnect cleanly."""
    client_id = unique_id("sess")
    first = _persistent(paho, version, client_id).connect()
    assert first.connack.session_present is False, "session present for a brand-new client id"
    assert first.subscribe(topic, 1) == [1]
    first.disconnect()
    return client_id


def _publish_while_offline(paho, version, topic, count):
    payloads = [f"queued-{i:02d}".encode() for i in range(count)]
    publisher = paho(version).connect()
    for payload in payloads:
        publisher.publish(topic, payload, qos=1)
    publisher.disconnect()
    return payloads


def test_session_resumption_delivers_queued_messages(paho, version):
    topic = unique_topic("resume")
    client_id = _park_session(paho, version, topic)
    payloads = _publish_while_offline(paho, version, topic, QUEUED)

    resumed = _persistent(paho, version, client_id).connect()
    assert resumed.connack.session_present is True, "CONNACK session-present flag not set"
    received = resumed.expect_messages(QUEUED)
    assert [m.payload for m in received] == payloads
    assert all(m.topic == topic and m.qos == 1 for m in received)
    resumed.assert_silent(0.3)

    # The subscription itself survived too: live traffic still flows.
    paho(version).connect().publish(topic, b"live", qos=1)
    assert resumed.expect_message().payload == b"live"


def test_clean_start_discards_session(paho, version):
    topic = unique_topic("discard")
    client_id = _park_session(paho, version, topic)
    _publish_while_offline(paho, version, topic, 3)

    fresh = paho(version, client_id, clean=True).connect()
    assert fresh.connack.session_present is False, "clean start must not resume the session"
    fresh.assert_silent()

    # The old subscription is gone as well.
    paho(version).connect().publish(topic, b"after clean start", qos=1)
    fresh.assert_silent(0.3)


def test_v5_zero_session_expiry_ends_with_connection(paho):
    topic = unique_topic("expiry0")
    client_id = unique_id("exp0")
    short = paho(V5, client_id, clean=False, session_expiry=0).connect()
    assert short.subscribe(topic, 1) == [1]
    short.disconnect()
    _publish_while_offline(paho, V5, topic, 2)

    again = paho(V5, client_id, clean=False, session_expiry=SESSION_EXPIRY).connect()
    assert again.connack.session_present is False, "session with expiry 0 outlived its connection"
    again.assert_silent()
