"""Every exception fastfib raises, in one module.

Like msgpack's exceptions, each class also inherits the builtin a caller would
naturally catch: a bad argument is a ``ValueError``, a timeout a
``TimeoutError``, so code that knows nothing of fastfib still does the right
thing.
"""

from __future__ import annotations

__all__ = [
    "FastFibError",
    "FibRangeError",
    "RpcError",
    "RemoteError",
    "InvalidArgument",
    "OutOfRange",
    "UnsupportedFormat",
    "InternalServerError",
    "RpcTimeout",
    "Unroutable",
    "ConnectionLost",
    "ProtocolError",
    "remote_error",
]


class FastFibError(Exception):
    """Base of every fastfib exception."""


class FibRangeError(FastFibError, ValueError):
    """The kernel was asked for F(n) with n < 0 or n above its hard limit."""


class RpcError(FastFibError):
    """Base of the errors of an RPC call."""


class RemoteError(RpcError):
    """The server answered with an error reply (protocol v1 ``x-error``).

    ``kind`` is the protocol's error kind (``invalid_argument``,
    ``out_of_range``, ``unsupported_format``, ``internal`` or one this client
    does not know), ``message`` the server's human-readable text.
    """

    kind = "internal"

    def __init__(self, message: str, kind: str | None = None) -> None:
        if kind is not None:
            self.kind = kind
        self.message = message
        super().__init__(f"{self.kind}: {message}")

    def __reduce__(self):  # keep kind and message across pickling
        return (type(self), (self.message, self.kind))


class InvalidArgument(RemoteError, ValueError):
    """The server could not parse the request body as a decimal integer."""

    kind = "invalid_argument"


class OutOfRange(RemoteError, ValueError):
    """n was negative or above the server's configured maximum."""

    kind = "out_of_range"


class UnsupportedFormat(RemoteError, ValueError):
    """The server does not produce the reply encoding that was asked for."""

    kind = "unsupported_format"


class InternalServerError(RemoteError):
    """Something unexpected failed on the server."""

    kind = "internal"


_KINDS = {cls.kind: cls for cls in (InvalidArgument, OutOfRange, UnsupportedFormat, InternalServerError)}


def remote_error(kind: str, message: str) -> RemoteError:
    """Build the ``RemoteError`` subclass that matches a protocol error kind."""
    cls = _KINDS.get(kind, RemoteError)
    return cls(message, kind)


class RpcTimeout(RpcError, TimeoutError):
    """No reply came within the timeout."""


class Unroutable(RpcError):
    """The broker could not route the request (no such queue)."""


class ConnectionLost(RpcError, ConnectionError):
    """The broker connection was lost and could not be restored in time."""


class ProtocolError(RpcError, ValueError):
    """A reply that does not follow protocol v1 (for example, a body that is not a number)."""
