"""What the blocking and the asyncio client share.

:class:`fastfib.client.FibonacciRpcClient` and
:class:`fastfib.aio.AsyncFibonacciRpcClient` differ only in how they drive
pika. Everything else lives here once: argument checks, the broker URL list
and its connection parameters, correlation ids, publisher-confirm
bookkeeping, counters and the messages of the errors they raise. This module
is loaded by the clients only (``import fastfib`` does not load pika).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import operator
import os
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.spec import BasicProperties

from .errors import ConnectionLost, Unroutable
from .protocol import CONTENT_BINARY, CONTENT_DECIMAL, DEFAULT_TIMEOUT, HEADER_ACCEPT, HEADER_DEADLINE, MAX_BODY_BYTES
from .urls import client_urls, describe_error, describe_failures, endpoint

_log = logging.getLogger(__name__)


#: Seconds without a reply (requests pending, none waiting in the queue) after which a client
#: takes its connection's replies as lost, reconnects and resends.
DEFAULT_STALL_TIMEOUT = 5.0

#: ``reply_queue`` values: RabbitMQ's Direct Reply-to pseudo-queue (default) or
#: a server-named, exclusive, auto-delete queue declared by the client.
REPLY_DIRECT = "direct"
REPLY_EXCLUSIVE = "exclusive"
REPLY_QUEUES = (REPLY_DIRECT, REPLY_EXCLUSIVE)

#: ``format`` values -> the ``accept`` header that asks for them.
ACCEPT = {"binary": CONTENT_BINARY, "decimal": CONTENT_DECIMAL}

#: The largest n whose decimal form fits in a request body.
MAX_WIRE_N = 10**MAX_BODY_BYTES - 1

#: Broker refusals that no retry on the same node will cure.
AUTH_ERRORS = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
    pika.exceptions.AuthenticationError,
    pika.exceptions.IncompatibleProtocolError,
)

#: What a lost or broken connection or channel raises out of pika.
LINK_ERRORS = (pika.exceptions.AMQPError, OSError)

class StalledConnection(pika.exceptions.AMQPConnectionError):
    """Raised inside a client (never to its caller): the connection is up but its replies stopped coming."""


RECONNECT_FIRST_DELAY = 0.05
RECONNECT_MAX_DELAY = 1.0


def nack_delay(nacks: int) -> float:
    """Seconds before a request nacked ``nacks`` times is sent again.

    The first nack is answered at once (a broker hiccup); a request the
    broker keeps refusing (say a full queue with ``x-overflow: reject-publish``)
    backs off, 50 ms doubling up to 1 s, instead of a publish/nack busy loop.
    """
    return 0.0 if nacks <= 1 else min(0.05 * 2 ** (nacks - 2), 1.0)


# --- argument checks ------------------------------------------------------------------------


def check_n(n: Any) -> int:
    """Reject what the server would reject, before sending it; return n as an int.

    Like the kernel (``fastfib.fib``): an ``int`` or an object with
    ``__index__`` (gmpy2.mpz, numpy integers) is accepted, ``bool`` is refused
    as a likely mistake, anything else is a ``TypeError``.
    """
    if type(n) is not int:
        if isinstance(n, bool):
            raise TypeError("n must be an integer, not bool (True/False are refused as likely mistakes)")
        try:
            n = operator.index(n)
        except TypeError:
            raise TypeError(f"n must be an integer, not {type(n).__name__}") from None
    if n < 0:
        raise ValueError(f"n must not be negative, got {n}")
    if n > MAX_WIRE_N:
        raise ValueError(f"n has more than {MAX_BODY_BYTES} digits; the protocol cannot carry it")
    return n


def check_timeout(timeout: Any, what: str = "timeout") -> float:
    """``timeout`` as a float; it must be a positive, finite number of seconds."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(timeout).__name__}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"{what} must be a positive, finite number of seconds, got {timeout!r}")
    return float(timeout)


