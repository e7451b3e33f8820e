"""The one module that uses pika's private API: the fast wire of the worker and of both clients.

:class:`CoalescingConnection` is a :class:`pika.SelectConnection` that decodes
the deliveries to one channel's consumers (and its ``basic.ack`` confirms) with
:mod:`fastfib.wire` and writes each I/O loop turn's frames with one
``sendmsg``. Everything else is pika's. The worker runs on it; so does the
blocking client, as the implementation of a :class:`pika.BlockingConnection`
driven by :class:`ClientWire`; :class:`AsyncioCoalescingConnection` is the
same for the asyncio client.

It relies on these private parts of pika 1.4.4 (pinned exactly in
pyproject.toml): ``Connection._on_data_available`` (called with each chunk
read from the socket), ``_frame_buffer`` (bytes not yet decoded),
``_process_frame`` (one decoded frame in), ``_output_marshaled_frames`` (every
frame out), ``_body_max_length``, ``_adapter_emit_data`` and ``_transport``;
the plain transport's ``_sock``, ``_state`` and ``_STATE_ACTIVE``; for
:class:`ClientWire`, ``BlockingConnection``'s ``_impl_class`` argument,
``_impl``, ``_closed_result``, ``_channels_pending_dispatch``,
``_ready_events`` and ``_cleanup``, and ``BlockingChannel._impl``; and, for
:func:`self_check`, ``BaseConnection._nbio`` and ``_StreamingProtocolShim``.

:func:`self_check` runs a real connection of this class through a handshake,
a channel, a consumer, deliveries (whole and split), replies, acks and a
heartbeat against an in-process fake broker on a socketpair (:class:`Loopback`).
If the installed pika no longer behaves as this module expects, it returns
what went wrong, and the worker logs one warning and runs on pika's public
API (``--wire pika``) instead. :func:`client_self_check` does the same for the
clients' fast wire, against a fake broker on a loopback TCP port; when it
fails, the clients use pika's public API.
"""

from __future__ import annotations

import functools
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pika.frame
from pika import spec
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.select_connection import IOLoop

from .wire import (
    FRAME_OVERHEAD,
    INCOMPLETE,
    BadDelivery,
    RequestEncoder,
    decode_ack,
    decode_delivery,
    encode_reply,
    encode_request,
    frame_count,
)

try:  # for the direct send of CoalescingConnection._flush (plain TCP only; TLS goes through pika)
    from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport as _PlaintextTransport
except ImportError:  # pragma: no cover - another pika layout: pika's own writes only
    _PlaintextTransport = None

log = logging.getLogger(__name__)

_UNPACK_FRAME_HEADER = struct.Struct(">BHI").unpack_from
_BASIC_DELIVER = b"\x00\x3c\x00\x3c"  # class 60 (basic), method 60 (deliver)
#: Deliveries with a larger body are left to pika (a valid request is at most 64 bytes): a large one
#: arriving over many reads would be decoded again from its start at each read.
_FAST_BODY_MAX = 65536
#: At most this many buffers per sendmsg (Linux's IOV_MAX is 1024).
_IOV_MAX = 1024
#: Pieces handed to pika's transport after a partial send: smaller ones are joined (one send each
#: in pika), larger ones go as they are (no copy).
_JOIN_BELOW = 65536


