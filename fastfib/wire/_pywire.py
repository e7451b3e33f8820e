"""The pure-Python AMQP codec of the hot path: bytes in, bytes out, no I/O.

:class:`ReplyEncoder` encodes a success reply's frames; :func:`parse_delivery`
decodes a basic.deliver with its content header and body frames.
"""

from __future__ import annotations

import struct

import pika.exceptions
from pika.data import decode_table

from .. import protocol

_FRAME_END = b"\xce"
_PACK_FRAME_HEADER = struct.Struct(">BHI").pack  # frame type, channel, payload size
_PACK_CONTENT_HEADER = struct.Struct(">HHQH").pack  # class 60 (basic), weight 0, body size, property flags
_FLAG_CONTENT_TYPE = 0x8000
_FLAG_CORRELATION_ID = 0x0400


class ReplyEncoder:
    """Encodes a success reply's three frames (basic.publish, content header, body) directly.

    The bytes are exactly what pika's ``basic_publish`` would marshal for
    ``basic_publish("", reply_to, body, BasicProperties(content_type=...,
    correlation_id=...))`` (``tests/test_server_unit.py`` compares them), at a
    fraction of the cost: the publish method frame is cached per ``reply_to``
    (a Direct Reply-to client or a tutorial client reuses one name), and the
    header is two ``struct`` packs. Error replies, rare, still go through pika.
    """

    __slots__ = ("channel_number", "body_max", "_methods")

    def __init__(self, channel_number: int, body_max: int) -> None:
        self.channel_number = channel_number
        self.body_max = body_max
        self._methods: dict[str, bytes] = {}

    def _method_frame(self, reply_to: str) -> bytes:
        frame = self._methods.get(reply_to)
        if frame is None:
            key = reply_to.encode("utf-8")
            if len(key) > 255:
                raise ValueError(f"reply_to is {len(key)} bytes; a short string holds at most 255")
            # basic.publish (60, 40): reserved-1 short 0, exchange "" (shortstr), routing key (shortstr), bits 0
            payload = b"\x00\x3c\x00\x28\x00\x00\x00" + bytes((len(key),)) + key + b"\x00"
            frame = _PACK_FRAME_HEADER(1, self.channel_number, len(payload)) + payload + _FRAME_END
            if len(self._methods) >= 1024:
                self._methods.clear()
            self._methods[reply_to] = frame
        return frame

    def frames(self, reply_to: str, content_type: bytes, correlation_id, body: bytes) -> list[bytes]:
        """The pieces to write, in order; ``content_type`` is the property already as a short string."""
        channel = self.channel_number
        size = len(body)
        if correlation_id is None:
            payload = _PACK_CONTENT_HEADER(60, 0, size, _FLAG_CONTENT_TYPE) + content_type
        else:
            cid = correlation_id.encode("utf-8") if isinstance(correlation_id, str) else correlation_id
            payload = (_PACK_CONTENT_HEADER(60, 0, size, _FLAG_CONTENT_TYPE | _FLAG_CORRELATION_ID)
                       + content_type + bytes((len(cid),)) + cid)
        pieces = [self._method_frame(reply_to), _PACK_FRAME_HEADER(2, channel, len(payload)) + payload + _FRAME_END]
        body_max = self.body_max
        if size <= body_max:
            pieces += (_PACK_FRAME_HEADER(3, channel, size), body, _FRAME_END)
        else:
            view = memoryview(body)
            for start in range(0, size, body_max):
                chunk = view[start:start + body_max]
                pieces += (_PACK_FRAME_HEADER(3, channel, len(chunk)), chunk, _FRAME_END)
        return pieces


#: content_type property values, encoded as AMQP short strings.
CONTENT_TYPE_SHORTSTR = {fmt: bytes((len(ct),)) + ct.encode() for fmt, ct in protocol.CONTENT_TYPES.items()}


_UNPACK_FRAME_HEADER = struct.Struct(">BHI").unpack_from
_UNPACK_CONTENT_HEADER = struct.Struct(">HHQH").unpack_from
_UNPACK_U64 = struct.Struct(">Q").unpack_from
_BASIC_DELIVER = b"\x00\x3c\x00\x3c"  # class 60 (basic), method 60 (deliver)
#: Deliveries with a larger body are left to pika (a valid request is at most 64 bytes).
_FAST_BODY_MAX = 65536
INCOMPLETE = object()


