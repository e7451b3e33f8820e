"""The request policy of a worker: what happens to each delivery, on the I/O thread.

:meth:`Dispatcher.handle`, in order:

1. no ``reply_to``: acknowledged and dropped (logged, rate-limited);
   an unusable one (not UTF-8, or a Direct Reply-to name the reply guard
   refuses): the same; one the guard must first ask the broker about is held
   (:mod:`.reply_guard`);
2. ``x-deadline-ms`` in the past: acknowledged, neither computed nor answered;
3. ``accept`` and the body are parsed by :mod:`fastfib.protocol`; a bad request
   gets an error reply (``x-error``) and is acknowledged once, never requeued;
   so does an n whose reply would exceed ``--max-reply-bytes``
   (:mod:`fastfib.limits`: ``out_of_range``) or whose reply the broker
   refused before (:mod:`.closes`: ``internal``), before anything is computed;
4. n <= ``inline_max_n`` (cheap: ~90 us at 2*10^4, decimal): computed right here,
   replied, acknowledged;
5. larger n: answered from the per-worker :class:`~fastfib.cache.ReplyCache`
   when it is there, else handed to the compute thread (:mod:`.compute`);
   requests for an (n, format) already being computed wait for that job.

A reply is always queued before the acknowledgement of its request
(:mod:`.acks`), on the same channel, so the broker sees the publish first.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from pika.spec import BasicProperties

from .. import protocol
from ..cache import ReplyCache
from ..errors import InternalServerError, RemoteError
from ..limits import ReplySizeLimit
from ..wire import CONTENT_TYPE_SHORTSTR, BadDelivery, Delivery, ReplyEncoder, frame_count
from .acks import AckBatcher
from .closes import RefusalMemory
from .compute import ComputeThread, Job
from .reply_guard import ReplyGuard
from .settings import WorkerConfig
from .stats import RateLimitedLog, Stats

if TYPE_CHECKING:
    from ..metrics import LocalHistogram

log = logging.getLogger(__name__)

_clock = time.perf_counter
_DIRECT_REPLY_PREFIX = protocol.DIRECT_REPLY_TO + "."
_ERROR_HEADERS = {kind: {protocol.HEADER_ERROR: kind} for kind in protocol.ERROR_KINDS}


def _deadline_ms(headers) -> int | None:
    """The request's x-deadline-ms (Unix ms) as :func:`fastfib.protocol.deadline_passed` reads it, or None."""
    deadline = headers.get(protocol.HEADER_DEADLINE) if headers else None
    if deadline is None or isinstance(deadline, bool):
        return None
    try:
        return int(deadline)
    except (TypeError, ValueError, OverflowError):
        return None