class _FastWire:
    """What :class:`CoalescingConnection` and :class:`AsyncioCoalescingConnection` add to pika's
    connection classes: one write per I/O loop turn, and a fast decoder for the deliveries to one
    channel's consumers and for one channel's publisher confirms.

    pika hands every frame to its transport separately, and the transport
    sends each queued chunk with a system call of its own: a reply is three
    frames (method, header, body), so three ``send`` calls, plus one per ack.
    Measured under load, those calls were the largest single cost of a worker.
    This class collects what pika outputs during a loop turn and writes it
    in a timer at the end of the turn, after ``before_flush`` (the worker's
    batched acknowledgements) has added its frames. Order is kept, so a reply
    still reaches the broker before the ack of its request.
    """

    def __init__(self, *args: Any, before_flush: Callable[[], None] | None = None, **kwargs: Any) -> None:
        self._out: list = []
        self._flush_scheduled = False
        self._before_flush = before_flush
        self._fast: tuple[int, tuple[bytes, ...], Callable] | None = None
        self._fast_acks: tuple[int, Callable] | None = None
        super().__init__(*args, **kwargs)

    def set_fast_deliveries(self, channel_number: int, consumer_tag: str | tuple[str, ...], handler: Callable) -> None:
        """Decode the deliveries to ``consumer_tag`` (or to any of a tuple of tags) on ``channel_number`` here and call
        ``handler(delivery)`` (a :class:`fastfib.wire.Delivery`, or a :class:`fastfib.wire.BadDelivery`
        to settle), bypassing pika's generic frame machinery (which costs more than everything else a
        small request needs). Everything else, and any delivery this decoder does not take, goes
        through pika as usual."""
        tags = (consumer_tag,) if isinstance(consumer_tag, str) else consumer_tag
        self._fast = (channel_number, tuple(t.encode("utf-8") for t in tags), handler) if tags else None

    def clear_fast_deliveries(self) -> None:
        self._fast = None

    def set_fast_acks(self, channel_number: int, handler: Callable[[int, bool], None]) -> None:
        """Decode the publisher confirms (``basic.ack``) on ``channel_number`` here and call
        ``handler(delivery_tag, multiple)``; ``basic.nack`` and everything else still go to pika."""
        self._fast_acks = (channel_number, handler)

    def _on_data_available(self, data_in: bytes) -> None:
        if self._fast is None and self._fast_acks is None and not self._frame_buffer:
            super()._on_data_available(data_in)
            return
        buf = self._frame_buffer + data_in if self._frame_buffer else data_in
        self._frame_buffer = b""
        pos, n = 0, len(buf)
        while n - pos >= 8:
            fast, acks = self._fast, self._fast_acks
            if fast is None and acks is None:  # switched off meanwhile (consumer cancelled): pika takes the rest
                super()._on_data_available(buf[pos:])
                return
            ftype, channel_number, size = _UNPACK_FRAME_HEADER(buf, pos)
            end = pos + 7 + size
            if end >= n:
                break
            ack = decode_ack(buf, pos, acks[0]) if acks is not None and ftype == 1 else None
            if ack is not None:
                tag, multiple, next_pos = ack
                self.bytes_received += next_pos - pos
                self.frames_received += 1
                pos = next_pos
                acks[1](tag, multiple)
                continue
            if (fast is not None and ftype == 1 and channel_number == fast[0]
                    and buf[pos + 7:pos + 11] == _BASIC_DELIVER):
                delivery = decode_delivery(buf, pos, channel_number, fast[1], max_body=_FAST_BODY_MAX)
                if delivery is INCOMPLETE:
                    break
                if delivery is not None:
                    # pika counts both; its heartbeat checker takes received bytes as a sign of life.
                    self.bytes_received += delivery.end - pos
                    self.frames_received += delivery.frames
                    pos = delivery.end
                    fast[2](delivery)
                    continue
            if buf[end] != 0xCE:  # let pika's decoder raise its error on it
                super()._on_data_available(buf[pos:])
                return
            _, frame_value = pika.frame.decode_frame(buf[pos:end + 1])
            self.bytes_received += end + 1 - pos
            pos = end + 1
            self._process_frame(frame_value)
        self._frame_buffer = buf[pos:]

    def _output_marshaled_frames(self, marshaled_frames) -> None:
        for frame in marshaled_frames:
            self.bytes_sent += len(frame)
            self.frames_sent += 1
        self._out.extend(marshaled_frames)
        if not self._flush_scheduled:
            self.request_flush()

    def write_frames(self, pieces: list, frames: int, *, schedule: bool = True) -> None:
        """Queue already-marshaled bytes (``pieces``, bytes or memoryviews, making up ``frames`` whole
        frames); they are not copied before they are written. With ``schedule=False`` they wait for
        the caller's :meth:`flush` (or the next scheduled one)."""
        if self.is_closed:
            raise pika.exceptions.ConnectionWrongStateError("the connection is closed")
        for piece in pieces:
            self.bytes_sent += len(piece)
        self.frames_sent += frames
        self._out.extend(pieces)
        if schedule and not self._flush_scheduled:
            self.request_flush()

    def body_max_length(self) -> int:
        """The largest body frame payload, as negotiated (frame_max minus the frame's 8 bytes of framing)."""
        return self._body_max_length or (self.params.frame_max - FRAME_OVERHEAD)

    def request_flush(self) -> None:
        """Run ``before_flush`` and write what is buffered at the end of this loop turn."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.ioloop.call_later(0, self._flush)

    def _flush(self) -> None:
        # Whatever before_flush does, the flag is cleared and the output written: a failure there
        # must not stop every later write (heartbeats included).
        try:
            if self._before_flush is not None:
                self._before_flush()
        except Exception:
            log.exception("internal error before writing the output (acknowledgements); writing it anyway")
        finally:
            self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write what is buffered now (one ``sendmsg`` when the socket takes it all)."""
        out = self._out
        if not out:
            return
        self._out = []
        transport = self._transport
        if transport is None:
            return
        if (_PlaintextTransport is not None and type(transport) is _PlaintextTransport
                and transport._state == transport._STATE_ACTIVE and not transport.get_write_buffer_size()):
            # Nothing queued before us: send now, as asyncio's transports do, instead of waiting
            # one more epoll round for writability. Whatever the kernel does not take (or an error,
            # which pika then meets and handles) goes the usual way.
            out = _send_pieces(transport._sock, out)
            if not out:
                return
        for chunk in _coalesce(out):
            self._adapter_emit_data(chunk)


