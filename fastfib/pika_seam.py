"""The one module that uses pika's private API: the worker's connection on the hot path.

:class:`CoalescingConnection` is a :class:`pika.SelectConnection` that decodes
the worker's own deliveries with :mod:`fastfib.wire` and writes each I/O loop
turn's frames with one ``send``. Everything else is pika's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pika.frame

from .wire import INCOMPLETE, decode_delivery

try:  # for the direct send of CoalescingConnection._flush (plain TCP only; TLS goes through pika)
    from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport as _PlaintextTransport
except ImportError:  # pragma: no cover - another pika layout: pika's own writes only
    _PlaintextTransport = None


_UNPACK_FRAME_HEADER = struct.Struct(">BHI").unpack_from
_BASIC_DELIVER = b"\x00\x3c\x00\x3c"  # class 60 (basic), method 60 (deliver)
#: Deliveries with a larger body are left to pika (a valid request is at most 64 bytes): a large one
#: arriving over many reads would be decoded again from its start at each read.
_FAST_BODY_MAX = 65536


class CoalescingConnection(pika.SelectConnection):
    """A SelectConnection that writes one I/O loop turn's frames with one send(2).

    pika hands every frame to its transport separately, and the transport
    sends each queued chunk with a system call of its own: a reply is three
    frames (method, header, body), so three ``send`` calls, plus one per ack.
    Measured under load, those calls were the largest single cost of a worker.
    This subclass collects what pika outputs during a loop turn and writes it
    as one chunk in a timer at the end of the turn, after ``before_flush``
    (the worker's batched acknowledgements) has added its frames. Order is
    kept, so a reply still reaches the broker before the ack of its request.

    It overrides ``Connection._output_marshaled_frames``, a private method that
    every outgoing frame goes through in pika 1.x (``tests/test_server_unit.py``
    checks it is still there).
    """

    def __init__(self, *args: Any, before_flush: Callable[[], None] | None = None, **kwargs: Any) -> None:
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._before_flush = before_flush
        self._fast: tuple[int, bytes, Callable] | None = None
        super().__init__(*args, **kwargs)

    def set_fast_deliveries(self, channel_number: int, consumer_tag: str, handler: Callable) -> None:
        """Decode the deliveries to ``consumer_tag`` on ``channel_number`` here and call
        ``handler(delivery)`` (a :class:`fastfib.wire.Delivery`, or a :class:`fastfib.wire.BadDelivery`
        to settle), bypassing pika's generic frame machinery
        (which costs more than everything else a small request needs). Everything else,
        and any delivery this decoder does not take, goes through pika as usual."""
        self._fast = (channel_number, consumer_tag.encode("utf-8"), handler)

    def clear_fast_deliveries(self) -> None:
        self._fast = None

    def _on_data_available(self, data_in: bytes) -> None:
        if self._fast is None and not self._frame_buffer:
            super()._on_data_available(data_in)
            return
        buf = self._frame_buffer + data_in if self._frame_buffer else data_in
        self._frame_buffer = b""
        pos, n = 0, len(buf)
        while n - pos >= 8:
            fast = self._fast
            if fast is None:  # switched off meanwhile (consumer cancelled): pika takes the rest
                super()._on_data_available(buf[pos:])
                return
            ftype, channel_number, size = _UNPACK_FRAME_HEADER(buf, pos)
            end = pos + 7 + size
            if end >= n:
                break
            if ftype == 1 and channel_number == fast[0] and buf[pos + 7:pos + 11] == _BASIC_DELIVER:
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

    def write_frames(self, pieces: list, frames: int) -> None:
        """Queue already-marshaled bytes (``pieces`` making up ``frames`` whole frames)."""
        if self.is_closed:
            raise pika.exceptions.ConnectionWrongStateError("the connection is closed")
        for piece in pieces:
            self.bytes_sent += len(piece)
        self.frames_sent += frames
        self._out.extend(pieces)
        if not self._flush_scheduled:
            self.request_flush()

    def body_max_length(self) -> int:
        """The largest body frame payload, as negotiated (frame_max minus the frame's 8 bytes of framing)."""
        return self._body_max_length or (self.params.frame_max - 8)

    def request_flush(self) -> None:
        """Run ``before_flush`` and write what is buffered at the end of this loop turn."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.ioloop.call_later(0, self._flush)

    def _flush(self) -> None:
        if self._before_flush is not None:
            self._before_flush()
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        data = b"".join(out)
        out.clear()
        transport = self._transport
        if transport is None:
            return
        if (_PlaintextTransport is not None and type(transport) is _PlaintextTransport
                and transport._state == transport._STATE_ACTIVE and not transport.get_write_buffer_size()):
            # Nothing queued before us: send now, as asyncio's transports do, instead of
            # waiting one more epoll round for writability. Whatever the kernel does not
            # take (or an error, which pika then meets and handles) goes the usual way.
            try:
                sent = transport._sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self._adapter_emit_data(data)
