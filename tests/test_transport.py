"""The embedded transport's doorbells (clustersearch/wire/transport.py).

Every wait below is slower than the tests' deadlines unless a doorbell
wakes it: the polling interval and the node loop's slice are set to 5 s.
"""

import threading
import time

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from clustersearch.wire import transport
from clustersearch.wire.config import create_app
from clustersearch.wire.transport import Bells, ring

SLOW_S = 5.0  # what a wait would take without a doorbell
PROMPT_S = 1.5  # what the tests allow


@pytest.fixture
def slow_polling(monkeypatch):
    monkeypatch.setattr(transport, "_DRAIN_SLICE_S", SLOW_S)


def _connection(app):
    options = dict(app.conf.broker_transport_options, polling_interval=SLOW_S)
    return Connection(app.conf.broker_url, transport=transport.Transport,
                      transport_options=options)  # fmt: skip


def test_a_ring_wakes_a_wait_and_nothing_else_does(tmp_path):
    bells = Bells(str(tmp_path))
    bells.listen(["q1"])
    try:
        began = time.monotonic()
        assert not bells.wait(0.2)  # nobody rang: the whole timeout
        assert time.monotonic() - began >= 0.15
        ring(str(tmp_path), "other")  # no such bell: nothing, no error
        threading.Timer(0.2, ring, (str(tmp_path), "q1")).start()
        began = time.monotonic()
        assert bells.wait(SLOW_S)
        assert time.monotonic() - began < PROMPT_S
        assert not bells.wait(0.05)  # drained: one ring, one wake
    finally:
        bells.close()
    ring(str(tmp_path), "q1")  # nobody listens any more: no error, no block


def test_a_published_message_wakes_its_consumer_at_once(tmp_path, slow_polling):
    app = create_app(f"filesystem://{tmp_path}")
    exchange = Exchange("bells", type="direct")
    queue = Queue("bells-q", exchange, routing_key="bells-q")
    got = []
    with _connection(app) as consumer_conn, _connection(app) as producer_conn:
        channel = consumer_conn.channel()
        with Consumer(channel, [queue], callbacks=[lambda body, m: (got.append(body), m.ack())],
                      accept=["json"]):  # fmt: skip
            Producer(producer_conn.channel()).publish({"n": 0}, exchange=exchange,
                                                      routing_key="bells-q", declare=[queue])  # fmt: skip
            consumer_conn.drain_events(timeout=SLOW_S)  # the first look finds it
            assert got == [{"n": 0}]
            # Now the consumer waits; a message published meanwhile wakes it.
            threading.Timer(0.3, lambda: Producer(producer_conn.channel()).publish(
                {"n": 1}, exchange=exchange, routing_key="bells-q")).start()  # fmt: skip
            began = time.monotonic()
            consumer_conn.drain_events(timeout=3 * SLOW_S)
            assert got == [{"n": 0}, {"n": 1}]
            assert time.monotonic() - began < PROMPT_S


def test_an_ack_wakes_a_consumer_waiting_for_a_free_slot(tmp_path, slow_polling):
    # A node on the embedded transport takes one message at a time
    # (prefetch 1, acked when its fit ends): the next message waits until
    # the ack, which must wake the loop, not its next poll.
    app = create_app(f"filesystem://{tmp_path}")
    exchange = Exchange("slot", type="direct")
    queue = Queue("slot-q", exchange, routing_key="slot-q")
    held = []
    with _connection(app) as consumer_conn, _connection(app) as producer_conn:
        producer = Producer(producer_conn.channel())
        for n in range(2):
            producer.publish({"n": n}, exchange=exchange, routing_key="slot-q", declare=[queue])
        channel = consumer_conn.channel()
        channel.basic_qos(prefetch_count=1)
        with Consumer(channel, [queue], callbacks=[lambda body, m: held.append((body, m))],
                      accept=["json"]):  # fmt: skip
            consumer_conn.drain_events(timeout=SLOW_S)
            # One of the two (files written in the same millisecond have no
            # order), and not the other until the ack.
            assert len(held) == 1, held
            threading.Timer(0.3, held[0][1].ack).start()  # the fit ends elsewhere
            began = time.monotonic()
            consumer_conn.drain_events(timeout=3 * SLOW_S)
            assert sorted(b["n"] for b, _ in held) == [0, 1]
            assert time.monotonic() - began < PROMPT_S
            held[1][1].ack()


def test_a_stored_result_rings_the_clients_listener(tmp_path):
    app = create_app(f"filesystem://{tmp_path}")
    client, node = app.backend, create_app(f"filesystem://{tmp_path}").backend
    woken = threading.Event()
    stop = client.listen(woken.set)
    try:
        time.sleep(0.2)
        assert not woken.is_set()
        node.store_result("some-task-id", {"payload": "x"}, "SUCCESS")
        assert woken.wait(PROMPT_S)
        assert client.get_task_meta("some-task-id")["status"] == "SUCCESS"
    finally:
        stop()


def test_a_large_stored_result_is_read_where_it_lies(tmp_path):
    # A forest's result (tens of MB) is mapped, and its payload decoded as a
    # view into the mapping: the client never copies it into bytes first.
    # A small one is read as bytes. Both survive the file's deletion.
    import mmap

    client = create_app(f"filesystem://{tmp_path}").backend
    node = create_app(f"filesystem://{tmp_path}").backend
    big = bytes(range(256)) * (transport.MAP_OVER // 256 + 1)
    node.store_result("big", {"payload": big}, "SUCCESS")
    node.store_result("small", {"payload": b"tiny"}, "SUCCESS")
    meta = client.get_task_meta("big")
    view = meta["result"]["payload"]
    assert isinstance(view, memoryview) and isinstance(view.obj, mmap.mmap)
    client.forget("big")
    assert view == big
    small = client.get_task_meta("small")["result"]["payload"]
    client.forget("small")
    assert isinstance(small.obj, bytes) and small == b"tiny"