class CoalescingConnection(_FastWire, pika.SelectConnection):
    """A :class:`pika.SelectConnection` (the worker's, and under the blocking client's
    :class:`pika.BlockingConnection`) that writes one I/O loop turn's frames with one ``sendmsg``
    and decodes its hot frames with :mod:`fastfib.wire` (see :class:`_FastWire`)."""


class AsyncioCoalescingConnection(_FastWire, AsyncioConnection):
    """The same for :class:`pika.adapters.asyncio_connection.AsyncioConnection` (the asyncio client's)."""


def _send_pieces(sock: socket.socket, pieces: list) -> list:
    """Send ``pieces`` with ``sendmsg`` (no joining, no copies) until done or the kernel takes no
    more; return what is left (the first piece possibly as a memoryview of its unsent tail)."""
    i = 0
    n = len(pieces)
    while i < n:
        batch = pieces[i:i + _IOV_MAX]
        try:
            sent = sock.sendmsg(batch)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return pieces[i:]  # pika's transport meets the error again and closes the connection
        for piece in batch:
            size = len(piece)
            if sent >= size:
                sent -= size
                i += 1
                continue
            if sent:
                pieces[i] = memoryview(piece)[sent:]
            return pieces[i:]
    return []


def _coalesce(pieces: list):
    """``pieces`` for pika's transport (one send per chunk there): runs of small pieces joined,
    large ones as they are."""
    small: list = []
    for piece in pieces:
        if len(piece) >= _JOIN_BELOW:
            if small:
                yield b"".join(small)
                small = []
            yield piece
        elif piece:
            small.append(piece)
    if small:
        yield b"".join(small)


# ----------------------------------------------------------------------------- the blocking client's wire


def _never(*_args: Any) -> None:
    """pika's consumer callback for replies the fast decoder takes (it never gets any)."""


