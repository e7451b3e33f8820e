"""The blocking client: :class:`FibonacciRpcClient`.

One client holds one broker connection and one channel at a time. A request is
published to the default exchange with routing key = the service queue,
``mandatory`` set, a fresh ``correlation_id`` (32 hex digits), ``expiration`` and
``x-deadline-ms`` derived from the timeout, and ``accept`` naming the reply
encoding; the reply comes back on Direct Reply-to (or on an exclusive
server-named queue) and is decoded by its own ``content_type`` and ``x-error``
(see ``docs/protocol.md``). Requests are published with publisher confirms,
settled asynchronously: a nacked request is sent again at once. When the
connection is lost, the client connects to the next broker URL and sends every
pending request again. ``docs/client.md`` explains the design choices; what
this client shares with :mod:`fastfib.aio` is in :mod:`fastfib.rpc_base`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from time import monotonic
from typing import Any

import pika
import pika.exceptions
from pika.spec import BasicProperties

from . import pika_seam
from .errors import ConnectionLost, ProtocolError, RemoteError, RpcError, RpcTimeout
from .protocol import DEFAULT_QUEUE, DIRECT_REPLY_TO, decode_reply
from .rpc_base import (
    AUTH_ERRORS,
    DEFAULT_STALL_TIMEOUT,
    DEFAULT_TIMEOUT,
    LINK_ERRORS,
    MAX_WIRE_N,
    RECONNECT_FIRST_DELAY,
    RECONNECT_MAX_DELAY,
    REPLY_DIRECT,
    REPLY_EXCLUSIVE,
    ClientSettings,
    Confirms,
    CorrelationIds,
    NoConfirms,
    StalledConnection,
    check_n,
    check_timeout,
    check_window,
    connect_error,
    consumer_note,
    fast_wire_works,
    lost_message,
    nack_delay,
    request_properties,
    timeout_message,
    unroutable,
)

__all__ = ["FibonacciRpcClient", "DEFAULT_TIMEOUT", "REPLY_DIRECT", "REPLY_EXCLUSIVE"]

_log = logging.getLogger(__name__)

#: How long opening confirm mode may take before the connection counts as broken, in seconds.
_CONFIRM_SELECT_TIMEOUT = 10.0


class _PublicWire:
    """What :class:`fastfib.pika_seam.ClientWire` does, with pika's public API only: the fallback
    when the seam's self-check fails. Publisher confirms are then synchronous (pika's
    ``confirm_delivery()``): one round trip per request."""

    def __init__(self, conn: pika.BlockingConnection, channel: Any,
                 on_return: Callable[..., None], on_nacked: Callable[[str], None]) -> None:
        self._conn, self._channel = conn, channel
        self._on_return, self._on_nacked = on_return, on_nacked
        self._queue = self._reply_to = self._accept = ""

    def confirm_select(self, on_ack: Any, on_nack: Any, timeout: float) -> None:
        self._channel.confirm_delivery()

    def consume(self, queue: str, on_reply: Callable[[Any, bytes], None], on_bad: Any) -> None:
        self._channel.basic_consume(queue, lambda _ch, _m, props, body: on_reply(props, body), auto_ack=True)

    def prepare(self, queue: str, reply_to: str, accept: str) -> None:
        self._queue, self._reply_to, self._accept = queue, reply_to, accept

    def publish(self, correlation_id: str, expiration: str, deadline_ms: int, body: bytes) -> None:
        props = request_properties(self._reply_to, self._accept, correlation_id, expiration, deadline_ms)
        try:
            self._channel.basic_publish("", self._queue, body, props, True)
        except pika.exceptions.UnroutableError as exc:  # confirm mode: returns are raised, not called back
            for message in exc.messages:
                self._on_return(self._channel, message.method, message.properties, message.body)
        except pika.exceptions.NackError:
            self._on_nacked(correlation_id)

    def flush(self) -> None:
        pass

    def wait(self, timeout: float, done: Callable[[], Any]) -> None:
        deadline = monotonic() + timeout
        while True:
            self._conn.process_data_events(max(0.0, deadline - monotonic()))
            if done() or monotonic() >= deadline:
                return


# --- the blocking client -------------------------------------------------------------------


class _Slot:
    """One request in flight."""

    __slots__ = ("body", "deadline", "deadline_ms", "value", "error", "done", "index", "nacks")

    def __init__(self, body: bytes, deadline: float, deadline_ms: int, index: int = 0) -> None:
        self.body = body
        self.deadline = deadline  # time.monotonic()
        self.deadline_ms = deadline_ms  # Unix epoch ms, the x-deadline-ms header
        self.value: int | None = None
        self.error: BaseException | None = None
        self.done = False
        self.index = index
        self.nacks = 0


class FibonacciRpcClient(ClientSettings):
    """Blocking client of the Fibonacci RPC service.

    >>> with FibonacciRpcClient() as fib:          # doctest: +SKIP
    ...     fib.call(30)
    ...     fib.call_many(range(10))
    832040
    [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]

    ``url`` is an AMQP URL, or several (the nodes of a cluster): a list, or
    one string with the URLs separated by spaces or commas. ``None`` reads
    ``$FASTFIB_URL``, else uses ``amqp://guest:guest@localhost:5672/%2F``.
    The client connects to the first URL that answers; when it loses that
    node it connects to the next one and sends its pending requests again.
    ``queue`` is the service queue. ``timeout`` (seconds, default
    :data:`DEFAULT_TIMEOUT`) applies to each :meth:`call` and to each
    :meth:`call_many` batch unless the call passes its own. ``format`` is the
    reply encoding asked for: ``"binary"`` (default) or ``"decimal"``; either
    way the reply is decoded by its own content type. ``reply_queue`` is
    ``"direct"`` (Direct Reply-to, default) or ``"exclusive"`` (a server-named
    exclusive queue). ``connection_name`` is shown by the broker
    (``rabbitmqctl list_connections client_properties``). When requests are
    pending, no reply has come for ``stall_timeout`` seconds and the service
    queue holds no waiting request, the replies are taken as lost: the client
    reconnects (to the next URL) and resends (see ``docs/client.md``).
    ``confirms=False`` publishes without publisher confirms: about 10 % more
    pipelined throughput, but a request the broker nacks is then only noticed
    at its timeout.

    The constructor connects; when no URL can be reached it raises
    :class:`~fastfib.errors.ConnectionLost` naming each host:port tried.

    A client may be shared between threads: each call holds the client's lock,
    so calls from several threads are serialized over the one connection.
    """

    def __init__(
        self,
        url: str | Iterable[str] | None = None,
        queue: str = DEFAULT_QUEUE,
        *,
        timeout: float | None = None,
        format: str = "binary",
        reply_queue: str = REPLY_DIRECT,
        connection_name: str | None = None,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        confirms: bool = True,
    ) -> None:
        self._init_settings(url, queue, timeout, format, reply_queue, connection_name, "client", stall_timeout,
                            confirms)
        self._lock = threading.Lock()
        self._pending: dict[str, _Slot] = {}
        self._completed: list[_Slot] = []
        self._conn: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._link: Any = None  # pika_seam.ClientWire, or _PublicWire
        self._new_corr = CorrelationIds()
        self._reply_to: str = DIRECT_REPLY_TO
        self._confirms: Confirms | NoConfirms = NoConfirms()
        self._nacked: list[tuple[float, str]] = []  # (when to resend, correlation id)
        self._closed = False
        self._connect_round(advance=False, deadline=None)

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
        connection was lost and no broker URL could be reached within the timeout.
        """
        if type(n) is not int or n < 0 or n > MAX_WIRE_N:
            n = check_n(n)
        t = self.timeout if timeout is None else check_timeout(timeout)
        body = b"%d" % n
        with self._lock:
            if self._closed:
                raise RpcError("the client is closed")
            now = monotonic()
            slot = _Slot(body, now + t, int((time.time() + t) * 1000))
            corr = self._new_corr()
            pending = self._pending
            if not pending:
                self._last_progress = now
            pending[corr] = slot
            try:
                if self._channel is None:  # a previous recovery failed: connect (and send) now
                    self._recover(slot.deadline, None)
                else:
                    try:
                        self._publish(corr, slot, str(int(t * 1000) or 1))
                    except LINK_ERRORS as exc:
                        self._recover(slot.deadline, exc)
                while not slot.done:
                    remaining = slot.deadline - monotonic()
                    if remaining <= 0:
                        pending.pop(corr, None)
                        raise RpcTimeout(timeout_message(self.queue, t, 1, 1, self._queue_note()))
                    try:
                        self._link.wait(min(remaining, self._wait_limit()), lambda: slot.done)
                        if self._nacked:
                            self._resend_nacked()
                        if monotonic() - self._last_progress > self.stall_timeout and not slot.done:
                            self._check_stall()
                    except LINK_ERRORS as exc:
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
        that could not be restored in time always raises.
        """
        ns = [n if type(n) is int and 0 <= n <= MAX_WIRE_N else check_n(n) for n in ns]
        window = check_window(window)
        t = self.timeout if timeout is None else check_timeout(timeout)
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
            if not pending:
                self._last_progress = monotonic()
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
                            link, confirms = self._link, self._confirms
                            new_corr = self._new_corr
                            while sent < total and sent - done < window:
                                body = b"%d" % ns[sent]
                                corr = new_corr()
                                pending[corr] = _Slot(body, deadline, deadline_ms, sent)
                                mine.append(corr)
                                sent += 1
                                confirms.published(corr)
                                link.publish(corr, expiration, deadline_ms, body)
                            link.flush()
                        except LINK_ERRORS as exc:
                            self._recover(deadline, exc)
                    if not completed:
                        remaining = deadline - monotonic()
                        if remaining <= 0:
                            note = self._queue_note()
                            raise RpcTimeout(timeout_message(queue, t, total - done, total, note))
                        try:
                            self._link.wait(min(remaining, self._wait_limit()), completed.__len__)
                            if self._nacked:
                                self._resend_nacked()
                            if not completed and monotonic() - self._last_progress > self.stall_timeout:
                                self._check_stall()
                        except LINK_ERRORS as exc:
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

    def consumer_count(self) -> int | None:
        """The number of consumers of the service queue now, or None when the queue does not exist.

        One passive ``queue_declare`` on a channel of its own; raises
        :class:`~fastfib.errors.ConnectionLost` when the client is not connected.
        """
        with self._lock:
            if self._conn is None or not self._conn.is_open:
                raise ConnectionLost("the client is not connected")
            try:
                method = self._declare_passive()
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 404:
                    return None
                raise
            except LINK_ERRORS as exc:
                raise ConnectionLost(lost_message(self.queue, exc)) from exc
            return method.consumer_count

    # --- publishing and its confirms --------------------------------------------------

    def _publish(self, corr: str, slot: _Slot, expiration: str) -> None:
        """Publish one request and write it out now."""
        self._confirms.published(corr)
        self._link.publish(corr, expiration, slot.deadline_ms, slot.body)
        self._link.flush()

    def _on_ack(self, confirms: Confirms, tag: int, multiple: bool) -> None:
        """``Basic.Ack`` of our requests (runs inside the connection's frame processing)."""
        if confirms is self._confirms:  # else a late confirm of a connection given up on
            confirms.settle(tag, multiple)

    def _on_nack(self, confirms: Confirms, tag: int, multiple: bool) -> None:
        """``Basic.Nack``: the broker did not take these requests; they are sent again once the
        connection hands control back."""
        if confirms is self._confirms:
            self._nacked_corrs(confirms.settle(tag, multiple))

    def _nacked_corrs(self, corrs: Iterable[str]) -> None:
        now = monotonic()
        for corr in corrs:
            slot = self._pending.get(corr)
            if slot is not None and not slot.done:
                self.counters.nacked += 1
                slot.nacks += 1
                self._nacked.append((now + nack_delay(slot.nacks), corr))

    def _check_stall(self) -> None:
        """Nothing came back for ``stall_timeout`` seconds: give up this connection if the requests are lost.

        A backlog (requests waiting in the service queue) explains the silence:
        wait on. An empty queue does not: the requests or their replies were
        lost (seen on a RabbitMQ 3.10 cluster: a channel whose first publish
        came while the quorum queue elected a new leader had every request
        confirmed and none queued). Raise so that the caller reconnects (a new
        channel, on the next URL) and resends.
        """
        self._last_progress = monotonic()
        try:
            waiting = self._declare_passive().message_count
        except pika.exceptions.ChannelClosedByBroker:
            return  # the queue is gone: the resend path reports it as unroutable if it stays so
        if waiting == 0:
            error = StalledConnection(
                f"no reply for {self.stall_timeout:g} s while {len(self._pending)} request(s) were pending "
                "and the service queue held none"
            )
            _log.warning("%s; reconnecting", error)
            raise error

    def _resend_nacked(self) -> None:
        now = monotonic()
        due = [corr for when, corr in self._nacked if when <= now]
        self._nacked = [item for item in self._nacked if item[0] > now]
        for corr in due:
            slot = self._pending.get(corr)
            if slot is not None and not slot.done:
                self._publish(corr, slot, str(max(1, int((slot.deadline - now) * 1000))))
                self.counters.resent += 1

    def _wait_limit(self) -> float:
        """How long process_data_events may wait: until the stall check, or the next nacked resend."""
        if not self._nacked:
            return self.stall_timeout
        return max(0.0, min(self.stall_timeout, min(when for when, _ in self._nacked) - monotonic()))

    # --- callbacks (run while the connection is served, on the calling thread) -------

    def _on_reply(self, props: Any, body: bytes) -> None:
        """A reply (``props``: fastfib.wire's Properties, or pika's for what pika decoded)."""
        self._last_progress = monotonic()
        slot = self._pending.pop(props.correlation_id, None)
        if slot is None:
            self.counters.duplicates += 1
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

    def _on_bad_reply(self, bad: Any) -> None:
        """A reply whose properties do not decode (a :class:`fastfib.wire.BadDelivery`)."""
        self._last_progress = monotonic()
        slot = self._pending.pop(bad.correlation_id, None) if bad.correlation_id is not None else None
        if slot is None:
            _log.warning("dropping a reply that cannot be decoded: %r", bad.error)
            return
        slot.error = ProtocolError(f"cannot decode the reply: {bad.error!r}")
        slot.done = True
        self._completed.append(slot)

    def _on_return(self, channel: Any, method: Any, props: BasicProperties, body: bytes) -> None:
        slot = self._pending.pop(props.correlation_id, None)
        if slot is None:
            _log.debug("dropping a returned request with unknown correlation id %r", props.correlation_id)
            return
        slot.error = unroutable(method.routing_key, method)
        slot.done = True
        self._completed.append(slot)

    # --- connection management -------------------------------------------------------

    def _connect_round(self, advance: bool, deadline: float | None) -> None:
        """Connect to the first URL that answers, starting with the current one or the next.

        Raises :class:`ConnectionLost` naming every host:port tried when none
        did; with ``deadline``, each attempt is bounded by the time left.
        """
        failures: list[tuple[str, BaseException]] = []
        refused = True
        for index in self._rotation(advance):
            params = self._params[index]
            socket_timeout, stack_timeout = params.socket_timeout, params.stack_timeout
            if deadline is not None:
                remaining = deadline - monotonic()
                if remaining <= 0 and failures:
                    break
                params.socket_timeout = max(0.05, min(socket_timeout or remaining, remaining))
                params.stack_timeout = max(0.05, min(stack_timeout or remaining, remaining))
            try:
                self._connect(params)
            except AUTH_ERRORS as exc:
                failures.append((self.urls[index], exc))
            except LINK_ERRORS as exc:
                failures.append((self.urls[index], exc))
                refused = False
            else:
                self._url_index = index
                return
            finally:
                params.socket_timeout, params.stack_timeout = socket_timeout, stack_timeout
        raise connect_error(failures, refused) from failures[-1][1]

    def _connect(self, params: pika.URLParameters) -> None:
        fast = fast_wire_works()
        conn = pika_seam.ClientWire.connect(params) if fast else pika.BlockingConnection(params)
        try:
            channel = conn.channel()
            channel.add_on_return_callback(self._on_return)
            if fast:
                link: Any = pika_seam.ClientWire(conn, channel)
            else:
                link = _PublicWire(conn, channel, self._on_return, lambda corr: self._nacked_corrs([corr]))
            confirms: Confirms | NoConfirms = NoConfirms()
            if self.confirms:
                if fast:  # settled asynchronously; the public API's confirms need no bookkeeping
                    confirms = Confirms()
                bound = confirms
                link.confirm_select(lambda tag, multiple: self._on_ack(bound, tag, multiple),
                                    lambda tag, multiple: self._on_nack(bound, tag, multiple), _CONFIRM_SELECT_TIMEOUT)
            if self.reply_queue == REPLY_EXCLUSIVE:
                reply_to = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            else:
                reply_to = DIRECT_REPLY_TO
            # Direct Reply-to requires consuming, with auto-ack, before publishing.
            link.consume(reply_to, self._on_reply, self._on_bad_reply)
            link.prepare(self.queue, reply_to, self._accept)
        except BaseException:
            _close_quietly(conn)
            raise
        self._conn, self._channel, self._reply_to, self._link = conn, channel, reply_to, link
        self._confirms = confirms
        self._last_progress = monotonic()
        self._nacked.clear()  # whatever was nacked is resent with every pending request

    def _drop_connection(self) -> None:
        conn, self._conn, self._channel, self._link = self._conn, None, None, None
        if conn is not None:
            _close_quietly(conn)

    def _recover(self, deadline: float, cause: BaseException | None) -> None:
        """Connect to the next URL that answers and resend every pending request, before ``deadline``.

        Raises :class:`ConnectionLost` when that is not possible: the deadline
        passed, or every node refused the credentials (which no retry cures).
        """
        if self._closed:
            raise RpcError("the client is closed") from cause
        if cause is not None:
            _log.info("lost the connection to the broker: %r", cause)
        delay = RECONNECT_FIRST_DELAY
        last = cause
        while True:
            self._drop_connection()
            if deadline - monotonic() <= 0:
                if isinstance(cause, StalledConnection):  # connected all along: the replies did not come
                    raise RpcTimeout(f"no reply from queue {self.queue!r} in time: {cause}") from cause
                raise ConnectionLost(lost_message(self.queue, last)) from last
            try:
                self._connect_round(advance=True, deadline=deadline)
            except ConnectionLost as exc:
                if exc.refused:
                    raise
                last = exc
                time.sleep(max(0.0, min(delay, deadline - monotonic())))
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            self.counters.reconnects += 1
            try:
                self._await_queue(deadline)
                resent = self._resend_pending()
            except LINK_ERRORS as exc:
                last = exc
                continue
            _log.info("reconnected to %s and resent %d request(s)", self.endpoint, resent)
            return

    def _await_queue(self, deadline: float) -> None:
        """After a reconnect, wait (until ``deadline``) for the service queue to exist again.

        A broker restart takes a non-durable service queue with it, and the
        servers declare it again only once they have reconnected, which may be
        seconds after this client did: resent at once, the requests would come
        back unroutable. One passive ``queue_declare`` per try, on a channel of
        its own (a 404 closes it); no permission is needed for it. If the queue
        is still missing at the deadline, the resend reports it (Unroutable).
        """
        delay = RECONNECT_FIRST_DELAY
        while True:
            try:
                self._declare_passive()
                return
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    return
            remaining = deadline - monotonic()
            if remaining <= 0:
                return
            self._conn.sleep(min(delay, remaining))  # keeps serving the connection meanwhile
            delay = min(delay * 2, RECONNECT_MAX_DELAY / 2)

    def _resend_pending(self) -> int:
        """Publish every pending request on the new connection; fib is idempotent, duplicates are dropped."""
        now = monotonic()
        count = 0
        for corr, slot in list(self._pending.items()):
            if not slot.done:
                self._publish(corr, slot, str(max(1, int((slot.deadline - now) * 1000))))
                count += 1
        self.counters.resent += count
        return count

    def _declare_passive(self) -> Any:
        """``Queue.DeclareOk`` of the service queue, asked on a channel of its own (a 404 closes it)."""
        channel = self._conn.channel()
        method = channel.queue_declare(self.queue, passive=True).method
        try:
            channel.close()
        except LINK_ERRORS:
            pass
        return method

    def _queue_note(self) -> str:
        """Describe the service queue for a timeout message (one passive declare)."""
        conn = self._conn
        if conn is None or not conn.is_open:
            return ""
        try:
            return consumer_note(self._declare_passive())
        except pika.exceptions.ChannelClosedByBroker as exc:
            return "; the queue does not exist" if exc.reply_code == 404 else ""
        except LINK_ERRORS:
            return ""


def _close_quietly(conn: Any) -> None:
    try:
        if conn.is_open:
            conn.close()
    except Exception:  # already closing, socket gone, ...
        _log.debug("error closing a connection", exc_info=True)