class RequestProperties:
    """The three properties a request's handling reads, as pika would decode them."""

    __slots__ = ("reply_to", "correlation_id", "headers")

    def __init__(self, reply_to, correlation_id, headers) -> None:
        self.reply_to = reply_to
        self.correlation_id = correlation_id
        self.headers = headers


def _shortstr(buf: bytes, p: int):
    """A short string at ``p`` and the offset after it, decoded as pika does (str, or bytes if not UTF-8)."""
    end = p + 1 + buf[p]
    value = buf[p + 1:end]
    try:
        value = value.decode("utf-8")
    except UnicodeDecodeError:
        pass
    return value, end


def _parse_properties(buf: bytes, p: int, end: int, flags: int) -> RequestProperties | None:
    """Basic properties in ``buf[p:end]``; None for what this parser leaves to pika."""
    if flags & 0x0001:  # a second flag word: never sent by clients we know of
        return None
    headers = correlation_id = reply_to = None
    if flags & 0x8000:  # content_type
        p += 1 + buf[p]
    if flags & 0x4000:  # content_encoding
        p += 1 + buf[p]
    if flags & 0x2000:
        headers, p = decode_table(buf, p)
    if flags & 0x1000:  # delivery_mode
        p += 1
    if flags & 0x0800:  # priority
        p += 1
    if flags & 0x0400:
        correlation_id, p = _shortstr(buf, p)
    if flags & 0x0200:
        reply_to, p = _shortstr(buf, p)
    for flag in (0x0100, 0x0080):  # expiration, message_id
        if flags & flag:
            p += 1 + buf[p]
    if flags & 0x0040:  # timestamp
        p += 8
    for flag in (0x0020, 0x0010, 0x0008, 0x0004):  # type, user_id, app_id, cluster_id
        if flags & flag:
            p += 1 + buf[p]
    if p != end:
        return None
    return RequestProperties(reply_to, correlation_id, headers)


def parse_delivery(buf: bytes, pos: int, channel_number: int, consumer_tag: bytes):
    """Decode the basic.deliver at ``buf[pos]`` and its content, if all of it is in ``buf``.

    Returns ``(delivery_tag, properties, body, next_pos, frames)``; :data:`INCOMPLETE`
    when more bytes are needed; None when it is not a delivery this fast path
    takes (another consumer tag, another channel, a large body, anything
    unusual): pika then processes it frame by frame as usual.
    """
    n = len(buf)
    try:
        _, _, size = _UNPACK_FRAME_HEADER(buf, pos)
        end = pos + 7 + size  # the frame-end octet of the method frame
        p = pos + 11
        tag_len = buf[p]
        if buf[p + 1:p + 1 + tag_len] != consumer_tag:
            return None
        p += 1 + tag_len
        (delivery_tag,) = _UNPACK_U64(buf, p)
        p += 9  # delivery tag, redelivered
        p += 1 + buf[p]  # exchange
        p += 1 + buf[p]  # routing key
        if p != end:
            return None
        h = end + 1
        if n - h < 8:
            return INCOMPLETE
        ftype, ch, size = _UNPACK_FRAME_HEADER(buf, h)
        if ftype != 2 or ch != channel_number:
            return None
        hend = h + 7 + size
        if hend >= n:
            return INCOMPLETE
        if buf[hend] != 0xCE or size < 14:
            return None
        class_id, _, body_size, flags = _UNPACK_CONTENT_HEADER(buf, h + 7)
        if class_id != 60 or body_size > _FAST_BODY_MAX:
            return None
        props = _parse_properties(buf, h + 21, hend, flags)
        if props is None:
            return None
        b = hend + 1
        frames = 2
        parts = []
        got = 0
        while got < body_size:
            if n - b < 8:
                return INCOMPLETE
            ftype, ch, size = _UNPACK_FRAME_HEADER(buf, b)
            if ftype != 3 or ch != channel_number:
                return None
            bend = b + 7 + size
            if bend >= n:
                return INCOMPLETE
            if buf[bend] != 0xCE:
                return None
            parts.append(buf[b + 7:bend])
            got += size
            b = bend + 1
            frames += 1
        if got != body_size:
            return None
    except (IndexError, struct.error, pika.exceptions.AMQPError, ValueError):
        return None  # malformed: pika's own decoder reports it
    body = parts[0] if len(parts) == 1 else b"".join(parts)
    return delivery_tag, props, body, b, frames