class ClientWire:
    """The blocking client's fast wire: requests written pre-encoded, replies and confirms decoded here.

    It drives a :class:`pika.BlockingConnection` built by :meth:`connect`,
    whose implementation is a :class:`CoalescingConnection`. A batch of
    requests (:meth:`publish`, encoded by :class:`fastfib.wire.RequestEncoder`)
    goes out in one ``sendmsg`` (:meth:`flush`); replies are decoded by
    :func:`fastfib.wire.decode_reply` and ``basic.ack`` confirms by
    :class:`CoalescingConnection`, inside :meth:`wait`, without pika's frame
    and dispatch machinery. Everything else (channel open, ``basic.return``,
    ``basic.nack``, replies over 64 KiB, heartbeats, closes) is pika's, as
    with a plain ``BlockingConnection``. Use it only when
    :func:`client_self_check` passed.
    """

    @staticmethod
    def connect(params: pika.connection.Parameters) -> pika.BlockingConnection:
        """A BlockingConnection whose implementation is a :class:`CoalescingConnection`."""
        return pika.BlockingConnection(params, _impl_class=CoalescingConnection)

    def __init__(self, conn: pika.BlockingConnection, channel: Any) -> None:
        self._conn = conn
        self._impl: CoalescingConnection = conn._impl
        self._ioloop = self._impl.ioloop
        self._channel = channel
        self.channel_number: int = channel.channel_number
        self._encoder: RequestEncoder | None = None

    def confirm_select(self, on_ack: Callable[[int, bool], None], on_nack: Callable[[int, bool], None],
                       timeout: float) -> None:
        """Publisher confirms, settled asynchronously: ``on_ack``/``on_nack(delivery_tag, multiple)``.

        ``BlockingChannel.confirm_delivery()`` would make every publish wait
        for its own confirm; the channel under it takes callbacks instead.
        """

        def on_frame(frame: Any) -> None:
            method = frame.method
            (on_nack if isinstance(method, spec.Basic.Nack) else on_ack)(method.delivery_tag, method.multiple)

        selected: list = []
        self._channel._impl.confirm_delivery(ack_nack_callback=on_frame, callback=selected.append)
        self.wait(timeout, lambda: selected)
        if not selected:
            raise pika.exceptions.AMQPConnectionError("the broker did not answer Confirm.Select")
        self._impl.set_fast_acks(self.channel_number, on_ack)

    def consume(self, queue: str, on_reply: Callable[[Any, bytes], None],
                on_bad: Callable[[Any], None]) -> None:
        """Consume ``queue`` with auto-ack: ``on_reply(properties, body)`` for each reply (the
        properties have ``correlation_id``, ``content_type``, ``headers``), ``on_bad(bad_delivery)``
        for one that does not decode (:class:`fastfib.wire.BadDelivery`)."""

        def fast(delivery: Any) -> None:
            if type(delivery) is BadDelivery:
                on_bad(delivery)
            else:
                on_reply(delivery.properties, delivery.body)

        ctag = self._channel.basic_consume(queue, lambda _ch, _m, props, body: on_reply(props, body),
                                           auto_ack=True)
        self._impl.set_fast_deliveries(self.channel_number, ctag, fast)

    def prepare(self, queue: str, reply_to: str, accept: str) -> None:
        """Encode the constant part of the requests to ``queue`` (mandatory, replies to ``reply_to``)."""
        self._encoder = RequestEncoder(self.channel_number, self._impl.body_max_length() + FRAME_OVERHEAD, queue,
                                       reply_to, accept, mandatory=True)

    def _raise_closed(self) -> None:
        """Raise why the connection closed, cleaning up as ``BlockingConnection._flush_output`` does."""
        closed = self._conn._closed_result
        if closed.ready:
            error = closed.value.error
            self._conn._cleanup()
            if not isinstance(error, pika.exceptions.ConnectionClosedByClient):
                raise error
        raise pika.exceptions.ConnectionWrongStateError("the connection is closed")

    def publish(self, correlation_id: str, expiration: str, deadline_ms: int, body: bytes) -> None:
        """Queue one request; it goes out at the next :meth:`flush` (or :meth:`wait`)."""
        if not self._channel.is_open:
            if self._impl.is_closed:
                self._raise_closed()
            raise pika.exceptions.ChannelWrongStateError("the channel is closed")
        pieces = self._encoder.frames(correlation_id, expiration, deadline_ms, body)
        self._impl.write_frames(pieces, frame_count(pieces), schedule=False)

    def flush(self) -> None:
        """Write the queued requests now."""
        if self._impl._out:
            self._impl.flush()

    def wait(self, timeout: float, done: Callable[[], Any]) -> None:
        """Serve the connection until ``done()`` or ``timeout`` seconds, like
        ``process_data_events(timeout)`` but returning as soon as ``done()`` (which the fast handlers
        make true; pika would not know). pika's own events are then dispatched as it would."""
        conn, ioloop = self._conn, self._ioloop
        if conn.is_closed:
            self._raise_closed()
        self.flush()
        fired: list = []
        timer = ioloop.call_later(timeout, lambda: fired.append(True))
        closed = conn._closed_result
        try:
            while not (done() or fired or closed.ready or conn._channels_pending_dispatch or conn._ready_events):
                ioloop.poll()
                ioloop.process_timeouts()
        finally:
            ioloop.remove_timeout(timer)
        if closed.ready and not done():  # replies that came with the close are handed over first
            self._raise_closed()
        if conn._channels_pending_dispatch or conn._ready_events:
            conn.process_data_events(0)  # pika's consumer and return callbacks


# ----------------------------------------------------------------------------- the self-check


