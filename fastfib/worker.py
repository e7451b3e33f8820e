"""One worker process of ``fastfib serve``: consume requests, compute, reply, acknowledge.

A :class:`Worker` owns one :class:`pika.SelectConnection` (callback style, one
``_on_*`` method per connection step, like pika's asynchronous consumer
example) and one I/O loop that outlives its connections, so that reconnecting
is only a timer on the same loop.

The path of a request (:meth:`Worker._handle`), all on the I/O thread:

1. no ``reply_to``: acknowledged and dropped (logged, rate-limited);
2. ``x-deadline-ms`` in the past: acknowledged, neither computed nor answered;
3. ``accept`` and the body are parsed by :mod:`fastfib.protocol`; a bad request
   gets an error reply (``x-error``) and is acknowledged once, never requeued;
4. n <= ``inline_max_n`` (cheap: ~90 us at 2*10^4, decimal): computed right here,
   replied, acknowledged;
5. larger n: answered from the per-worker :class:`~fastfib.cache.ReplyCache`
   when it is there, else handed to the compute thread. The kernel releases
   the GIL, so the I/O thread keeps serving small requests and heartbeats
   while F(10^6) is computed; the result comes back through
   ``ioloop.add_callback_threadsafe`` and is published and acknowledged on the
   I/O thread.

A reply is always queued before the acknowledgement of its request, on the
same channel and connection, so the broker sees the publish first.
Acknowledgements are batched once per I/O loop turn into one
``basic.ack(multiple=True)`` up to the lowest request still being computed;
requests finished above it are acknowledged one by one.

On the hot path the connection (:class:`_CoalescingConnection`) decodes our
deliveries itself, encodes success replies itself (:class:`ReplyEncoder`) and
writes each loop turn's frames with one ``send``; everything else is pika's.
``docs/server.md`` explains each choice and what it was measured against.
"""

from __future__ import annotations

import base64
import functools
import itertools
import logging
import os
import queue
import random
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pika
import pika.data
import pika.exceptions
import pika.frame
from pika.adapters.select_connection import IOLoop
from pika.spec import BasicProperties

from . import protocol
from .cache import DEFAULT_CACHE_BYTES, ReplyCache
from .errors import RemoteError
from .limits import DEFAULT_MAX_REPLY_BYTES, ReplySizeLimit
from .logs import configure_logging, mask_url  # noqa: F401 - mask_url: part of this module's API

if TYPE_CHECKING:
    from .metrics import WorkerMetrics

log = logging.getLogger("fastfib.worker")

# Exit codes of a worker process, and of the pool (fastfib.supervisor).
EXIT_OK = 0
EXIT_FAILURE = 1
#: Credentials refused, or permissions (vhost access, queue configure/read, publish) refused.
EXIT_ACCESS_REFUSED = 77  # sysexits.h EX_NOPERM

#: Requests with n up to this are computed on the I/O thread. Measured on the
#: dev machine (docs/server.md): F(2*10^4) costs 90 us decimal / 40 us binary,
#: while a hop to the compute thread and back added 300-500 us to the median
#: round trip; at 5*10^4 (300 us) the hop starts to pay.
DEFAULT_INLINE_MAX_N = 20_000

#: Default prefetch (basic.qos prefetch_count) per worker.
DEFAULT_PREFETCH = 64

#: ``--queue-type`` values; classic is the tutorial's.
QUEUE_TYPES = ("classic", "quorum")

#: Reconnection backoff: the delay before the k-th retry round is
#: min(CAP, BASE * 2**k), times a random factor in [0.5, 1) (jitter).
RECONNECT_BASE = 0.5
RECONNECT_CAP = 30.0

#: How long a graceful stop waits for in-flight computations before closing anyway.
STOP_TIMEOUT = 30.0

_TICK = 0.2  # seconds between checks for a stop request and the supervisor's death, and metrics flushes
_clock = time.perf_counter

_DIRECT_REPLY_PREFIX = protocol.DIRECT_REPLY_TO + "."
_ERROR_HEADERS = {kind: {protocol.HEADER_ERROR: kind} for kind in protocol.ERROR_KINDS}


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; picklable, so that it crosses into a spawned process."""

    urls: tuple[str, ...] = (protocol.DEFAULT_URL,)
    queue: str = protocol.DEFAULT_QUEUE
    prefetch: int = DEFAULT_PREFETCH
    max_n: int = protocol.DEFAULT_MAX_N
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    cache_bytes: int = DEFAULT_CACHE_BYTES
    inline_max_n: int = DEFAULT_INLINE_MAX_N
    #: Threads per large F(n) (fastfib.fib_encoded's ``threads``; issue 8).
    kernel_threads: int = 1
    log_level: str = "INFO"
    stop_timeout: float = STOP_TIMEOUT
    log_format: str = "text"
    #: Queue kind (issue 7); the defaults declare the tutorial's queue.
    queue_durable: bool = False
    queue_type: str = "classic"
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    delivery_limit: int | None = None
    #: Export the worker's counters to prometheus_client's multiprocess files (fastfib.metrics).
    metrics: bool = False

    def queue_declaration(self) -> tuple[bool, dict[str, Any] | None]:
        """``(durable, arguments)`` for ``queue_declare``; ``(False, None)`` is exactly the tutorial's."""
        arguments: dict[str, Any] = {}
        durable = self.queue_durable
        if self.queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
            durable = True  # a quorum queue is always durable; the broker refuses anything else
        if self.dead_letter_exchange is not None:
            arguments["x-dead-letter-exchange"] = self.dead_letter_exchange
            if self.dead_letter_routing_key is not None:
                arguments["x-dead-letter-routing-key"] = self.dead_letter_routing_key
        if self.delivery_limit is not None:
            arguments["x-delivery-limit"] = self.delivery_limit
        return durable, arguments or None

    def describe_queue(self) -> str:
        """How the queue is declared, for log lines: ``the tutorial's`` or e.g. ``durable quorum, ...``."""
        durable, arguments = self.queue_declaration()
        if not durable and not arguments:
            return "the tutorial's (non-durable classic, no arguments)"
        kind = f"{'durable' if durable else 'non-durable'} {self.queue_type}"
        extra = ", ".join(f"{k}={v}" for k, v in (arguments or {}).items() if k != "x-queue-type")
        return f"{kind}{', ' + extra if extra else ''}"


