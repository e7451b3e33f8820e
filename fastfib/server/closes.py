"""Why the broker closed a channel or connection, and what the worker does about it.

:func:`classify` ``(reply_code, reply_text, doing) -> Close`` is a pure
function of the close frame and of what the worker was doing (``doing``: one
of :data:`DOING`). Each :class:`Cause` has one reaction:

===================  ==========================================  =============================================
cause                seen as                                     reaction
===================  ==========================================  =============================================
REPLY_TOO_LARGE      406 "message size N is larger than [conf-    the reply limit drops to the broker's max:
                     igured] max size M" (3.x and 4.x)           the redelivered request gets out_of_range
REPLY_REFUSED        any other 406 while serving (per message)   its (n, format) is remembered (RefusalMemory):
                                                                 the redelivery gets ``internal``, uncomputed
QUEUE_ATTRIBUTES     406 "inequivalent arg" on queue.declare     the ONLY cause that switches to passive declare
QUEUE_GONE           404 on a passive queue.declare              declare the queue again
DECLARATION_REFUSED  530/541 naming a deprecated feature or a    fatal, no retry (e.g. RabbitMQ 4.3 denies
                     disabled feature flag on queue.declare      transient non-exclusive queues)
ACCESS_REFUSED       403                                         fatal (exit 77), no retry
RESOURCE_LIMIT       406/530 naming a limit (queue or            reconnect with backoff
                     connection limit, max channels)
REPLY_TO_CRASH       541 while serving (Direct Reply-to names,   the reply guard forgets its verdicts; reconnect
                     RabbitMQ before 3.12)
CONSUMER_TIMEOUT     406 "delivery acknowledgement ... timed     reconnect
                     out" (consumer_timeout)
OTHER                anything else                               reconnect with backoff
===================  ==========================================  =============================================

:class:`Backoff` is the reconnection delay policy: it grows across repeated
failures of the same cause and starts over when the cause changes or the
worker consumed for a while (30 s) before failing. :class:`RefusalMemory` remembers refused replies.
:func:`describe` gives a one-line account of a pika error and
:func:`fatal_reason` says why a failed connection attempt is not worth retrying.
"""

from __future__ import annotations

import enum
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pika.exceptions

#: What the worker was doing when the close came.
DOING = ("connecting", "declaring", "declaring-passive", "consuming", "serving")

_SIZE_RE = re.compile(r"message size (\d+) is larger than (?:configured )?max size (\d+)")


class Cause(enum.Enum):
    REPLY_TOO_LARGE = "reply too large"
    REPLY_REFUSED = "reply refused"
    QUEUE_ATTRIBUTES = "queue attributes differ"
    QUEUE_GONE = "queue gone"
    DECLARATION_REFUSED = "queue declaration refused"
    ACCESS_REFUSED = "access refused"
    RESOURCE_LIMIT = "resource limit"
    REPLY_TO_CRASH = "Direct Reply-to crash"
    CONSUMER_TIMEOUT = "consumer timeout"
    OTHER = "other"


@dataclass(frozen=True)
class Close:
    """A classified close: its cause and, for a refused size, the sizes the broker named."""

    cause: Cause
    reply_code: int | None
    reply_text: str
    refused_size: int | None = None
    max_size: int | None = None

    @property
    def fatal(self) -> bool:
        """Not worth retrying: the worker exits with a clear message."""
        return self.cause in (Cause.ACCESS_REFUSED, Cause.DECLARATION_REFUSED)

    @property
    def passive(self) -> bool:
        """Serve the existing queue as it is (passive declare)."""
        return self.cause is Cause.QUEUE_ATTRIBUTES