class Loopback:
    """A real :class:`CoalescingConnection` (pika's transport, I/O loop and frame machinery) wired
    over a socketpair to a fake broker run by the caller: ``send`` writes broker frames, ``recv``
    reads what the connection wrote, ``spin`` runs the I/O loop until a condition holds.

    Used by :func:`self_check` at startup and by the tests; no network, no broker.
    """

    def __init__(self, connection_class: type = None, frame_max: int = 131072, **kwargs: Any) -> None:
        cls = connection_class or CoalescingConnection
        self.ioloop = IOLoop()
        self.peer, sock = socket.socketpair()
        self.peer.setblocking(False)
        sock.setblocking(False)  # pika's connector would have made it non-blocking
        self.opened = self.open_error = self.closed = None
        self.frame_max = frame_max
        params = pika.ConnectionParameters(heartbeat=0, frame_max=frame_max)
        self.connection = cls(
            parameters=params, custom_ioloop=self.ioloop, internal_connection_workflow=False,
            on_open_callback=lambda c: setattr(self, "opened", c),
            on_open_error_callback=lambda c, e: setattr(self, "open_error", e),
            on_close_callback=lambda c, e: setattr(self, "closed", e), **kwargs)
        from pika.adapters.base_connection import _StreamingProtocolShim

        done: list = []
        self.connection._nbio.create_streaming_connection(
            functools.partial(_StreamingProtocolShim, self.connection), sock, done.append)
        self.spin(lambda: done, what="the transport")
        if isinstance(done[0], BaseException):
            raise done[0]
        self._received = bytearray()

    def spin(self, condition: Callable[[], Any], timeout: float = 2.0, what: str = "the condition") -> None:
        deadline = time.monotonic() + timeout
        self.ioloop.activate_poller()
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            wake = self.ioloop.call_later(0.05, lambda: None)  # poll() would wait for I/O without end
            self.ioloop.poll()
            self.ioloop.process_timeouts()
            self.ioloop.remove_timeout(wake)
        self.ioloop.deactivate_poller()

    def send(self, data: bytes) -> None:
        self.peer.sendall(data)

    def send_method(self, channel: int, method) -> None:
        self.send(pika.frame.Method(channel, method).marshal())

    def recv(self) -> bytes:
        """Everything the connection has written so far (and not returned before)."""
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._received += chunk
        data, self._received = bytes(self._received), bytearray()
        return data

    def frames(self, condition: Callable[[list], bool], what: str) -> list:
        """Decoded frames the connection writes, read until ``condition(frames)``."""
        buf = b""
        frames: list = []

        def more() -> bool:
            nonlocal buf
            buf += self.recv()
            while True:
                used, value = pika.frame.decode_frame(buf)
                if not value:
                    break
                frames.append(value)
                buf = buf[used:]
            return condition(frames)

        self.spin(more, what=what)
        return frames

    def handshake(self) -> None:
        """Protocol header, start, tune, open: the connection is open afterwards."""
        header = bytearray()
        self.spin(lambda: header.extend(self.recv()) or len(header) >= 8, what="the protocol header")
        if bytes(header) != pika.frame.ProtocolHeader().marshal():
            raise AssertionError(f"unexpected protocol header {bytes(header)!r}")
        self.send_method(0, spec.Connection.Start(server_properties={"product": "loopback"},
                                                  mechanisms="PLAIN", locales="en_US"))
        self.frames(lambda fs: any(isinstance(f.method, spec.Connection.StartOk) for f in fs), "start-ok")
        self.send_method(0, spec.Connection.Tune(channel_max=16, frame_max=self.frame_max, heartbeat=0))
        self.frames(lambda fs: any(isinstance(f.method, spec.Connection.Open) for f in fs), "open")
        self.send_method(0, spec.Connection.OpenOk())
        self.spin(lambda: self.opened is not None or self.open_error is not None, what="the connection to open")
        if self.open_error is not None:
            raise self.open_error

    def close(self) -> None:
        try:
            transport = self.connection._transport
            if transport is not None:
                transport.abort()
        finally:
            self.peer.close()
            self.ioloop.close()


def _delivery(channel: int, tag: int, ctag: str, props: spec.BasicProperties, body: bytes, frame_max: int) -> bytes:
    out = [pika.frame.Method(channel, spec.Basic.Deliver(consumer_tag=ctag, delivery_tag=tag, redelivered=tag == 2,
                                                         exchange="", routing_key="q")).marshal(),
           pika.frame.Header(channel, len(body), props).marshal()]
    step = frame_max - FRAME_OVERHEAD
    out += [pika.frame.Body(channel, body[i:i + step]).marshal() for i in range(0, len(body), step)]
    return b"".join(out)


