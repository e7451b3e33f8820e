"""fastfib.pika_seam on real pika connections (pika's transport, I/O loop and frame machinery) wired
to a fake broker over a socketpair (pika_seam.Loopback): the fast delivery decoder, the coalesced
writes, the startup self-check, and the worker's fallback to pika's public API when it fails."""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import uuid

import pika.adapters.base_connection
import pika.connection
import pytest
from _amqp_tables import nested_table
from pika import frame, spec
from pika.spec import BasicProperties

import fastfib
from fastfib import pika_seam
from fastfib.pika_seam import CoalescingConnection, Loopback
from fastfib.server import lifecycle
from fastfib.server.lifecycle import Worker
from fastfib.server.settings import WorkerConfig


def _delivery_bytes(channel_number, consumer_tag, tag, props, body, frame_max=131072) -> bytes:
    out = [frame.Method(channel_number, spec.Basic.Deliver(consumer_tag=consumer_tag, delivery_tag=tag,
                                                           redelivered=tag % 2 == 0, exchange="",
                                                           routing_key="rpc_queue")).marshal(),
           frame.Header(channel_number, len(body), props).marshal()]
    for start in range(0, len(body), frame_max - 8):
        out.append(frame.Body(channel_number, body[start:start + frame_max - 8]).marshal())
    return b"".join(out)


class Consumer:
    """A Loopback connection, open, with channel 1 consuming as ``ctag``: ``fast`` collects what the
    fast decoder hands over, ``slow`` what pika's own consumer callback gets, ``frames`` every frame
    that went to pika's ``_process_frame``."""

    def __init__(self, **kwargs) -> None:
        self.loop = Loopback(**kwargs)
        loop, conn = self.loop, self.loop.connection
        self.conn = conn
        loop.handshake()
        opened: list = []
        conn.channel(channel_number=1, on_open_callback=opened.append)
        loop.send_method(1, spec.Channel.OpenOk())
        loop.spin(lambda: opened)
        self.channel = opened[0]
        self.fast: list = []
        self.slow: list = []
        self.frames: list = []
        consuming: list = []
        self.ctag = self.channel.basic_consume("q", lambda ch, m, p, b: self.slow.append((m.delivery_tag, p, b)),
                                               consumer_tag="ctag", callback=consuming.append)
        loop.send_method(1, spec.Basic.ConsumeOk(consumer_tag="ctag"))
        loop.spin(lambda: consuming)
        loop.recv()
        process = conn._process_frame

        def recording(value):
            self.frames.append(value)
            process(value)

        conn._process_frame = recording
        self.on()

    def on(self, handler=None) -> None:
        self.conn.set_fast_deliveries(1, "ctag", handler or self.fast.append)

    def feed(self, data: bytes, until) -> None:
        self.loop.send(data)
        self.loop.spin(until, what="the data to be processed")

    def close(self) -> None:
        self.loop.close()


@pytest.fixture
def consumer():
    c = Consumer()
    yield c
    c.close()


PROPS = [
    BasicProperties(reply_to="amq.rabbitmq.reply-to.abc.def", correlation_id="c-1"),
    BasicProperties(reply_to="amq.gen-q", correlation_id=None),
    BasicProperties(reply_to=None, correlation_id="x" * 255),
    BasicProperties(content_type="text/plain", reply_to="q", correlation_id="ünï",
                    headers={"accept": "application/octet-stream", "x-deadline-ms": 1234567890123,
                             "nested": {"a": [1, 2, b"x"]}}),
    BasicProperties(content_type="a", content_encoding="b", headers={}, delivery_mode=2, priority=5,
                    correlation_id="c", reply_to="r", expiration="60000", message_id="m", timestamp=1700000000,
                    type="t", user_id="guest", app_id="app", cluster_id="cl"),
]