def classify(reply_code: int | None, reply_text: str | bytes | None, doing: str) -> Close:
    """Classify a close by its code, its text and what the worker was doing (one of :data:`DOING`)."""
    if doing not in DOING:
        raise ValueError(f"doing must be one of {DOING}, not {doing!r}")
    if isinstance(reply_text, bytes):
        reply_text = reply_text.decode("utf-8", "replace")
    text = reply_text or ""
    low = text.lower()

    def close(cause: Cause, **sizes: int) -> Close:
        return Close(cause, reply_code, text, **sizes)

    if reply_code == 403:
        return close(Cause.ACCESS_REFUSED)
    if "deprecated" in low or "feature flag is disabled" in low:
        return close(Cause.DECLARATION_REFUSED if doing.startswith("declaring") else Cause.OTHER)
    if "limit" in low and ("reached" in low or "exceeded" in low) or "channel_max" in low:
        return close(Cause.RESOURCE_LIMIT)
    if reply_code == 406:
        m = _SIZE_RE.search(text)
        if m:
            return close(Cause.REPLY_TOO_LARGE, refused_size=int(m[1]), max_size=int(m[2]))
        if "inequivalent arg" in low and doing == "declaring":
            return close(Cause.QUEUE_ATTRIBUTES)
        if "acknowledgement" in low and "timed out" in low:
            return close(Cause.CONSUMER_TIMEOUT)
        if doing == "serving" and "delivery tag" not in low:
            return close(Cause.REPLY_REFUSED)
        return close(Cause.OTHER)
    if reply_code == 404 and doing == "declaring-passive":
        return close(Cause.QUEUE_GONE)
    if reply_code == 541 and doing == "serving":
        return close(Cause.REPLY_TO_CRASH)
    return close(Cause.OTHER)


class Backoff:
    """Reconnection delays that grow across repeated failures of the same cause.

    The k-th consecutive failure of one cause waits ``min(cap, base * 2**(k-1))``
    times a jitter factor in [0.5, 1). With several URLs, failing over to the
    next node is immediate until every node was tried once in the round. A
    different cause starts the count over, and so does a failure that comes
    more than ``healthy_after`` seconds after :meth:`healthy` (the worker was
    consuming): a connection that is lost again and again soon after
    consuming, for the same reason, waits longer each time.
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, *, healthy_after: float = 30.0,
                 jitter: Callable[[], float] = lambda: random.uniform(0.5, 1.0),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base, self.cap, self.healthy_after = base, cap, healthy_after
        self._jitter = jitter
        self._clock = clock
        self._cause: Cause | str | None = None
        self._healthy_since: float | None = None
        self.failures = 0

    def healthy(self) -> None:
        """The worker is consuming again."""
        self._healthy_since = self._clock()

    def next_delay(self, cause: Cause | str, urls: int = 1) -> float:
        """Record one failure of ``cause``; the delay before the next attempt."""
        since, self._healthy_since = self._healthy_since, None
        if cause != self._cause or (since is not None and self._clock() - since > self.healthy_after):
            self._cause, self.failures = cause, 0
        self.failures += 1
        if urls > 1 and self.failures % urls != 0:
            return 0.0
        rounds = (self.failures - 1) // max(1, urls)
        return min(self.cap, self.base * 2 ** min(rounds, 16)) * self._jitter()

    def reset(self) -> None:
        self._cause, self._healthy_since, self.failures = None, None, 0


class RefusalMemory:
    """Requests whose reply the broker refused for a reason other than its size.

    The broker does not say which reply it refused, only that the channel
    publishing it is closed. So every (n, format) replied to but not yet
    acknowledged when such a close came gets a strike; a key with
    ``strikes`` strikes is refused: its next request is answered with
    ``internal`` instead of being computed again. With the default of 2, an
    innocent request that was merely in flight is recomputed once, and the
    culprit costs at most two channel closes, never a loop.
    """

    def __init__(self, strikes: int = 2, capacity: int = 1024) -> None:
        self.strikes = strikes
        self._capacity = capacity
        self._counts: dict[tuple[int, str], int] = {}
        self.reason: dict[tuple[int, str], str] = {}

    def record(self, keys: Iterable[tuple[int, str]], reason: str) -> None:
        for key in set(keys):
            if len(self._counts) >= self._capacity and key not in self._counts:
                self._counts.clear()
                self.reason.clear()
            self._counts[key] = self._counts.get(key, 0) + 1
            self.reason[key] = reason

    def refused(self, n: int, fmt: str) -> str | None:
        """The broker's reason if the reply for (n, fmt) is refused, else None."""
        key = (n, fmt)
        if self._counts.get(key, 0) >= self.strikes:
            return self.reason[key]
        return None


def describe(error: BaseException) -> str:
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


def fatal_reason(error: BaseException) -> str | None:
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
