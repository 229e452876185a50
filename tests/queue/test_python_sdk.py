"""Ferry's embedded queue with the official RocketMQ 5 Python SDK (rocketmq-python-client 5.1.x)
against the real ``ferry`` binary. Every wait is bounded."""

from __future__ import annotations

import threading
import time

import pytest
from rocketmq import (ClientConfiguration, ConsumeResult, Credentials, FilterExpression, Message,
                      MessageListener, Producer, PushConsumer, SimpleConsumer)

from conftest import WAIT, unique


def config(endpoint: str, ak: str = "", sk: str = "") -> ClientConfiguration:
    return ClientConfiguration(endpoint, Credentials(ak, sk), request_timeout=5)


class Clients:
    """Starts SDK clients and shuts them all down at the end of the test."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.started = []

    def producer(self, *topics, ak="", sk="") -> Producer:
        p = Producer(config(self.endpoint, ak, sk), topics)
        p.startup()
        self.started.append(p)
        return p

    def simple(self, group, topic, expr="*", ak="", sk="", await_duration=1) -> SimpleConsumer:
        c = SimpleConsumer(config(self.endpoint, ak, sk), group,
                           {topic: FilterExpression(expr)}, await_duration=await_duration)
        c.startup()
        self.started.append(c)
        return c

    def push(self, group, topic, listener, expr="*") -> PushConsumer:
        c = PushConsumer(config(self.endpoint), group, listener, {topic: FilterExpression(expr)},
                         consumption_thread_count=2)
        c.startup()
        self.started.append(c)
        return c

    def close(self) -> None:
        for c in reversed(self.started):
            try:
                c.shutdown()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass


@pytest.fixture
def clients(ferry):
    c = Clients(ferry.queue_endpoint)
    yield c
    c.close()


def message(topic: str, body: bytes, tag: str | None = None, keys=(), **props) -> Message:
    m = Message()
    m.topic = topic
    m.body = body
    if tag:
        m.tag = tag
    if keys:
        m.keys = keys[0] if len(keys) == 1 else list(keys)
    for k, v in props.items():
        m.add_property(k, v)
    return m


def receive_until(consumer: SimpleConsumer, count: int, invisible: int = 10, timeout=WAIT):
    """Receives until ``count`` messages came (or the time is up)."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += consumer.receive(32, invisible)
    return got


def test_send_receive_ack_keeps_tag_keys_properties(clients):
    topic, group = unique("t"), unique("g")
    consumer = clients.simple(group, topic)
    producer = clients.producer(topic)
    receipt = producer.send(message(topic, b"hello ferry", tag="tagA", keys=("k1",), color="red"))
    assert receipt.message_id
    got = receive_until(consumer, 1)
    assert len(got) == 1
    m = got[0]
    assert m.body == b"hello ferry"
    assert m.tag == "tagA"
    assert set(m.keys) == {"k1"}
    assert m.properties.get("color") == "red"
    assert m.message_id == receipt.message_id
    assert m.delivery_attempt == 1
    consumer.ack(m)
    # Acknowledged: nothing more comes (the receive long-polls for await_duration = 1 s).
    assert consumer.receive(32, 10) == []


def test_tag_filter_a_or_b(clients):
    topic, group = unique("t"), unique("g")
    consumer = clients.simple(group, topic, expr="a||b")
    producer = clients.producer(topic)
    for tag in ("a", "b", "c", "a"):
        producer.send(message(topic, f"m-{tag}".encode(), tag=tag))
    got = receive_until(consumer, 3)
    assert sorted(m.tag for m in got) == ["a", "a", "b"]
    for m in got:
        consumer.ack(m)
    assert consumer.receive(32, 10) == []


def test_two_groups_each_see_every_message(clients):
    topic = unique("t")
    c1 = clients.simple(unique("g"), topic)
    c2 = clients.simple(unique("g"), topic)
    producer = clients.producer(topic)
    for i in range(3):
        producer.send(message(topic, f"m{i}".encode()))
    for c in (c1, c2):
        got = receive_until(c, 3)
        assert sorted(m.body for m in got) == [b"m0", b"m1", b"m2"]
        for m in got:
            c.ack(m)


class Collect(MessageListener):
    def __init__(self, fail_first: bool = False) -> None:
        self.lock = threading.Condition()
        self.seen = []  # (body, delivery_attempt)
        self.fail_first = fail_first

    def consume(self, message):
        with self.lock:
            self.seen.append((message.body, message.delivery_attempt))
            self.lock.notify_all()
        if self.fail_first and message.delivery_attempt == 1:
            return ConsumeResult.FAILURE
        return ConsumeResult.SUCCESS

    def wait_for(self, pred, timeout=WAIT):
        with self.lock:
            return self.lock.wait_for(lambda: pred(self.seen), timeout)