@pytest.mark.parametrize("props", PROPS, ids=range(len(PROPS)))
@pytest.mark.parametrize("body", [b"", b"20", b"1" * 64, bytes(70000)], ids=["empty", "20", "64", "70000"])
def test_fast_decoder_agrees_with_pika_at_every_split(consumer, props, body):
    data = b"".join(_delivery_bytes(1, "ctag", tag, props, body) for tag in (1, 2, 3))
    splits = [1, 7, 8, 100, len(data) // 2, len(data) - 1] if len(body) > 1000 else range(1, len(data), 3)
    conn = consumer.conn
    for k, split in enumerate(splits, 1):
        start = conn.bytes_received
        consumer.feed(data[:split],
                      lambda: conn.bytes_received + len(conn._frame_buffer) == start + split)  # noqa: B023
        taken = consumer.slow if len(body) > 65536 else consumer.fast
        consumer.feed(data[split:], lambda: len(taken) == 3 * k)  # noqa: B023 - used right here
        assert conn.bytes_received == start + len(data)  # the heartbeat checker reads it
        assert not conn._frame_buffer
    if len(body) > 65536:  # left to pika, frame by frame
        assert consumer.fast == [] and len(consumer.frames) == 3 * 3 * len(splits)
        assert [b for _, _, b in consumer.slow] == [body] * 3 * len(splits)
        return
    assert consumer.frames == [] and consumer.slow == []
    assert [d.delivery_tag for d in consumer.fast] == [1, 2, 3] * len(splits)
    for d in consumer.fast:
        assert d.body == body and d.redelivered == (d.delivery_tag == 2)
        for name in ("reply_to", "correlation_id", "headers", "content_type", "expiration", "timestamp"):
            assert getattr(d.properties, name) == getattr(props, name), name


def test_fast_decoder_leaves_other_consumers_channels_and_frames_to_pika(consumer):
    props = BasicProperties(reply_to="q", correlation_id="c")
    data = (_delivery_bytes(1, "other-consumer", 1, props, b"5")
            + frame.Heartbeat().marshal()
            + _delivery_bytes(1, "ctag", 3, props, b"7"))
    consumer.feed(data, lambda: consumer.fast and len(consumer.frames) == 4)
    assert [(d.delivery_tag, d.body) for d in consumer.fast] == [(3, b"7")]
    assert [type(f).__name__ for f in consumer.frames] == ["Method", "Header", "Body", "Heartbeat"]
    consumer.conn.clear_fast_deliveries()
    consumer.feed(_delivery_bytes(1, "ctag", 4, props, b"8"), lambda: consumer.slow)
    assert consumer.slow[0][0] == 4 and consumer.slow[0][2] == b"8" and len(consumer.fast) == 1


def test_fast_decoder_hands_a_corrupt_stream_to_pika(consumer):
    bad = bytearray(_delivery_bytes(1, "ctag", 1, BasicProperties(reply_to="q"), b"5"))
    bad[-1] = 0x00  # the body frame's frame-end octet
    consumer.loop.send(bytes(bad))
    consumer.loop.spin(lambda: consumer.loop.closed is not None, what="pika to drop the connection")
    # pika's own verdict, as without the fast path: the stream is corrupt, the connection is lost
    assert "Invalid FRAME_END" in str(consumer.loop.closed)
    assert consumer.fast == []


# --------------------------------------------------------------- the worker behind the fast decoder


class FakeChannel:
    is_open = True

    def __init__(self) -> None:
        self.published: list = []
        self.acks: list = []
        self.rejects: list = []

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False):
        self.published.append((routing_key, body, properties))

    def basic_ack(self, delivery_tag=0, multiple=False):
        self.acks.append((delivery_tag, multiple))

    def basic_reject(self, delivery_tag, requeue=True):
        self.rejects.append((delivery_tag, requeue))


