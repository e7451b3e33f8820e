"""Pool-wide Prometheus metrics for ``fastfib serve --metrics-port PORT``.

prometheus_client's multiprocess mode: before it starts any worker, the
supervisor creates a temporary directory and points ``PROMETHEUS_MULTIPROC_DIR``
at it; every process (the supervisor and each spawned worker, which inherits
the variable) writes its metrics to memory-mapped files of its own there, and
the supervisor's HTTP endpoint merges them at each scrape
(``MultiProcessCollector``). The supervisor marks dead workers with
``mark_process_dead`` (their live gauges vanish; their counters stay, so
totals never go down when a worker is restarted) and removes the directory at
exit.

What it costs a worker: a prometheus_client ``Counter.inc`` in multiprocess
mode is a lock and an mmap write, about 2 us here, and ``Histogram.observe``
4.5 to 6 us, where a whole n=20 request costs the worker about 60 us of CPU.
So the hot path touches no prometheus_client object: the worker's plain
counters (:class:`fastfib.server.stats.Stats`, the cache's hits and misses) are
already there, and a reply's duration goes into a :class:`LocalHistogram`
(two ``perf_counter`` calls and a ``bisect``, well under 1 us). Every 0.2 s
(the worker's housekeeping tick), and once more when it stops,
:meth:`WorkerMetrics.flush` adds what changed since the last flush to the
prometheus_client metrics. The price: the endpoint lags by up to 0.2 s, and a
worker killed with SIGKILL loses at most its last 0.2 s of counts.

Exposed (``worker`` is the worker's index, 0..N-1, kept across restarts)::

    fastfib_requests_total{worker, outcome}   ok | invalid_argument | out_of_range |
                                              unsupported_format | internal | expired | no_reply_to
    fastfib_request_duration_seconds          histogram: delivery handed to the worker -> reply handed
                                              to the broker connection, for every reply (ok or error)
    fastfib_cache_hits_total, fastfib_cache_misses_total, fastfib_cache_bytes
    fastfib_requests_in_flight                requests waiting for or on a compute thread (sampled)
    fastfib_requests_requeued_total           given back to the queue by a stopping worker
    fastfib_broker_connections_total, fastfib_broker_connection_losses_total
    fastfib_worker_restarts_total{worker}     (supervisor)
    fastfib_workers, fastfib_workers_consuming (supervisor)

prometheus_client is optional (the ``metrics`` extra). This module imports
it only inside the functions that need it, so importing this module does not.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .protocol import ERROR_KINDS

log = logging.getLogger(__name__)

#: Histogram buckets (seconds): a cached or small-n reply takes tens of microseconds,
#: F(10^6) in decimal about 40 ms, F(10^8) seconds.
BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
           0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Values of the ``outcome`` label of ``fastfib_requests_total``.
OUTCOMES = ("ok", *ERROR_KINDS, "expired", "no_reply_to")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class MetricsUnavailable(RuntimeError):
    """prometheus_client is missing (or the endpoint cannot be set up)."""


def require_prometheus() -> None:
    """Raise :class:`MetricsUnavailable`, saying what to install, unless prometheus_client imports."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise MetricsUnavailable(
            f"--metrics-port needs prometheus_client, which cannot be imported ({exc}); "
            "install fastfib's [metrics] extra into its environment: pip install prometheus_client"
        ) from None


def _multiprocess_value_class() -> None:
    """Make prometheus_client write to ``$PROMETHEUS_MULTIPROC_DIR`` even if it was imported before it was set."""
    from prometheus_client import values

    if not os.environ.get(MULTIPROC_ENV):
        raise MetricsUnavailable(f"{MULTIPROC_ENV} is not set: the supervisor sets it before starting the workers")
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.get_value_class()


