"""The pure-Python AMQP 0-9-1 codec of fastfib's hot path: bytes in, bytes out, no I/O.

Decoding and encoding follow pika 1.4's own marshalling (``pika.data``,
``pika.spec``, ``pika.frame``) value for value and byte for byte, including
its quirks (a float or double header value decodes to an int; a short string
that is not UTF-8 decodes to bytes); ``tests/test_wire.py`` checks both
against pika. pika itself is not imported here.
"""

from __future__ import annotations

import decimal
import struct
from datetime import datetime, timezone
from typing import Any

from .. import protocol

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
#: Bytes of framing around a frame's payload (type, channel, size; frame-end).
FRAME_OVERHEAD = 8

_FRAME_END = b"\xce"
_PACK_FRAME_HEADER = struct.Struct(">BHI").pack  # frame type, channel, payload size
_UNPACK_FRAME_HEADER = struct.Struct(">BHI").unpack_from
_PACK_CONTENT_HEADER = struct.Struct(">HHQH").pack  # class 60 (basic), weight 0, body size, property flags
_UNPACK_CONTENT_HEADER = struct.Struct(">HHQH").unpack_from
_UNPACK_U16 = struct.Struct(">H").unpack_from
_UNPACK_U32 = struct.Struct(">I").unpack_from
_UNPACK_U64 = struct.Struct(">Q").unpack_from
_BASIC_DELIVER = b"\x00\x3c\x00\x3c"  # class 60 (basic), method 60 (deliver)
_BASIC_PUBLISH = b"\x00\x3c\x00\x28"  # class 60 (basic), method 40 (publish)

#: basic property flags, in wire order (the first flag word).
_FLAG_CONTENT_TYPE = 0x8000
_FLAG_CONTENT_ENCODING = 0x4000
_FLAG_HEADERS = 0x2000
_FLAG_DELIVERY_MODE = 0x1000
_FLAG_PRIORITY = 0x0800
_FLAG_CORRELATION_ID = 0x0400
_FLAG_REPLY_TO = 0x0200
_FLAG_EXPIRATION = 0x0100
_FLAG_MESSAGE_ID = 0x0080
_FLAG_TIMESTAMP = 0x0040
_FLAG_TYPE = 0x0020
_FLAG_USER_ID = 0x0010
_FLAG_APP_ID = 0x0008
_FLAG_CLUSTER_ID = 0x0004

#: Returned by :func:`decode_delivery` when ``buf`` does not hold the whole delivery yet.
INCOMPLETE: Any = type("Incomplete", (), {"__repr__": lambda self: "INCOMPLETE", "__slots__": ()})()


class EncodeError(ValueError):
    """A value that AMQP (as pika encodes it) cannot carry: a short string over 255 bytes, a float..."""


# ------------------------------------------------------------------------------ properties

_PROPERTY_NAMES = ("content_type", "content_encoding", "headers", "delivery_mode", "priority", "correlation_id",
                   "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id", "cluster_id")


class Properties:
    """The basic properties of a message, as pika's ``BasicProperties`` holds them (None: absent)."""

    # No __slots__: the class attributes are the defaults, so a decoder sets only what is present.
    content_type = content_encoding = headers = delivery_mode = priority = correlation_id = reply_to = None
    expiration = message_id = timestamp = type = user_id = app_id = cluster_id = None

    def __init__(self, content_type=None, content_encoding=None, headers=None, delivery_mode=None, priority=None,
                 correlation_id=None, reply_to=None, expiration=None, message_id=None, timestamp=None, type=None,
                 user_id=None, app_id=None, cluster_id=None) -> None:
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.headers = headers
        self.delivery_mode = delivery_mode
        self.priority = priority
        self.correlation_id = correlation_id
        self.reply_to = reply_to
        self.expiration = expiration
        self.message_id = message_id
        self.timestamp = timestamp
        self.type = type
        self.user_id = user_id
        self.app_id = app_id
        self.cluster_id = cluster_id

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _PROPERTY_NAMES}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Properties) and self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment] - mutable

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items() if v is not None)
        return f"Properties({shown})"


