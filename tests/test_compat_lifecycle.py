"""The worker's reactions to classified closes (issue 14), driven with fake channels and connections.

What RabbitMQ 3.10.8 can produce is also run end to end in tests/test_compat_server.py; the 4.3
deprecated-feature close cannot be produced here, so its reaction is checked on the worker itself.
"""

import pika.exceptions
from pika.spec import BasicProperties

from fastfib.exitcodes import EXIT_CONFIG
from fastfib.server.lifecycle import Worker
from fastfib.server.settings import WorkerConfig


class FakeChannel:
    is_open = True
    channel_number = 1

    def __init__(self):
        self.published = []
        self.acks = []

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False):
        self.published.append((routing_key, body, properties))

    def basic_ack(self, delivery_tag=0, multiple=False):
        self.acks.append((delivery_tag, multiple))


class FakeConnection:
    is_open = True

    def __init__(self):
        self.channels_opened = 0
        self.closed = False

    def channel(self, on_open_callback=None):
        self.channels_opened += 1

    def close(self):
        self.closed = True

    def clear_fast_deliveries(self):
        pass


class Method:
    def __init__(self, tag):
        self.delivery_tag = tag
        self.redelivered = True


def _bind(worker, channel, connection):
    """Make ``channel`` the worker's (the fake-channel path of _set_channel), then attach ``connection``."""
    worker._connection = None
    worker._set_channel(channel)
    worker._connection = connection


def _worker(**config):
    events = []
    worker = Worker(WorkerConfig(**config), compute=lambda n, fmt: str(n).encode(),
                    on_event=lambda name, detail: events.append((name, detail)))
    return worker, events


def test_a_deprecated_feature_close_while_declaring_is_fatal_with_exit_78():
    worker, events = _worker(queue_type="classic", queue_durable=False)
    connection = FakeConnection()
    worker._connection = connection
    worker._doing = "declaring"
    reason = pika.exceptions.ConnectionClosedByBroker(
        541, "INTERNAL_ERROR - Feature `transient_nonexcl_queues` is deprecated.\n"
             "By default, this feature is not permitted anymore.")
    worker._on_connection_closed(connection, reason)
    assert worker.exit_code == EXIT_CONFIG
    assert [name for name, _ in events] == ["disconnected", "fatal"]
    assert "seed tutorial" in events[-1][1] and "transient_nonexcl_queues" in events[-1][1]
    assert worker._reconnect_timer is None  # no retry


def test_a_reply_too_large_lowers_the_limit_and_reopens_the_channel_without_reconnecting():
    worker, events = _worker(max_n=10**7, max_reply_bytes=128 << 20)
    connection, channel = FakeConnection(), FakeChannel()
    _bind(worker, channel, connection)
    worker._doing = "serving"
    reason = pika.exceptions.ChannelClosedByBroker(
        406, "PRECONDITION_FAILED - message size 1065837 is larger than configured max size 1048576")
    worker._on_channel_closed(channel, reason)
    assert connection.channels_opened == 1 and not connection.closed
    assert worker.dispatcher.reply_limit.max_reply_bytes == 1048576
    # The redelivered request is answered out_of_range, without computing.
    new = FakeChannel()
    _bind(worker, new, connection)
    computed = []
    worker.dispatcher._compute = lambda n, fmt: computed.append(n) or b""
    worker.dispatcher.on_message(new, Method(1), BasicProperties(reply_to="q", correlation_id="c"), b"5100000")
    (_, body, props), = new.published
    assert props.headers == {"x-error": "out_of_range"} and b"1065837 bytes" in body
    assert computed == []


def test_a_reply_refused_twice_for_another_reason_is_answered_internal_uncomputed():
    worker, _ = _worker()
    connection = FakeConnection()
    for round_ in range(2):
        channel = FakeChannel()
        _bind(worker, channel, connection)
        worker._doing = "serving"
        worker.dispatcher.on_message(channel, Method(1), BasicProperties(reply_to="q", correlation_id="c"), b"77")
        assert channel.published[0][2].content_type == "text/plain"
        worker._on_channel_closed(channel, pika.exceptions.ChannelClosedByBroker(
            406, "PRECONDITION_FAILED - some per-message reason"))
        assert not connection.closed and connection.channels_opened == round_ + 1
    channel = FakeChannel()
    _bind(worker, channel, connection)
    worker.dispatcher.on_message(channel, Method(1), BasicProperties(reply_to="q", correlation_id="c"), b"77")
    (_, body, props), = channel.published
    assert props.headers == {"x-error": "internal"} and b"some per-message reason" in body


def test_inequivalent_args_switch_to_passive_and_other_406s_do_not():
    worker, _ = _worker()
    connection, channel = FakeConnection(), FakeChannel()
    _bind(worker, channel, connection)
    worker._doing = "declaring"
    worker._on_channel_closed(channel, pika.exceptions.ChannelClosedByBroker(
        406, "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'rpc_queue'"))
    assert worker._passive_declare
    worker2, _ = _worker()
    channel2 = FakeChannel()
    _bind(worker2, channel2, connection)
    worker2._doing = "serving"
    worker2._on_channel_closed(channel2, pika.exceptions.ChannelClosedByBroker(
        406, "PRECONDITION_FAILED - unknown delivery tag 9"))
    assert not worker2._passive_declare and connection.closed  # reconnect, with backoff