class LocalHistogram:
    """Per-bucket counts and a sum, in plain Python: what the hot path feeds instead of prometheus_client.

    ``counts[i]`` counts the values in ``(bounds[i-1], bounds[i]]``, the last
    slot the ones above every bound: the same (non-cumulative) layout as
    prometheus_client's own histogram, so a flush adds them bucket by bucket.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def take(self) -> tuple[list[int], float]:
        """The counts and sum since the last call, and start again from zero."""
        counts, total = self.counts, self.sum
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        return counts, total


def add_to_histogram(histogram: Any, counts: list[int], total: float) -> None:
    """Add batched observations to a prometheus_client ``Histogram`` (no labels).

    prometheus_client has no call for this; it stores one value per bucket
    (``_buckets``, non-cumulative) and the sum (``_sum``), which ``observe``
    increments. ``tests/test_ops_metrics_unit.py`` checks that this gives
    exactly what ``observe`` gives, so a change of those internals fails a test.
    """
    buckets = histogram._buckets
    for i, count in enumerate(counts):
        if count:
            buckets[i].inc(count)
    if any(counts):
        histogram._sum.inc(total)


def _histogram_internals_ok(histogram: Any) -> bool:
    return (isinstance(getattr(histogram, "_buckets", None), list) and len(histogram._buckets) == len(BUCKETS) + 1
            and hasattr(histogram, "_sum") and list(histogram._upper_bounds[:-1]) == list(BUCKETS))


def define_worker_metrics(registry: Any = None) -> dict[str, Any]:
    """The worker-side metric families (one definition, shared by every process)."""
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "requests": Counter("fastfib_requests", "Requests finished, by worker and outcome",
                            ["worker", "outcome"], registry=registry),
        "duration": Histogram("fastfib_request_duration_seconds",
                              "Time from a request reaching its worker to its reply (ok or error) being handed "
                              "to the broker connection", buckets=BUCKETS, registry=registry),
        "cache_hits": Counter("fastfib_cache_hits", "Reply cache hits (large n only)", registry=registry),
        "cache_misses": Counter("fastfib_cache_misses", "Reply cache misses (large n only)", registry=registry),
        "cache_bytes": Gauge("fastfib_cache_bytes", "Bytes held by the reply caches of the live workers",
                             registry=registry, multiprocess_mode="livesum"),
        "in_flight": Gauge("fastfib_requests_in_flight",
                           "Requests waiting for or on a compute thread (sampled every 0.2 s)",
                           registry=registry, multiprocess_mode="livesum"),
        "requeued": Counter("fastfib_requests_requeued", "Requests given back to the queue by a stopping worker",
                            registry=registry),
        "connections": Counter("fastfib_broker_connections", "Broker connections opened by the workers",
                               registry=registry),
        "connection_losses": Counter("fastfib_broker_connection_losses",
                                     "Broker connections lost while consuming", registry=registry),
    }


class WorkerMetrics:
    """One worker's side: a :class:`LocalHistogram` for the hot path and a periodic :meth:`flush`.

    Created in the worker process (``PROMETHEUS_MULTIPROC_DIR`` inherited from the supervisor).
    """

    def __init__(self, index: int) -> None:
        require_prometheus()
        _multiprocess_value_class()
        self.index = index
        self.durations = LocalHistogram()
        family = define_worker_metrics()
        worker = str(index)
        # Children created now: every series exists (at 0) from the start.
        self._outcomes = {outcome: family["requests"].labels(worker=worker, outcome=outcome) for outcome in OUTCOMES}
        self._counters = {name: family[name] for name in
                          ("cache_hits", "cache_misses", "requeued", "connections", "connection_losses")}
        self._histogram = family["duration"]
        if not _histogram_internals_ok(self._histogram):
            log.error("this prometheus_client's Histogram internals are not the ones fastfib batches into; "
                      "fastfib_request_duration_seconds stays empty")
            self._histogram = None
        self._cache_bytes = family["cache_bytes"]
        self._in_flight = family["in_flight"]
        self._last: dict[str, float] = {}

    @staticmethod
    def totals(stats: Any, cache: Any) -> dict[str, int]:
        """The worker's running totals, by metric key (outcomes as ``outcome:<name>``)."""
        totals = {"outcome:ok": stats.replied, "outcome:expired": stats.expired,
                  "outcome:no_reply_to": stats.no_reply_to}
        for kind, count in stats.errors.items():
            totals[f"outcome:{kind}"] = count
        totals.update(cache_hits=cache.hits, cache_misses=cache.misses, requeued=stats.requeued_on_stop,
                      connections=stats.connections, connection_losses=stats.connection_losses)
        return totals

    def flush(self, stats: Any, cache: Any, in_flight: int) -> None:
        """Add what changed since the last flush to the shared metrics; set the gauges."""
        last = self._last
        for key, value in self.totals(stats, cache).items():
            delta = value - last.get(key, 0)
            if delta > 0:
                if key.startswith("outcome:"):
                    self._outcomes[key[8:]].inc(delta)
                else:
                    self._counters[key].inc(delta)
                last[key] = value
        counts, total = self.durations.take()
        if self._histogram is not None:
            add_to_histogram(self._histogram, counts, total)
        self._cache_bytes.set(cache.size)
        self._in_flight.set(in_flight)


