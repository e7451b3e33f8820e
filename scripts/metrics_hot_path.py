"""What ``fastfib serve --metrics-port`` adds to a worker's request path, in microseconds per request.

Drives ``Worker._handle`` for n=20 on a do-nothing channel, without metrics and
with the real hot-path part of them (the ``LocalHistogram`` timing of each
reply; the flush to prometheus_client runs on the 0.2 s tick, not here), and
for comparison the per-call cost of prometheus_client's own ``Counter.inc`` and
``Histogram.observe`` in multiprocess mode. No broker needed::

    .venv/bin/python scripts/metrics_hot_path.py [--rounds 15] [--requests 100000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pika.spec import BasicProperties  # noqa: E402

from fastfib.metrics import BUCKETS, LocalHistogram  # noqa: E402
from fastfib.server.lifecycle import Worker
from fastfib.server.settings import WorkerConfig  # noqa: E402


class _Channel:
    is_open = True

    def basic_publish(self, *args, **kwargs) -> None:
        pass

    def basic_ack(self, *args, **kwargs) -> None:
        pass


class _HotPathOnly:
    """What the worker uses of WorkerMetrics on the request path."""

    def __init__(self) -> None:
        self.durations = LocalHistogram()

    def flush(self, *args) -> None:
        pass


def per_request_us(metrics, requests: int) -> float:
    worker = Worker(WorkerConfig(), metrics=metrics)
    channel = _Channel()
    worker._set_channel(channel)
    props = BasicProperties(reply_to="amq.gen-x", correlation_id="c")
    handle = worker.dispatcher.handle
    start = time.perf_counter()
    for tag in range(1, requests + 1):
        handle(channel, tag, props, b"20")
        if tag % 32 == 0:
            worker.acks.bind(channel)  # drop the collected acks
    return (time.perf_counter() - start) / requests * 1e6


def prometheus_call_us(calls: int = 200_000) -> tuple[float, float]:
    directory = tempfile.mkdtemp(prefix="fastfib-metrics-cost-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        from prometheus_client import Counter, Histogram

        counter = Counter("x", "x", ["worker", "outcome"]).labels(worker="0", outcome="ok")
        histogram = Histogram("d_seconds", "d", buckets=BUCKETS)
        inc = timeit.timeit(counter.inc, number=calls) / calls * 1e6
        observe = timeit.timeit(lambda: histogram.observe(0.0003), number=calls) / calls * 1e6
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return inc, observe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=100_000)
    args = parser.parse_args()
    off, on = [], []
    for _ in range(args.rounds):  # alternated, so that a busy moment hits both
        off.append(per_request_us(None, args.requests))
        on.append(per_request_us(_HotPathOnly(), args.requests))
    print(f"request path, metrics off: median {statistics.median(off):.2f} us, min {min(off):.2f} us")
    print(f"request path, metrics on:  median {statistics.median(on):.2f} us, min {min(on):.2f} us")
    print(f"added: {statistics.median(on) - statistics.median(off):+.2f} us (medians), "
          f"{min(on) - min(off):+.2f} us (minimums)")
    inc, observe = prometheus_call_us()
    print(f"for comparison, prometheus_client multiprocess: Counter.inc {inc:.2f} us, "
          f"Histogram.observe {observe:.2f} us per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
