"""The asyncio client: :class:`AsyncFibonacciRpcClient`.

Same wire behaviour and semantics as the blocking :class:`fastfib.client.FibonacciRpcClient`
(Direct Reply-to or an exclusive reply queue, binary replies by default,
``expiration`` + ``x-deadline-ms``, mandatory publishes, typed errors,
reconnect and resend), on pika's :class:`~pika.adapters.asyncio_connection.AsyncioConnection`:
one connection, one channel, and a future per request keyed by its
correlation id, so that any number of coroutines can await calls at once.

pika's asyncio adapter watches the socket with ``loop.add_reader``, which
the default event loop on Linux and macOS supports; Windows'
``ProactorEventLoop`` does not (use ``WindowsSelectorEventLoopPolicy``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.spec import BasicProperties

from . import pika_seam
from .errors import ConnectionLost, ProtocolError, RemoteError, RpcError, RpcTimeout, Unroutable
from .protocol import DEFAULT_QUEUE, DIRECT_REPLY_TO, decode_reply
from .rpc_base import (
    AUTH_ERRORS,
    DEFAULT_STALL_TIMEOUT,
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
from .wire import FRAME_OVERHEAD, Delivery, RequestEncoder, frame_count

__all__ = ["AsyncFibonacciRpcClient"]

_log = logging.getLogger(__name__)

#: How long a timeout waits at most for the passive declare that explains it.
_NOTE_TIMEOUT = 2.0


class _TimedOut(Exception):
    """Internal: set on a request's future when its timer fires."""


class _Request:
    __slots__ = ("body", "future", "deadline", "deadline_ms", "generation", "nacks")

    def __init__(self, body: bytes, future: asyncio.Future, deadline: float, deadline_ms: int) -> None:
        self.body = body
        self.future = future
        self.deadline = deadline  # loop.time()
        self.deadline_ms = deadline_ms  # Unix epoch ms, the x-deadline-ms header
        self.generation = -1  # the connection it was last published on; -1: not yet
        self.nacks = 0