def check_window(window: Any) -> int:
    """``window`` (requests in flight at once); it must be an int of at least 1."""
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, not {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    return window


def accept_for(format: str) -> str:
    """The ``accept`` header value that asks for ``format`` ("binary" or "decimal")."""
    try:
        return ACCEPT[format]
    except (KeyError, TypeError):
        raise ValueError(f"format must be 'binary' or 'decimal', got {format!r}") from None


def check_reply_queue(reply_queue: str) -> str:
    if reply_queue not in REPLY_QUEUES:
        raise ValueError(f"reply_queue must be 'direct' or 'exclusive', got {reply_queue!r}")
    return reply_queue


def connection_parameters(urls: list[str], connection_name: str | None, kind: str) -> list[pika.URLParameters]:
    """pika's parameters for each URL, all with the same ``connection_name`` client property.

    A URL that pika cannot parse is a ``ValueError`` naming it, password masked.
    """
    if connection_name is None:
        connection_name = f"fastfib {kind} pid={os.getpid()} {uuid.uuid4().hex[:8]}"
    result = []
    for url in urls:
        try:
            params = pika.URLParameters(url)
        except Exception as exc:
            raise ValueError(f"bad broker URL for {endpoint(url)}: {exc}") from None
        props = dict(params.client_properties or {})
        props.setdefault("product", "fastfib")
        props["connection_name"] = connection_name
        params.client_properties = props
        result.append(params)
    return result


# --- messages -------------------------------------------------------------------------------


def timeout_message(queue: str, timeout: float, unanswered: int, total: int, note: str) -> str:
    what = "no reply" if total == 1 else f"{unanswered} of {total} requests unanswered"
    return f"{what} from queue {queue!r} within {timeout:g} s{note}"


def consumer_note(method_frame: Any) -> str:
    """The part of a timeout message that describes the service queue."""
    consumers = method_frame.consumer_count
    if consumers == 0:
        return "; the queue has no consumer (is a server running?)"
    return f" ({consumers} consumer(s), {method_frame.message_count} request(s) waiting)"


def unroutable(queue: str, method: Any) -> Unroutable:
    return Unroutable(
        f"the broker could not route the request to queue {queue!r} "
        f"({method.reply_code} {method.reply_text}): does the queue exist?"
    )


def lost_message(queue: str, cause: BaseException | None) -> str:
    why = f" ({describe_error(cause)})" if cause is not None else ""
    return f"the connection to the broker was lost{why} and could not be restored in time (queue {queue!r})"


def connect_error(failures: list[tuple[str, BaseException]], refused: bool = False) -> ConnectionLost:
    """The error of a connection round that failed on every URL: names each host:port tried and why.

    Its ``refused`` attribute is true when every node refused the credentials.
    """
    verb = "the broker refused the connection" if refused else "cannot connect to the broker"
    error = ConnectionLost(f"{verb}: tried {describe_failures(failures)}")
    error.refused = refused  # every node refused the credentials: no retry will cure it
    return error


# --- requests and replies ------------------------------------------------------------------


@functools.cache
def fast_wire_works() -> bool:
    """Whether the clients' fast wire (:mod:`fastfib.pika_seam`) works with the installed pika,
    checked once per process (:func:`fastfib.pika_seam.client_self_check`); when it does not, one
    warning says so and the clients use pika's public API."""
    from . import pika_seam

    problem = pika_seam.client_self_check()
    if problem is not None:
        _log.warning("the clients' fast wire does not work with the installed pika %s (%s); using pika's "
                     "public API instead", pika.__version__, problem)
    return problem is None


def request_properties(reply_to: str, accept: str, correlation_id: str, expiration: str,
                       deadline_ms: int) -> BasicProperties:
    """A request's properties for pika's public ``basic_publish`` (the fallback of the fast wire,
    which encodes the same with :class:`fastfib.wire.RequestEncoder`)."""
    return BasicProperties(reply_to=reply_to, correlation_id=correlation_id, expiration=expiration,
                           headers={HEADER_ACCEPT: accept, HEADER_DEADLINE: deadline_ms})


class CorrelationIds:
    """Fresh correlation ids: 32 hex digits, a random prefix per client and a counter.

    Unique within a client (the replies come back to it alone), and cheaper
    than a ``uuid4().hex`` per request (docs/client.md).
    """

    __slots__ = ("_prefix", "_count")

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


# --- publisher confirms ---------------------------------------------------------------------


class Confirms:
    """Publisher-confirm bookkeeping of one channel: delivery tag -> correlation id.

    The broker numbers the messages published on a confirm-mode channel 1, 2,
    3 ... and acks or nacks them, one at a time or "up to tag n" (multiple).
    A client calls :meth:`published` for every publish on the channel, in
    order, and :meth:`settle` for every ``Basic.Ack``/``Basic.Nack``.
    """

    __slots__ = ("_next", "_tags", "_corrs")

    def __init__(self) -> None:
        self._next = 1
        self._tags: deque[int] = deque()
        self._corrs: dict[int, str] = {}

    def published(self, corr: str) -> None:
        tag = self._next
        self._next = tag + 1
        self._tags.append(tag)
        self._corrs[tag] = corr

    def settle(self, tag: int, multiple: bool) -> list[str]:
        """Forget the confirmed tags (``tag``, or every tag up to it); returns their correlation ids."""
        corrs = self._corrs
        if not multiple:
            corr = corrs.pop(tag, None)
            return [] if corr is None else [corr]
        tags = self._tags
        settled = []
        while tags and tags[0] <= tag:
            corr = corrs.pop(tags.popleft(), None)
            if corr is not None:
                settled.append(corr)
        return settled

    def __len__(self) -> int:
        return len(self._corrs)


class NoConfirms:
    """What a client uses in place of :class:`Confirms` on a channel without confirm mode."""

    __slots__ = ()

    def published(self, corr: str) -> None:
        pass

    def settle(self, tag: int, multiple: bool) -> list[str]:
        return []

    def __len__(self) -> int:
        return 0


@dataclass
class ClientCounters:
    """What a client has done to keep its calls going (for logs, tests and benchmarks)."""

    #: Connections opened after the first one.
    reconnects: int = 0
    #: Requests published again: after a reconnect, or at once after a nack.
    resent: int = 0
    #: Requests the broker nacked.
    nacked: int = 0
    #: Replies dropped because their correlation id was unknown (already answered, or abandoned).
    duplicates: int = 0


# --- settings -------------------------------------------------------------------------------


class ClientSettings:
    """The constructor arguments both clients share, checked and stored once."""

    def _init_settings(self, url: str | Iterable[str] | None, queue: str, timeout: float | None, format: str,
                       reply_queue: str, connection_name: str | None, kind: str,
                       stall_timeout: float = DEFAULT_STALL_TIMEOUT, confirms: bool = True) -> None:
        self.queue = queue
        self.timeout = DEFAULT_TIMEOUT if timeout is None else check_timeout(timeout)
        self.stall_timeout = check_timeout(stall_timeout, "stall_timeout")
        if not isinstance(confirms, bool):
            raise TypeError(f"confirms must be True or False, not {type(confirms).__name__}")
        #: Whether requests are published with publisher confirms.
        self.confirms = confirms
        self.format = format
        self._accept = accept_for(format)
        self.reply_queue = check_reply_queue(reply_queue)
        #: The broker URLs, in the order they are tried.
        self.urls: tuple[str, ...] = tuple(client_urls(url))
        self._params = connection_parameters(list(self.urls), connection_name, kind)
        self.connection_name: str = self._params[0].client_properties["connection_name"]
        #: Index (in :attr:`urls`) of the URL of the current or last connection.
        self._url_index = 0
        self.counters = ClientCounters()

    @property
    def endpoint(self) -> str | None:
        """``host:port`` of the node this client is connected to, or None when it is not connected."""
        return endpoint(self.urls[self._url_index]) if self.is_open else None

    def _rotation(self, advance: bool) -> list[int]:
        """URL indexes in the order to try them: the current one first, or the next one after it."""
        count = len(self._params)
        start = (self._url_index + 1) % count if advance else self._url_index
        return [(start + i) % count for i in range(count)]