def test_push_consumer_receives_with_a_listener(clients):
    topic, group = unique("t"), unique("g")
    listener = Collect()
    clients.push(group, topic, listener)
    producer = clients.producer(topic)
    time.sleep(0.5)  # the push consumer's group exists once its settings reached the server
    for i in range(5):
        producer.send(message(topic, f"p{i}".encode()))
    assert listener.wait_for(lambda s: len({b for b, _ in s}) == 5), listener.seen
    assert sorted({b for b, _ in listener.seen}) == [f"p{i}".encode() for i in range(5)]


def test_failure_is_redelivered_with_attempt_2(clients):
    topic, group = unique("t"), unique("g")
    listener = Collect(fail_first=True)
    clients.push(group, topic, listener)
    producer = clients.producer(topic)
    time.sleep(0.5)
    producer.send(message(topic, b"retry-me"))
    # FAILURE -> ChangeInvisibleDuration(1 s backoff) -> redelivery with delivery_attempt 2.
    assert listener.wait_for(lambda s: (b"retry-me", 2) in s), listener.seen
    assert (b"retry-me", 1) in listener.seen


def test_dead_letter_queue_after_max_attempts(clients):
    # The session's ferry runs with queue.max_attempts = 2.
    topic, group = unique("t"), unique("g")
    consumer = clients.simple(group, topic)
    producer = clients.producer(topic)
    producer.send(message(topic, b"poison", tag="x"))
    attempts = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and len(attempts) < 3:
        for m in consumer.receive(32, 1):  # never acknowledged; invisible for 1 s
            attempts.append(m.delivery_attempt)
        if len(attempts) == 2:
            # One more receive after the second invisibility ends moves it to the DLQ.
            time.sleep(1.1)
            assert consumer.receive(32, 1) == []
            break
    assert attempts == [1, 2]
    dlq = clients.simple(unique("dlqreader"), f"%DLQ%{group}")
    got = receive_until(dlq, 1)
    assert [m.body for m in got] == [b"poison"]
    assert got[0].tag == "x"
    dlq.ack(got[0])


def test_restart_keeps_unacked_and_forgets_acked(fresh_ferry):
    topic, group = unique("t"), unique("g")
    clients = Clients(fresh_ferry.queue_endpoint)
    try:
        consumer = clients.simple(group, topic)
        producer = clients.producer(topic)
        for i in range(4):
            producer.send(message(topic, f"r{i}".encode()))
        got = receive_until(consumer, 3, invisible=2)
        got = got[:3]
        assert len(got) == 3
        consumer.ack(got[0])
        acked = got[0].body
    finally:
        clients.close()
    fresh_ferry.restart()
    clients = Clients(fresh_ferry.queue_endpoint)
    try:
        consumer = clients.simple(group, topic)
        # The two unacknowledged come back once their 2 s invisibility ended, plus the one that
        # was never received; the acknowledged one does not.
        again = receive_until(consumer, 3, invisible=30)
        bodies = sorted(m.body for m in again)
        assert len(bodies) == 3, bodies
        assert acked not in bodies
        assert set(bodies) | {acked} == {b"r0", b"r1", b"r2", b"r3"}
        for m in again:
            consumer.ack(m)
        assert consumer.receive(32, 10) == []
    finally:
        clients.close()


@pytest.fixture
def keys(ferry):
    full = ferry.ctl("keys", "create", "--permission", "full")
    pub_only = ferry.ctl("keys", "create", "--permission", "pub-only")
    return {
        "full": (full["access_key_id"], full["access_key_secret"]),
        "pub": (pub_only["access_key_id"], pub_only["access_key_secret"]),
    }


def test_access_key_works(clients, keys):
    ak, sk = keys["full"]
    topic, group = unique("t"), unique("g")
    consumer = clients.simple(group, topic, ak=ak, sk=sk)
    producer = clients.producer(topic, ak=ak, sk=sk)
    producer.send(message(topic, b"signed"))
    got = receive_until(consumer, 1)
    assert [m.body for m in got] == [b"signed"]
    consumer.ack(got[0])


def test_bad_secret_is_refused(clients, keys, caplog):
    ak, _ = keys["full"]
    topic = unique("t")
    with pytest.raises(Exception) as err:
        producer = clients.producer(topic, ak=ak, sk="not-the-secret")
        producer.send(message(topic, b"nope"))
    # The SDK logs the server's status (UNAUTHORIZED) and raises a generic route error.
    assert "40100" in str(err.value) + caplog.text, err.value
    assert "signature" in caplog.text


def test_pub_only_key_cannot_consume(clients, keys, caplog):
    ak, sk = keys["pub"]
    topic = unique("t")
    producer = clients.producer(topic, ak=ak, sk=sk)
    producer.send(message(topic, b"may send"))
    with pytest.raises(Exception) as err:
        consumer = clients.simple(unique("g"), topic, ak=ak, sk=sk)
        consumer.receive(32, 10)
    assert "40300" in str(err.value) + caplog.text, err.value