class AsyncFibonacciRpcClient(ClientSettings):
    """Asyncio client of the Fibonacci RPC service.

    ::

        async with AsyncFibonacciRpcClient() as fib:
            print(await fib.call(30))
            print(await asyncio.gather(*(fib.call(n) for n in range(1000))))

    Arguments as for :class:`fastfib.client.FibonacciRpcClient`. The client
    belongs to the event loop it connected on; using it from another loop or
    thread raises ``RuntimeError``. ``await client.connect()`` (or ``async
    with``) connects and raises :class:`~fastfib.errors.ConnectionLost` when
    it cannot; a call on a client that never connected connects first.
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
        self._init_settings(url, queue, timeout, format, reply_queue, connection_name, "aio-client", stall_timeout,
                            confirms)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: AsyncioConnection | None = None
        self._channel: Any = None  # set only while open and consuming replies
        self._reply_to = DIRECT_REPLY_TO
        self._encoder: RequestEncoder | None = None  # the fast wire's (None: pika's basic_publish)
        self._new_corr = CorrelationIds()
        self._generation = 0
        self._confirms: Confirms | NoConfirms = NoConfirms()
        self._pending: dict[str, _Request] = {}
        self._reconnector: asyncio.Task | None = None
        self._last_error: BaseException | None = None
        self._note_task: asyncio.Task | None = None
        self._stall_task: asyncio.Task | None = None
        self._last_progress = 0.0  # loop time of the last reply (or of the start of waiting for one)
        self._closed = False

    # --- lifetime --------------------------------------------------------------------

    async def __aenter__(self) -> AsyncFibonacciRpcClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect now; raises :class:`~fastfib.errors.ConnectionLost` on failure. Idempotent."""
        self._bind_loop()
        if self._closed:
            raise RpcError("the client is closed")
        if self._channel is not None:
            return
        if self._reconnector is not None and not self._reconnector.done():
            # A (re)connection is under way: wait for it, bounded by the default timeout.
            await asyncio.wait({self._reconnector}, timeout=self.timeout)
            if self._channel is not None:
                return
            raise ConnectionLost(lost_message(self.queue, self._last_error))
        await self._open_round(advance=False, deadline=None)

    async def close(self) -> None:
        """Close the connection and fail the calls in flight. Idempotent."""
        self._closed = True
        for task in (self._reconnector, self._note_task, self._stall_task):
            if task is not None and not task.done():
                task.cancel()
        error = RpcError("the client was closed")
        for req in self._pending.values():
            if not req.future.done():
                req.future.set_exception(error)
        self._pending.clear()
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None and not (conn.is_closed or conn.is_closing):
            closed = asyncio.get_running_loop().create_future()
            conn.add_on_close_callback(lambda _c, _r: closed.done() or closed.set_result(None))
            try:
                conn.close()
                await asyncio.wait_for(closed, 5)
            except Exception:
                _log.debug("error closing the connection", exc_info=True)

    @property
    def is_open(self) -> bool:
        return not self._closed and self._channel is not None

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._channel is not None else "not connected")
        return f"<AsyncFibonacciRpcClient queue={self.queue!r} format={self.format!r} {state}>"

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("this AsyncFibonacciRpcClient belongs to another event loop; use one client per loop")
        return loop

    # --- the API ---------------------------------------------------------------------

    async def call(self, n: int, timeout: float | None = None) -> int:
        """F(n), computed by the service. Errors as for the blocking client's ``call``."""
        if type(n) is not int or n < 0 or n > MAX_WIRE_N:
            n = check_n(n)
        t = self.timeout if timeout is None else check_timeout(timeout)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind_loop()
        return await self._call(b"%d" % n, loop.time() + t, int((time.time() + t) * 1000), t, loop)

    async def call_many(
        self,
        ns: Iterable[int],
        window: int = 64,
        timeout: float | None = None,
        *,
        return_exceptions: bool = False,
    ) -> list:
        """[F(n) for n in ns], at most ``window`` in flight, in order; as the blocking ``call_many``."""
        ns = [n if type(n) is int and 0 <= n <= MAX_WIRE_N else check_n(n) for n in ns]
        window = check_window(window)
        t = self.timeout if timeout is None else check_timeout(timeout)
        loop = self._bind_loop()
        deadline = loop.time() + t
        deadline_ms = int((time.time() + t) * 1000)
        gate = asyncio.Semaphore(window)

        async def one(n: int) -> Any:
            async with gate:
                try:
                    return await self._call(b"%d" % n, deadline, deadline_ms, t, loop)
                except (RemoteError, ProtocolError, Unroutable) as exc:
                    if return_exceptions:
                        return exc
                    raise

        tasks = [loop.create_task(one(n)) for n in ns]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()

    async def _call(self, body: bytes, deadline: float, deadline_ms: int, t: float, loop: Any) -> int:
        if self._closed:
            raise RpcError("the client is closed")
        corr = self._new_corr()
        future = loop.create_future()
        req = _Request(body, future, deadline, deadline_ms)
        if not self._pending:
            self._last_progress = loop.time()
        self._pending[corr] = req
        timer = loop.call_at(deadline, self._expire, corr)
        try:
            if self._channel is not None:
                self._publish(corr, req, deadline - loop.time())
            else:
                self._ensure_reconnecting()
            return await future
        except _TimedOut:
            if req.generation == self._generation and self._channel is not None:
                raise RpcTimeout(timeout_message(self.queue, t, 1, 1, await self._queue_note())) from None
            raise ConnectionLost(lost_message(self.queue, self._last_error)) from self._last_error
        finally:
            timer.cancel()
            self._pending.pop(corr, None)

    def _publish(self, corr: str, req: _Request, remaining: float) -> None:
        expiration = str(max(1, int(remaining * 1000)))
        try:
            encoder, channel = self._encoder, self._channel
            if encoder is not None:
                # The fast wire: pre-encoded frames, written with the loop turn's other requests.
                if not channel.is_open:
                    raise pika.exceptions.ChannelWrongStateError("the channel is closed")
                pieces = encoder.frames(corr, expiration, req.deadline_ms, req.body)
                self._confirms.published(corr)
                self._conn.write_frames(pieces, frame_count(pieces))
            else:
                props = request_properties(self._reply_to, self._accept, corr, expiration, req.deadline_ms)
                self._confirms.published(corr)
                channel.basic_publish("", self.queue, req.body, props, True)
        except LINK_ERRORS as exc:  # the connection is going away; on_close will reconnect
            self._last_error = exc
            self._ensure_reconnecting()
            return
        req.generation = self._generation

    def _on_ack(self, confirms: Confirms, tag: int, multiple: bool) -> None:
        """``Basic.Ack`` of our requests, decoded by the fast wire."""
        if confirms is self._confirms:  # else a late confirm of a connection given up on
            confirms.settle(tag, multiple)

    def _on_confirm(self, confirms: Confirms, frame: Any) -> None:
        """``Basic.Ack``/``Basic.Nack`` of our requests: a nacked request is sent again at once."""
        if confirms is not self._confirms:
            return  # a late confirm of a connection given up on
        method = frame.method
        corrs = confirms.settle(method.delivery_tag, method.multiple)
        if isinstance(method, pika.spec.Basic.Nack):
            for corr in corrs:
                req = self._pending.get(corr)
                if req is not None and not req.future.done():
                    self.counters.nacked += 1
                    req.nacks += 1
                    self._loop.call_later(nack_delay(req.nacks), self._resend, corr, self._generation)

    def _resend(self, corr: str, generation: int) -> None:
        """Send a nacked request again, unless it was answered or its connection is gone meanwhile."""
        req = self._pending.get(corr)
        if req is None or req.future.done() or generation != self._generation or self._channel is None:
            return  # a new connection resends every pending request anyway
        self.counters.resent += 1
        self._publish(corr, req, req.deadline - self._loop.time())

    # --- callbacks (run on the event loop) ---------------------------------------------

    def _expire(self, corr: str) -> None:
        req = self._pending.pop(corr, None)
        if req is not None and not req.future.done():
            req.future.set_exception(_TimedOut())

    def _on_fast_reply(self, delivery: Any) -> None:
        """A reply decoded by the fast wire (a :class:`fastfib.wire.Delivery` or ``BadDelivery``)."""
        if type(delivery) is Delivery:
            self._on_reply(None, None, delivery.properties, delivery.body)
            return
        self._last_progress = self._loop.time()
        req = self._pending.pop(delivery.correlation_id, None) if delivery.correlation_id is not None else None
        if req is None or req.future.done():
            _log.warning("dropping a reply that cannot be decoded: %r", delivery.error)
            return
        req.future.set_exception(ProtocolError(f"cannot decode the reply: {delivery.error!r}"))

    def _on_reply(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        """A reply; ``props`` are pika's, or fastfib.wire's Properties from the fast wire."""
        self._last_progress = self._loop.time()
        req = self._pending.pop(props.correlation_id, None)
        if req is None or req.future.done():
            self.counters.duplicates += 1
            _log.debug("dropping a reply with unknown or duplicate correlation id %r", props.correlation_id)
            return
        try:
            req.future.set_result(decode_reply(props.content_type, props.headers, body))
        except (RemoteError, ProtocolError) as exc:
            req.future.set_exception(exc)
        except Exception as exc:  # never let a bad reply escape into pika
            req.future.set_exception(ProtocolError(f"cannot decode the reply: {exc!r}"))

    def _on_return(self, channel: Any, method: Any, props: BasicProperties, body: bytes) -> None:
        req = self._pending.pop(props.correlation_id, None)
        if req is None or req.future.done():
            _log.debug("dropping a returned request with unknown correlation id %r", props.correlation_id)
            return
        req.future.set_exception(unroutable(method.routing_key, method))

    def _on_connection_closed(self, conn: Any, reason: BaseException) -> None:
        if conn is not self._conn:
            return
        self._conn = self._channel = None
        self._last_error = reason
        if not self._closed:
            _log.info("lost the connection to the broker: %r", reason)
            if self._pending:
                self._ensure_reconnecting()

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        self._last_error = reason
        conn = self._conn
        if conn is not None and conn.is_open:
            # The broker closed our channel on a live connection: start over on a new
            # connection (_on_connection_closed reconnects).
            conn.close()
            return
        # The connection is going down with the channel: forget it and reconnect now.
        self._conn = None
        if not self._closed:
            _log.info("lost the connection to the broker: %r", reason)
            if self._pending:
                self._ensure_reconnecting()

    # --- connection management -------------------------------------------------------

    async def _open_round(self, advance: bool, deadline: float | None) -> None:
        """Connect to the first URL that answers, starting with the current one or the next.

        Raises :class:`ConnectionLost` naming every host:port tried when none
        did; with ``deadline`` (loop time), each attempt is bounded by the time left.
        """
        failures: list[tuple[str, BaseException]] = []
        refused = True
        for index in self._rotation(advance):
            limit = None
            if deadline is not None:
                limit = deadline - self._loop.time()
                if limit <= 0 and failures:
                    break
                limit = max(limit, 0.05)
            try:
                await asyncio.wait_for(self._open(self._params[index]), limit)
            except AUTH_ERRORS as exc:
                failures.append((self.urls[index], exc))
            except (*LINK_ERRORS, asyncio.TimeoutError) as exc:
                failures.append((self.urls[index], exc))
                refused = False
            else:
                self._url_index = index
                return
        raise connect_error(failures, refused) from failures[-1][1]

    async def _open(self, params: Any) -> None:
        """Open a connection and a channel in confirm mode, and start consuming replies."""
        loop = self._loop
        assert loop is not None
        opened = loop.create_future()
        broken = loop.create_future()  # fails if the connection or channel dies during setup

        def fail(_obj: Any, exc: Any) -> None:
            if not isinstance(exc, BaseException):
                exc = pika.exceptions.AMQPConnectionError(str(exc))
            for f in (opened, broken):
                if not f.done():
                    f.set_exception(exc)

        def on_close(conn: Any, exc: BaseException) -> None:
            if conn is self._conn:
                self._on_connection_closed(conn, exc)
            else:
                fail(conn, exc)

        fast = await loop.run_in_executor(None, fast_wire_works)  # once per process; keeps the loop free
        conn = (pika_seam.AsyncioCoalescingConnection if fast else AsyncioConnection)(
            params,
            on_open_callback=lambda c: opened.done() or opened.set_result(c),
            on_open_error_callback=fail,
            on_close_callback=on_close,
            custom_ioloop=loop,
        )
        broken.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception never retrieved"

        async def step(future: asyncio.Future) -> Any:
            await asyncio.wait({future, broken}, return_when=asyncio.FIRST_COMPLETED)
            if future.done():
                return future.result()
            future.cancel()
            return broken.result()  # raises

        try:
            await step(opened)
            f: asyncio.Future = loop.create_future()
            conn.channel(on_open_callback=f.set_result)
            channel = await step(f)
            channel.add_on_close_callback(fail)
            channel.add_on_return_callback(self._on_return)
            confirms: Confirms | NoConfirms = NoConfirms()
            if self.confirms:
                confirms = Confirms()
                f = loop.create_future()
                channel.confirm_delivery(lambda frame: self._on_confirm(confirms, frame), callback=f.set_result)
                await step(f)
                if fast:  # basic.ack decoded by the connection; basic.nack still by pika
                    conn.set_fast_acks(channel.channel_number, lambda tag, multiple: self._on_ack(confirms, tag, multiple))
            if self.reply_queue == REPLY_EXCLUSIVE:
                f = loop.create_future()
                channel.queue_declare("", exclusive=True, auto_delete=True, callback=f.set_result)
                reply_to = (await step(f)).method.queue
            else:
                reply_to = DIRECT_REPLY_TO
            f = loop.create_future()
            # Direct Reply-to requires consuming, with auto-ack, before publishing.
            ctag = channel.basic_consume(reply_to, self._on_reply, auto_ack=True, callback=f.set_result)
            await step(f)
            encoder = None
            if fast:  # replies decoded by the connection (pika's callback gets only those over 64 KiB)
                conn.set_fast_deliveries(channel.channel_number, ctag, self._on_fast_reply)
                encoder = RequestEncoder(channel.channel_number, conn.body_max_length() + FRAME_OVERHEAD, self.queue,
                                         reply_to, self._accept, mandatory=True)
        except BaseException:
            if not (conn.is_closed or conn.is_closing):
                conn.close()
            raise
        # From here on a channel closure means "reconnect".
        channel.add_on_close_callback(self._on_channel_closed)
        if self._closed:
            conn.close()
            raise RpcError("the client was closed")
        self._generation += 1
        self._conn, self._channel, self._reply_to = conn, channel, reply_to
        self._confirms = confirms
        self._last_progress = loop.time()
        self._stall_task = loop.create_task(self._watch_stall(self._generation))
        self._encoder = encoder

    def _ensure_reconnecting(self) -> None:
        if self._closed:
            return
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = self._loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Reconnect while calls are waiting, then resend what they sent on the lost connection."""
        delay = RECONNECT_FIRST_DELAY
        while not self._closed and self._pending:
            conn = self._conn
            if conn is not None:
                if self._channel is not None and conn.is_open:
                    break  # connected meanwhile
                # A connection on its way out: forget it (its close callback is then ignored).
                self._conn = self._channel = None
                if not (conn.is_closed or conn.is_closing):
                    conn.close()
            latest = max(r.deadline for r in self._pending.values())
            remaining = latest - self._loop.time()
            if remaining <= 0:
                break
            try:
                await self._open_round(advance=self._generation > 0, deadline=latest)
            except ConnectionLost as exc:
                self._last_error = exc
                if exc.refused:  # every node refused the credentials: no retry will cure it
                    for req in list(self._pending.values()):
                        if not req.future.done():
                            req.future.set_exception(exc)
                    return
                await asyncio.sleep(delay)
                delay = min(2 * delay, RECONNECT_MAX_DELAY)
                continue
            if self._generation > 1:
                self.counters.reconnects += 1
            break
        if self._channel is None:
            return
        # A broker restart takes a non-durable service queue with it: wait for the servers to declare it
        # again (they may reconnect seconds after us), else the resent requests would come back unroutable.
        delay = RECONNECT_FIRST_DELAY
        while self._pending and not self._closed and self._channel is not None:
            remaining = max(r.deadline for r in self._pending.values()) - self._loop.time()
            try:
                if remaining <= 0 or await asyncio.wait_for(self._queue_exists(), min(remaining, 2.0)):
                    break
            except (*LINK_ERRORS, asyncio.TimeoutError):
                pass  # lost the connection meanwhile (the loop ends), or a slow broker: ask again
            await asyncio.sleep(min(delay, max(0.0, remaining)))
            delay = min(2 * delay, RECONNECT_MAX_DELAY / 2)
        if self._channel is None:
            if self._pending and not self._closed:  # lost again while waiting: start over
                self._reconnector = None
                self._ensure_reconnecting()
            return
        # Resend what is not on this connection yet (duplicates are dropped by correlation id).
        now = self._loop.time()
        resent = 0
        for corr, req in list(self._pending.items()):
            if req.generation != self._generation and not req.future.done():
                self._publish(corr, req, req.deadline - now)
                resent += 1
        self.counters.resent += resent
        if resent:
            _log.info("reconnected to %s and resent %d request(s)", self.endpoint, resent)

    async def _queue_note(self) -> str:
        """Describe the service queue for a timeout message; concurrent timeouts share one check."""
        if self._note_task is None or self._note_task.done():
            self._note_task = self._loop.create_task(asyncio.wait_for(self._check_queue(), _NOTE_TIMEOUT))
        try:
            return await asyncio.shield(self._note_task)
        except Exception:
            return ""

    async def _declare_passive(self) -> Any:
        """``Queue.DeclareOk`` of the service queue, asked on a channel of its own (a 404 closes it).

        Raises ``ChannelClosedByBroker`` (404: no such queue) or a link error.
        """
        conn = self._conn
        if conn is None or not conn.is_open:
            raise pika.exceptions.ConnectionWrongStateError("not connected")
        loop = self._loop
        opened, done = loop.create_future(), loop.create_future()

        def on_close(_ch: Any, exc: BaseException) -> None:
            for f in (opened, done):
                if not f.done():
                    f.set_exception(exc)

        conn.channel(on_open_callback=opened.set_result)
        channel = await opened  # (a connection loss leaves this to the caller's wait_for)
        channel.add_on_close_callback(on_close)
        channel.queue_declare(self.queue, passive=True, callback=done.set_result)
        frame = await done
        if channel.is_open:
            channel.close()
        return frame.method

    async def _queue_exists(self) -> bool:
        """Whether the service queue exists: one passive ``queue_declare``."""
        if self._conn is None or not self._conn.is_open:
            return True  # nothing to check on: let the resend path deal with the connection
        try:
            await self._declare_passive()
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return False
            raise
        return True

    async def _check_queue(self) -> str:
        try:
            method = await self._declare_passive()
        except pika.exceptions.ChannelClosedByBroker as exc:
            return "; the queue does not exist" if exc.reply_code == 404 else ""
        except LINK_ERRORS:
            return ""
        return consumer_note(method)

    async def _watch_stall(self, generation: int) -> None:
        """While connection ``generation`` is the current one, give it up when its replies stop coming.

        As the blocking client's ``_check_stall``: requests pending, no reply
        for ``stall_timeout`` seconds and no request waiting in the service
        queue mean lost replies; closing the connection makes the client
        reconnect (to the next URL) and resend.
        """
        loop = self._loop
        while not self._closed and generation == self._generation and self._conn is not None:
            await asyncio.sleep(self.stall_timeout / 2)
            if not self._pending or loop.time() - self._last_progress <= self.stall_timeout:
                continue
            self._last_progress = loop.time()
            try:
                method = await asyncio.wait_for(self._declare_passive(), self.stall_timeout)
            except (*LINK_ERRORS, asyncio.TimeoutError):
                continue  # lost or slow: the close callbacks handle a lost connection
            conn = self._conn
            if method.message_count or generation != self._generation or conn is None or not conn.is_open:
                continue
            error = StalledConnection(
                f"no reply for {self.stall_timeout:g} s while {len(self._pending)} request(s) were pending "
                "and the service queue held none"
            )
            _log.warning("%s; reconnecting", error)
            self._last_error = error
            conn.close()  # _on_connection_closed reconnects and resends
            return
