"""The AMQP codec of fastfib's hot path: pure functions on bytes, no I/O.

The worker (:mod:`fastfib.server`) decodes its deliveries and encodes its
replies with it.
"""

from __future__ import annotations

from ._pywire import CONTENT_TYPE_SHORTSTR, INCOMPLETE, ReplyEncoder, RequestProperties, parse_delivery

__all__ = ["CONTENT_TYPE_SHORTSTR", "INCOMPLETE", "ReplyEncoder", "RequestProperties", "parse_delivery"]
