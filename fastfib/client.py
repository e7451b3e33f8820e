"""The blocking client: :class:`FibonacciRpcClient`.

One client holds one broker connection and one channel. A request is published
to the default exchange with routing key = the service queue, ``mandatory``
set, a fresh ``correlation_id`` (uuid4 hex), ``expiration`` and
``x-deadline-ms`` derived from the timeout, and ``accept`` naming the reply
encoding; the reply comes back on Direct Reply-to (or on an exclusive
server-named queue) and is decoded by its own ``content_type`` and ``x-error``
(see ``docs/protocol.md``). ``docs/client.md`` explains the design choices.

Everything that the asyncio client (:mod:`fastfib.aio`) shares with this one,
argument checks, connection parameters, messages, lives here too, with a
leading underscore.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterable
from time import monotonic
from typing import Any

import pika
import pika.exceptions
from pika.spec import BasicProperties

from .errors import ConnectionLost, ProtocolError, RemoteError, RpcError, RpcTimeout, Unroutable
from .protocol import (
    CONTENT_BINARY,
    CONTENT_DECIMAL,
    DEFAULT_QUEUE,
    DEFAULT_URL,
    DIRECT_REPLY_TO,
    HEADER_ACCEPT,
    HEADER_DEADLINE,
    MAX_BODY_BYTES,
    decode_reply,
)

__all__ = ["FibonacciRpcClient", "DEFAULT_TIMEOUT", "REPLY_DIRECT", "REPLY_EXCLUSIVE"]

_log = logging.getLogger(__name__)

#: The timeout of a client built without one, in seconds.
DEFAULT_TIMEOUT = 30.0

#: ``reply_queue`` values: RabbitMQ's Direct Reply-to pseudo-queue (default) or
#: a server-named, exclusive, auto-delete queue declared by the client.
REPLY_DIRECT = "direct"
REPLY_EXCLUSIVE = "exclusive"
_REPLY_QUEUES = (REPLY_DIRECT, REPLY_EXCLUSIVE)

#: ``format`` values -> the ``accept`` header that asks for them.
_ACCEPT = {"binary": CONTENT_BINARY, "decimal": CONTENT_DECIMAL}

#: The largest n whose decimal form fits in a request body.
_MAX_WIRE_N = 10**MAX_BODY_BYTES - 1

#: Broker refusals that no retry will cure.
_AUTH_ERRORS = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
    pika.exceptions.AuthenticationError,
    pika.exceptions.IncompatibleProtocolError,
)

#: What a lost or broken connection or channel raises out of pika.
_LINK_ERRORS = (pika.exceptions.AMQPError, OSError)

_RECONNECT_FIRST_DELAY = 0.05
_RECONNECT_MAX_DELAY = 1.0


# --- helpers shared with fastfib.aio -------------------------------------------------------


def _check_n(n: Any) -> int:
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
    if n > _MAX_WIRE_N:
        raise ValueError(f"n has more than {MAX_BODY_BYTES} digits; the protocol cannot carry it")
    return n


def _check_timeout(timeout: Any, what: str = "timeout") -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(timeout).__name__}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"{what} must be a positive, finite number of seconds, got {timeout!r}")
    return float(timeout)


def _check_window(window: Any) -> int:
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, not {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    return window


def _accept_for(format: str) -> str:
    try:
        return _ACCEPT[format]
    except (KeyError, TypeError):
        raise ValueError(f"format must be 'binary' or 'decimal', got {format!r}") from None


def _check_reply_queue(reply_queue: str) -> str:
    if reply_queue not in _REPLY_QUEUES:
        raise ValueError(f"reply_queue must be 'direct' or 'exclusive', got {reply_queue!r}")
    return reply_queue


def _connection_parameters(url: str | None, connection_name: str | None, kind: str) -> pika.URLParameters:
    params = pika.URLParameters(url or DEFAULT_URL)
    if connection_name is None:
        connection_name = f"fastfib {kind} pid={os.getpid()} {uuid.uuid4().hex[:8]}"
    props = dict(params.client_properties or {})
    props.setdefault("product", "fastfib")
    props["connection_name"] = connection_name
    params.client_properties = props
    return params


def _timeout_message(queue: str, timeout: float, unanswered: int, total: int, note: str) -> str:
    what = "no reply" if total == 1 else f"{unanswered} of {total} requests unanswered"
    return f"{what} from queue {queue!r} within {timeout:g} s{note}"


def _consumer_note(method_frame: Any) -> str:
    """The part of a timeout message that describes the service queue."""
    consumers = method_frame.consumer_count
    if consumers == 0:
        return "; the queue has no consumer (is a server running?)"
    return f" ({consumers} consumer(s), {method_frame.message_count} request(s) waiting)"


def _unroutable(queue: str, method: Any) -> Unroutable:
    return Unroutable(
        f"the broker could not route the request to queue {queue!r} "
        f"({method.reply_code} {method.reply_text}): does the queue exist?"
    )


def _is_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, _AUTH_ERRORS)


def _lost_message(queue: str, cause: BaseException | None) -> str:
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return f"the connection to the broker was lost{why} and could not be restored in time (queue {queue!r})"


class _RequestProperties(BasicProperties):
    """The properties of a request, encoded from a per-client template.

    pika's ``BasicProperties`` sets 14 attributes and re-encodes every field,
    headers table included, on every publish. A request's properties differ
    only in ``correlation_id``, ``expiration`` and ``x-deadline-ms``, so this
    subclass keeps the rest as ready-made bytes and produces exactly what
    pika's ``encode()`` would (``tests/test_client_unit.py`` checks byte for
    byte). Only ``encode()`` and ``INDEX`` are used by pika's publish path;
    the attributes are there for whoever inspects a request.
    """

    # Everything this request does not set, as BasicProperties.__init__ would leave it.
    content_type = content_encoding = delivery_mode = priority = None
    message_id = timestamp = type = user_id = app_id = cluster_id = None

    def __init__(self, template: _PropertiesTemplate, correlation_id: str, expiration: str, deadline_ms: int) -> None:
        self._template = template
        self.correlation_id = correlation_id
        self.expiration = expiration
        self._deadline_ms = deadline_ms

    @property
    def reply_to(self) -> str:  # type: ignore[override]
        return self._template.reply_to

    @property
    def headers(self) -> dict:  # type: ignore[override]
        return {HEADER_ACCEPT: self._template.accept, HEADER_DEADLINE: self._deadline_ms}

    def __repr__(self) -> str:
        return (
            f"<RequestProperties correlation_id={self.correlation_id!r} reply_to={self.reply_to!r} "
            f"expiration={self.expiration!r} headers={self.headers!r}>"
        )

    def encode(self) -> list[bytes]:
        t = self._template
        corr = self.correlation_id.encode()
        exp = self.expiration.encode()
        return [
            t.head,
            _pack_deadline(self._deadline_ms),
            _pack_len(len(corr)) + corr,
            t.reply_to_short,
            _pack_len(len(exp)) + exp,
        ]


_pack_len = struct.Struct(">B").pack
_pack_deadline = struct.Struct(">q").pack


class _PropertiesTemplate:
    """The constant part of a client's request properties (see :class:`_RequestProperties`)."""

    __slots__ = ("accept", "reply_to", "head", "reply_to_short")

    def __init__(self, accept: str, reply_to: str) -> None:
        self.accept = accept
        self.reply_to = reply_to
        flags = (
            BasicProperties.FLAG_HEADERS
            | BasicProperties.FLAG_CORRELATION_ID
            | BasicProperties.FLAG_REPLY_TO
            | BasicProperties.FLAG_EXPIRATION
        )
        accept_b = accept.encode()
        # The headers table as pika encodes it: {accept: str -> 'S' long string,
        # x-deadline-ms: an int beyond 32 bits -> 'l' signed 64-bit}; the 8 bytes of the
        # deadline itself follow the head.
        entries = (
            _short(HEADER_ACCEPT) + b"S" + struct.pack(">I", len(accept_b)) + accept_b
            + _short(HEADER_DEADLINE) + b"l"
        )
        self.head = struct.pack(">HI", flags, len(entries) + 8) + entries
        self.reply_to_short = _short(reply_to)

    def __call__(self, correlation_id: str, expiration: str, deadline_ms: int) -> BasicProperties:
        if deadline_ms < 2**31:  # never, for a Unix-epoch ms deadline; pika would pick a 32-bit int
            return BasicProperties(
                reply_to=self.reply_to,
                correlation_id=correlation_id,
                expiration=expiration,
                headers={HEADER_ACCEPT: self.accept, HEADER_DEADLINE: deadline_ms},
            )
        return _RequestProperties(self, correlation_id, expiration, deadline_ms)


