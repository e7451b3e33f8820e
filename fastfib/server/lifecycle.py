"""One worker process of ``fastfib serve``: its connection's life from connect to stop.

A :class:`Worker` owns one pika ``SelectConnection`` (callback style, one
``_on_*`` method per connection step, like pika's asynchronous consumer
example) and one I/O loop that outlives its connections, so that reconnecting
is only a timer on the same loop: connect, open a channel, declare the queue,
set the prefetch, consume; on a loss, reconnect with backoff (failing over to
the next URL of a cluster); on a stop, cancel the consumer, finish what is in
flight and close.

What happens to each request is :mod:`.dispatch`'s job, large F(n) are
:mod:`.compute`'s, acknowledgements :mod:`.acks`'.

On the ``fast`` wire (the default) the connection is
:class:`fastfib.pika_seam.CoalescingConnection`: it decodes the worker's
deliveries and writes its replies with :mod:`fastfib.wire`. On the ``pika``
wire (``--wire pika``, or when the seam's startup self-check fails with the
installed pika) it is a plain ``pika.SelectConnection`` and the worker uses
pika's public API only: ``basic_consume``'s callback, ``basic_publish``,
``basic_ack``.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop

from .. import pika_seam
from ..cache import ReplyCache
from ..exitcodes import EXIT_ACCESS_REFUSED, EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from ..logs import configure_logging, mask_url
from ..wire import ReplyEncoder
from .acks import AckBatcher
from .closes import Backoff, Cause, classify, describe, fatal_reason
from .compute import ComputeThread, kernel_encoder
from .dispatch import Dispatcher
from .settings import IDLE_PREFETCH, IDLE_PRIORITY, RECONNECT_BASE, RECONNECT_CAP, WorkerConfig
from .stats import RateLimitedLog, Stats

if TYPE_CHECKING:
    from ..metrics import WorkerMetrics

log = logging.getLogger(__name__)


@functools.cache
def wire_works() -> bool:
    """Whether the fast wire works with the installed pika (:func:`fastfib.pika_seam.self_check`), checked
    once per process; when it does not, one warning says so."""
    problem = pika_seam.self_check()
    if problem is not None:
        log.warning("the fast wire does not work with the installed pika %s (%s); running on pika's public API "
                    "instead, as with --wire pika", pika.__version__, problem)
    return problem is None

_TICK = 0.2  # seconds between checks for a stop request and the supervisor's death, and metrics flushes


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
        compute = compute if compute is not None else kernel_encoder(config.kernel_threads)
        self._on_event = on_event or (lambda name, detail: None)
        # Pool-wide metrics (fastfib.metrics): the hot path only times replies into a local
        # histogram; _tick hands the counters to prometheus_client every _TICK seconds.
        self._metrics = metrics
        self._params = [pika.URLParameters(url) for url in config.urls]
        for params in self._params:  # shown by `rabbitmqctl list_connections client_properties` and the UI
            params.client_properties = {"connection_name": f"fastfib-worker-{index} pid={os.getpid()} queue={config.queue}"}
        self._masked = [mask_url(url) for url in config.urls]
        # Spread the workers over the cluster's nodes: worker i starts at URL i.
        self._url_index = index % len(self._params)
        self._backoff = Backoff(RECONNECT_BASE, RECONNECT_CAP)  # grows across failures of the same cause
        self._doing = "connecting"  # what a close interrupts (fastfib.server.closes.DOING)
        self._pending_cause: Cause | None = None  # a channel close that made us close the connection

        #: "fast" or "pika" (WorkerConfig.wire); "fast" turns to "pika" in run() if the seam's check fails.
        self.wire = config.wire
        self._ioloop = IOLoop()
        self._connection: pika.SelectConnection | None = None
        self._channel = None
        self._consumer_tag: str | None = None
        #: Worker 0 of a pool of several also holds the idle consumer (settings.IDLE_PRIORITY).
        self._idle_consumer = index == 0 and config.pool_workers > 1
        self._idle_tag: str | None = None
        self._passive_declare = False
        self._queue_declaration = config.queue_declaration()
        self._reconnect_timer = None

        self._stop_requested = False  # set by a signal handler
        self._stopping = False
        self._stop_deadline = 0.0
        self._parent_pid = os.getppid()
        self._watch_parent = False
        self._log_metrics = RateLimitedLog(log, logging.ERROR, interval=60.0)

        self.cache = ReplyCache(config.cache_bytes)
        self.acks = AckBatcher()
        self.computer = ComputeThread(compute, self._ioloop.add_callback_threadsafe, name=f"fastfib-compute-{index}")
        self.dispatcher = Dispatcher(
            config, index, stats=self.stats, cache=self.cache, acks=self.acks, computer=self.computer,
            compute=compute, post=self._ioloop.add_callback_threadsafe,
            current_url=lambda: self.config.urls[self._url_index], on_settled=self._maybe_finish_stop,
            durations=metrics.durations if metrics is not None else None,
        )

    # ------------------------------------------------------------------ running

    def run(self, *, install_signal_handlers: bool = False, watch_parent: bool = False) -> int:
        """Serve until stopped (signal, :meth:`request_stop`, or a fatal error); return the exit code."""
        if install_signal_handlers:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        self._watch_parent = watch_parent
        if self.wire == "fast" and not wire_works():
            self.wire = "pika"
        self.computer.start(self.dispatcher.on_computed)
        self._ioloop.call_later(_TICK, self._tick)
        self._connect()
        try:
            self._ioloop.start()
        finally:
            self.dispatcher.close()
            self.computer.stop(timeout=5.0)
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
        self.dispatcher.poll()
        if self._metrics is not None:
            self._flush_metrics()
        if self._stop_requested and not self._stopping:
            self._begin_stop("stop requested")
        elif self._watch_parent and not self._stopping and os.getppid() != self._parent_pid:
            log.warning("the supervisor is gone; stopping")
            self._begin_stop("supervisor gone")
        if self._stopping and time.monotonic() > self._stop_deadline:
            log.warning("graceful stop took over %.0f s; closing with %d request(s) in flight",
                        self.config.stop_timeout, len(self.acks.inflight))
            self._stop_deadline = float("inf")
            self.acks.inflight.clear()
            self._finish_stop()
        self._ioloop.call_later(_TICK, self._tick)

    def _flush_metrics(self) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        try:
            metrics.flush(self.stats, self.cache, len(self.acks.inflight))
        except Exception:  # metrics must never cost the worker its requests
            self._log_metrics("cannot update the metrics", exc_info=True)

    # --------------------------------------------------------------- connecting

    def _connect(self) -> None:
        self._reconnect_timer = None
        i = self._url_index
        log.debug("connecting to %s", self._masked[i])
        callbacks = dict(parameters=self._params[i], on_open_callback=self._on_connection_open,
                         on_open_error_callback=self._on_connection_open_error,
                         on_close_callback=self._on_connection_closed, custom_ioloop=self._ioloop)
        if self.wire == "fast":
            self._connection = pika_seam.CoalescingConnection(**callbacks, before_flush=self.acks.flush)
        else:
            self._connection = pika.SelectConnection(**callbacks)

    def _on_connection_open(self, connection) -> None:
        if connection is not self._connection:
            return
        self.stats.connections += 1
        log.debug("connected to %s", self._masked[self._url_index])
        self.dispatcher.reply_guard.on_connected(connection.server_properties)
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
        fatal = fatal_reason(error)
        if fatal:
            self._fatal(f"{fatal} by the broker at {url}: {describe(error)}")
            return
        self._schedule_reconnect(f"cannot connect to {url}: {describe(error)}", type(error).__name__)

    def _on_connection_closed(self, connection, reason: BaseException) -> None:
        if connection is not self._connection:
            return
        self._connection = None
        was_consuming = self._consumer_tag is not None
        self._consumer_tag = self._idle_tag = None
        self._set_channel(None)
        if self._stopping:
            self._ioloop.stop()
            return
        self._on_event("disconnected", describe(reason))
        url = self._masked[self._url_index]
        close = classify(getattr(reason, "reply_code", None), getattr(reason, "reply_text", None),
                         "serving" if was_consuming else self._doing)
        if close.cause is Cause.DECLARATION_REFUSED:
            self._fatal(f"the broker at {url} refused to declare queue {self.config.queue!r} as "
                        f"{self.config.describe_queue()}: {describe(reason)}. Declare it with another "
                        "--queue-type / --queue-durable, or create the queue beforehand", EXIT_CONFIG)
            return
        if close.cause is Cause.REPLY_TO_CRASH or getattr(reason, "reply_code", None) == 541:
            # Possibly a reply to a name vetted earlier whose node has left the cluster since:
            # vet every name again, so that its redelivered request is dropped, not a crash loop.
            self.dispatcher.forget_vetted_names()
        fatal = fatal_reason(reason)
        if fatal:
            self._fatal(f"{fatal} by the broker at {url}: {describe(reason)}")
            return
        if was_consuming:
            self.stats.connection_losses += 1
        cause, self._pending_cause = self._pending_cause or close.cause, None
        self._schedule_reconnect(f"connection to {url} lost: {describe(reason)}", cause)

    def _schedule_reconnect(self, why: str, cause: Cause | str) -> None:
        n_urls = len(self._params)
        self._url_index = (self._url_index + 1) % n_urls
        delay = self._backoff.next_delay(cause, n_urls)
        self._doing = "connecting"
        log.warning("%s; reconnecting to %s in %.1f s", why, self._masked[self._url_index], delay)
        self._reconnect_timer = self._ioloop.call_later(delay, self._connect)

    def _open_channel(self) -> None:
        self._connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel) -> None:
        self._set_channel(channel)
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        self._declare_queue()

    def _set_channel(self, channel) -> None:
        """Make ``channel`` (None: none) the worker's; what was in flight on the old one is redelivered."""
        self._channel = channel
        connection = self._connection
        self._clear_fast_deliveries()
        if channel is None:
            self.acks.bind(None)
            self.dispatcher.bind(None)
        elif connection is None:  # not connected through us (unit tests drive a fake channel)
            self.acks.bind(channel)
            self.dispatcher.bind(channel)
        elif self.wire == "pika":
            self.acks.bind(channel, functools.partial(self._ioloop.call_later, 0, self.acks.flush))
            self.dispatcher.bind(channel)
        else:
            self.acks.bind(channel, connection.request_flush)
            self.dispatcher.bind(channel, ReplyEncoder(channel.channel_number, connection.body_max_length()),
                                 connection.write_frames)

    def _declare_queue(self) -> None:
        # By default as the current tutorial declares it: durable, x-queue-type quorum.
        durable, arguments = self._queue_declaration
        self._doing = "declaring-passive" if self._passive_declare else "declaring"
        self._channel.queue_declare(
            queue=self.config.queue, passive=self._passive_declare, durable=durable, arguments=arguments,
            callback=self._on_queue_declareok,
        )

    def _on_queue_declareok(self, frame) -> None:
        self._doing = "consuming"
        self._channel.basic_qos(prefetch_count=self.config.prefetch, callback=self._on_qos_ok)

    def _on_qos_ok(self, frame) -> None:
        if self._stopping:
            self._finish_stop()
            return
        channel = self._channel
        self._consumer_tag = channel.basic_consume(self.config.queue, self.dispatcher.on_message,
                                                   callback=self._on_consume_ok)
        if self._idle_consumer:
            # A basic.qos sets the prefetch of the consumers created after it: the main one keeps its own.
            channel.basic_qos(prefetch_count=IDLE_PREFETCH, callback=self._on_idle_qos_ok)
        self._set_fast_deliveries()

    def _on_idle_qos_ok(self, frame) -> None:
        channel = self._channel
        if self._stopping or self._consumer_tag is None or channel is None or not channel.is_open:
            return
        self._idle_tag = channel.basic_consume(self.config.queue, self.dispatcher.on_message,
                                               arguments={"x-priority": IDLE_PRIORITY})
        self._set_fast_deliveries()

    def _set_fast_deliveries(self) -> None:
        if self.wire == "fast" and self._connection is not None and self._channel is not None:
            tags = tuple(t for t in (self._consumer_tag, self._idle_tag) if t is not None)
            self._connection.set_fast_deliveries(self._channel.channel_number, tags, self.dispatcher.on_fast_delivery)

    def _clear_fast_deliveries(self) -> None:
        if self.wire == "fast" and self._connection is not None:
            self._connection.clear_fast_deliveries()

    def _on_consume_ok(self, frame) -> None:
        self._doing = "serving"
        self._backoff.healthy()
        log.info("consuming from queue %r on %s (prefetch %d, wire %s)", self.config.queue,
                 self._masked[self._url_index], self.config.prefetch, self.wire)
        self._on_event("consuming", self._masked[self._url_index])

    def _on_consumer_cancelled(self, frame) -> None:
        # The broker cancelled our consumer: the queue was deleted. Declare it again and resume,
        # once it has cancelled both of worker 0's (a deleted queue's consumers are all cancelled).
        tag = frame.method.consumer_tag
        if tag == self._idle_tag:
            self._idle_tag = None
        elif tag == self._consumer_tag:
            self._consumer_tag = None
        else:
            return
        self._clear_fast_deliveries()
        if self._consumer_tag is not None or self._idle_tag is not None:
            return
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
        self._consumer_tag = self._idle_tag = None
        self._set_channel(None)
        connection = self._connection
        if connection is None or not connection.is_open:
            return  # the connection is going down: _on_connection_closed speaks for both
        if self._stopping:
            connection.close()
            return
        close = classify(getattr(reason, "reply_code", None), getattr(reason, "reply_text", None), self._doing)
        cause = close.cause
        if cause is Cause.ACCESS_REFUSED:
            self._fatal(f"permission refused by the broker at {self._masked[self._url_index]}: {describe(reason)}")
            return
        if cause is Cause.DECLARATION_REFUSED:
            self._fatal(f"the broker refused to declare queue {self.config.queue!r} as "
                        f"{self.config.describe_queue()}: "
                        f"{describe(reason)}", EXIT_CONFIG)
            return
        if cause is Cause.QUEUE_ATTRIBUTES:
            log.warning("queue %r exists with other attributes than %s (%s); serving it as it is",
                        self.config.queue, self._queue_wanted(), describe(reason))
            self._passive_declare = True
            self._open_channel()
            return
        if cause is Cause.QUEUE_GONE:
            log.warning("queue %r is gone (%s); declaring it as configured (%s)", self.config.queue,
                        describe(reason), self.config.describe_queue())
            self._passive_declare = False
            self._open_channel()
            return
        if cause is Cause.REPLY_TOO_LARGE:
            # Not a reason to reconnect: the request comes back (redelivered) and gets out_of_range, uncomputed.
            log.warning("the broker refused a reply of %d bytes (its max_message_size is %d); replies above %d bytes "
                        "get out_of_range from now on: set --max-reply-bytes to at most the broker's limit",
                        close.refused_size, close.max_size, close.max_size)
            self.dispatcher.lower_reply_limit(close.max_size)
            self._open_channel()
            return
        if cause is Cause.REPLY_REFUSED:
            log.warning("the broker refused one of the latest replies (%s); a request whose reply is refused "
                        "twice gets an internal error instead", describe(reason))
            self.dispatcher.record_refused_replies(close.reply_text)
            self._open_channel()
            return
        log.warning("channel closed by the broker: %s; reconnecting", describe(reason))
        self._pending_cause = cause
        connection.close()  # _on_connection_closed schedules the reconnection

    def _queue_wanted(self) -> str:
        return f"the configured ones ({self.config.describe_queue()})"

    def _fatal(self, message: str, exit_code: int = EXIT_ACCESS_REFUSED) -> None:
        log.critical("fatal: %s; not retrying", message)
        self.exit_code = exit_code
        self._on_event("fatal", message)
        self._stopping = True
        self.computer.draining = True
        self._stop_deadline = time.monotonic() + self.config.stop_timeout
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()  # _on_connection_closed stops the loop
        else:
            self._connection = None
            self._ioloop.stop()

    # ----------------------------------------------------------------- stopping

    def _begin_stop(self, why: str) -> None:
        log.info("stopping (%s): cancelling the consumer, finishing %d request(s) in flight", why,
                 len(self.acks.inflight))
        self._stopping = True
        self.computer.draining = True
        self._stop_deadline = time.monotonic() + self.config.stop_timeout
        if self._reconnect_timer is not None:
            self._ioloop.remove_timeout(self._reconnect_timer)
            self._reconnect_timer = None
        channel, connection = self._channel, self._connection
        if connection is None:
            self._ioloop.stop()
        elif channel is not None and channel.is_open and (self._consumer_tag or self._idle_tag) is not None:
            # Deliveries that arrive after this are rejected (requeued) by pika itself.
            self._clear_fast_deliveries()
            for tag in (self._consumer_tag, self._idle_tag):
                if tag is not None:
                    channel.basic_cancel(tag, callback=self._on_cancelok)
        elif connection.is_open:
            self._finish_stop()
        else:  # still opening: closing aborts it, and _on_connection_open_error stops the loop
            try:
                connection.close()
            except pika.exceptions.ConnectionWrongStateError:
                pass

    def _on_cancelok(self, frame) -> None:
        if frame.method.consumer_tag == self._idle_tag:
            self._idle_tag = None
        else:
            self._consumer_tag = None
        self._maybe_finish_stop()

    def _maybe_finish_stop(self) -> None:
        if self._stopping and self._consumer_tag is None and self._idle_tag is None and not self.acks.inflight:
            self._finish_stop()

    def _finish_stop(self) -> None:
        self.acks.flush()
        connection = self._connection
        if connection is not None and connection.is_open:
            # Closing returns the prefetched, unacknowledged requests to the queue.
            connection.close()
        elif connection is None:
            self._ioloop.stop()


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
            from ..metrics import WorkerMetrics  # imports prometheus_client: only when asked for

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
