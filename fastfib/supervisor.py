"""The ``fastfib serve`` pool: a supervisor process and N worker processes.

The supervisor holds no broker connection. It starts each worker with
``multiprocessing`` (``spawn``: a fresh interpreter, so nothing of the
supervisor, let alone a socket, crosses into the child), and then only
watches:

- each worker reports ``consuming`` / ``disconnected`` / ``fatal`` on a pipe
  of its own; when all N consume, the supervisor logs
  ``all N workers consuming`` (again after a recovery);
- a worker that dies is restarted after a backoff (0.5 s, doubling up to 30 s
  while it keeps dying within 30 s of its start), and the death is logged;
- a worker that exits with :data:`~fastfib.exitcodes.EXIT_ACCESS_REFUSED`
  (credentials or permissions refused) or :data:`~fastfib.exitcodes.EXIT_CONFIG`
  (the broker refused the queue declaration) stops the whole pool, which exits
  with that code: a retry loop would not help;
- SIGTERM or SIGINT is forwarded (as SIGTERM) to every worker, which cancels
  its consumer, finishes, replies to and acknowledges what it is computing,
  and closes its connection (the broker requeues prefetched requests). The
  pool exits 0 once every worker has, or 1 when some had to be killed after
  the grace period. A second signal kills the workers at once.

With ``metrics_port`` (``fastfib serve --metrics-port``), the supervisor also
serves ``/metrics`` (the whole pool's, :mod:`fastfib.metrics`) and ``/healthz``
(how many workers consume) over HTTP, from a thread of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from .exitcodes import EXIT_ACCESS_REFUSED, EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from .limits import max_n_warning
from .logs import configure_logging, mask_url
from .server.lifecycle import run_worker, wire_works
from .server.settings import WorkerConfig

log = logging.getLogger("fastfib.supervisor")

RESTART_BASE = 0.5
RESTART_CAP = 30.0
#: A worker that lived longer than this before dying restarts after RESTART_BASE again.
RESTART_RESET_AFTER = 30.0
#: How long the supervisor waits for the workers' graceful stop before killing them.
SHUTDOWN_GRACE = 60.0


@dataclass
class _Slot:
    index: int
    process: multiprocessing.Process | None = None
    conn: multiprocessing.connection.Connection | None = None
    started: float = 0.0
    consuming: bool = False
    quick_deaths: int = 0
    restart_at: float | None = None
    fatal_message: str | None = None


class Supervisor:
    """Starts, watches, restarts and stops the workers; see the module's docstring."""

    def __init__(self, config: WorkerConfig, workers: int, shutdown_grace: float = SHUTDOWN_GRACE, *,
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1") -> None:
        if workers < 1:
            raise ValueError(f"need at least one worker, got {workers}")
        if (metrics_port is not None) != config.metrics:
            config = dataclasses.replace(config, metrics=metrics_port is not None)
        self.config = config
        self.workers = workers
        self.shutdown_grace = shutdown_grace
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self._metrics: Any = None  # fastfib.metrics.PoolMetrics, when metrics_port is set
        self._health: dict[str, Any] = {"status": "starting", "workers": workers, "consuming": 0,
                                        "queue": config.queue, "pid": os.getpid()}
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i) for i in range(workers)]
        self._stopping = False
        self._first_signal_at: float | None = None
        self._forced = False
        self._signal_name = ""
        self._all_consuming = False
        self._ever_all_consuming = False
        self._exit_code = EXIT_OK
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # ------------------------------------------------------------------ running

    def run(self) -> int:
        old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info(
                "starting %d worker(s) on queue %r (broker %s, prefetch %d, max n %d, cache %d bytes per worker; "
                "queue declared as %s; wire %s)",
                self.workers, self.config.queue, ", ".join(mask_url(u) for u in self.config.urls),
                self.config.prefetch, self.config.max_n, self.config.cache_bytes, self.config.describe_queue(),
                self.config.wire,
            )
            if self.config.wire == "fast" and not wire_works():
                self.config = dataclasses.replace(self.config, wire="pika")  # warned once, here
            too_large = max_n_warning(self.config.max_n, self.config.max_reply_bytes)
            if too_large:
                log.warning("%s", too_large)
            if self.metrics_port is not None:
                code = self._start_metrics()
                if code is not None:
                    return code
            for slot in self._slots:
                self._start(slot)
            while not self._stopping:
                self._wait(self._next_timeout())
                self._restart_due()
            return self._shutdown()
        finally:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            self._wake_r.close()
            self._wake_w.close()

    def _start_metrics(self) -> int | None:
        """Set up the metrics directory and endpoint before any worker starts; an exit code if that fails."""
        from .metrics import MetricsUnavailable, PoolMetrics

        try:
            self._metrics = PoolMetrics(self.metrics_host, self.metrics_port, self.workers, self.health)
        except MetricsUnavailable as exc:
            log.critical("%s", exc)
            return EXIT_USAGE
        except OSError as exc:
            log.critical("cannot serve metrics on %s:%d: %s", self.metrics_host, self.metrics_port, exc)
            return EXIT_FAILURE
        log.info("metrics on %s/metrics, health on %s/healthz (multiprocess files in %s)",
                 self._metrics.url, self._metrics.url, self._metrics.directory)
        return None

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``(healthy, details)``: healthy when every worker consumes and the pool is not stopping.

        Called from the metrics endpoint's thread: it reads a dict the main
        thread replaces whole, never one it is changing.
        """
        snapshot = self._health
        return snapshot["status"] == "ok", dict(snapshot)

    def _on_signal(self, signum: int, frame) -> None:
        # Only flags and os.kill here: the main loop, woken by the wakeup fd, does the logging.
        # A repeated signal kills the workers, unless it came within a second of the first:
        # `timeout`, a terminal's Ctrl-C and service managers may deliver one stop twice.
        now = time.monotonic()
        if not self._stopping or self._first_signal_at is None:
            self._first_signal_at = now
            self._signal_name = signal.Signals(signum).name
            self._stopping = True
        elif now - self._first_signal_at > 1.0 and not self._forced:
            self._forced = True
            for slot in self._slots:
                if slot.process is not None:
                    _kill(slot.process, signal.SIGKILL)

    def _start(self, slot: _Slot) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=run_worker, args=(slot.index, self.config, child_conn), name=f"fastfib-worker-{slot.index}"
        )
        process.start()
        child_conn.close()
        slot.process, slot.conn = process, parent_conn
        slot.started = time.monotonic()
        slot.consuming = False
        slot.restart_at = None
        log.debug("started worker %d (pid %d)", slot.index, process.pid)

    def _next_timeout(self) -> float | None:
        due = [s.restart_at for s in self._slots if s.restart_at is not None]
        if not due:
            return None
        return max(0.0, min(due) - time.monotonic())

    def _wait(self, timeout: float | None) -> None:
        waitables: list = [self._wake_r]
        for slot in self._slots:
            if slot.process is not None:
                waitables.append(slot.process.sentinel)
            if slot.conn is not None:
                waitables.append(slot.conn)
        ready = multiprocessing.connection.wait(waitables, timeout)
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        for slot in self._slots:
            if slot.conn is not None and slot.conn in ready:
                self._read_events(slot)
        for slot in self._slots:
            if slot.process is not None and slot.process.sentinel in ready:
                self._reap(slot)

    def _read_events(self, slot: _Slot) -> None:
        try:
            while slot.conn.poll():
                name, detail = slot.conn.recv()
                self._on_event(slot, name, detail)
        except (EOFError, OSError):
            slot.conn.close()
            slot.conn = None

    def _on_event(self, slot: _Slot, name: str, detail: str) -> None:
        if name == "consuming":
            slot.consuming = True
        elif name == "disconnected":
            slot.consuming = False
        elif name == "fatal":
            slot.fatal_message = detail
        self._update_readiness()

    def _update_readiness(self) -> None:
        consuming = sum(s.consuming for s in self._slots)
        all_consuming = consuming == self.workers
        if all_consuming and not self._all_consuming and not self._stopping:
            again = " again" if self._ever_all_consuming else ""
            log.info("all %d workers consuming%s", self.workers, again)
            self._ever_all_consuming = True
        self._all_consuming = all_consuming
        if self._stopping:
            status = "stopping"
        elif all_consuming:
            status = "ok"
        else:
            status = "degraded" if self._ever_all_consuming else "starting"
        self._health = {**self._health, "status": status, "consuming": consuming}
        if self._metrics is not None:
            self._metrics.set_consuming(consuming)

    def _reap(self, slot: _Slot) -> None:
        process = slot.process
        process.join()
        if slot.conn is not None:
            self._read_events(slot)  # a fatal report may still be in the pipe
            if slot.conn is not None:
                slot.conn.close()
        slot.process, slot.conn = None, None
        slot.consuming = False
        code = process.exitcode
        if self._metrics is not None:
            self._metrics.worker_died(process.pid)
        self._update_readiness()
        if self._stopping:
            return
        if code in (EXIT_ACCESS_REFUSED, EXIT_CONFIG):
            log.critical("worker %d (pid %d) refused by the broker (%s): stopping the pool",
                         slot.index, process.pid, slot.fatal_message or "credentials or permissions")
            self._exit_code = code
            self._stopping = True
            return
        lived = time.monotonic() - slot.started
        slot.quick_deaths = slot.quick_deaths + 1 if lived < RESTART_RESET_AFTER else 1
        delay = min(RESTART_CAP, RESTART_BASE * 2 ** min(slot.quick_deaths - 1, 16))
        log.warning("worker %d (pid %d) %s after %.1f s; restarting it in %.1f s",
                    slot.index, process.pid, _describe_exit(code), lived, delay)
        slot.restart_at = time.monotonic() + delay
        if self._metrics is not None:
            self._metrics.worker_restarting(slot.index)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.restart_at is not None and slot.restart_at <= now and not self._stopping:
                self._start(slot)

    # ---------------------------------------------------------------- stopping

    def _shutdown(self) -> int:
        self._update_readiness()  # /healthz says "stopping" from now on
        if self._signal_name:
            log.info("received %s: stopping the pool gracefully", self._signal_name)
        live = [s for s in self._slots if s.process is not None]
        for slot in live:
            _kill(slot.process, signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_grace
        killed = False
        while any(s.process is not None for s in self._slots):
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not killed:
                log.error("workers still running %.0f s after the stop request: killing them", self.shutdown_grace)
                for slot in self._slots:
                    if slot.process is not None:
                        _kill(slot.process, signal.SIGKILL)
                killed = True
                self._exit_code = self._exit_code or EXIT_FAILURE
            self._wait(max(0.05, remaining) if not killed else 1.0)
        if self._forced:
            log.warning("a second signal killed the workers")
        if self._forced and self._exit_code == EXIT_OK:
            self._exit_code = EXIT_FAILURE  # killed on the second signal: not a graceful stop
        log.info("pool stopped (exit code %d)", self._exit_code)
        return self._exit_code


def _kill(process: multiprocessing.Process, sig: int) -> None:
    try:
        os.kill(process.pid, sig)
    except (ProcessLookupError, TypeError):
        pass


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "vanished"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def serve(config: WorkerConfig, workers: int, *, metrics_port: int | None = None,
          metrics_host: str = "127.0.0.1") -> int:
    """Run the pool in the foreground until SIGTERM/SIGINT or a fatal error; return the exit code.

    ``metrics_port`` (0: any free port) turns on the ``/metrics`` and
    ``/healthz`` endpoint on ``metrics_host``.
    """
    configure_logging(config.log_level, "supervisor", log_format=config.log_format)
    return Supervisor(config, workers, metrics_port=metrics_port, metrics_host=metrics_host).run()