class Delivery:
    """A decoded ``basic.deliver`` with its content; ``end`` is the offset after its last frame."""

    __slots__ = ("consumer_tag", "delivery_tag", "redelivered", "exchange", "routing_key", "properties", "body",
                 "end", "frames")

    def __init__(self, consumer_tag, delivery_tag: int, redelivered: bool, exchange, routing_key,
                 properties: Properties, body: bytes, end: int, frames: int) -> None:
        self.consumer_tag = consumer_tag
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties = properties
        self.body = body
        self.end = end
        self.frames = frames

    def __repr__(self) -> str:
        return (f"Delivery(tag={self.delivery_tag}, redelivered={self.redelivered}, {self.properties!r}, "
                f"body={self.body[:32]!r}{'...' if len(self.body) > 32 else ''}, frames={self.frames})")


class BadDelivery:
    """A delivery whose frames are whole but whose content cannot be decoded (``error`` says why).

    It must still be settled: ``delivery_tag`` and ``end``/``frames`` are
    known, and so are ``reply_to`` and ``correlation_id`` when they could be
    read (None otherwise), so that the sender can get an error reply.
    """

    __slots__ = ("delivery_tag", "redelivered", "reply_to", "correlation_id", "error", "end", "frames")

    def __init__(self, delivery_tag: int, redelivered: bool, reply_to, correlation_id, error: BaseException,
                 end: int, frames: int) -> None:
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.reply_to = reply_to
        self.correlation_id = correlation_id
        self.error = error
        self.end = end
        self.frames = frames

    def __repr__(self) -> str:
        return f"BadDelivery(tag={self.delivery_tag}, reply_to={self.reply_to!r}, error={self.error!r})"


# ------------------------------------------------------------------------------ decoding values

_new_properties = object.__new__


def _shortstr(buf, p: int):
    """A short string at ``p`` and the offset after it: str, or bytes when it is not UTF-8 (as pika)."""
    end = p + 1 + buf[p]
    if end > len(buf):
        raise IndexError("short string past the end")
    try:
        return buf[p + 1:end].decode("utf-8"), end
    except UnicodeDecodeError:
        return bytes(buf[p + 1:end]), end


def decode_table(buf, p: int) -> tuple[dict, int]:
    """A field table at ``buf[p]`` and the offset after it, as ``pika.data.decode_table``."""
    (size,) = _UNPACK_U32(buf, p)
    p += 4
    limit = p + size
    if limit > len(buf):
        raise IndexError("table past the end")
    result = {}
    while p < limit:
        key, p = _shortstr(buf, p)
        result[key], p = _decode_value(buf, p)
    return result, p


_S_b, _S_B, _S_h, _S_H = struct.Struct(">b"), struct.Struct(">B"), struct.Struct(">h"), struct.Struct(">H")
_S_i, _S_I, _S_q, _S_Q = struct.Struct(">i"), struct.Struct(">I"), struct.Struct(">q"), struct.Struct(">Q")
_S_f, _S_d = struct.Struct(">f"), struct.Struct(">d")
#: kind -> (struct, conversion or None). 'U' and 's' are both a signed short, as in pika.
_FIXED = {
    0x62: (_S_b, None), 0x42: (_S_B, None), 0x55: (_S_h, None), 0x75: (_S_H, None), 0x73: (_S_h, None),
    0x49: (_S_i, None), 0x69: (_S_I, None), 0x4C: (_S_q, None), 0x6C: (_S_q, None),
    0x66: (_S_f, int), 0x64: (_S_d, int),  # pika 1.4 turns floats into ints (int(), may raise)
}