def _undecodable_delivery(tag: int, reply_to: bytes | None, cid: bytes = b"bad") -> bytes:
    """A delivery whose headers are nested too deeply for any decoder; its frames are whole."""
    flags = 0x2000 | 0x0400 | (0x0200 if reply_to is not None else 0)
    props = nested_table(3000) + bytes((len(cid),)) + cid
    if reply_to is not None:
        props += bytes((len(reply_to),)) + reply_to
    payload = struct.pack(">HxxQH", 60, 2, flags) + props
    return (frame.Method(1, spec.Basic.Deliver(consumer_tag="ctag", delivery_tag=tag, exchange="",
                                               routing_key="rpc_queue")).marshal()
            + struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce" + frame.Body(1, b"20").marshal())


def _worker_on(consumer) -> tuple[Worker, FakeChannel]:
    worker = Worker(WorkerConfig())
    channel = FakeChannel()
    worker._set_channel(channel)
    consumer.on(worker.dispatcher.on_fast_delivery)
    return worker, channel


def test_an_undecodable_delivery_is_settled_and_never_raised_into_the_transport(consumer):
    worker, channel = _worker_on(consumer)
    good = _delivery_bytes(1, "ctag", 3, BasicProperties(reply_to="replies", correlation_id="ok"), b"10")
    consumer.feed(_undecodable_delivery(1, b"replies") + _undecodable_delivery(2, None) + good,
                  lambda: worker.stats.received == 3)
    worker.acks.flush()
    (rt, body, props), (_, body2, props2) = channel.published
    assert rt == "replies" and props.correlation_id == "bad" and props.headers == {"x-error": "invalid_argument"}
    assert "cannot be decoded" in json.loads(body)["message"]
    assert body2 == b"55" and props2.correlation_id == "ok"
    assert channel.rejects == [(1, False), (2, False)]  # rejected, not requeued
    assert channel.acks == [(3, False)]
    assert worker.stats.undecodable == 2 and worker.stats.errors["invalid_argument"] == 1
    assert consumer.frames == [] and not consumer.conn._frame_buffer and consumer.loop.closed is None


def test_the_redelivered_flag_is_kept(consumer):
    worker, _ = _worker_on(consumer)
    props = BasicProperties(reply_to="replies", correlation_id="c")
    consumer.feed(b"".join(_delivery_bytes(1, "ctag", tag, props, b"5") for tag in (1, 2, 3, 4)),
                  lambda: worker.stats.replied == 4)
    assert worker.stats.redelivered == 2  # _delivery_bytes: even tags are redelivered


# ------------------------------------------------------------------------------ writes


def test_a_failure_before_the_flush_does_not_stall_the_output():
    calls: list = []

    def before_flush():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated failure in the acknowledgements")

    loop = Loopback(before_flush=before_flush)
    try:
        loop.handshake()  # its frames went out although the first flush's before_flush raised
        conn = loop.connection
        conn._send_frame(frame.Heartbeat())
        loop.frames(lambda fs: any(isinstance(f, frame.Heartbeat) for f in fs), "a heartbeat")
        conn.write_frames([b"\x08\x00\x00\x00\x00\x00\x00\xce"], 1)  # a heartbeat, hand-encoded
        loop.frames(lambda fs: any(isinstance(f, frame.Heartbeat) for f in fs), "another heartbeat")
        assert len(calls) >= 3 and not conn._flush_scheduled
    finally:
        loop.close()


def test_large_writes_are_sent_from_the_pieces_without_copies():
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        body = bytes(range(256)) * 4096  # 1 MiB
        view = memoryview(body)
        pieces = [b"head", view[:400_000], view[400_000:], b"tail"]
        left = pika_seam._send_pieces(a, list(pieces))
        assert left, "the kernel took 1 MiB at once: nothing left to check"
        assert isinstance(left[0], memoryview) and left[0].obj is body  # the unsent tail: a view, not a copy
        assert all(p is q for p, q in zip(left[1:], pieces[len(pieces) - len(left) + 1:], strict=True))
        b.setblocking(False)
        got = bytearray()
        while True:
            try:
                chunk = b.recv(1 << 20)
            except BlockingIOError:
                break
            got += chunk
        assert bytes(got) + b"".join(bytes(p) for p in left) == b"head" + body + b"tail"
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------------------ the self-check


def test_the_self_check_passes_on_the_installed_pika():
    assert pika.__version__ == "1.4.4"  # pinned exactly in pyproject.toml
    assert pika_seam.self_check() is None


def _bypass_output(monkeypatch):
    """pika stops routing its frames through _output_marshaled_frames (a renamed internal, say)."""
    monkeypatch.setattr(CoalescingConnection, "_output_marshaled_frames",
                        pika.connection.Connection._output_marshaled_frames)


def _bypass_input(monkeypatch):
    """pika's transport stops calling Connection._on_data_available."""
    monkeypatch.setattr(pika.adapters.base_connection.BaseConnection, "_proto_data_received",
                        lambda self, data: pika.connection.Connection._on_data_available(self, data))


def _bytearray_buffer(monkeypatch):
    """pika's development branch: _frame_buffer is a bytearray, consumed in place."""
    init = pika.connection.Connection._init_connection_state

    def init_state(self):
        init(self)
        self._frame_buffer = bytearray()

    def on_data_available(self, data_in):
        self._frame_buffer += data_in
        while self._frame_buffer:
            consumed, value = self._read_frame()
            if not value:
                return
            del self._frame_buffer[:consumed]
            self.bytes_received += consumed
            self._process_frame(value)

    monkeypatch.setattr(pika.connection.Connection, "_init_connection_state", init_state)
    monkeypatch.setattr(pika.connection.Connection, "_on_data_available", on_data_available)


@pytest.mark.parametrize("break_pika", [_bypass_output, _bypass_input, _bytearray_buffer])
def test_the_self_check_notices_a_pika_that_changed(monkeypatch, break_pika):
    break_pika(monkeypatch)
    problem = pika_seam.self_check()
    assert problem is not None and problem.strip()


@pytest.mark.broker
@pytest.mark.timeout(60)
def test_a_failed_self_check_means_one_warning_and_the_public_api(broker_url, monkeypatch, caplog):
    from _server_helpers import RpcClient, delete_queue

    _bypass_input(monkeypatch)
    lifecycle.wire_works.cache_clear()
    queue = f"fastfib-test-seam-{uuid.uuid4().hex[:12]}"
    consuming = threading.Event()
    worker = Worker(WorkerConfig(urls=(broker_url,), queue=queue),
                    on_event=lambda name, detail: name == "consuming" and consuming.set())
    assert worker.wire == "fast"
    thread = threading.Thread(target=worker.run, daemon=True)
    try:
        with caplog.at_level(logging.WARNING, logger="fastfib"):
            thread.start()
            assert consuming.wait(20)
            assert worker.wire == "pika" and not lifecycle.wire_works()
            with RpcClient(queue) as client:
                assert client.call(b"20")[1] == str(fastfib.fib(20)).encode()
        warnings = [r for r in caplog.records if "fast wire does not work" in r.getMessage()]
        assert len(warnings) == 1 and "public API" in warnings[0].getMessage()
    finally:
        worker.request_stop()
        thread.join(15)
        delete_queue(queue)
        lifecycle.wire_works.cache_clear()
    assert not thread.is_alive() and worker.exit_code == 0