class Dispatcher:
    """Handles the deliveries of the worker's current channel (:meth:`bind`).

    ``compute(n, fmt) -> bytes`` computes inline; ``computer`` takes the larger
    n; ``post`` runs a callable on the I/O thread from another thread;
    ``current_url()`` is the broker URL the worker is connected to (for the
    reply guard's probe); ``on_settled()`` is called whenever requests in
    flight were settled (a graceful stop waits for them).
    """

    def __init__(
        self,
        config: WorkerConfig,
        index: int,
        *,
        stats: Stats,
        cache: ReplyCache,
        acks: AckBatcher,
        computer: ComputeThread,
        compute: Callable[[int, str], bytes],
        post: Callable[[Callable[[], None]], None],
        current_url: Callable[[], str],
        on_settled: Callable[[], None] = lambda: None,
        durations: LocalHistogram | None = None,
    ) -> None:
        self.stats = stats
        self.cache = cache
        self._acks = acks
        self._computer = computer
        self._compute = compute
        self._current_url = current_url
        self._on_settled = on_settled
        #: The reply-time histogram (metrics on), or None.
        self.durations = durations
        self._max_n = config.max_n
        self._inline_max_n = config.inline_max_n
        self.reply_limit = ReplySizeLimit(config.max_reply_bytes, config.max_n)
        self._refusals = RefusalMemory()
        self._refusals_seen = False  # fast path: no lookup until a refusal was recorded
        self._recent: deque[tuple[int, str]] = deque(maxlen=2 * config.prefetch)  # (n, fmt) of the last replies

        # Per-channel state, reset by bind().
        self.channel = None
        self._encoder: ReplyEncoder | None = None
        self._write_frames: Callable[[list, int], None] | None = None
        self._computing: dict[tuple[int, str], Job] = {}  # (n, fmt) -> its job, while it is computed

        #: Which Direct Reply-to names may be replied to (verdicts per pid; probes on brokers with the 541 crash).
        self.reply_guard = ReplyGuard(index, post)
        self._internal_ids = itertools.count(1)
        self._log_no_reply_to = RateLimitedLog(log, logging.WARNING)
        self._log_bad_reply_to = RateLimitedLog(log, logging.WARNING)
        self._log_internal = RateLimitedLog(log, logging.ERROR, interval=1.0)
        self._log_undecodable = RateLimitedLog(log, logging.WARNING)

    def bind(self, channel, encoder: ReplyEncoder | None = None,
             write_frames: Callable[[list, int], None] | None = None) -> None:
        """Serve ``channel`` from now on (None: no channel). With ``encoder`` and ``write_frames``
        (the connection's), success replies are encoded here instead of by pika."""
        self.channel = channel
        self._encoder = encoder
        self._write_frames = write_frames
        self._computing = {}
        if channel is not None:
            self._recent.clear()

    def forget_vetted_names(self) -> None:
        """Vet every Direct Reply-to name again (after a 541 close: a vetted name's node may have left)."""
        self.reply_guard.forget()

    def lower_reply_limit(self, max_bytes: int) -> None:
        """The broker refused a reply above ``max_bytes``: answer such n with out_of_range from now on."""
        if max_bytes < self.reply_limit.max_reply_bytes:
            self.reply_limit = ReplySizeLimit(max_bytes, self._max_n)

    def record_refused_replies(self, reason: str) -> None:
        """The broker refused one of the latest replies (not for its size): see :class:`.closes.RefusalMemory`."""
        self._refusals.record(self._recent, reason)
        self._refusals_seen = True
        self._recent.clear()

    def poll(self) -> None:
        """Periodic housekeeping (the worker's tick): the reply guard's probe timeouts."""
        self.reply_guard.poll()

    def close(self) -> None:
        """Stop the reply guard's thread."""
        self.reply_guard.stop()

    # ------------------------------------------------------------ deliveries

    def on_message(self, channel, method, props: BasicProperties, body: bytes) -> None:
        """pika's delivery callback (deliveries the fast path left to pika)."""
        if method.redelivered:
            self.stats.redelivered += 1
        self.handle(channel, method.delivery_tag, props, body)

    def on_fast_delivery(self, delivery: Delivery | BadDelivery) -> None:
        """A delivery decoded by the connection itself (:mod:`fastfib.pika_seam`, :mod:`fastfib.wire`)."""
        channel = self.channel
        if channel is None or not channel.is_open:
            return
        if delivery.redelivered:
            self.stats.redelivered += 1
        if type(delivery) is BadDelivery:
            self.stats.received += 1
            self.settle_undecodable(channel, delivery)
        else:
            self.handle(channel, delivery.delivery_tag, delivery.properties, delivery.body)

    def settle_undecodable(self, channel, bad: BadDelivery, vetted: bool | None = None) -> None:
        """A delivery whose properties do not decode: an ``invalid_argument`` reply when its ``reply_to``
        could be read (and is safe to reply to), then rejected without requeue (dead-lettered, if the
        queue says so): redelivering it would fail the same way. Never raises."""
        try:
            reply_to = bad.reply_to
            if vetted is not None:  # the reply guard's verdict on its name, held for it (_on_vetted)
                usable = vetted
            else:
                usable = type(reply_to) is str and bool(reply_to) and self.reply_guard.verdict(reply_to)
            if usable is None:  # settled once the broker has vetted the name's pid (_on_vetted)
                self.reply_guard.hold(reply_to, (channel, bad), self._on_vetted, self._current_url())
                self._acks.inflight.add(bad.delivery_tag)
                return
            self.stats.undecodable += 1
            self._log_undecodable("undecodable request (correlation_id %r, reply_to %r): %s: %s; rejected "
                                  "without requeue", bad.correlation_id, reply_to,
                                  type(bad.error).__name__, str(bad.error)[:200])
            if usable:
                self._reply_error(channel, reply_to, bad.correlation_id, protocol.KIND_INVALID_ARGUMENT,
                                  f"the request's properties cannot be decoded ({type(bad.error).__name__})")
            channel.basic_reject(bad.delivery_tag, requeue=False)
        except Exception:  # the channel is gone (the broker redelivers it), or a bug: never into the transport
            self._log_internal("cannot settle the undecodable request %d", bad.delivery_tag, exc_info=True)

    def handle(self, channel, tag: int, props, body: bytes, vetted: bool = False) -> None:
        """Serve one request (``props``: reply_to, correlation_id, headers) delivered on ``channel``.

        ``vetted``: the reply guard has already allowed its ``reply_to``.
        """
        self.stats.received += 1
        start = _clock() if self.durations is not None else None
        reply_to = props.reply_to
        n = None
        try:
            if not reply_to:
                self.stats.no_reply_to += 1
                self._log_no_reply_to("request without reply_to (correlation_id %r) acknowledged and dropped",
                                      props.correlation_id)
                self._acks.done(tag)
                return
            if not vetted and (type(reply_to) is not str or reply_to.startswith(_DIRECT_REPLY_PREFIX)):
                ok = self.reply_guard.verdict(reply_to)
                if ok is None:  # held until the broker has vetted the name's pid (_on_vetted)
                    self.reply_guard.hold(reply_to, (channel, (tag, props, body)), self._on_vetted,
                                          self._current_url())
                    self._acks.inflight.add(tag)  # so that no multiple ack covers it, and a stop waits for it
                    return
                if not ok:
                    self._drop_unusable(tag, reply_to)
                    return
            headers = props.headers
            if headers:
                if protocol.deadline_passed(headers):
                    self.stats.expired += 1
                    log.debug("request %r past its deadline: acknowledged without an answer", props.correlation_id)
                    self._acks.done(tag)
                    return
                fmt = protocol.reply_format(headers)
            else:
                fmt = "decimal"
            n = protocol.parse_n(body, self._max_n)
            self.reply_limit.check(n, fmt)
            if self._refusals_seen:
                refused = self._refusals.refused(n, fmt)
                if refused is not None:
                    raise InternalServerError(f"the broker refused the reply for n={n} ({fmt}): {refused}")
            if n <= self._inline_max_n:
                payload = self._compute(n, fmt)
            else:
                key = (n, fmt)
                payload = self.cache.get(key)
                if payload is None:
                    self._acks.inflight.add(tag)
                    job = self._computing.get(key)
                    deadline_ms = _deadline_ms(headers)
                    if job is not None:
                        job.add_waiter(tag, reply_to, props.correlation_id, start, deadline_ms)
                    else:
                        self.stats.offloaded += 1
                        job = self._computing[key] = Job(channel, n, fmt, tag, reply_to, props.correlation_id, start,
                                                         deadline_ms)
                        self._computer.submit(job)
                    return
                self.stats.cache_hits += 1
            self._reply(channel, reply_to, props.correlation_id, fmt, payload, start)
            self._recent.append((n, fmt))
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
        self._acks.done(tag)

    # ------------------------------------------------------------ the reply guard

    def _on_vetted(self, item: tuple, ok: bool) -> None:
        """The reply guard's verdict on a held request (on the I/O thread)."""
        channel, held = item
        if channel is self.channel and channel.is_open:  # else redelivered on the new channel
            if type(held) is BadDelivery:
                self._acks.inflight.discard(held.delivery_tag)
                self.settle_undecodable(channel, held, vetted=ok)
            else:
                tag, props, body = held
                self._acks.inflight.discard(tag)
                if ok:
                    self.stats.received -= 1  # counted when it arrived
                    self.handle(channel, tag, props, body, vetted=True)
                else:
                    self._drop_unusable(tag, props.reply_to)
        self._on_settled()

    def _drop_unusable(self, tag: int, reply_to) -> None:
        # Not UTF-8 (pika hands it over as bytes), or a Direct Reply-to name that is
        # malformed or that the broker cannot take (it would close our connection).
        self.stats.no_reply_to += 1
        self._log_bad_reply_to("request with an unusable reply_to %r acknowledged and dropped", reply_to[:80])
        self._acks.done(tag)

    # ------------------------------------------------------------ replies

    def _reply(self, channel, reply_to: str, correlation_id, fmt: str, payload: bytes,
               start: float | None = None) -> None:
        encoder = self._encoder
        if encoder is not None and channel is self.channel:
            pieces = encoder.frames(reply_to, CONTENT_TYPE_SHORTSTR[fmt], correlation_id, payload)
            self._write_frames(pieces, frame_count(pieces))
        else:
            props = BasicProperties(content_type=protocol.CONTENT_TYPES[fmt], correlation_id=correlation_id)
            channel.basic_publish("", reply_to, payload, props)
        self.stats.replied += 1
        if start is not None:
            self.durations.observe(_clock() - start)

    def _reply_error(self, channel, reply_to: str, correlation_id, kind: str, message: str,
                     start: float | None = None) -> None:
        props = BasicProperties(
            content_type=protocol.CONTENT_ERROR, correlation_id=correlation_id, headers=_ERROR_HEADERS[kind]
        )
        channel.basic_publish("", reply_to, protocol.error_body(kind, message), props)
        self.stats.errors[kind] += 1
        if start is not None:
            self.durations.observe(_clock() - start)

    def _internal_error(self, channel, tag: int, reply_to: str, correlation_id, what: str,
                        start: float | None = None) -> None:
        """Log an unexpected exception (the caller is in its ``except``), reply ``internal``, acknowledge."""
        ref = f"{os.getpid()}-{next(self._internal_ids)}"
        self._log_internal("internal error %s while %s (correlation_id %r)", ref, what, correlation_id, exc_info=True)
        if not (channel.is_open and channel is self.channel):
            return  # the request is redelivered on the next connection
        try:
            self._reply_error(channel, reply_to, correlation_id, protocol.KIND_INTERNAL,
                              f"internal server error (reference {ref}); the server logged it", start)
        except Exception:
            log.exception("cannot send the internal error reply %s", ref)
            if not channel.is_open:
                return
        self._acks.done(tag)

    # ------------------------------------------------------------ results of the compute thread

    def on_computed(self, job: Job) -> None:
        """A job back from the compute thread (on the I/O thread): reply to its waiters."""
        key = (job.n, job.fmt)
        if job.body is not None:  # even if its channel is gone: the redelivered requests cost a lookup
            self.cache.put(key, job.body)
        channel = job.channel
        if channel is not self.channel or not channel.is_open:
            return  # that channel is gone; the broker redelivers the requests
        if self._computing.get(key) is job:
            del self._computing[key]
        inflight = self._acks.inflight
        for tag, *_ in job.waiters:
            inflight.discard(tag)
        if job.skipped:
            # Stopping: give the requests back at once, so that another worker takes them.
            for tag, *_ in job.waiters:
                self.stats.requeued_on_stop += 1
                channel.basic_reject(tag, requeue=True)
        elif job.expired:
            # Every waiter's deadline passed while the job was queued: acknowledged without an answer.
            for tag, _, correlation_id, _ in job.waiters:
                self.stats.expired += 1
                log.debug("request %r past its deadline when its F(%d) came up: acknowledged without an answer",
                          correlation_id, job.n)
                self._acks.done(tag)
        elif job.error is not None:
            try:
                raise job.error
            except Exception:
                for tag, reply_to, correlation_id, start in job.waiters:
                    self._internal_error(channel, tag, reply_to, correlation_id, f"computing F({job.n})", start)
        else:
            for tag, reply_to, correlation_id, start in job.waiters:
                self._reply(channel, reply_to, correlation_id, job.fmt, job.body, start)
                self._acks.done(tag)
            self._recent.append(key)
        self._on_settled()