def _decode_value(buf, p: int):
    kind = buf[p]
    p += 1
    fixed = _FIXED.get(kind)
    if fixed is not None:
        st, convert = fixed
        (value,) = st.unpack_from(buf, p)
        return (convert(value) if convert is not None else value), p + st.size
    if kind == 0x53:  # 'S' long string
        (length,) = _UNPACK_U32(buf, p)
        p += 4
        if p + length > len(buf):
            raise IndexError("long string past the end")
        value = bytes(buf[p:p + length])
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            pass
        return value, p + length
    if kind == 0x74:  # 't' boolean
        return bool(buf[p]), p + 1
    if kind == 0x46:  # 'F' table
        return decode_table(buf, p)
    if kind == 0x41:  # 'A' array
        (length,) = _UNPACK_U32(buf, p)
        p += 4
        end = p + length
        if end > len(buf):
            raise IndexError("array past the end")
        values = []
        while p < end:
            value, p = _decode_value(buf, p)
            values.append(value)
        return values, p
    if kind == 0x78:  # 'x' byte array
        (length,) = _UNPACK_U32(buf, p)
        p += 4
        if p + length > len(buf):
            raise IndexError("byte array past the end")
        return bytes(buf[p:p + length]), p + length
    if kind == 0x56:  # 'V' void
        return None, p
    if kind == 0x54:  # 'T' timestamp
        (seconds,) = _UNPACK_U64(buf, p)
        return datetime.fromtimestamp(seconds, timezone.utc), p + 8
    if kind == 0x44:  # 'D' decimal
        decimals = buf[p]
        (raw,) = _S_i.unpack_from(buf, p + 1)
        return decimal.Decimal(raw) * (decimal.Decimal(10) ** -decimals), p + 5
    raise ValueError(f"unknown field type {bytes((kind,))!r}")


def decode_properties(buf, p: int, end: int) -> Properties:
    """The basic properties of a content header whose property flags start at ``buf[p]``, up to ``end``."""
    (flags,) = _UNPACK_U16(buf, p)
    p += 2
    more = flags & 1
    while more:  # further flag words: basic has no properties there (pika ignores them too)
        (word,) = _UNPACK_U16(buf, p)
        p += 2
        more = word & 1
    props = _new_properties(Properties)
    if flags & _FLAG_CONTENT_TYPE:
        props.content_type, p = _shortstr(buf, p)
    if flags & _FLAG_CONTENT_ENCODING:
        props.content_encoding, p = _shortstr(buf, p)
    if flags & _FLAG_HEADERS:
        props.headers, p = decode_table(buf, p)
    if flags & _FLAG_DELIVERY_MODE:
        props.delivery_mode = buf[p]
        p += 1
    if flags & _FLAG_PRIORITY:
        props.priority = buf[p]
        p += 1
    if flags & _FLAG_CORRELATION_ID:
        props.correlation_id, p = _shortstr(buf, p)
    if flags & _FLAG_REPLY_TO:
        props.reply_to, p = _shortstr(buf, p)
    if flags & 0x01FF:
        if flags & _FLAG_EXPIRATION:
            props.expiration, p = _shortstr(buf, p)
        if flags & _FLAG_MESSAGE_ID:
            props.message_id, p = _shortstr(buf, p)
        if flags & _FLAG_TIMESTAMP:
            (props.timestamp,) = _UNPACK_U64(buf, p)
            p += 8
        if flags & _FLAG_TYPE:
            props.type, p = _shortstr(buf, p)
        if flags & _FLAG_USER_ID:
            props.user_id, p = _shortstr(buf, p)
        if flags & _FLAG_APP_ID:
            props.app_id, p = _shortstr(buf, p)
        if flags & _FLAG_CLUSTER_ID:
            props.cluster_id, p = _shortstr(buf, p)
    if p > end:
        raise ValueError("the properties run past their frame")
    return props


