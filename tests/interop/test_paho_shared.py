"""Shared subscriptions (``$share/<group>/<filter>``) with paho-mqtt.

Within one group every message goes to exactly one member and the load is
spread over the members; separate groups and ordinary subscribers each get a
full copy. Shared subscriptions are an MQTT 5 feature, but brokers commonly
accept them from 3.1.1 clients too, so both versions are exercised.
"""

from interop_support import collect_across, unique_topic

MESSAGES = 20


def _payloads(count):
    return [f"msg-{i:03d}".encode() for i in range(count)]


def test_shared_group_splits_messages(paho, version):
    topic = unique_topic("shared")
    members = [paho(version).connect() for _ in range(2)]
    for member in members:
        assert member.subscribe(f"$share/grp/{topic}", 1) == [1]
    plain = paho(version).connect()
    assert plain.subscribe(topic, 1) == [1]

    publisher = paho(version).connect()
    payloads = _payloads(MESSAGES)
    for payload in payloads:
        publisher.publish(topic, payload, qos=1)

    per_member = collect_across(members, MESSAGES)
    for member in members:
        member.assert_silent(0.3)  # nothing beyond the MESSAGES already counted
    got = [[m.payload for m in bucket] for bucket in per_member]
    assert sorted(got[0] + got[1]) == payloads, "each message must reach exactly one member"
    assert got[0] and got[1], f"one member got everything: {[len(g) for g in got]}"
    for bucket in got:  # each member still sees its share in publish order
        assert bucket == sorted(bucket)
    assert all(m.topic == topic and m.qos == 1 for bucket in per_member for m in bucket)

    assert [m.payload for m in plain.expect_messages(MESSAGES)] == payloads
    plain.assert_silent(0.0)


def test_each_share_group_gets_a_copy(paho, version):
    topic = unique_topic("groups")
    group_a = [paho(version).connect() for _ in range(2)]
    group_b = [paho(version).connect()]
    for member in group_a:
        assert member.subscribe(f"$share/a/{topic}", 1) == [1]
    assert group_b[0].subscribe(f"$share/b/{topic}", 1) == [1]

    publisher = paho(version).connect()
    payloads = _payloads(6)
    for payload in payloads:
        publisher.publish(topic, payload, qos=1)

    received_a = collect_across(group_a, len(payloads))
    assert sorted(m.payload for bucket in received_a for m in bucket) == payloads
    assert [m.payload for m in group_b[0].expect_messages(len(payloads))] == payloads
    for client in group_a + group_b:
        client.assert_silent(0.2)
