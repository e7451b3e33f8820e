"""What one worker runs with: :class:`WorkerConfig`, its defaults and bounds.

Imports nothing of pika or of the rest of the server, so that the command
line's configuration (:mod:`fastfib.config`) loads neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import protocol
from ..cache import DEFAULT_CACHE_BYTES
from ..limits import DEFAULT_MAX_REPLY_BYTES

#: Requests with n up to this are computed on the I/O thread. Measured on the
#: dev machine (docs/server.md): F(2*10^4) costs 90 us decimal / 40 us binary,
#: while a hop to the compute thread and back added 300-500 us to the median
#: round trip; at 5*10^4 (300 us) the hop starts to pay.
DEFAULT_INLINE_MAX_N = 20_000

#: Default prefetch (basic.qos prefetch_count) per worker.
DEFAULT_PREFETCH = 64
#: basic.qos prefetch_count is a 16-bit field: anything larger cannot be sent.
MAX_PREFETCH = 65535

#: The largest --inline-max-n: n up to it are computed on the I/O thread, which meanwhile serves
#: nothing else and sends no heartbeat. F(2*10^6) costs about 27 ms in decimal (docs/server.md), the
#: longest stall allowed: far below any heartbeat interval, and the docs' inline experiment still runs.
#: At 10^7 it would be about 0.27 s per request.
MAX_INLINE_MAX_N = 2 * 10**6

#: The largest --max-n: the largest n whose decimal reply fits a message of 128 MiB, RabbitMQ 3.x's
#: default max_message_size (F(642228067) has 134217728 digits). A larger n could be computed, but its
#: reply would be refused by the broker. (The kernel's own limit, fastfib.MAX_N, is 10^9.)
MAX_SERVED_N = 642_228_067

#: ``--wire`` values: ``fast`` decodes deliveries and encodes replies itself (fastfib.wire, through
#: fastfib.pika_seam); ``pika`` uses pika's public API only.
WIRES = ("fast", "pika")

#: ``--queue-type`` values. quorum (durable) is how the current RabbitMQ tutorial declares
#: ``rpc_queue``; ``classic`` with ``queue_durable=False`` is the seed tutorial's transient queue.
QUEUE_TYPES = ("quorum", "classic")

#: Reconnection backoff: the delay before the k-th retry round is
#: min(CAP, BASE * 2**k), times a random factor in [0.5, 1) (jitter).
RECONNECT_BASE = 0.5
RECONNECT_CAP = 30.0

#: The consumer priority of worker 0's idle consumer (prefetch 1), in a pool of several workers.
#: The broker delivers to it first whenever it has no request unacknowledged, so that requests
#: sent one at a time all reach one worker, warm, instead of alternating between idle workers
#: (docs/server.md, "The idle consumer"); under load it is one more request in flight on worker 0.
IDLE_PRIORITY = 10
IDLE_PREFETCH = 1

#: How long a graceful stop waits for in-flight computations before closing anyway.
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; picklable, so that it crosses into a spawned process."""

    urls: tuple[str, ...] = (protocol.DEFAULT_URL,)
    queue: str = protocol.DEFAULT_QUEUE
    prefetch: int = DEFAULT_PREFETCH
    max_n: int = protocol.DEFAULT_MAX_N
    #: The largest reply body sent (fastfib.limits); larger ones get out_of_range, uncomputed.
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    cache_bytes: int = DEFAULT_CACHE_BYTES
    inline_max_n: int = DEFAULT_INLINE_MAX_N
    #: Threads per large F(n) (fastfib.fib_encoded's ``threads``; issue 8).
    kernel_threads: int = 1
    log_level: str = "INFO"
    stop_timeout: float = STOP_TIMEOUT
    log_format: str = "text"
    #: Queue kind (issues 7, 14): by default durable quorum, as the current tutorial declares it;
    #: classic + not durable is the seed tutorial's queue_declare(queue=Q).
    queue_durable: bool = True
    queue_type: str = "quorum"
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    delivery_limit: int | None = None
    #: Export the worker's counters to prometheus_client's multiprocess files (fastfib.metrics).
    metrics: bool = False
    #: How the worker speaks AMQP on its hot path (WIRES).
    wire: str = "fast"
    #: Workers in the pool. With more than one, worker 0 adds the idle consumer (IDLE_PRIORITY).
    pool_workers: int = 1

    def queue_declaration(self) -> tuple[bool, dict[str, Any] | None]:
        """``(durable, arguments)`` for ``queue_declare``.

        The default ``(True, {"x-queue-type": "quorum"})`` is the current tutorial's;
        ``(False, None)`` is exactly the seed tutorial's ``queue_declare(queue=Q)``.
        """
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
        """How the queue is declared, for log lines: e.g. ``durable quorum, x-delivery-limit=5``."""
        durable, arguments = self.queue_declaration()
        if not durable and not arguments:
            return "the seed tutorial's (non-durable classic, no arguments)"
        kind = f"{'durable' if durable else 'non-durable'} {self.queue_type}"
        extra = ", ".join(f"{k}={v}" for k, v in (arguments or {}).items() if k != "x-queue-type")
        return f"{kind}{', ' + extra if extra else ''}"