def _salvage(buf, p: int, end: int):
    """(reply_to, correlation_id) from properties that do not decode: the headers table is skipped by
    its length prefix. (None, None) for what cannot be read."""
    reply_to = correlation_id = None
    try:
        (flags,) = _UNPACK_U16(buf, p)
        if flags & 1:
            return None, None
        p += 2
        for flag in (_FLAG_CONTENT_TYPE, _FLAG_CONTENT_ENCODING):
            if flags & flag:
                p += 1 + buf[p]
        if flags & _FLAG_HEADERS:
            p += 4 + _UNPACK_U32(buf, p)[0]
        p += bool(flags & _FLAG_DELIVERY_MODE) + bool(flags & _FLAG_PRIORITY)
        if flags & _FLAG_CORRELATION_ID:
            correlation_id, p = _shortstr(buf, p)
        if flags & _FLAG_REPLY_TO:
            reply_to, p = _shortstr(buf, p)
        if p > end:
            return None, None
    except (IndexError, struct.error):
        pass
    return reply_to, correlation_id


# ------------------------------------------------------------------------------ decoding deliveries


_BASIC_ACK = b"\x00\x3c\x00\x50"  # class 60 (basic), method 80 (ack)


def decode_ack(buf, pos: int, channel_number: int):
    """Decode the ``basic.ack`` method frame (a publisher confirm) at ``buf[pos]``, if it is one.

    Returns ``(delivery_tag, multiple, end)``, ``end`` the offset after the
    frame; None when the whole frame at ``pos`` is not a basic.ack on
    ``channel_number`` (or is not whole yet).
    """
    if len(buf) - pos < 21:
        return None
    ftype, ch, size = _UNPACK_FRAME_HEADER(buf, pos)
    if (ftype != FRAME_METHOD or ch != channel_number or size != 13 or buf[pos + 7:pos + 11] != _BASIC_ACK
            or buf[pos + 20] != FRAME_END):
        return None
    (tag,) = _UNPACK_U64(buf, pos + 11)
    return tag, bool(buf[pos + 19] & 1), pos + 21


