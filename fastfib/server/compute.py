"""The compute thread: large F(n), off the I/O thread, one job at a time.

The kernel releases the GIL, so the I/O thread keeps serving small requests
and heartbeats while F(10^6) is computed here; each result goes back to the
I/O thread through ``post`` (the I/O loop's ``add_callback_threadsafe``).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def kernel_encoder(threads: int = 1) -> Callable[[int, str], bytes]:
    """The compiled kernel's ``fib_encoded``, with ``threads`` threads per F(n).

    GMP's routines for this CPU are chosen now (:mod:`fastfib.gmp_dispatch`), and logged,
    rather than at the first large request.
    """
    from .. import fib_encoded, gmp_dispatch, threads_min_n

    log.info("GMP code: %s", gmp_dispatch.apply())

    if threads == 1:
        return fib_encoded  # the plain call: no partial on the hot path
    threads_min_n()  # calibrate now (tens of ms), at startup, rather than in the first large request
    return functools.partial(fib_encoded, threads=threads)


class Job:
    """One F(n) for the compute thread, and the requests waiting for it.

    Requests for an (n, format) that is already being computed join its
    ``waiters`` instead of computing it again: at the start of a burst of one
    hot large n, the first computation serves them all (then the cache does).
    """

    __slots__ = ("channel", "n", "fmt", "waiters", "deadline_ms", "body", "error", "skipped", "expired")

    def __init__(self, channel, n: int, fmt: str, tag: int, reply_to: str, correlation_id,
                 start: float | None = None, deadline_ms: int | None = None) -> None:
        self.channel = channel
        self.n = n
        self.fmt = fmt
        # (delivery tag, reply_to, correlation_id, when it was received: perf_counter() or None)
        self.waiters: list[tuple[int, str, Any, float | None]] = [(tag, reply_to, correlation_id, start)]
        #: The latest x-deadline-ms of the waiters (Unix ms), None when one of them has none.
        self.deadline_ms = deadline_ms
        self.body: bytes | None = None
        self.error: BaseException | None = None
        self.skipped = False
        #: Set by the compute thread: every waiter's deadline had passed when the job's turn came.
        self.expired = False

    def add_waiter(self, tag: int, reply_to: str, correlation_id, start: float | None,
                   deadline_ms: int | None) -> None:
        """Another request for the same (n, format)."""
        self.waiters.append((tag, reply_to, correlation_id, start))
        if self.deadline_ms is not None:
            self.deadline_ms = None if deadline_ms is None else max(self.deadline_ms, deadline_ms)


class ComputeThread:
    """Runs :class:`Job` s with ``compute(n, fmt) -> bytes`` and posts each back, done, to ``on_done``.

    A job is skipped (``job.skipped``) instead of computed when the worker is
    draining (:attr:`draining`: a graceful stop) or the job's channel is gone,
    and dropped (``job.expired``) when the deadline of every request waiting
    for it passed while it was queued: a backlog does not compute late work.
    """

    def __init__(self, compute: Callable[[int, str], bytes], post: Callable[[Callable[[], None]], None],
                 name: str = "fastfib-compute") -> None:
        #: ``compute(n, fmt) -> bytes``: the kernel call this thread makes.
        self.compute = compute
        self._post = post
        self._name = name
        #: The jobs waiting for the thread (None stops it).
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        #: Set on a graceful stop, read by the thread: skip the jobs not yet started.
        self.draining = False
        self._thread: threading.Thread | None = None

    def start(self, on_done: Callable[[Job], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(on_done,), name=self._name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current job; wait for the thread at most ``timeout`` seconds."""
        self.jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _run(self, on_done: Callable[[Job], None]) -> None:
        compute, post = self.compute, self._post
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.draining or not job.channel.is_open:
                job.skipped = True
            elif job.deadline_ms is not None and time.time() * 1000.0 > job.deadline_ms:
                job.expired = True
            else:
                try:
                    job.body = compute(job.n, job.fmt)
                except BaseException as exc:  # noqa: B036 - reported to the I/O thread, which replies internal
                    job.error = exc
            try:
                post(functools.partial(on_done, job))
            except Exception:  # the loop is closed: we are exiting
                return