def _exercise(loop: Loopback) -> None:
    """Drive a connection through what the worker's fast wire relies on; raise AssertionError if
    something does not work as expected."""
    conn = loop.connection
    loop.handshake()
    opened: list = []
    conn.channel(on_open_callback=opened.append)
    loop.frames(lambda fs: any(isinstance(f.method, spec.Channel.Open) for f in fs), "channel.open")
    loop.send_method(1, spec.Channel.OpenOk())
    loop.spin(lambda: opened, what="the channel to open")
    channel = opened[0]
    assert conn.body_max_length() == loop.frame_max - FRAME_OVERHEAD, "the negotiated frame size is not seen"

    got: list = []
    consuming: list = []
    ctag = channel.basic_consume("q", lambda *a: got.append(("pika",) + a), auto_ack=False, callback=consuming.append)
    loop.frames(lambda fs: any(isinstance(f.method, spec.Basic.Consume) for f in fs), "basic.consume")
    loop.send_method(1, spec.Basic.ConsumeOk(consumer_tag=ctag))
    loop.spin(lambda: consuming, what="consume-ok")
    conn.set_fast_deliveries(channel.channel_number, ctag, lambda d: got.append(("fast", d)))
    props = spec.BasicProperties(reply_to="replies", correlation_id="c", headers={"x-deadline-ms": 1})
    body = bytes(range(256)) * 3
    stream = b"".join(_delivery(1, tag, ctag, props, body, loop.frame_max) for tag in (1, 2, 3))
    before = conn.bytes_received
    loop.send(stream[:50])  # a delivery split over reads, with a heartbeat between
    loop.spin(lambda: conn._frame_buffer, what="the first part to be buffered")
    loop.send(stream[50:] + pika.frame.Heartbeat().marshal())
    loop.spin(lambda: len(got) == 3, what="three deliveries")
    assert [(kind, d.delivery_tag, d.redelivered, d.body) for kind, d in got] == [
        ("fast", t, t == 2, body) for t in (1, 2, 3)], "deliveries not decoded by the fast path"
    assert got[0][1].properties.headers == {"x-deadline-ms": 1}
    assert conn.bytes_received - before == len(stream) + 8, f"received bytes not counted: {conn.bytes_received - before} of {len(stream) + 8}"
    assert not conn._frame_buffer, "bytes left in pika's frame buffer"

    # Other frames on the way in go to pika: a delivery to another consumer, split over reads.
    conn.clear_fast_deliveries()
    other = _delivery(1, 4, ctag, props, b"x", loop.frame_max)
    loop.send(other[:9])
    loop.spin(lambda: conn._frame_buffer, what="pika to buffer a partial frame")
    conn.set_fast_deliveries(channel.channel_number, ctag, lambda d: got.append(("fast", d)))
    loop.send(other[9:])
    loop.spin(lambda: len(got) == 4, what="the fourth delivery")
    assert got[3][1].delivery_tag == 4 and not conn._frame_buffer, "a partial frame was lost or doubled"
    conn.clear_fast_deliveries()
    loop.send(_delivery(1, 5, ctag, props, b"y", loop.frame_max))
    loop.spin(lambda: len(got) == 5, what="a delivery through pika")
    assert got[4][0] == "pika" and got[4][2].delivery_tag == 5 and got[4][4] == b"y", "pika's own path broke"

    # The way out: a reply written by us, then an ack by pika, in that order, in one write.
    reply = encode_reply(1, "replies", b"r" * 300_000, loop.frame_max, content_type="text/plain",
                         correlation_id="c")
    conn.write_frames(reply, frame_count(reply))
    channel.basic_ack(3, multiple=True)
    out = loop.frames(lambda fs: any(isinstance(f, pika.frame.Method) and isinstance(f.method, spec.Basic.Ack)
                                     for f in fs), "the reply and the ack")
    kinds = [type(f.method).__name__ if isinstance(f, pika.frame.Method) else type(f).__name__ for f in out]
    assert kinds == ["Publish", "Header"] + ["Body"] * 3 + ["Ack"], f"frames out of order or missing: {kinds}"
    assert b"".join(f.fragment for f in out if isinstance(f, pika.frame.Body)) == b"r" * 300_000
    # A heartbeat (pika's own frame) still goes out, through the same coalescing path.
    conn._send_frame(pika.frame.Heartbeat())
    loop.frames(lambda fs: any(isinstance(f, pika.frame.Heartbeat) for f in fs), "a heartbeat")


def self_check() -> str | None:
    """None when :class:`CoalescingConnection` works with the installed pika; else what went wrong."""
    loop = None
    try:
        loop = Loopback()
        _exercise(loop)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use the fast wire
        return f"{type(exc).__name__}: {exc}"
    finally:
        if loop is not None:
            try:
                loop.close()
            except Exception:  # noqa: BLE001 - closing a check's sockets
                pass
    return None




# ----------------------------------------------------------------------------- the clients' self-check

_REPLY_TO = "amq.rabbitmq.reply-to"
_BIG = 70000  # over _FAST_BODY_MAX: this reply goes through pika's own consumer path


