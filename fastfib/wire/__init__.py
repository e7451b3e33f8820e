"""The AMQP 0-9-1 codec of fastfib's hot path: pure functions on bytes, no I/O, no pika.

- :func:`decode_delivery` (and :data:`decode_reply`, the same for a client's
  reply consumer): a ``basic.deliver`` with its content header and body
  frames -> :class:`Delivery` (delivery tag, ``redelivered``, properties,
  body, where it ends), :data:`INCOMPLETE`, None (not ours: the caller's
  generic decoder takes it), or :class:`BadDelivery` (whole, but it does not
  decode: settle it);
- :func:`encode_publish`, :func:`encode_reply`, :func:`encode_request`: the
  frames of a ``basic.publish`` as pieces to write in order (no empty body
  frame; large bodies as memoryviews);
- :class:`ReplyEncoder`: :func:`encode_reply` with per-``reply_to`` caching,
  for the worker's success replies; :class:`RequestEncoder`: :func:`encode_request`
  with a client's constant part encoded once.

Everything here produces and accepts exactly what pika 1.4's marshalling
does (``tests/test_wire.py``). :data:`IMPLEMENTATION` names the code in use:
``"python"`` (:mod:`._pywire`, the reference); no compiled version is built,
because compiling it did not pay (docs/server.md).
"""

from __future__ import annotations

from ._pywire import (
    CONTENT_TYPE_SHORTSTR,
    FRAME_OVERHEAD,
    INCOMPLETE,
    BadDelivery,
    Delivery,
    EncodeError,
    Properties,
    ReplyEncoder,
    RequestEncoder,
    decode_ack,
    decode_delivery,
    decode_properties,
    decode_reply,
    decode_table,
    encode_properties,
    encode_publish,
    encode_reply,
    encode_request,
    encode_table,
    frame_count,
)

#: Which implementation is in use: "python" (the pure-Python reference, :mod:`fastfib.wire._pywire`).
IMPLEMENTATION = "python"

__all__ = [
    "CONTENT_TYPE_SHORTSTR", "FRAME_OVERHEAD", "IMPLEMENTATION", "INCOMPLETE", "BadDelivery", "Delivery",
    "EncodeError", "Properties", "ReplyEncoder", "RequestEncoder", "decode_ack", "decode_delivery", "decode_properties", "decode_reply",
    "decode_table", "encode_properties", "encode_publish", "encode_reply", "encode_request", "encode_table",
    "frame_count",
]