def _short(text: str) -> bytes:
    raw = text.encode()
    return _pack_len(len(raw)) + raw


# --- the blocking client -------------------------------------------------------------------


class _Slot:
    """One request in flight."""

    __slots__ = ("body", "deadline", "deadline_ms", "value", "error", "done", "index")

    def __init__(self, body: bytes, deadline: float, deadline_ms: int, index: int = 0) -> None:
        self.body = body
        self.deadline = deadline  # time.monotonic()
        self.deadline_ms = deadline_ms  # Unix epoch ms, the x-deadline-ms header
        self.value: int | None = None
        self.error: BaseException | None = None
        self.done = False
        self.index = index


class _ClientSettings:
    """The constructor arguments both clients share, checked and stored once."""

    def _init_settings(self, url: str | None, queue: str, timeout: float | None, format: str, reply_queue: str,
                       connection_name: str | None, kind: str) -> None:
        self.queue = queue
        self.timeout = DEFAULT_TIMEOUT if timeout is None else _check_timeout(timeout)
        self.format = format
        self._accept = _accept_for(format)
        self.reply_queue = _check_reply_queue(reply_queue)
        self._params = _connection_parameters(url, connection_name, kind)
        self.connection_name: str = self._params.client_properties["connection_name"]


class FibonacciRpcClient(_ClientSettings):
    """Blocking client of the Fibonacci RPC service.

    >>> with FibonacciRpcClient() as fib:          # doctest: +SKIP
    ...     fib.call(30)
    ...     fib.call_many(range(10))
    832040
    [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]

    ``url`` is an AMQP URL (default ``amqp://guest:guest@localhost:5672/%2F``),
    ``queue`` the service queue. ``timeout`` (seconds, default
    :data:`DEFAULT_TIMEOUT`) applies to each :meth:`call` and to each
    :meth:`call_many` batch unless the call passes its own. ``format`` is the
    reply encoding asked for: ``"binary"`` (default) or ``"decimal"``; either
    way the reply is decoded by its own content type. ``reply_queue`` is
    ``"direct"`` (Direct Reply-to, default) or ``"exclusive"`` (a server-named
    exclusive queue). ``connection_name`` is shown by the broker
    (``rabbitmqctl list_connections client_properties``).

    The constructor connects; a failure raises :class:`~fastfib.errors.ConnectionLost`.

    A client may be shared between threads: each call holds the client's lock,
    so calls from several threads are serialized over the one connection.
    """

    def __init__(
        self,
        url: str | None = None,
        queue: str = DEFAULT_QUEUE,
        *,
        timeout: float | None = None,
        format: str = "binary",
        reply_queue: str = REPLY_DIRECT,
        connection_name: str | None = None,
    ) -> None:
        self._init_settings(url, queue, timeout, format, reply_queue, connection_name, "client")
        self._default_socket_timeout = self._params.socket_timeout
        self._default_stack_timeout = self._params.stack_timeout

        self._lock = threading.Lock()
        self._pending: dict[str, _Slot] = {}
        self._completed: list[_Slot] = []
        self._conn: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._reply_to: str = DIRECT_REPLY_TO
        self._closed = False
        try:
            self._connect()
        except _AUTH_ERRORS as exc:
            raise ConnectionLost(f"the broker refused the connection: {exc!r}") from exc
        except _LINK_ERRORS as exc:
            raise ConnectionLost(f"cannot connect to the broker: {exc!r}") from exc

    # --- context manager and lifetime ------------------------------------------------

    def __enter__(self) -> FibonacciRpcClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection. Idempotent; the client cannot be used afterwards."""
        with self._lock:
            self._closed = True
            self._drop_connection()

    @property
    def is_open(self) -> bool:
        conn = self._conn
        return not self._closed and conn is not None and conn.is_open

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<FibonacciRpcClient queue={self.queue!r} format={self.format!r} {state}>"

    # --- the API ---------------------------------------------------------------------

    def call(self, n: int, timeout: float | None = None) -> int:
        """F(n), computed by the service.

        Raises ``TypeError``/``ValueError`` for a bad ``n`` before sending,
        :class:`~fastfib.errors.RemoteError` (a subclass per kind) when the
        server answers with an error, :class:`~fastfib.errors.RpcTimeout`
        when no reply came within ``timeout`` seconds,
        :class:`~fastfib.errors.Unroutable` at once when the service queue
        does not exist, :class:`~fastfib.errors.ConnectionLost` when the
        connection was lost and could not be restored within the timeout.
        """
        if type(n) is not int or n < 0 or n > _MAX_WIRE_N:
            n = _check_n(n)
        t = self.timeout if timeout is None else _check_timeout(timeout)
        body = b"%d" % n
        with self._lock:
            if self._closed:
                raise RpcError("the client is closed")
            now = monotonic()
            slot = _Slot(body, now + t, int((time.time() + t) * 1000))
            corr = uuid.uuid4().hex
            pending = self._pending
            pending[corr] = slot
            try:
                channel = self._channel
                if channel is None:  # a previous recovery failed: connect (and send) now
                    self._recover(slot.deadline, None)
                else:
                    try:
                        channel.basic_publish(
                            "", self.queue, body, self._props(corr, str(int(t * 1000) or 1), slot.deadline_ms), True
                        )
                    except _LINK_ERRORS as exc:
                        self._recover(slot.deadline, exc)
                while not slot.done:
                    remaining = slot.deadline - monotonic()
                    if remaining <= 0:
                        pending.pop(corr, None)
                        raise RpcTimeout(_timeout_message(self.queue, t, 1, 1, self._queue_note()))
                    try:
                        self._conn.process_data_events(remaining)
                    except _LINK_ERRORS as exc:
                        if not slot.done:
                            self._recover(slot.deadline, exc)
            finally:
                pending.pop(corr, None)
                self._completed.clear()
        if slot.error is not None:
            raise slot.error
        return slot.value

    def call_many(
        self,
        ns: Iterable[int],
        window: int = 64,
        timeout: float | None = None,
        *,
        return_exceptions: bool = False,
    ) -> list:
        """[F(n) for n in ns], pipelined over the one connection, in order.

        At most ``window`` requests are in flight at a time. ``timeout`` is
        the budget of the whole batch. Every n is checked before anything is
        sent. The first error (in arrival order) is raised and the rest of the
        batch abandoned (late replies are dropped), unless
        ``return_exceptions`` is true: then a failed request's place in the
        list holds its :class:`~fastfib.errors.RemoteError` or
        :class:`~fastfib.errors.Unroutable`. A timeout or a lost connection
        always raises.
        """
        ns = [n if type(n) is int and 0 <= n <= _MAX_WIRE_N else _check_n(n) for n in ns]
        window = _check_window(window)
        t = self.timeout if timeout is None else _check_timeout(timeout)
        total = len(ns)
        results: list = [None] * total
        if not total:
            return results
        with self._lock:
            if self._closed:
                raise RpcError("the client is closed")
            deadline = monotonic() + t
            deadline_ms = int((time.time() + t) * 1000)
            pending = self._pending
            completed = self._completed
            completed.clear()
            queue = self.queue
            sent = done = 0
            mine: list[str] = []
            if self._channel is None:  # a previous recovery failed: connect now
                self._recover(deadline, None)
            try:
                while done < total:
                    # Keep the window full.
                    if sent < total and sent - done < window:
                        expiration = str(max(1, int((deadline - monotonic()) * 1000)))
                        try:
                            while sent < total and sent - done < window:
                                body = b"%d" % ns[sent]
                                corr = uuid.uuid4().hex
                                pending[corr] = _Slot(body, deadline, deadline_ms, sent)
                                mine.append(corr)
                                sent += 1
                                self._channel.basic_publish(
                                    "", queue, body, self._props(corr, expiration, deadline_ms), True
                                )
                        except _LINK_ERRORS as exc:
                            self._recover(deadline, exc)
                    if not completed:
                        remaining = deadline - monotonic()
                        if remaining <= 0:
                            note = self._queue_note()
                            raise RpcTimeout(_timeout_message(queue, t, total - done, total, note))
                        try:
                            self._conn.process_data_events(remaining)
                        except _LINK_ERRORS as exc:
                            self._recover(deadline, exc)
                    for slot in completed:
                        if slot.error is not None:
                            if not return_exceptions:
                                raise slot.error
                            results[slot.index] = slot.error
                        else:
                            results[slot.index] = slot.value
                    done += len(completed)
                    completed.clear()
            finally:
                for corr in mine:
                    pending.pop(corr, None)
                completed.clear()
        return results

    # --- callbacks (run inside process_data_events, on the calling thread) -----------

    def _on_reply(self, channel: Any, method: Any, props: BasicProperties, body: bytes) -> None:
        slot = self._pending.pop(props.correlation_id, None)
        if slot is None:
            _log.debug("dropping a reply with unknown or duplicate correlation id %r", props.correlation_id)
            return
        try:
            slot.value = decode_reply(props.content_type, props.headers, body)
        except (RemoteError, ProtocolError) as exc:
            slot.error = exc
        except Exception as exc:  # a reply no decoder expected: never let it escape into pika
            slot.error = ProtocolError(f"cannot decode the reply: {exc!r}")
        slot.done = True
        self._completed.append(slot)

    def _on_return(self, channel: Any, method: Any, props: BasicProperties, body: bytes) -> None:
        slot = self._pending.pop(props.correlation_id, None)
        if slot is None:
            _log.debug("dropping a returned request with unknown correlation id %r", props.correlation_id)
            return
        slot.error = _unroutable(method.routing_key, method)
        slot.done = True
        self._completed.append(slot)

    # --- connection management -------------------------------------------------------

    def _connect(self) -> None:
        conn = pika.BlockingConnection(self._params)
        try:
            channel = conn.channel()
            channel.add_on_return_callback(self._on_return)
            if self.reply_queue == REPLY_EXCLUSIVE:
                reply_to = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            else:
                reply_to = DIRECT_REPLY_TO
            # Direct Reply-to requires consuming, with auto-ack, before publishing.
            channel.basic_consume(reply_to, self._on_reply, auto_ack=True)
        except BaseException:
            _close_quietly(conn)
            raise
        self._conn, self._channel, self._reply_to = conn, channel, reply_to
        self._props = _PropertiesTemplate(self._accept, reply_to)

    def _drop_connection(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            _close_quietly(conn)

    def _recover(self, deadline: float, cause: BaseException | None) -> None:
        """Reconnect and resend every pending request, before ``deadline``.

        Raises :class:`ConnectionLost` when that is not possible: the deadline
        passed, or the broker refused the credentials (which no retry cures).
        """
        if self._closed:
            raise RpcError("the client is closed") from cause
        if cause is not None and _is_auth_error(cause):
            raise ConnectionLost(f"the broker refused the connection: {cause!r}") from cause
        delay = _RECONNECT_FIRST_DELAY
        last = cause
        params = self._params
        try:
            while True:
                self._drop_connection()
                remaining = deadline - monotonic()
                if remaining <= 0:
                    raise ConnectionLost(_lost_message(self.queue, last)) from last
                # Bound each attempt by the caller's remaining time.
                params.socket_timeout = max(0.05, min(self._default_socket_timeout or remaining, remaining))
                params.stack_timeout = max(0.05, min(self._default_stack_timeout or remaining, remaining))
                try:
                    self._connect()
                except _AUTH_ERRORS as exc:
                    raise ConnectionLost(f"the broker refused the connection: {exc!r}") from exc
                except _LINK_ERRORS as exc:
                    last = exc
                    time.sleep(max(0.0, min(delay, deadline - monotonic())))
                    delay = min(delay * 2, _RECONNECT_MAX_DELAY)
                    continue
                try:
                    self._await_queue(deadline)
                    self._resend_pending()
                except _LINK_ERRORS as exc:
                    last = exc
                    continue
                _log.info("reconnected to the broker and resent %d request(s)", len(self._pending))
                return
        finally:
            params.socket_timeout = self._default_socket_timeout
            params.stack_timeout = self._default_stack_timeout

    def _await_queue(self, deadline: float) -> None:
        """After a reconnect, wait (until ``deadline``) for the service queue to exist again.

        A broker restart takes a non-durable service queue with it, and the
        servers declare it again only once they have reconnected, which may be
        seconds after this client did: resent at once, the requests would come
        back unroutable. One passive ``queue_declare`` per try, on a channel of
        its own (a 404 closes it); no permission is needed for it. If the queue
        is still missing at the deadline, the resend reports it (Unroutable).
        """
        delay = _RECONNECT_FIRST_DELAY
        while True:
            try:
                channel = self._conn.channel()
                channel.queue_declare(self.queue, passive=True)
                channel.close()
                return
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    return
            remaining = deadline - monotonic()
            if remaining <= 0:
                return
            self._conn.sleep(min(delay, remaining))  # keeps serving the connection meanwhile
            delay = min(delay * 2, _RECONNECT_MAX_DELAY / 2)

    def _resend_pending(self) -> None:
        now = monotonic()
        for corr, slot in list(self._pending.items()):
            expiration = str(max(1, int((slot.deadline - now) * 1000)))
            self._channel.basic_publish("", self.queue, slot.body, self._props(corr, expiration, slot.deadline_ms), True)

    def _queue_note(self) -> str:
        """Describe the service queue for a timeout message (one passive declare)."""
        conn = self._conn
        if conn is None or not conn.is_open:
            return ""
        try:
            channel = conn.channel()
        except _LINK_ERRORS:
            return ""
        try:
            frame = channel.queue_declare(self.queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return "; the queue does not exist"
            return ""
        except _LINK_ERRORS:
            return ""
        try:
            channel.close()
        except _LINK_ERRORS:
            pass
        return _consumer_note(frame.method)


def _close_quietly(conn: Any) -> None:
    try:
        if conn.is_open:
            conn.close()
    except Exception:  # already closing, socket gone, ...
        _log.debug("error closing a connection", exc_info=True)