def decode_delivery(buf, pos: int, channel_number: int, consumer_tag: bytes | tuple[bytes, ...] | None = None, *,
                    max_body: int | None = None):
    """Decode the ``basic.deliver`` method frame at ``buf[pos]`` with its content header and body frames.

    Returns a :class:`Delivery`; :data:`INCOMPLETE` when ``buf`` ends before
    the delivery does; a :class:`BadDelivery` when its frames are whole but
    its method or properties cannot be decoded (any exception while decoding
    them: it must be settled, not raised into the transport); None when it is
    not a delivery this codec takes: not a basic.deliver on ``channel_number``
    (to ``consumer_tag``, or one of a tuple of tags, when given), a body over ``max_body``, or a frame
    structure that is not a delivery's (wrong frame type or channel, a bad
    frame-end octet): the caller's generic frame decoder handles those.
    """
    n = len(buf)
    if n - pos < 11:
        return INCOMPLETE
    ftype, ch, size = _UNPACK_FRAME_HEADER(buf, pos)
    # 16: the method id, the shortest consumer tag, delivery tag, bits, exchange and routing key
    if ftype != FRAME_METHOD or ch != channel_number or size < 16 or buf[pos + 7:pos + 11] != _BASIC_DELIVER:
        return None
    mend = pos + 7 + size  # the frame-end octet of the method frame
    h = mend + 1
    if n - h < 7:
        return INCOMPLETE
    if buf[mend] != FRAME_END:
        return None
    p = pos + 11
    if consumer_tag is not None:
        tag_len = buf[p]
        if p + 1 + tag_len > mend:
            return None
        tag = buf[p + 1:p + 1 + tag_len]
        if (tag != consumer_tag) if type(consumer_tag) is bytes else (tag not in consumer_tag):
            return None
    # The content header and body frames first: whatever the method or properties hold, the
    # delivery's extent must be known to settle it.
    ftype, ch, size = _UNPACK_FRAME_HEADER(buf, h)
    if ftype != FRAME_HEADER or ch != channel_number or size < 14:
        return None
    hend = h + 7 + size
    if hend >= n:
        return INCOMPLETE
    if buf[hend] != FRAME_END:
        return None
    class_id, _, body_size, _ = _UNPACK_CONTENT_HEADER(buf, h + 7)
    if class_id != 60 or (max_body is not None and body_size > max_body):
        return None
    b = hend + 1
    frames = 2
    got = 0
    first = -1
    parts = None
    while got < body_size:
        if n - b < 7:
            return INCOMPLETE
        ftype, ch, size = _UNPACK_FRAME_HEADER(buf, b)
        if ftype != FRAME_BODY or ch != channel_number:
            return None
        bend = b + 7 + size
        if bend >= n:
            return INCOMPLETE
        if buf[bend] != FRAME_END:
            return None
        if first < 0:
            first = b
        elif parts is None:
            parts = [(first + 7, first + 7 + got), (b + 7, bend)]
        else:
            parts.append((b + 7, bend))
        got += size
        b = bend + 1
        frames += 1
    if got != body_size:
        return None
    try:
        ctag, p = _shortstr(buf, pos + 11)
        (delivery_tag,) = _UNPACK_U64(buf, p)
        redelivered = bool(buf[p + 8] & 1)
        if buf[p + 9] == 0:  # the default exchange (RPC requests, replies)
            exchange, p = "", p + 10
        else:
            exchange, p = _shortstr(buf, p + 9)
        routing_key, p = _shortstr(buf, p)
        if p > mend:
            return None
    except (IndexError, struct.error, UnicodeError):
        return None
    try:
        props = decode_properties(buf, h + 19, hend)
    except Exception as exc:  # anything: RecursionError (nested tables), a bad field type, a float int() refuses
        reply_to, correlation_id = _salvage(buf, h + 19, hend)
        return BadDelivery(delivery_tag, redelivered, reply_to, correlation_id, exc, b, frames)
    if parts is None:
        body = buf[first + 7:first + 7 + body_size] if body_size else b""
        if type(body) is not bytes:
            body = bytes(body)
    else:
        body = b"".join([buf[s:e] for s, e in parts])
    return Delivery(ctag, delivery_tag, redelivered, exchange, routing_key, props, body, b, frames)


#: The clients decode the deliveries to their reply consumer the same way.
decode_reply = decode_delivery


# ------------------------------------------------------------------------------ encoding


def _enc_shortstr(out: list, value) -> None:
    raw = value if isinstance(value, bytes) else value.encode("utf-8")
    if len(raw) > 255:
        raise EncodeError(f"a short string holds at most 255 bytes, got {len(raw)}")
    out.append(bytes((len(raw),)))
    out.append(raw)


def encode_table(out: list, table: dict | None) -> None:
    """Append the field table ``table`` (None: empty) to ``out``, as ``pika.data.encode_table``."""
    pieces: list = []
    for key, value in (table or {}).items():
        _enc_shortstr(pieces, key)
        _encode_value(pieces, value)
    body = b"".join(pieces)
    out.append(_S_I.pack(len(body)))
    out.append(body)