class _FakeBroker:
    """Just enough of a broker, on a TCP port of 127.0.0.1, in a thread, for one client connection
    to run the clients' fast wire through: handshake, channel, confirm mode, a reply consumer, two
    requests in, then an ack, a nack, two replies (one small, one over 64 KiB), one reply that does
    not decode, and the close. ``error`` says what went wrong on its side."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5)
        self.port = self.listener.getsockname()[1]
        self.error: str | None = None
        self.requests: list = []
        self._buf = b""
        self._thread = threading.Thread(target=self._run, name="fastfib-seam-check", daemon=True)
        self._thread.start()

    def _frames(self, sock: socket.socket, until: Callable[[Any], bool]) -> list:
        frames: list = []
        while True:
            while True:
                used, value = pika.frame.decode_frame(self._buf)
                if not value:
                    break
                self._buf = self._buf[used:]
                frames.append(value)
                if until(value):
                    return frames
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the client closed the connection")
            self._buf += chunk

    def _method(self, sock: socket.socket, cls: type | tuple) -> Any:
        frames = self._frames(sock, lambda f: isinstance(f, pika.frame.Method) and isinstance(f.method, cls))
        return frames[-1].method

    def _run(self) -> None:
        sock = None
        try:
            sock, _ = self.listener.accept()
            sock.settimeout(5)
            header = b""
            while len(header) < 8:
                header += sock.recv(8 - len(header))
            send = sock.sendall

            def method(channel: int, value: Any) -> bytes:
                return pika.frame.Method(channel, value).marshal()

            send(method(0, spec.Connection.Start(
                server_properties={"product": "check", "capabilities": {"publisher_confirms": True,
                                                                          "basic.nack": True}},
                mechanisms="PLAIN", locales="en_US")))
            self._method(sock, spec.Connection.StartOk)
            send(method(0, spec.Connection.Tune(channel_max=16, frame_max=131072, heartbeat=0)))
            self._method(sock, spec.Connection.Open)
            send(method(0, spec.Connection.OpenOk()))
            self._method(sock, spec.Channel.Open)
            send(method(1, spec.Channel.OpenOk()))
            self._method(sock, spec.Confirm.Select)
            send(method(1, spec.Confirm.SelectOk()))
            consume = self._method(sock, spec.Basic.Consume)
            ctag = consume.consumer_tag
            send(method(1, spec.Basic.ConsumeOk(consumer_tag=ctag)))
            frames = self._frames(sock, lambda f: isinstance(f, pika.frame.Body) and f.fragment == b"21")
            self.requests = [f for f in frames if not isinstance(f, pika.frame.Heartbeat)]
            out = [method(1, spec.Basic.Ack(delivery_tag=1)), method(1, spec.Basic.Nack(delivery_tag=2))]
            for tag, corr, body in ((1, "c1", b"6765"), (2, "c2", b"x" * _BIG)):
                out.append(_delivery(1, tag, ctag, spec.BasicProperties(content_type="text/plain",
                                                                        correlation_id=corr), body, 131072))
            out.append(method(1, spec.Basic.Deliver(consumer_tag=ctag, delivery_tag=3, exchange="",
                                                    routing_key=_REPLY_TO)))
            # A content header whose headers table holds an unknown field type ('Z'): it does not decode.
            table = b"\x01kZ"
            props = (struct.pack(">HI", 0x2000 | 0x0400, len(table)) + table + b"\x02c3")
            payload = struct.pack(">HHQ", 60, 0, 1) + props
            out.append(struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce")
            out.append(pika.frame.Body(1, b"!").marshal())
            send(b"".join(out))
            while True:  # the client may cancel its consumer and close its channel, then the connection
                closing = self._method(sock, (spec.Basic.Cancel, spec.Channel.Close, spec.Connection.Close))
                if isinstance(closing, spec.Connection.Close):
                    send(method(0, spec.Connection.CloseOk()))
                    break
                if isinstance(closing, spec.Basic.Cancel):
                    send(method(1, spec.Basic.CancelOk(consumer_tag=closing.consumer_tag)))
                else:
                    send(method(1, spec.Channel.CloseOk()))
        except Exception as exc:  # noqa: BLE001 - reported by the check
            self.error = f"fake broker: {type(exc).__name__}: {exc}"
        finally:
            if sock is not None:
                sock.close()
            self.listener.close()

    def join(self) -> None:
        self._thread.join(10)


class _Collected:
    """What the client side of the check saw."""

    def __init__(self) -> None:
        self.acks: list = []
        self.nacks: list = []
        self.replies: list = []
        self.bad: list = []

    def on_reply(self, props: Any, body: bytes) -> None:
        self.replies.append((props.correlation_id, props.content_type, body))

    def done(self) -> bool:
        return len(self.replies) == 2 and bool(self.bad and self.acks and self.nacks)

    def verify(self, broker: _FakeBroker) -> None:
        if broker.error:
            raise AssertionError(broker.error)
        expected = b"".join(b"".join(encode_request(1, "q", body, 131072, reply_to=_REPLY_TO, correlation_id=corr,
                                                    expiration="5000", mandatory=True,
                                                    headers={"accept": "text/plain", "x-deadline-ms": 2**40}))
                            for corr, body in (("c1", b"20"), ("c2", b"21")))
        got = b"".join(f.marshal() for f in broker.requests)
        assert got == expected, "the requests written are not pika's bytes"
        assert self.acks == [(1, False)] and self.nacks == [(2, False)], f"confirms: {self.acks} {self.nacks}"
        assert sorted(self.replies) == [("c1", "text/plain", b"6765"), ("c2", "text/plain", b"x" * _BIG)], \
            f"replies: {[(c, t, len(b)) for c, t, b in self.replies]}"
        assert [b.correlation_id for b in self.bad] == ["c3"], f"undecodable reply: {self.bad}"


def _check_blocking() -> None:
    broker = _FakeBroker()
    seen = _Collected()
    params = pika.ConnectionParameters("127.0.0.1", broker.port, heartbeat=0, connection_attempts=1,
                                       socket_timeout=5, stack_timeout=5)
    conn = ClientWire.connect(params)
    try:
        assert type(conn._impl) is CoalescingConnection, "pika did not use the implementation class given"
        wire = ClientWire(conn, conn.channel())
        wire.confirm_select(lambda t, m: seen.acks.append((t, m)), lambda t, m: seen.nacks.append((t, m)), 5.0)
        wire.consume(_REPLY_TO, seen.on_reply, seen.bad.append)
        wire.prepare("q", _REPLY_TO, "text/plain")
        wire.publish("c1", "5000", 2**40, b"20")
        wire.publish("c2", "5000", 2**40, b"21")
        deadline = time.monotonic() + 5
        while not seen.done() and time.monotonic() < deadline:
            wire.wait(deadline - time.monotonic(), seen.done)
    finally:
        _close_quietly(conn)
    broker.join()
    seen.verify(broker)


def _check_asyncio() -> None:
    import asyncio

    async def run(broker: _FakeBroker, seen: _Collected) -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future = loop.create_future()
        closed: asyncio.Future = loop.create_future()

        def fail(_conn: Any, exc: Any) -> None:
            if not opened.done():
                opened.set_exception(exc if isinstance(exc, BaseException) else RuntimeError(str(exc)))

        conn = AsyncioCoalescingConnection(
            pika.ConnectionParameters("127.0.0.1", broker.port, heartbeat=0, connection_attempts=1,
                                      socket_timeout=5, stack_timeout=5),
            on_open_callback=opened.set_result, on_open_error_callback=fail,
            on_close_callback=lambda c, e: closed.done() or closed.set_result(e), custom_ioloop=loop)
        await asyncio.wait_for(opened, 5)
        try:
            step: asyncio.Future = loop.create_future()
            conn.channel(on_open_callback=step.set_result)
            channel = await asyncio.wait_for(step, 5)
            step = loop.create_future()

            def on_confirm(frame: Any) -> None:
                m = frame.method
                (seen.nacks if isinstance(m, spec.Basic.Nack) else seen.acks).append((m.delivery_tag, m.multiple))

            channel.confirm_delivery(on_confirm, callback=step.set_result)
            await asyncio.wait_for(step, 5)
            conn.set_fast_acks(channel.channel_number, lambda t, m: seen.acks.append((t, m)))
            step = loop.create_future()
            ctag = channel.basic_consume(_REPLY_TO, lambda _c, _m, p, b: seen.on_reply(p, b), auto_ack=True,
                                         callback=step.set_result)
            await asyncio.wait_for(step, 5)
            conn.set_fast_deliveries(channel.channel_number, ctag,
                                     lambda d: seen.bad.append(d) if type(d) is BadDelivery
                                     else seen.on_reply(d.properties, d.body))
            encoder = RequestEncoder(channel.channel_number, conn.body_max_length() + FRAME_OVERHEAD, "q", _REPLY_TO,
                                     "text/plain", mandatory=True)
            for corr, body in (("c1", b"20"), ("c2", b"21")):
                pieces = encoder.frames(corr, "5000", 2**40, body)
                conn.write_frames(pieces, frame_count(pieces))
            deadline = loop.time() + 5
            while not seen.done() and loop.time() < deadline:
                await asyncio.sleep(0.002)
            step = loop.create_future()
            channel.basic_cancel(ctag, callback=step.set_result)  # else pika logs the late CancelOk of its close
            await asyncio.wait_for(step, 5)
        finally:
            if not (conn.is_closed or conn.is_closing):
                conn.close()
            try:
                await asyncio.wait_for(closed, 5)
            except asyncio.TimeoutError:
                pass  # the check's verdict is the assertions'; a slow close is not one

    def in_thread() -> None:  # a loop of its own, in a thread of its own: the caller may be running one
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(run(broker, seen))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            failure.append(exc)
        finally:
            loop.close()

    broker = _FakeBroker()
    seen = _Collected()
    failure: list = []
    thread = threading.Thread(target=in_thread, name="fastfib-seam-check-asyncio", daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        raise AssertionError("the asyncio check did not finish")
    if failure:
        raise failure[0]
    broker.join()
    seen.verify(broker)


def _close_quietly(conn: Any) -> None:
    try:
        if conn.is_open:
            conn.close()
    except Exception:  # noqa: BLE001 - the check's verdict comes from its assertions
        pass


def client_self_check() -> str | None:
    """None when the clients' fast wire (:class:`ClientWire` on a BlockingConnection, and
    :class:`AsyncioCoalescingConnection`) works with the installed pika; else what went wrong.

    Each runs against a fake broker on a loopback TCP port (:class:`_FakeBroker`): the requests
    written must be pika's bytes, and the confirms and replies (fast, over 64 KiB through pika,
    undecodable) must reach their handlers.
    """
    for name, check in (("blocking", _check_blocking), ("asyncio", _check_asyncio)):
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - any failure means: use pika's public API
            return f"{name}: {type(exc).__name__}: {exc}"
    return None