@dataclass
class Stats:
    """Counters of one worker: the hook for pool-wide metrics (issue 7).

    Plain ints, incremented on the I/O thread only; reading them from another
    thread gives a slightly stale but consistent-enough view.
    """

    received: int = 0
    replied: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(protocol.ERROR_KINDS, 0))
    no_reply_to: int = 0
    expired: int = 0
    offloaded: int = 0
    cache_hits: int = 0
    requeued_on_stop: int = 0
    connections: int = 0
    connection_losses: int = 0

    def snapshot(self) -> dict[str, Any]:
        snap = dict(self.__dict__)
        snap["errors"] = dict(self.errors)
        return snap


class _RateLimitedLog:
    """Log a recurring anomaly at most once per ``interval`` seconds, counting the rest."""

    def __init__(self, logger: logging.Logger, level: int, interval: float = 5.0) -> None:
        self._logger, self._level, self._interval = logger, level, interval
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, msg: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" ({self._suppressed} more like it not logged)"
            self._suppressed = 0
        self._next = now + self._interval
        self._logger.log(self._level, msg, *args, exc_info=exc_info)


def direct_reply_to_ok(reply_to: str) -> bool:
    """True unless ``reply_to`` is a malformed Direct Reply-to name.

    RabbitMQ (seen with 3.10) closes the publishing *connection* with
    541 INTERNAL_ERROR when a reply is published to an ``amq.rabbitmq.reply-to.X.Y``
    name whose X is not a base64 Erlang pid; a request carrying such a name
    would otherwise cost every worker it reaches its connection, again at every
    redelivery. A real name is ``amq.rabbitmq.reply-to.<base64 pid>.<base64 key>``;
    this checks that shape (the pid term's structure, not that the pid exists).
    """
    if not reply_to.startswith(_DIRECT_REPLY_PREFIX):
        return True
    pid_part, dot, key = reply_to[len(_DIRECT_REPLY_PREFIX):].partition(".")
    if not dot or not key:
        return False
    try:
        raw = base64.b64decode(pid_part, validate=True)
        base64.b64decode(key, validate=True)
    except (ValueError, TypeError):
        return False
    # External term format: 131, then PID_EXT (103) or NEW_PID_EXT (88): node atom, id, serial, creation.
    if len(raw) < 4 or raw[0] != 131 or raw[1] not in (88, 103):
        return False
    tag = raw[2]
    if tag in (100, 118):  # ATOM_EXT, ATOM_UTF8_EXT: 2-byte length
        alen, pos = int.from_bytes(raw[3:5], "big"), 5
    elif tag in (115, 119):  # SMALL_ATOM_EXT, SMALL_ATOM_UTF8_EXT: 1-byte length
        alen, pos = raw[3], 4
    else:
        return False
    node = raw[pos:pos + alen]
    if len(node) != alen or b"@" not in node:
        return False
    tail = 4 + 4 + (4 if raw[1] == 88 else 1)
    return len(raw) == pos + alen + tail