def _encode_value(out: list, value) -> None:
    if isinstance(value, str):
        raw = value.encode("utf-8")
        out.append(b"S" + _S_I.pack(len(raw)))
        out.append(raw)
    elif isinstance(value, bytes):
        out.append(b"x" + _S_I.pack(len(value)))
        out.append(value)
    elif isinstance(value, bool):
        out.append(b"t\x01" if value else b"t\x00")
    elif isinstance(value, int):
        # pika.compat.long (an int subclass) marks a value to send as 'l'; pika itself is not imported here
        if type(value).__module__ != "pika.compat" and -(2**31) <= value < 2**31:
            out.append(b"I" + _S_i.pack(value))
        else:  # pika's `long` marker class, or too large for a signed 32-bit int
            try:
                out.append(b"l" + _S_q.pack(value))
            except struct.error:
                raise EncodeError(f"integer out of the 64-bit range: {value}") from None
    elif isinstance(value, decimal.Decimal):
        value = value.normalize()
        exponent = value.as_tuple().exponent
        if exponent < 0:
            out.append(b"D" + struct.pack(">Bi", -exponent, int(value * (decimal.Decimal(10) ** -exponent))))
        else:
            out.append(b"D" + struct.pack(">Bi", 0, int(value)))
    elif isinstance(value, datetime):
        import calendar

        out.append(b"T" + _S_Q.pack(calendar.timegm(value.utctimetuple())))
    elif isinstance(value, dict):
        out.append(b"F")
        encode_table(out, value)
    elif isinstance(value, list):
        pieces: list = []
        for item in value:
            _encode_value(pieces, item)
        body = b"".join(pieces)
        out.append(b"A" + _S_I.pack(len(body)))
        out.append(body)
    elif value is None:
        out.append(b"V")
    else:
        raise EncodeError(f"AMQP tables cannot carry {type(value).__name__} values (as pika encodes them)")


def encode_properties(content_type=None, content_encoding=None, headers=None, delivery_mode=None, priority=None,
                      correlation_id=None, reply_to=None, expiration=None, message_id=None, timestamp=None,
                      type=None, user_id=None, app_id=None, cluster_id=None) -> bytes:
    """The property flags and values of a content header, as ``pika.spec.BasicProperties.encode``."""
    flags = 0
    out: list = [b""]
    if content_type is not None:
        flags |= _FLAG_CONTENT_TYPE
        _enc_shortstr(out, content_type)
    if content_encoding is not None:
        flags |= _FLAG_CONTENT_ENCODING
        _enc_shortstr(out, content_encoding)
    if headers is not None:
        flags |= _FLAG_HEADERS
        encode_table(out, headers)
    if delivery_mode is not None:
        flags |= _FLAG_DELIVERY_MODE
        out.append(_S_B.pack(delivery_mode))
    if priority is not None:
        flags |= _FLAG_PRIORITY
        out.append(_S_B.pack(priority))
    if correlation_id is not None:
        flags |= _FLAG_CORRELATION_ID
        _enc_shortstr(out, correlation_id)
    if reply_to is not None:
        flags |= _FLAG_REPLY_TO
        _enc_shortstr(out, reply_to)
    for flag, value in ((_FLAG_EXPIRATION, expiration), (_FLAG_MESSAGE_ID, message_id)):
        if value is not None:
            flags |= flag
            _enc_shortstr(out, value)
    if timestamp is not None:
        flags |= _FLAG_TIMESTAMP
        out.append(_S_Q.pack(timestamp))
    for flag, value in ((_FLAG_TYPE, type), (_FLAG_USER_ID, user_id), (_FLAG_APP_ID, app_id),
                        (_FLAG_CLUSTER_ID, cluster_id)):
        if value is not None:
            flags |= flag
            _enc_shortstr(out, value)
    out[0] = _S_H.pack(flags)
    return b"".join(out)


def _body_frames(pieces: list, channel_number: int, body, body_max: int) -> int:
    """Append ``body``'s frames (none for an empty body, as pika) to ``pieces``; return how many."""
    size = len(body)
    if size == 0:
        return 0
    if size <= body_max:
        pieces += (_PACK_FRAME_HEADER(FRAME_BODY, channel_number, size), body, _FRAME_END)
        return 1
    view = memoryview(body)
    count = 0
    for start in range(0, size, body_max):
        chunk = view[start:start + body_max]
        pieces += (_PACK_FRAME_HEADER(FRAME_BODY, channel_number, len(chunk)), chunk, _FRAME_END)
        count += 1
    return count


def _publish_method_frame(channel_number: int, exchange, routing_key, mandatory: bool) -> bytes:
    payload: list = [_BASIC_PUBLISH, b"\x00\x00"]  # reserved-1 (ticket) 0
    _enc_shortstr(payload, exchange)
    _enc_shortstr(payload, routing_key)
    payload.append(b"\x01" if mandatory else b"\x00")
    data = b"".join(payload)
    return _PACK_FRAME_HEADER(FRAME_METHOD, channel_number, len(data)) + data + _FRAME_END


