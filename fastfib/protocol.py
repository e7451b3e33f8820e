"""fastfib wire protocol, version 1 (see ``docs/protocol.md``).

Everything both sides must agree on lives here: how a request body is parsed
and bounds-checked, which headers mean what, how an error reply is built, and
how a reply is decoded. The server (:mod:`fastfib.server`) and the clients
(:mod:`fastfib.client`, :mod:`fastfib.aio`) import it, so that the contract is
written down once.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Any

import gmpy2

from .errors import InvalidArgument, OutOfRange, ProtocolError, UnsupportedFormat, remote_error

PROTOCOL_VERSION = 1

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
DEFAULT_QUEUE = "rpc_queue"
#: The timeout of a client built without one, in seconds (fastfib.client.DEFAULT_TIMEOUT; here so that
#: the CLI can show it without loading pika).
DEFAULT_TIMEOUT = 30.0
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

#: The largest request body the server parses, in bytes.
MAX_BODY_BYTES = 64

#: The server's default ``--max-n``.
DEFAULT_MAX_N = 1_000_000

CONTENT_DECIMAL = "text/plain"
CONTENT_BINARY = "application/octet-stream"
CONTENT_ERROR = "application/json"

HEADER_ACCEPT = "accept"
HEADER_DEADLINE = "x-deadline-ms"
HEADER_ERROR = "x-error"

#: content type -> the kernel's encoding name (``fastfib.fib_encoded``).
FORMATS = {CONTENT_DECIMAL: "decimal", CONTENT_BINARY: "binary"}
#: the kernel's encoding name -> content type.
CONTENT_TYPES = {v: k for k, v in FORMATS.items()}

KIND_INVALID_ARGUMENT = "invalid_argument"
KIND_OUT_OF_RANGE = "out_of_range"
KIND_UNSUPPORTED_FORMAT = "unsupported_format"
KIND_INTERNAL = "internal"
ERROR_KINDS = (KIND_INVALID_ARGUMENT, KIND_OUT_OF_RANGE, KIND_UNSUPPORTED_FORMAT, KIND_INTERNAL)

# ASCII digits only: \d would also match Arabic-Indic or full-width digits.
_BODY_RE = re.compile(rb"(-?)([0-9]+)")
# bytes.strip() with no argument strips exactly ASCII whitespace.
_DIGITS_PREVIEW = 20


def parse_n(body: bytes, max_n: int = DEFAULT_MAX_N) -> int:
    """Parse and bounds-check a request body.

    Returns n, or raises :class:`~fastfib.errors.InvalidArgument` (not a
    decimal integer) or :class:`~fastfib.errors.OutOfRange` (negative, or above
    ``max_n``), each with a message fit to send back to the client.
    ``-0`` is zero, not negative.
    """
    if len(body) > MAX_BODY_BYTES:
        raise InvalidArgument(f"request body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted")
    m = _BODY_RE.fullmatch(body.strip())
    if m is None:
        raise InvalidArgument(f"request body {_preview(body)} is not a decimal integer")
    sign, digits = m.groups()
    n = int(digits)
    if sign and n:
        raise OutOfRange(f"n must not be negative, got -{_short(digits)}")
    if n > max_n:
        raise OutOfRange(f"n must be at most {max_n} (the server's maximum), got {_short(digits)}")
    return n


def _short(digits: bytes) -> str:
    s = digits.decode("ascii").lstrip("0") or "0"
    return s if len(s) <= _DIGITS_PREVIEW else f"{s[:_DIGITS_PREVIEW]}... ({len(s)} digits)"


def _preview(body: bytes) -> str:
    if not body:
        return "(empty)"
    return repr(body[:_DIGITS_PREVIEW]) + ("..." if len(body) > _DIGITS_PREVIEW else "")


def reply_format(headers: Mapping[str, Any] | None) -> str:
    """The kernel encoding ("decimal" or "binary") a request's ``accept`` header asks for.

    Raises :class:`~fastfib.errors.UnsupportedFormat` for any other value.
    """
    accept = (headers or {}).get(HEADER_ACCEPT)
    if accept is None:
        return "decimal"
    if isinstance(accept, bytes):  # pika hands over AMQP long strings as bytes
        accept = accept.decode("utf-8", "replace")
    fmt = FORMATS.get(accept) if isinstance(accept, str) else None
    if fmt is None:
        raise UnsupportedFormat(
            f"accept {accept!r} is not supported; use {CONTENT_DECIMAL!r} or {CONTENT_BINARY!r}"
        )
    return fmt


def deadline_passed(headers: Mapping[str, Any] | None, now_ms: float | None = None) -> bool:
    """True when the request's ``x-deadline-ms`` lies in the past.

    A header that is not a number is ignored (the request is served): the
    deadline is an optimisation for the client, not part of the question.
    """
    deadline = (headers or {}).get(HEADER_DEADLINE)
    if deadline is None or isinstance(deadline, bool):
        return False
    try:
        deadline = int(deadline)
    except (TypeError, ValueError):
        return False
    if now_ms is None:
        now_ms = time.time() * 1000.0
    return now_ms > deadline


def deadline_header(timeout: float, now: float | None = None) -> int:
    """The ``x-deadline-ms`` value for a request that may wait ``timeout`` seconds."""
    if now is None:
        now = time.time()
    return int((now + timeout) * 1000)


def expiration(timeout: float) -> str:
    """The AMQP ``expiration`` property (ms, as a string) for ``timeout`` seconds."""
    return str(max(1, int(timeout * 1000)))


def error_body(kind: str, message: str) -> bytes:
    """The JSON body of an error reply."""
    return json.dumps({"error": kind, "message": message}).encode("utf-8")


def decode_reply(content_type: str | None, headers: Mapping[str, Any] | None, body: bytes) -> int:
    """Decode a reply by its own ``content_type`` and ``x-error`` header.

    Returns F(n) as an int, or raises the :class:`~fastfib.errors.RemoteError`
    subclass that the error kind names. A reply without a content type is
    decimal text: that is what the tutorial's server sends.
    """
    kind = (headers or {}).get(HEADER_ERROR)
    if kind is not None:
        if isinstance(kind, bytes):
            kind = kind.decode("utf-8", "replace")
        message = body.decode("utf-8", "replace")
        try:
            doc = json.loads(body)
            if isinstance(doc, dict) and isinstance(doc.get("message"), str):
                message = doc["message"]
        except ValueError:
            pass
        raise remote_error(str(kind), message)
    if content_type == CONTENT_BINARY:
        if not body:
            raise ProtocolError("empty binary reply")
        return int.from_bytes(body, "big")
    if content_type in (None, "", CONTENT_DECIMAL) or content_type.startswith("text/"):
        text = body.strip()
        if not text.isdigit() or not text.isascii():
            raise ProtocolError(f"reply body {_preview(body)} is not a decimal number")
        # gmpy2 parses in subquadratic time and has no 4300-digit limit (int() has both).
        return int(gmpy2.mpz(text.decode("ascii")))
    raise ProtocolError(f"reply has unknown content_type {content_type!r}")
