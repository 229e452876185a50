"""The product's own walk-throughs of the rules (§5, §6.2), against the real ``ferry`` binary,
with the official RocketMQ 5 Python SDK on the queue side and paho-mqtt on the MQTT side:
inflow (queue → MQTT, P2P included), outflow (MQTT → queue, simple and push consumers), status
events (connect / disconnect / tcpclean with channel ids, across a client-id takeover), no loss
across a restart in the middle of each flow, and a rule whose queue side is an external
RocketMQ (a second Ferry process). Every wait is bounded."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
from rocketmq import (ClientConfiguration, ConsumeResult, Credentials, FilterExpression, Message,
                      MessageListener, Producer, PushConsumer, SimpleConsumer)

from conftest import WAIT, Ferry, unique

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))
from interop_support import V5, V311, PahoClient, publish_properties  # noqa: E402

Endpoint = namedtuple("Endpoint", "host port")


def mqtt_endpoint(server: Ferry) -> Endpoint:
    host, port = server.addresses["mqtt"].rsplit(":", 1)
    return Endpoint(host, int(port))


def config(endpoint: str) -> ClientConfiguration:
    return ClientConfiguration(endpoint, Credentials("", ""), request_timeout=5)


class Clients:
    """SDK and MQTT clients of one test, all closed at its end."""

    def __init__(self, server: Ferry) -> None:
        self.server = server
        self.started = []
        self.mqtt = []

    def producer(self, *topics) -> Producer:
        p = Producer(config(self.server.queue_endpoint), topics)
        p.startup()
        self.started.append(p)
        return p

    def simple(self, topic, expr="*", group=None, new=True) -> SimpleConsumer:
        c = SimpleConsumer(config(self.server.queue_endpoint), group or unique("g"),
                           {topic: FilterExpression(expr)}, await_duration=1)
        c.startup()
        self.started.append(c)
        if new:
            # A new group starts at the end of the topic: make it exist before anything is
            # sent.
            assert c.receive(32, 10) == []
        return c

    def push(self, topic, listener, expr="*") -> PushConsumer:
        c = PushConsumer(config(self.server.queue_endpoint), unique("g"), listener,
                         {topic: FilterExpression(expr)}, consumption_thread_count=2)
        c.startup()
        self.started.append(c)
        return c

    def paho(self, version=V311, client_id=None, **kw) -> PahoClient:
        c = PahoClient(mqtt_endpoint(self.server), version, client_id, **kw)
        self.mqtt.append(c)
        return c

    def close(self) -> None:
        for c in self.mqtt:
            c.close()
        for c in reversed(self.started):
            try:
                c.shutdown()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass


@pytest.fixture
def clients(ferry):
    c = Clients(ferry)
    yield c
    c.close()


def rule(server: Ferry, name, kind, source, target, *extra):
    server.ctl("rules", "create", name, "--type", kind, "--source", source, "--target", target,
               *extra)


def queue_message(topic, body: bytes, tag="MQ2MQTT", **props) -> Message:
    m = Message()
    m.topic = topic
    m.body = body
    m.tag = tag
    for k, v in props.items():
        m.add_property(k, v)
    return m


def receive_until(consumer: SimpleConsumer, count: int, timeout=WAIT):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += consumer.receive(32, 10)
    return got


class Collect(MessageListener):
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen = []

    def consume(self, message):
        with self.cond:
            self.seen.append(message)
            self.cond.notify_all()
        return ConsumeResult.SUCCESS

    def wait_for(self, pred, timeout=WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: pred(self.seen), timeout)


# -- inflow -------------------------------------------------------------------------------


def test_inflow_delivers_queue_messages_to_mqtt_subscribers_and_p2p(ferry, clients):
    queue_topic, parent = unique("TopicA"), unique("TopicB")
    rule(ferry, unique("in"), "inflow", queue_topic, parent)
    sub = clients.paho(V5).connect()
    sub.subscribe(f"{parent}/#", qos=1)
    dev1 = clients.paho(V311, client_id=unique("dev1")).connect()
    producer = clients.producer(queue_topic)

    producer.send(queue_message(queue_topic, b"to all", mqttSecondTopic="/testMq4Iot",
                                qoslevel="0", mqtt5UserProperty='[{"key":"k","value":"v"}]',
                                mqtt5ContentType="text/plain", mqtt5MsgExpireInterval="60"))
    m = sub.expect_message()
    assert (m.topic, m.payload, m.qos) == (f"{parent}/testMq4Iot", b"to all", 0)
    assert m.properties.UserProperty == [("k", "v")]
    assert m.properties.ContentType == "text/plain"
    assert 0 < m.properties.MessageExpiryInterval <= 60
    dev1.assert_silent(0.3)

    # P2P: only dev1 gets it, at qoslevel 1 (the default), without a subscription.
    producer.send(queue_message(queue_topic, b"just you", mqttSecondTopic=f"/p2p/{dev1.client_id}"))
    m = dev1.expect_message()
    assert (m.topic, m.payload, m.qos) == (f"{parent}/p2p/{dev1.client_id}", b"just you", 1)
    sub.assert_silent(0.3)

    # mqttRealTopic: the topic the P2P receiver sees.
    producer.send(queue_message(queue_topic, b"real", mqttSecondTopic=f"/p2p/{dev1.client_id}",
                                mqttRealTopic=f"{parent}/seen/here"))
    m = dev1.expect_message()
    assert (m.topic, m.payload) == (f"{parent}/seen/here", b"real")


def test_inflow_p2p_to_an_offline_persistent_client_survives_a_restart(fresh_ferry):
    server = fresh_ferry
    c = Clients(server)
    try:
        queue_topic, parent = unique("TopicA"), unique("TopicB")
        rule(server, unique("in"), "inflow", queue_topic, parent)
        device = unique("dev")
        away = c.paho(V311, client_id=device, clean=False).connect()
        away.disconnect()
        producer = c.producer(queue_topic)
        # cleansessionflag=false: kept for the offline persistent session.
        producer.send(queue_message(queue_topic, b"kept", mqttSecondTopic=f"/p2p/{device}",
                                    cleansessionflag="false"))
        # cleansessionflag=true (the default): only for a connected client.
        producer.send(queue_message(queue_topic, b"dropped", mqttSecondTopic=f"/p2p/{device}"))
        # Both were consumed by the rule once the broker had them.
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            clients_view = server.ctl("clients", "show", device)
            if clients_view["queued"] >= 1:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        c.close()
        server.restart()
        c = Clients(server)
        back = c.paho(V311, client_id=device, clean=False).connect()
        assert back.connack.session_present
        m = back.expect_message()
        assert (m.payload, m.qos) == (b"kept", 1)
        back.assert_silent(0.5)
    finally:
        c.close()


def test_inflow_honours_the_tag_filter_and_disable(ferry, clients):
    queue_topic, parent = unique("TopicA"), unique("TopicB")
    name = unique("in")
    rule(ferry, name, "inflow", queue_topic, parent, "--tag-filter", "MQ2MQTT||urgent")
    sub = clients.paho(V311).connect()
    sub.subscribe(f"{parent}/#", qos=1)
    producer = clients.producer(queue_topic)
    producer.send(queue_message(queue_topic, b"other", tag="other", mqttSecondTopic="/x"))
    producer.send(queue_message(queue_topic, b"urgent", tag="urgent", mqttSecondTopic="/x"))
    assert sub.expect_message().payload == b"urgent"
    sub.assert_silent(0.3)

    ferry.ctl("rules", "disable", name)
    producer.send(queue_message(queue_topic, b"while off", mqttSecondTopic="/x"))
    sub.assert_silent(1.0)
    ferry.ctl("rules", "enable", name)
    # The rule's consumer group kept its place: what came while it was off arrives now.
    assert sub.expect_message().payload == b"while off"


# -- outflow ------------------------------------------------------------------------------


def test_outflow_reaches_simple_and_push_consumers_with_the_mqtt_properties(ferry, clients):
    parent, queue_topic = unique("TopicA"), unique("QueueOut")
    rule(ferry, unique("out"), "outflow", parent, queue_topic)
    simple = clients.simple(queue_topic)
    listener = Collect()
    clients.push(queue_topic, listener)
    time.sleep(1.0)  # the push consumer's first long poll creates its group
    device = clients.paho(V311, client_id=unique("GID_x@@@dev")).connect()
    device.publish(f"{parent}/testMq4Iot", b"reading-1", qos=1)

    got = receive_until(simple, 1)
    assert len(got) == 1
    m = got[0]
    assert m.body == b"reading-1"
    assert m.properties.get("mqttSecondTopic") == "/testMq4Iot"
    assert m.properties.get("qoslevel") == "1"
    assert m.properties.get("cleansessionflag") == "true"
    assert m.properties.get("clientId") == device.client_id
    assert m.properties.get("topic") == f"{parent}/testMq4Iot"
    simple.ack(m)
    assert listener.wait_for(lambda s: any(x.body == b"reading-1" for x in s)), listener.seen
    pushed = next(x for x in listener.seen if x.body == b"reading-1")
    assert pushed.properties.get("clientId") == device.client_id

    # MQTT 5: user properties, content type and expiry carried; the PUBACK came after the
    # queue stored it (publish() waits for it).
    v5 = clients.paho(V5).connect()
    v5.publish(f"{parent}/x", b"v5", qos=1,
               properties=publish_properties(UserProperty=[("a", "b")], ContentType="text/plain",
                                             MessageExpiryInterval=120))
    got = receive_until(simple, 1)
    assert len(got) == 1
    p = got[0].properties
    assert json.loads(p["mqtt5UserProperty"]) == [{"key": "a", "value": "b"}]
    assert p["mqtt5ContentType"] == "text/plain"
    assert p["mqtt5MsgExpireInterval"] == "120"
    assert p["cleansessionflag"] == "true"
    simple.ack(got[0])


def test_outflow_messages_acknowledged_before_a_restart_are_delivered_after_it(fresh_ferry):
    server = fresh_ferry
    c = Clients(server)
    try:
        parent, queue_topic = unique("TopicA"), unique("QueueOut")
        rule(server, unique("out"), "outflow", parent, queue_topic)
        group = unique("g")
        c.simple(queue_topic, group=group)
        device = c.paho(V311).connect()
        for i in range(20):
            device.publish(f"{parent}/n", f"m{i}".encode(), qos=1)
        c.close()
        server.restart()
        c = Clients(server)
        consumer = c.simple(queue_topic, group=group, new=False)
        got = receive_until(consumer, 20)
        assert sorted(m.body for m in got) == sorted(f"m{i}".encode() for i in range(20))
        for m in got:
            consumer.ack(m)
        # The rule itself survived the restart.
        c.paho(V311).connect().publish(f"{parent}/n", b"after", qos=1)
        assert [m.body for m in receive_until(consumer, 1)] == [b"after"]
    finally:
        c.close()


def test_status_events_of_connections_closed_by_a_restart_are_kept(fresh_ferry):
    server = fresh_ferry
    c = Clients(server)
    try:
        group = "GID_" + unique("rs").replace("-", "_")
        server.ctl("groups", "create", group)
        queue_topic = unique("Status")
        rule(server, unique("status"), "status", group, queue_topic)
        consumer_group = unique("g")
        c.simple(queue_topic, group=consumer_group)
        watcher = c.simple(queue_topic)
        c.paho(V311, client_id=f"{group}@@@dev1").connect()
        assert [m.tag for m in receive_until(watcher, 1)] == ["connect"]
        server.restart()  # graceful: the broker closes the connection, then stops
        c.close()
        c = Clients(server)
        consumer = c.simple(queue_topic, group=consumer_group, new=False)
        got = receive_until(consumer, 2)
        events = [(m.tag, json.loads(m.body)["channelId"]) for m in got]
        assert [t for t, _ in events] == ["connect", "tcpclean"], events
        assert events[0][1] == events[1][1]
    finally:
        c.close()


# -- status events ------------------------------------------------------------------------


def test_status_events_connect_disconnect_tcpclean_and_takeover(ferry, clients):
    group = "GID_" + unique("st").replace("-", "_")
    ferry.ctl("groups", "create", group)
    queue_topic = unique("Status")
    rule(ferry, unique("status"), "status", group, queue_topic)
    listener = Collect()
    clients.push(queue_topic, listener, expr="connect||tcpclean")
    all_events = clients.simple(queue_topic)
    time.sleep(1.0)

    client_id = f"{group}@@@dev1"
    a = clients.paho(V311, client_id=client_id).connect()
    a.disconnect()  # clean DISCONNECT: disconnect, then tcpclean

    def events(pred_count):
        assert listener.wait_for(lambda s: len(s) >= pred_count), [m.tag for m in listener.seen]
        return [(m.tag, json.loads(m.body)) for m in listener.seen]

    seen = events(2)
    assert [t for t, _ in seen] == ["connect", "tcpclean"]
    (_, first), (_, second) = seen
    assert first["channelId"] == second["channelId"]
    assert len(first["channelId"]) == 32 and first["channelId"] == first["channelId"].lower()
    assert first["clientId"] == client_id and first["eventType"] == "connect"
    assert first["clientIp"].startswith("127.0.0.1:")
    # The unfiltered consumer also sees the disconnect, before the tcpclean.
    got = receive_until(all_events, 3)
    assert [m.tag for m in got] == ["connect", "disconnect", "tcpclean"]

    # Takeover: a second connection with the same client id; the first one is closed.
    b1 = clients.paho(V311, client_id=client_id).connect()
    b2 = clients.paho(V311, client_id=client_id).connect()
    seen = events(5)

    def online(evts) -> bool:
        state = {}
        for tag, body in evts:
            state[body["channelId"]] = tag == "connect"
        return any(state.values())

    tail = seen[2:]
    assert sorted(t for t, _ in tail) == ["connect", "connect", "tcpclean"]
    assert online(seen), "after the takeover the client is online"
    b2.disconnect()
    seen = events(6)
    assert not online(seen), "after its last connection closed the client is offline"
    del b1


# -- external RocketMQ --------------------------------------------------------------------


def test_rules_with_an_external_rocketmq_endpoint(ferry, clients, tmp_path):
    external = Ferry(tmp_path)
    ext = Clients(external)
    try:
        endpoint = external.queue_endpoint
        # outflow: MQTT on `ferry` → a queue topic on the external server.
        parent, queue_topic = unique("TopicA"), unique("ExtOut")
        rule(ferry, unique("out"), "outflow", parent, queue_topic, "--remote-endpoint", endpoint)
        consumer = ext.simple(queue_topic)
        device = clients.paho(V311).connect()
        device.publish(f"{parent}/a", b"over there", qos=1)
        got = receive_until(consumer, 1)
        assert [m.body for m in got] == [b"over there"]
        assert got[0].properties.get("mqttSecondTopic") == "/a"
        consumer.ack(got[0])

        # inflow: a queue topic on the external server → MQTT on `ferry`.
        queue_in, parent_in = unique("ExtIn"), unique("TopicB")
        ext.producer(queue_in)  # creates the topic there
        rule(ferry, unique("in"), "inflow", queue_in, parent_in, "--remote-endpoint", endpoint)
        sub = clients.paho(V311).connect()
        sub.subscribe(f"{parent_in}/#", qos=1)
        time.sleep(1.0)  # the rule's first receive creates its group on the external server
        producer = ext.producer(queue_in)
        producer.send(queue_message(queue_in, b"from afar", mqttSecondTopic="/b"))
        m = sub.expect_message(timeout=WAIT)
        assert (m.topic, m.payload) == (f"{parent_in}/b", b"from afar")
    finally:
        ext.close()
        external.stop()