def encode_publish(channel_number: int, exchange, routing_key, body, frame_max: int, *, mandatory: bool = False,
                   **properties: Any) -> list:
    """The frames of ``basic.publish`` + content header + body, as pieces to write in order.

    ``frame_max`` is the negotiated frame size: body frames carry at most
    ``frame_max - 8`` bytes. ``properties`` are :class:`Properties`' names
    (content_type, correlation_id, reply_to, headers, expiration, ...). The
    bytes are exactly what pika's ``basic_publish`` writes; an empty body has
    no body frame. Large bodies are cut as memoryviews, not copied.
    """
    header = encode_properties(**properties)
    payload = b"\x00\x3c\x00\x00" + _S_Q.pack(len(body)) + header  # class 60, weight 0, body size, properties
    pieces = [_publish_method_frame(channel_number, exchange, routing_key, mandatory),
              _PACK_FRAME_HEADER(FRAME_HEADER, channel_number, len(payload)) + payload + _FRAME_END]
    _body_frames(pieces, channel_number, body, frame_max - FRAME_OVERHEAD)
    return pieces


def encode_request(channel_number: int, queue: str, body, frame_max: int, *, reply_to: str, correlation_id,
                   headers: dict | None = None, expiration: str | None = None, mandatory: bool = False) -> list:
    """A request to the service: published to ``queue`` on the default exchange (docs/protocol.md)."""
    return encode_publish(channel_number, "", queue, body, frame_max, mandatory=mandatory, reply_to=reply_to,
                          correlation_id=correlation_id, headers=headers, expiration=expiration)


def encode_reply(channel_number: int, reply_to: str, body, frame_max: int, *, content_type: str, correlation_id=None,
                 headers: dict | None = None) -> list:
    """A reply: published to ``reply_to`` on the default exchange, ``correlation_id`` echoed."""
    return encode_publish(channel_number, "", reply_to, body, frame_max, content_type=content_type,
                          correlation_id=correlation_id, headers=headers)


def frame_count(pieces: list) -> int:
    """How many frames :func:`encode_publish` (or :meth:`ReplyEncoder.frames`) pieces hold."""
    return 2 + (len(pieces) - 2) // 3


#: content_type property values, encoded as AMQP short strings.
CONTENT_TYPE_SHORTSTR = {fmt: bytes((len(ct),)) + ct.encode() for fmt, ct in protocol.CONTENT_TYPES.items()}


class ReplyEncoder:
    """:func:`encode_reply` for the worker's success replies, with the per-``reply_to`` work cached.

    The bytes are exactly :func:`encode_reply`'s (and pika's), at a fraction
    of the cost: the publish method frame is cached per ``reply_to`` (a Direct
    Reply-to client or a tutorial client reuses one name), and the content
    header is two ``struct`` packs.
    """

    __slots__ = ("channel_number", "body_max", "_methods")

    def __init__(self, channel_number: int, body_max: int) -> None:
        self.channel_number = channel_number
        #: The largest body frame payload: frame_max - 8.
        self.body_max = body_max
        self._methods: dict[str, bytes] = {}

    def _method_frame(self, reply_to: str) -> bytes:
        frame = self._methods.get(reply_to)
        if frame is None:
            frame = _publish_method_frame(self.channel_number, "", reply_to, False)
            if len(self._methods) >= 1024:
                self._methods.clear()
            self._methods[reply_to] = frame
        return frame

    def frames(self, reply_to: str, content_type: bytes, correlation_id, body) -> list:
        """The pieces to write, in order; ``content_type`` is the property already as a short string
        (:data:`CONTENT_TYPE_SHORTSTR`)."""
        channel = self.channel_number
        size = len(body)
        if correlation_id is None:
            payload = _PACK_CONTENT_HEADER(60, 0, size, _FLAG_CONTENT_TYPE) + content_type
        else:
            cid = correlation_id.encode("utf-8") if isinstance(correlation_id, str) else correlation_id
            if len(cid) > 255:
                raise EncodeError(f"a short string holds at most 255 bytes, got {len(cid)}")
            payload = (_PACK_CONTENT_HEADER(60, 0, size, _FLAG_CONTENT_TYPE | _FLAG_CORRELATION_ID)
                       + content_type + bytes((len(cid),)) + cid)
        pieces = [self._method_frame(reply_to), _PACK_FRAME_HEADER(FRAME_HEADER, channel, len(payload)) + payload
                  + _FRAME_END]
        _body_frames(pieces, channel, body, self.body_max)
        return pieces