class _ReplyToProber:
    """Asks the broker whether replies to a Direct Reply-to name are safe, on a connection of its own.

    A name can be well-formed and still cost the publisher its connection:
    RabbitMQ 3.10 decodes the pid part and crashes the publishing channel
    (connection closed, 541 INTERNAL_ERROR) when its node hash names no running
    cluster node (``reply@<hash>``), when the node atom is not valid UTF-8, or
    when the pid's id or serial is out of Erlang's range. Only the broker knows
    which hashes are valid, so the worker asks it (issue 6): this thread
    publishes an empty message to the same pid with a random key, which the
    broker drops (a channel takes only replies with its own key), then does a
    ``basic.qos`` round trip on the same channel. ``qos-ok`` means the broker
    handled the publish: the name is safe. A 541 close means it is not, and
    only this probe connection paid for it. Verdicts go to ``callback(name,
    True | False | None)`` (None: the probe itself failed). Probes run one at a
    time; the connection is kept (heartbeats off: it idles) and reopened after
    a failure.
    """

    def __init__(self, index: int) -> None:
        self._index = index
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._connection: pika.BlockingConnection | None = None
        self._channel = None
        self._url: str | None = None

    def submit(self, url: str, name: str, callback: Callable[[str, bool | None], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"fastfib-reply-to-probe-{self._index}",
                                            daemon=True)
            self._thread.start()
        self._jobs.put((url, name, callback))

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._drop()
                return
            url, name, callback = job
            verdict = self._probe(url, name)
            try:
                callback(name, verdict)
            except Exception:  # the I/O loop is closed: the worker is exiting
                self._drop()
                return

    def _probe(self, url: str, name: str) -> bool | None:
        pid_part = name[len(_DIRECT_REPLY_PREFIX):].partition(".")[0]
        probe = f"{_DIRECT_REPLY_PREFIX}{pid_part}.{base64.b64encode(os.urandom(16)).decode()}"
        for _ in range(2):  # a connection that went stale while idle gets one fresh retry
            try:
                if self._connection is None or not self._connection.is_open or url != self._url:
                    self._open(url)
                self._channel.basic_publish("", probe, b"")
                self._channel.basic_qos(prefetch_count=0)
                return True
            except pika.exceptions.ConnectionClosedByBroker as exc:
                self._drop()
                if exc.reply_code == 541:
                    return False
            except Exception as exc:  # noqa: BLE001 - any failure of the probe is "cannot tell"
                log.debug("reply_to probe failed: %s", _describe(exc))
                self._drop()
        return None

    def _open(self, url: str) -> None:
        self._drop()
        params = pika.URLParameters(url)
        params.heartbeat = 0
        params.socket_timeout = params.stack_timeout = params.blocked_connection_timeout = 10.0
        params.connection_attempts = 1
        params.client_properties = {"connection_name": f"fastfib-worker-{self._index} reply-to probe pid={os.getpid()}"}
        self._connection = pika.BlockingConnection(params)
        self._url = url
        self._channel = self._connection.channel()

    def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass


class _Job:
    """One F(n) for the compute thread, and the requests waiting for it.

    Requests for an (n, format) that is already being computed join its
    ``waiters`` instead of computing it again: at the start of a burst of one
    hot large n, the first computation serves them all (then the cache does).
    """

    __slots__ = ("channel", "n", "fmt", "waiters", "body", "error", "skipped")

    def __init__(self, channel, n: int, fmt: str, tag: int, reply_to: str, correlation_id,
                 start: float | None = None) -> None:
        self.channel = channel
        self.n = n
        self.fmt = fmt
        # (delivery tag, reply_to, correlation_id, when it was received: perf_counter() or None)
        self.waiters: list[tuple[int, str, Any, float | None]] = [(tag, reply_to, correlation_id, start)]
        self.body: bytes | None = None
        self.error: BaseException | None = None
        self.skipped = False


try:  # for the direct send of _CoalescingConnection._flush (plain TCP only; TLS goes through pika)
    from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport as _PlaintextTransport
except ImportError:  # pragma: no cover - another pika layout: pika's own writes only
    _PlaintextTransport = None

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
_CONTENT_TYPE_SHORTSTR = {fmt: bytes((len(ct),)) + ct.encode() for fmt, ct in protocol.CONTENT_TYPES.items()}


_UNPACK_FRAME_HEADER = struct.Struct(">BHI").unpack_from
_UNPACK_CONTENT_HEADER = struct.Struct(">HHQH").unpack_from
_UNPACK_U64 = struct.Struct(">Q").unpack_from
_BASIC_DELIVER = b"\x00\x3c\x00\x3c"  # class 60 (basic), method 60 (deliver)
#: Deliveries with a larger body are left to pika (a valid request is at most 64 bytes).
_FAST_BODY_MAX = 65536
_INCOMPLETE = object()


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
        headers, p = pika.data.decode_table(buf, p)
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

    Returns ``(delivery_tag, properties, body, next_pos, frames)``; ``_INCOMPLETE``
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
            return _INCOMPLETE
        ftype, ch, size = _UNPACK_FRAME_HEADER(buf, h)
        if ftype != 2 or ch != channel_number:
            return None
        hend = h + 7 + size
        if hend >= n:
            return _INCOMPLETE
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
                return _INCOMPLETE
            ftype, ch, size = _UNPACK_FRAME_HEADER(buf, b)
            if ftype != 3 or ch != channel_number:
                return None
            bend = b + 7 + size
            if bend >= n:
                return _INCOMPLETE
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


class _CoalescingConnection(pika.SelectConnection):
    """A SelectConnection that writes one I/O loop turn's frames with one send(2).

    pika hands every frame to its transport separately, and the transport
    sends each queued chunk with a system call of its own: a reply is three
    frames (method, header, body), so three ``send`` calls, plus one per ack.
    Measured under load, those calls were the largest single cost of a worker.
    This subclass collects what pika outputs during a loop turn and writes it
    as one chunk in a timer at the end of the turn, after ``before_flush``
    (the worker's batched acknowledgements) has added its frames. Order is
    kept, so a reply still reaches the broker before the ack of its request.

    It overrides ``Connection._output_marshaled_frames``, a private method that
    every outgoing frame goes through in pika 1.x (``tests/test_server_unit.py``
    checks it is still there).
    """

    def __init__(self, *args: Any, before_flush: Callable[[], None] | None = None, **kwargs: Any) -> None:
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._before_flush = before_flush
        self._fast: tuple[int, bytes, Callable] | None = None
        super().__init__(*args, **kwargs)

    def set_fast_deliveries(self, channel_number: int, consumer_tag: str, handler: Callable) -> None:
        """Decode the deliveries to ``consumer_tag`` on ``channel_number`` here and call
        ``handler(delivery_tag, properties, body)``, bypassing pika's generic frame machinery
        (which costs more than everything else a small request needs). Everything else,
        and any delivery this decoder does not take, goes through pika as usual."""
        self._fast = (channel_number, consumer_tag.encode("utf-8"), handler)

    def clear_fast_deliveries(self) -> None:
        self._fast = None

    def _on_data_available(self, data_in: bytes) -> None:
        if self._fast is None and not self._frame_buffer:
            super()._on_data_available(data_in)
            return
        buf = self._frame_buffer + data_in if self._frame_buffer else data_in
        self._frame_buffer = b""
        pos, n = 0, len(buf)
        while n - pos >= 8:
            fast = self._fast
            if fast is None:  # switched off meanwhile (consumer cancelled): pika takes the rest
                super()._on_data_available(buf[pos:])
                return
            ftype, channel_number, size = _UNPACK_FRAME_HEADER(buf, pos)
            end = pos + 7 + size
            if end >= n:
                break
            if ftype == 1 and channel_number == fast[0] and buf[pos + 7:pos + 11] == _BASIC_DELIVER:
                parsed = parse_delivery(buf, pos, channel_number, fast[1])
                if parsed is _INCOMPLETE:
                    break
                if parsed is not None:
                    delivery_tag, props, body, next_pos, frames = parsed
                    # pika counts both; its heartbeat checker takes received bytes as a sign of life.
                    self.bytes_received += next_pos - pos
                    self.frames_received += frames
                    pos = next_pos
                    fast[2](delivery_tag, props, body)
                    continue
            if buf[end] != 0xCE:  # let pika's decoder raise its error on it
                super()._on_data_available(buf[pos:])
                return
            _, frame_value = pika.frame.decode_frame(buf[pos:end + 1])
            self.bytes_received += end + 1 - pos
            pos = end + 1
            self._process_frame(frame_value)
        self._frame_buffer = buf[pos:]

    def _output_marshaled_frames(self, marshaled_frames) -> None:
        for frame in marshaled_frames:
            self.bytes_sent += len(frame)
            self.frames_sent += 1
        self._out.extend(marshaled_frames)
        if not self._flush_scheduled:
            self.request_flush()

    def write_frames(self, pieces: list, frames: int) -> None:
        """Queue already-marshaled bytes (``pieces`` making up ``frames`` whole frames)."""
        if self.is_closed:
            raise pika.exceptions.ConnectionWrongStateError("the connection is closed")
        for piece in pieces:
            self.bytes_sent += len(piece)
        self.frames_sent += frames
        self._out.extend(pieces)
        if not self._flush_scheduled:
            self.request_flush()

    def body_max_length(self) -> int:
        """The largest body frame payload, as negotiated (frame_max minus the frame's 8 bytes of framing)."""
        return self._body_max_length or (self.params.frame_max - 8)

    def request_flush(self) -> None:
        """Run ``before_flush`` and write what is buffered at the end of this loop turn."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.ioloop.call_later(0, self._flush)

    def _flush(self) -> None:
        if self._before_flush is not None:
            self._before_flush()
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        data = b"".join(out)
        out.clear()
        transport = self._transport
        if transport is None:
            return
        if (_PlaintextTransport is not None and type(transport) is _PlaintextTransport
                and transport._state == transport._STATE_ACTIVE and not transport.get_write_buffer_size()):
            # Nothing queued before us: send now, as asyncio's transports do, instead of
            # waiting one more epoll round for writability. Whatever the kernel does not
            # take (or an error, which pika then meets and handles) goes the usual way.
            try:
                sent = transport._sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self._adapter_emit_data(data)


def _kernel_encoder(threads: int = 1) -> Callable[[int, str], bytes]:
    from . import fib_encoded

    if threads == 1:
        return fib_encoded  # the plain call: no partial on the hot path
    return functools.partial(fib_encoded, threads=threads)


class Worker:
    """One consumer connection, its I/O loop and its compute thread.

    ``compute(n, fmt) -> bytes`` defaults to the compiled kernel
    (``fastfib.fib_encoded``); ``on_event(name, detail)`` is told
    ``"consuming"``, ``"disconnected"`` and ``"fatal"`` (the supervisor's
    readiness and failure signals).
    """

    def __init__(
        self,
        config: WorkerConfig,
        index: int = 0,
        *,
        compute: Callable[[int, str], bytes] | None = None,
        on_event: Callable[[str, str], None] | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        if not config.urls:
            raise ValueError("at least one broker URL is needed")
        self.config = config
        self.index = index
        self.stats = Stats()
        self.exit_code = EXIT_OK
        self._compute = compute if compute is not None else _kernel_encoder(config.kernel_threads)
        self._on_event = on_event or (lambda name, detail: None)
        # Pool-wide metrics (fastfib.metrics): the hot path only times replies into a local
        # histogram; _tick hands the counters to prometheus_client every _TICK seconds.
        self._metrics = metrics
        self._durations = metrics.durations if metrics is not None else None
        self._params = [pika.URLParameters(url) for url in config.urls]
        for params in self._params:  # shown by `rabbitmqctl list_connections client_properties` and the UI
            params.client_properties = {"connection_name": f"fastfib-worker-{index} pid={os.getpid()} queue={config.queue}"}
        self._masked = [mask_url(url) for url in config.urls]
        # Spread the workers over the cluster's nodes: worker i starts at URL i.
        self._url_index = index % len(self._params)
        self._failures = 0  # consecutive failed connection attempts (or losses)
        self._max_n = config.max_n
        self._reply_limit = ReplySizeLimit(config.max_reply_bytes, config.max_n)
        self._inline_max_n = config.inline_max_n
        self._cache = ReplyCache(config.cache_bytes)

        self._ioloop = IOLoop()
        self._connection: pika.SelectConnection | None = None
        self._channel = None
        self._consumer_tag: str | None = None
        self._passive_declare = False
        self._queue_declaration = config.queue_declaration()
        self._reconnect_timer = None

        # Per-channel state, reset by _reset_channel_state().
        self._acks: list[int] = []
        self._flush_pending = False
        self._inflight: set[int] = set()  # delivery tags waiting for the compute thread
        self._computing: dict[tuple[int, str], _Job] = {}  # (n, fmt) -> its job, while it is computed
        self._encoder: ReplyEncoder | None = None

        self._stop_requested = False  # set by a signal handler
        self._stopping = False
        self._draining = False  # read by the compute thread: skip jobs not yet started
        self._stop_deadline = 0.0
        self._parent_pid = os.getppid()
        self._watch_parent = False

        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Direct Reply-to names -> safe to reply to (True) or not (False); see _ReplyToProber.
        self._reply_to_ok: dict[str, bool] = {}
        self._probing: dict[str, list] = {}  # name -> deliveries waiting for the broker's verdict on it
        self._prober = _ReplyToProber(index)
        self._log_probe = _RateLimitedLog(log, logging.WARNING)
        self._internal_ids = itertools.count(1)
        self._log_no_reply_to = _RateLimitedLog(log, logging.WARNING)
        self._log_bad_reply_to = _RateLimitedLog(log, logging.WARNING)
        self._log_internal = _RateLimitedLog(log, logging.ERROR, interval=1.0)
        self._log_metrics = _RateLimitedLog(log, logging.ERROR, interval=60.0)

    # ------------------------------------------------------------------ running

    def run(self, *, install_signal_handlers: bool = False, watch_parent: bool = False) -> int:
        """Serve until stopped (signal, :meth:`request_stop`, or a fatal error); return the exit code."""
        if install_signal_handlers:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        self._watch_parent = watch_parent
        self._thread = threading.Thread(target=self._compute_loop, name=f"fastfib-compute-{self.index}", daemon=True)
        self._thread.start()
        self._ioloop.call_later(_TICK, self._tick)
        self._connect()
        try:
            self._ioloop.start()
        finally:
            self._jobs.put(None)
            self._prober.stop()
            self._thread.join(timeout=5.0)
            self._ioloop.close()
            self._flush_metrics()
        log.info("worker stopped (exit code %d)", self.exit_code)
        return self.exit_code

    def request_stop(self) -> None:
        """Ask for a graceful stop; safe from a signal handler or another thread."""
        self._stop_requested = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_requested = True

    def _tick(self) -> None:
        if self._metrics is not None:
            self._flush_metrics()
        if self._stop_requested and not self._stopping:
            self._begin_stop("stop requested")
        elif self._watch_parent and not self._stopping and os.getppid() != self._parent_pid:
            log.warning("the supervisor is gone; stopping")
            self._begin_stop("supervisor gone")
        if self._stopping and time.monotonic() > self._stop_deadline:
            log.warning("graceful stop took over %.0f s; closing with %d request(s) in flight",
                        self.config.stop_timeout, len(self._inflight))
            self._stop_deadline = float("inf")
            self._inflight.clear()
            self._finish_stop()
        self._ioloop.call_later(_TICK, self._tick)

    def _flush_metrics(self) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        try:
            metrics.flush(self.stats, self._cache, len(self._inflight))
        except Exception:  # metrics must never cost the worker its requests
            self._log_metrics("cannot update the metrics", exc_info=True)

    # --------------------------------------------------------------- connecting

    def _connect(self) -> None:
        self._reconnect_timer = None
        i = self._url_index
        log.debug("connecting to %s", self._masked[i])
        self._connection = _CoalescingConnection(
            parameters=self._params[i],
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._ioloop,
            before_flush=self._flush_acks,
        )

    def _on_connection_open(self, connection) -> None:
        if connection is not self._connection:
            return
        self.stats.connections += 1
        log.debug("connected to %s", self._masked[self._url_index])
        if self._stopping:
            connection.close()
            return
        self._open_channel()

    def _on_connection_open_error(self, connection, error: BaseException) -> None:
        if connection is not self._connection:
            return
        self._connection = None
        if self._stopping:
            self._ioloop.stop()
            return
        url = self._masked[self._url_index]
        fatal = _fatal_reason(error)
        if fatal:
            self._fatal(f"{fatal} by the broker at {url}: {_describe(error)}")
            return
        self._schedule_reconnect(f"cannot connect to {url}: {_describe(error)}")

    def _on_connection_closed(self, connection, reason: BaseException) -> None:
        if connection is not self._connection:
            return
        self._connection = None
        was_consuming = self._consumer_tag is not None
        self._channel = None
        self._consumer_tag = None
        self._reset_channel_state()
        if self._stopping:
            self._ioloop.stop()
            return
        self._on_event("disconnected", _describe(reason))
        if getattr(reason, "reply_code", None) == 541:
            # Possibly a reply to a name vetted earlier whose node has left the cluster since:
            # vet every name again, so that its redelivered request is dropped, not a crash loop.
            self._reply_to_ok.clear()
        fatal = _fatal_reason(reason)
        url = self._masked[self._url_index]
        if fatal:
            self._fatal(f"{fatal} by the broker at {url}: {_describe(reason)}")
            return
        if was_consuming:
            self.stats.connection_losses += 1
            self._failures = 0
        self._schedule_reconnect(f"connection to {url} lost: {_describe(reason)}")

    def _schedule_reconnect(self, why: str) -> None:
        self._failures += 1
        n_urls = len(self._params)
        self._url_index = (self._url_index + 1) % n_urls
        if n_urls > 1 and self._failures % n_urls != 0:
            delay = 0.0  # fail over to the next node at once
        else:
            rounds = max(0, (self._failures - 1) // n_urls)
            delay = min(RECONNECT_CAP, RECONNECT_BASE * 2 ** min(rounds, 16)) * random.uniform(0.5, 1.0)
        log.warning("%s; reconnecting to %s in %.1f s", why, self._masked[self._url_index], delay)
        self._reconnect_timer = self._ioloop.call_later(delay, self._connect)

    def _open_channel(self) -> None:
        self._connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel) -> None:
        self._channel = channel
        self._reset_channel_state()
        self._encoder = ReplyEncoder(channel.channel_number, self._connection.body_max_length())
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        self._declare_queue()

    def _declare_queue(self) -> None:
        # By default exactly the tutorial's queue_declare(queue=Q): not durable, no arguments.
        durable, arguments = self._queue_declaration
        self._channel.queue_declare(
            queue=self.config.queue, passive=self._passive_declare, durable=durable, arguments=arguments,
            callback=self._on_queue_declareok,
        )

    def _on_queue_declareok(self, frame) -> None:
        self._channel.basic_qos(prefetch_count=self.config.prefetch, callback=self._on_qos_ok)

    def _on_qos_ok(self, frame) -> None:
        if self._stopping:
            self._finish_stop()
            return
        channel = self._channel
        self._consumer_tag = channel.basic_consume(self.config.queue, self._on_message, callback=self._on_consume_ok)
        self._connection.set_fast_deliveries(channel.channel_number, self._consumer_tag, self._on_fast_delivery)

    def _on_consume_ok(self, frame) -> None:
        self._failures = 0
        log.info("consuming from queue %r on %s (prefetch %d)", self.config.queue,
                 self._masked[self._url_index], self.config.prefetch)
        self._on_event("consuming", self._masked[self._url_index])

    def _on_consumer_cancelled(self, frame) -> None:
        # The broker cancelled our consumer: the queue was deleted. Declare it again and resume.
        self._consumer_tag = None
        if self._connection is not None:
            self._connection.clear_fast_deliveries()
        if self._stopping:
            self._maybe_finish_stop()
            return
        log.warning("the broker cancelled the consumer (queue %r deleted?); declaring it again", self.config.queue)
        self._on_event("disconnected", "consumer cancelled by the broker")
        if self._channel is not None and self._channel.is_open:
            self._declare_queue()

    def _on_channel_closed(self, channel, reason: BaseException) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        self._consumer_tag = None
        self._reset_channel_state()
        connection = self._connection
        if connection is None or not connection.is_open:
            return  # the connection is going down: _on_connection_closed speaks for both
        if self._stopping:
            connection.close()
            return
        code = getattr(reason, "reply_code", None)
        if code == 403:
            self._fatal(f"permission refused by the broker at {self._masked[self._url_index]}: {_describe(reason)}")
            return
        if code == 406 and not self._passive_declare:
            log.warning("queue %r exists with other attributes than %s (%s); serving it as it is",
                        self.config.queue, self._queue_wanted(), _describe(reason))
            self._passive_declare = True
            self._open_channel()
            return
        if code == 404 and self._passive_declare:
            log.warning("queue %r is gone (%s); declaring it %s", self.config.queue, _describe(reason),
                        "like the tutorial" if self._queue_declaration == (False, None) else "as configured")
            self._passive_declare = False
            self._open_channel()
            return
        log.warning("channel closed by the broker: %s; reconnecting", _describe(reason))
        connection.close()  # _on_connection_closed schedules the reconnection

    def _queue_wanted(self) -> str:
        if self._queue_declaration == (False, None):
            return "the tutorial's"
        return f"the configured ones ({self.config.describe_queue()})"

    def _reset_channel_state(self) -> None:
        # Delivery tags belong to a channel: what was unacknowledged on the old one is redelivered.
        self._acks = []
        self._flush_pending = False
        self._inflight = set()
        self._computing = {}
        self._encoder = None
        if self._connection is not None:
            self._connection.clear_fast_deliveries()

    def _fatal(self, message: str) -> None:
        log.critical("fatal: %s; not retrying", message)
        self.exit_code = EXIT_ACCESS_REFUSED
        self._on_event("fatal", message)
        self._stopping = True
        self._draining = True
        self._stop_deadline = time.monotonic() + self.config.stop_timeout
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()  # _on_connection_closed stops the loop
        else:
            self._connection = None
            self._ioloop.stop()

    # ----------------------------------------------------------------- stopping

    def _begin_stop(self, why: str) -> None:
        log.info("stopping (%s): cancelling the consumer, finishing %d request(s) in flight", why, len(self._inflight))
        self._stopping = True
        self._draining = True
        self._stop_deadline = time.monotonic() + self.config.stop_timeout
        if self._reconnect_timer is not None:
            self._ioloop.remove_timeout(self._reconnect_timer)
            self._reconnect_timer = None
        channel, connection = self._channel, self._connection
        if connection is None:
            self._ioloop.stop()
        elif channel is not None and channel.is_open and self._consumer_tag is not None:
            # Deliveries that arrive after this are rejected (requeued) by pika itself.
            connection.clear_fast_deliveries()
            channel.basic_cancel(self._consumer_tag, callback=self._on_cancelok)
        elif connection.is_open:
            self._finish_stop()
        else:  # still opening: closing aborts it, and _on_connection_open_error stops the loop
            try:
                connection.close()
            except pika.exceptions.ConnectionWrongStateError:
                pass

    def _on_cancelok(self, frame) -> None:
        self._consumer_tag = None
        self._maybe_finish_stop()

    def _maybe_finish_stop(self) -> None:
        if self._stopping and self._consumer_tag is None and not self._inflight:
            self._finish_stop()

    def _finish_stop(self) -> None:
        self._flush_acks()
        connection = self._connection
        if connection is not None and connection.is_open:
            # Closing returns the prefetched, unacknowledged requests to the queue.
            connection.close()
        elif connection is None:
            self._ioloop.stop()

    # ------------------------------------------------------------ request path

    def _on_message(self, channel, method, props: BasicProperties, body: bytes) -> None:
        """pika's delivery callback (deliveries the fast path left to pika)."""
        self._handle(channel, method.delivery_tag, props, body)

    def _on_fast_delivery(self, tag: int, props: RequestProperties, body: bytes) -> None:
        """A delivery decoded by ``_CoalescingConnection`` itself."""
        channel = self._channel
        if channel is not None and channel.is_open:
            self._handle(channel, tag, props, body)

    def _handle(self, channel, tag: int, props, body: bytes) -> None:
        self.stats.received += 1
        start = _clock() if self._durations is not None else None
        reply_to = props.reply_to
        n = None
        try:
            if not reply_to:
                self.stats.no_reply_to += 1
                self._log_no_reply_to("request without reply_to (correlation_id %r) acknowledged and dropped",
                                      props.correlation_id)
                self._done(tag)
                return
            if type(reply_to) is not str or (reply_to.startswith(_DIRECT_REPLY_PREFIX)
                                             and self._reply_to_ok.get(reply_to) is not True):
                if type(reply_to) is str and self._defer_to_probe(channel, tag, props, body):
                    return  # handled again once the broker has vetted the name (_on_reply_to_probed)
                # Not UTF-8 (pika hands it over as bytes), or a Direct Reply-to name that is
                # malformed or that the broker cannot take (it would close our connection).
                self.stats.no_reply_to += 1
                self._log_bad_reply_to("request with an unusable reply_to %r acknowledged and dropped",
                                       reply_to[:80])
                self._done(tag)
                return
            headers = props.headers
            if headers:
                if protocol.deadline_passed(headers):
                    self.stats.expired += 1
                    log.debug("request %r past its deadline: acknowledged without an answer", props.correlation_id)
                    self._done(tag)
                    return
                fmt = protocol.reply_format(headers)
            else:
                fmt = "decimal"
            n = protocol.parse_n(body, self._max_n)
            self._reply_limit.check(n, fmt)
            if n <= self._inline_max_n:
                payload = self._compute(n, fmt)
            else:
                key = (n, fmt)
                payload = self._cache.get(key)
                if payload is None:
                    self._inflight.add(tag)
                    job = self._computing.get(key)
                    if job is not None:
                        job.waiters.append((tag, reply_to, props.correlation_id, start))
                    else:
                        self.stats.offloaded += 1
                        job = self._computing[key] = _Job(channel, n, fmt, tag, reply_to, props.correlation_id, start)
                        self._jobs.put(job)
                    return
                self.stats.cache_hits += 1
            self._reply(channel, reply_to, props.correlation_id, fmt, payload, start)
        except RemoteError as exc:  # the request's own fault: an error reply, acknowledged once
            try:
                self._reply_error(channel, reply_to, props.correlation_id, exc.kind, exc.message, start)
            except Exception:
                self._internal_error(channel, tag, reply_to, props.correlation_id, "replying with an error", start)
                return
        except Exception:
            what = "parsing the request" if n is None else f"serving F({n})"
            self._internal_error(channel, tag, reply_to, props.correlation_id, what, start)
            return
        self._done(tag)

    def _defer_to_probe(self, channel, tag: int, props, body: bytes) -> bool:
        """Hold a request whose Direct Reply-to name is not vetted yet until the broker has vetted it.

        Returns False when the name is known to be unusable (malformed, or refused
        by the broker): the caller drops the request. Held requests count as in
        flight, so that no multiple ack covers them and a graceful stop waits for them.
        """
        reply_to = props.reply_to
        if self._reply_to_ok.get(reply_to) is False:
            return False
        if not direct_reply_to_ok(reply_to):
            self._vetted(reply_to, False)
            return False
        waiting = self._probing.get(reply_to)
        if waiting is None:
            waiting = self._probing[reply_to] = []
            callback = self._ioloop.add_callback_threadsafe
            self._prober.submit(self.config.urls[self._url_index], reply_to,
                                lambda name, ok: callback(functools.partial(self._on_reply_to_probed, name, ok)))
        waiting.append((channel, tag, props, body))
        self._inflight.add(tag)
        return True

    def _vetted(self, reply_to: str, ok: bool) -> None:
        if len(self._reply_to_ok) >= 4096:
            self._reply_to_ok.clear()
        self._reply_to_ok[reply_to] = ok

    def _on_reply_to_probed(self, reply_to: str, ok: bool | None) -> None:
        if ok is None:  # the probe could not run (broker unreachable?): serve as before the probe existed
            self._log_probe("cannot vet the Direct Reply-to name %r with the broker; replying to it unvetted",
                            reply_to[:80])
        elif not ok:
            self._log_probe("the broker cannot deliver to the Direct Reply-to name %r (unknown node or pid); "
                            "its requests are dropped", reply_to[:80])
        self._vetted(reply_to, ok is not False)
        for channel, tag, props, body in self._probing.pop(reply_to, ()):
            if channel is self._channel and channel.is_open:  # else redelivered on the new channel
                self._inflight.discard(tag)
                self.stats.received -= 1  # counted when it arrived
                self._handle(channel, tag, props, body)
        if self._stopping:
            self._maybe_finish_stop()

    def _reply(self, channel, reply_to: str, correlation_id, fmt: str, payload: bytes,
               start: float | None = None) -> None:
        encoder = self._encoder
        if encoder is not None and channel is self._channel:
            pieces = encoder.frames(reply_to, _CONTENT_TYPE_SHORTSTR[fmt], correlation_id, payload)
            self._connection.write_frames(pieces, 2 + (len(pieces) - 2) // 3)
        else:
            props = BasicProperties(content_type=protocol.CONTENT_TYPES[fmt], correlation_id=correlation_id)
            channel.basic_publish("", reply_to, payload, props)
        self.stats.replied += 1
        if start is not None:
            self._durations.observe(_clock() - start)

    def _reply_error(self, channel, reply_to: str, correlation_id, kind: str, message: str,
                     start: float | None = None) -> None:
        props = BasicProperties(
            content_type=protocol.CONTENT_ERROR, correlation_id=correlation_id, headers=_ERROR_HEADERS[kind]
        )
        channel.basic_publish("", reply_to, protocol.error_body(kind, message), props)
        self.stats.errors[kind] += 1
        if start is not None:
            self._durations.observe(_clock() - start)

    def _internal_error(self, channel, tag: int, reply_to: str, correlation_id, what: str,
                        start: float | None = None) -> None:
        """Log an unexpected exception (the caller is in its ``except``), reply ``internal``, acknowledge."""
        ref = f"{os.getpid()}-{next(self._internal_ids)}"
        self._log_internal("internal error %s while %s (correlation_id %r)", ref, what, correlation_id, exc_info=True)
        if not (channel.is_open and channel is self._channel):
            return  # the request is redelivered on the next connection
        try:
            self._reply_error(channel, reply_to, correlation_id, protocol.KIND_INTERNAL,
                              f"internal server error (reference {ref}); the server logged it", start)
        except Exception:
            log.exception("cannot send the internal error reply %s", ref)
            if not channel.is_open:
                return
        self._done(tag)

    # ----------------------------------------------------------- acknowledging

    def _done(self, tag: int) -> None:
        """The request ``tag`` was answered (or needs no answer): acknowledge it at the end of this loop turn."""
        self._acks.append(tag)
        if not self._flush_pending:
            self._flush_pending = True
            connection = self._connection
            if connection is not None:
                connection.request_flush()  # runs _flush_acks, then writes

    def _flush_acks(self) -> None:
        self._flush_pending = False
        acks = self._acks
        if not acks:
            return
        self._acks = []
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        inflight = self._inflight
        if not inflight:
            # Every request delivered up to max(acks) was answered: one ack covers them all.
            channel.basic_ack(max(acks), multiple=len(acks) > 1)
            return
        floor = min(inflight)
        low = [t for t in acks if t < floor]
        if low:
            channel.basic_ack(max(low), multiple=len(low) > 1)
        for t in acks:
            if t > floor:
                channel.basic_ack(t)

    # ------------------------------------------------------------- compute thread

    def _compute_loop(self) -> None:
        compute, callback = self._compute, self._ioloop.add_callback_threadsafe
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._draining or not job.channel.is_open:
                job.skipped = True
            else:
                try:
                    job.body = compute(job.n, job.fmt)
                except BaseException as exc:  # noqa: B036 - reported to the I/O thread, which replies internal
                    job.error = exc
            try:
                callback(functools.partial(self._on_computed, job))
            except Exception:  # the loop is closed: we are exiting
                return

    def _on_computed(self, job: _Job) -> None:
        channel = job.channel
        if channel is not self._channel or not channel.is_open:
            return  # that channel is gone; the broker redelivers the requests
        key = (job.n, job.fmt)
        if self._computing.get(key) is job:
            del self._computing[key]
        for tag, *_ in job.waiters:
            self._inflight.discard(tag)
        if job.skipped:
            # Stopping: give the requests back at once, so that another worker takes them.
            for tag, *_ in job.waiters:
                self.stats.requeued_on_stop += 1
                channel.basic_reject(tag, requeue=True)
        elif job.error is not None:
            try:
                raise job.error
            except Exception:
                for tag, reply_to, correlation_id, start in job.waiters:
                    self._internal_error(channel, tag, reply_to, correlation_id, f"computing F({job.n})", start)
        else:
            self._cache.put(key, job.body)
            for tag, reply_to, correlation_id, start in job.waiters:
                self._reply(channel, reply_to, correlation_id, job.fmt, job.body, start)
                self._done(tag)
        if self._stopping:
            self._maybe_finish_stop()


def _describe(error: BaseException) -> str:
    """A one-line account of a pika error, unwrapping pika's wrappers down to the root cause."""
    for _ in range(5):
        inner = getattr(error, "exceptions", None)  # AMQPConnectionWorkflowFailed
        if inner:
            error = inner[-1]
        elif isinstance(getattr(error, "exception", None), BaseException):  # AMQPConnectorPhaseErrorBase
            error = error.exception
        elif len(error.args) == 1 and isinstance(error.args[0], BaseException):
            error = error.args[0]
        else:
            break
    text = str(error) or ""
    name = type(error).__name__
    return f"{name}: {text}" if text and text != name else name


def _fatal_reason(error: BaseException) -> str | None:
    """Why ``error`` is not worth retrying ("credentials refused", "permission refused"), or None."""
    if isinstance(error, (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError)):
        return "credentials refused"
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError):
        return "access to the virtual host refused"
    code = getattr(error, "reply_code", None)
    if isinstance(error, pika.exceptions.ConnectionClosedByBroker):
        if code == 403:
            return "credentials or permission refused"
        if code == 530:  # NOT_ALLOWED: for example no access to the vhost
            return "access refused"
    if isinstance(error, pika.exceptions.ChannelClosedByBroker) and code == 403:
        return "permission refused"
    return None


def run_worker(index: int, config: WorkerConfig, status_conn=None) -> None:
    """Entry point of a worker process (the target of ``multiprocessing.Process``).

    Opens its own connection here, in the child; nothing of pika crosses the
    process boundary. Reports ``(event, detail)`` tuples on ``status_conn``.
    """
    configure_logging(config.log_level, f"worker-{index}", log_format=config.log_format, worker=index)

    def on_event(name: str, detail: str) -> None:
        if status_conn is not None:
            try:
                status_conn.send((name, detail))
            except (OSError, ValueError):
                pass

    try:
        metrics = None
        if config.metrics:
            from .metrics import WorkerMetrics  # imports prometheus_client: only when asked for

            metrics = WorkerMetrics(index)
        worker = Worker(config, index, on_event=on_event, metrics=metrics)
        code = worker.run(install_signal_handlers=True, watch_parent=True)
    except KeyboardInterrupt:
        code = EXIT_OK
    except Exception:
        log.exception("worker crashed")
        code = EXIT_FAILURE
    logging.shutdown()
    sys.exit(code)