# ------------------------------------------------------------------------------- supervisor side


class PoolMetrics:
    """The supervisor's side: the multiprocess directory, its own metrics, and the HTTP endpoint.

    ``GET /metrics``: every process's metrics, merged. ``GET /healthz``: what
    ``health()`` returns, as JSON, with status 200 when healthy and 503 when
    not. Create it before the workers start (they inherit
    ``PROMETHEUS_MULTIPROC_DIR``); :meth:`close` stops the endpoint and removes
    the directory.
    """

    def __init__(self, host: str, port: int, workers: int, health: Callable[[], tuple[bool, dict]]) -> None:
        require_prometheus()
        self.directory = tempfile.mkdtemp(prefix="fastfib-metrics-")
        # Ours alone: a directory left over from another run would add its counts to ours.
        self._previous_env = os.environ.get(MULTIPROC_ENV)
        os.environ[MULTIPROC_ENV] = self.directory
        try:
            self._setup(host, port, workers, health)
        except BaseException:
            self._remove_directory()
            raise

    def _setup(self, host: str, port: int, workers: int, health: Callable[[], tuple[bool, dict]]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge
        from prometheus_client.multiprocess import MultiProcessCollector

        _multiprocess_value_class()
        self._restarts = Counter("fastfib_worker_restarts", "Workers restarted after they died", ["worker"],
                                 registry=None)
        self._restart_children = [self._restarts.labels(worker=str(i)) for i in range(workers)]
        Gauge("fastfib_workers", "Worker processes configured", registry=None,
              multiprocess_mode="livesum").set(workers)
        self._consuming = Gauge("fastfib_workers_consuming", "Workers consuming from the queue", registry=None,
                                multiprocess_mode="livesum")
        self._consuming.set(0)
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=self.directory)
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), _Handler)
        self._server.registry = self.registry
        self._server.health = health
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fastfib-metrics-http",
                                        kwargs={"poll_interval": 0.5}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def worker_died(self, pid: int) -> None:
        """Drop a dead worker's live gauges (its counters stay in the totals)."""
        from prometheus_client import multiprocess

        try:
            multiprocess.mark_process_dead(pid, self.directory)
        except OSError as exc:
            log.warning("cannot clear the metrics of dead worker pid %d: %s", pid, exc)

    def worker_restarting(self, index: int) -> None:
        self._restart_children[index].inc()

    def set_consuming(self, count: int) -> None:
        self._consuming.set(count)

    def close(self) -> None:
        """Stop the endpoint, close the supervisor's metric files and remove the directory."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
        try:
            from prometheus_client import values

            close_files = getattr(values, "close_all_multiprocess_files", None)
            if close_files is not None:
                close_files()
        except Exception:  # closing files of a directory we are about to remove: best effort
            pass
        self._remove_directory()

    def _remove_directory(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._previous_env is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = self._previous_env


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    registry: Any = None
    health: Callable[[], tuple[bool, dict]] = None  # type: ignore[assignment]


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "fastfib"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                from prometheus_client.exposition import choose_encoder

                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, content_type, encoder(self.server.registry))
            elif path == "/healthz":
                ok, body = self.server.health()
                self._send(200 if ok else 503, "application/json", json.dumps(body).encode() + b"\n")
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")
        except Exception:
            log.exception("metrics endpoint: error serving %s", path)
            self._send(500, "text/plain; charset=utf-8", b"internal error\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("metrics endpoint: " + format, *args)