class RequestEncoder:
    """:func:`encode_request` for one client's requests, with the constant part encoded once.

    A client's requests differ only in ``correlation_id``, ``expiration``, the
    ``x-deadline-ms`` header and the body; the method frame (queue), the
    ``accept`` header and ``reply_to`` are encoded here once. The bytes are
    exactly :func:`encode_request`'s with ``headers={"accept": accept,
    "x-deadline-ms": deadline_ms}`` (and pika's).
    """

    __slots__ = ("channel_number", "body_max", "_method", "_head", "_tail", "_accept", "_reply_to", "_queue",
                 "_mandatory")

    def __init__(self, channel_number: int, frame_max: int, queue: str, reply_to: str, accept: str, *,
                 mandatory: bool = False) -> None:
        self.channel_number = channel_number
        self.body_max = frame_max - FRAME_OVERHEAD
        self._queue, self._reply_to, self._accept, self._mandatory = queue, reply_to, accept, mandatory
        self._method = _publish_method_frame(channel_number, "", queue, mandatory)
        entries: list = []
        _enc_shortstr(entries, protocol.HEADER_ACCEPT)
        _encode_value(entries, accept)
        _enc_shortstr(entries, protocol.HEADER_DEADLINE)
        entries.append(b"l")
        table = b"".join(entries)
        flags = _FLAG_HEADERS | _FLAG_CORRELATION_ID | _FLAG_REPLY_TO | _FLAG_EXPIRATION
        self._head = _S_H.pack(flags) + _S_I.pack(len(table) + 8) + table  # the deadline's 8 bytes follow
        tail: list = []
        _enc_shortstr(tail, reply_to)
        self._tail = b"".join(tail)

    def frames(self, correlation_id: str, expiration: str, deadline_ms: int, body) -> list:
        """The pieces to write, in order (:func:`frame_count` tells how many frames)."""
        if not 2**31 <= deadline_ms < 2**63:  # pika sends a 32-bit 'I' below 2**31 (never a real epoch-ms)
            return encode_request(self.channel_number, self._queue, body, self.body_max + FRAME_OVERHEAD,
                                  reply_to=self._reply_to, correlation_id=correlation_id, expiration=expiration,
                                  headers={protocol.HEADER_ACCEPT: self._accept,
                                           protocol.HEADER_DEADLINE: deadline_ms}, mandatory=self._mandatory)
        cid = correlation_id.encode("utf-8")
        exp = expiration.encode("utf-8")
        if len(cid) > 255 or len(exp) > 255:
            raise EncodeError("correlation_id and expiration hold at most 255 bytes")
        channel = self.channel_number
        payload = b"".join((b"\x00\x3c\x00\x00", _S_Q.pack(len(body)), self._head, _S_q.pack(deadline_ms),
                            bytes((len(cid),)), cid, self._tail, bytes((len(exp),)), exp))
        pieces = [self._method, _PACK_FRAME_HEADER(FRAME_HEADER, channel, len(payload)) + payload + _FRAME_END]
        _body_frames(pieces, channel, body, self.body_max)
        return pieces
