"""Dying workers and a stopping pool under load (issue 6, parts 2 and 4).

- ``kill -9`` of random workers, again and again, during a 20000-call load
  from two pipelining :class:`fastfib.FibonacciRpcClient` clients: every call
  returns, with the right value; the supervisor restores the pool (N workers
  consuming at the end); the duplicates that redeliveries cause are dropped
  by the client (counted from its debug log).
- SIGTERM during load, then a new pool: nothing lost.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time

import gmpy2
import pytest
from _fault_helpers import (
    Pool,
    RpcClient,
    check_replies,
    consumers,
    queue_depth,
    run_requests,
    wait_until,
)

from fastfib import FibonacciRpcClient

pytestmark = [pytest.mark.broker, pytest.mark.slow]

WORKERS = 2
KILL_EVERY = 2000  # product-client calls answered between two kills


class _DuplicateCounter(logging.Handler):
    """Counts the client's "dropping a reply with unknown or duplicate correlation id" debug lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if "duplicate correlation id" in record.getMessage():
            with self._lock2:
                self.count += 1


@pytest.fixture
def duplicates():
    logger = logging.getLogger("fastfib.client")
    counter = _DuplicateCounter()
    level = logger.level
    logger.addHandler(counter)
    logger.setLevel(logging.DEBUG)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)


def _mixed_ns(count: int, seed: int) -> list[int]:
    """Mostly small n (computed on the I/O thread), some above the inline threshold (compute thread)."""
    rng = random.Random(seed)
    return [rng.randrange(0, 3000) if rng.random() < 0.9 else rng.randrange(20_001, 40_000) for _ in range(count)]


def _load(url: str, queue: str, ns: list[int], fmt: str, out: dict, key: str, chunk: int = 1000) -> None:
    """call_many over ``ns`` in chunks; store the results (or the exception) in ``out[key]``.

    ``out[key + "_done"]`` counts the values answered so far, chunk by chunk.
    """
    try:
        results: list[int] = []
        with FibonacciRpcClient(url, queue, timeout=90, format=fmt) as client:
            for start in range(0, len(ns), chunk):
                results += client.call_many(ns[start:start + chunk], window=64)
                out[key + "_done"] = len(results)
        out[key] = results
    except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
        out[key] = exc


def _check(ns: list[int], results) -> None:
    if isinstance(results, BaseException):
        raise results
    assert len(results) == len(ns)
    cache: dict[int, int] = {}
    for n, value in zip(ns, results, strict=True):
        want = cache.get(n)
        if want is None:
            want = cache[n] = int(gmpy2.fib(n))
        assert value == want, f"F({n}) wrong"


@pytest.mark.timeout(300)
def test_kill_9_of_random_workers_during_20000_calls_loses_nothing(queue, broker_url, duplicates):
    rng = random.Random(6)
    # 20000 calls: two product clients (binary, decimal) and a raw pika client that keeps every reply,
    # duplicates included, so that the duplicates the redeliveries cause can be counted.
    ns_a, ns_b, ns_raw = _mixed_ns(8000, 1), _mixed_ns(8000, 2), _mixed_ns(4000, 4)
    out: dict = {}

    def raw_load() -> None:
        try:
            with RpcClient(queue) as client:
                sent = run_requests(client, [(b"%d" % n, None) for n in ns_raw], window=32, timeout=200)
                client.drain(1.0)
                out["raw"] = (sent, check_replies(client, sent, max_n=10**6))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            out["raw"] = exc
    with Pool(queue, "--prefetch", "32", workers=WORKERS) as pool:
        pool.wait_ready()
        started = time.monotonic()
        loads = [threading.Thread(target=_load, args=(broker_url, queue, ns, fmt, out, key, 500), daemon=True)
                 for ns, fmt, key in ((ns_a, "binary", "a"), (ns_b, "decimal", "b"))]
        loads.append(threading.Thread(target=raw_load, daemon=True))
        for thread in loads:
            thread.start()
        kills: list[int] = []
        # Kill a random live worker each time the product clients have answered another KILL_EVERY
        # calls, from KILL_EVERY / 2 on: the kills follow the load's progress, not the clock, so that
        # they spread over it on a fast machine as on a slow one (8 at most: the supervisor's restart
        # backoff doubles with each quick death of a slot).
        next_kill, total = KILL_EVERY // 2, len(ns_a) + len(ns_b)
        while any(t.is_alive() for t in loads) and next_kill < total and time.monotonic() - started < 120:
            time.sleep(0.005)
            if out.get("a_done", 0) + out.get("b_done", 0) < next_kill:
                continue
            pids = [pid for pid in pool.worker_pids() if pid not in kills]
            if pids:
                victim = rng.choice(pids)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)
                    next_kill += KILL_EVERY
                except ProcessLookupError:
                    pass
        for thread in loads:
            thread.join(200)
            assert not thread.is_alive(), "the load did not finish"
        elapsed = time.monotonic() - started
        _check(ns_a, out["a"])
        _check(ns_b, out["b"])
        if isinstance(out["raw"], BaseException):
            raise out["raw"]
        raw_sent, raw_duplicates = out["raw"]
        assert len(raw_sent) == len(ns_raw)
        assert len(kills) >= 5, f"only {len(kills)} kills happened during the load: make it longer"

        # The supervisor restores the pool: N live workers, N consumers on the queue (+ worker 0's idle one).
        restore_started = time.monotonic()
        wait_until(lambda: len(pool.worker_pids()) == WORKERS and consumers(queue) == WORKERS + 1, 90,
                   what=f"{WORKERS} workers consuming again")
        restored_after = time.monotonic() - restore_started
        text = pool.text()
        for pid in kills:
            assert f"(pid {pid}) was killed by SIGKILL" in text
        assert not set(kills) & set(pool.worker_pids())
        assert pool.proc.poll() is None
    print(f"\nkill -9: {len(ns_a) + len(ns_b) + len(ns_raw)} calls, {len(kills)} workers killed, 0 lost, "
          f"{duplicates.count} duplicate replies dropped by the product clients, {raw_duplicates} correlation ids "
          f"answered twice for the raw client, load {elapsed:.1f} s, "
          f"pool whole again {restored_after:.1f} s after the load")


@pytest.mark.timeout(300)
def test_sigterm_during_load_then_a_new_pool_loses_nothing(queue, broker_url, duplicates):
    ns = _mixed_ns(8000, 3)
    out: dict = {}
    with Pool(queue, "--prefetch", "64", workers=WORKERS) as pool:
        pool.wait_ready()
        thread = threading.Thread(target=_load, args=(broker_url, queue, ns, "binary", out, "r", 500), daemon=True)
        thread.start()
        # Stop once the load is under way: a fixed sleep let a fast machine finish it first.
        wait_until(lambda: out.get("r_done", 0) >= 1000 or not thread.is_alive(), 60, interval=0.005,
                   what="1000 of the calls answered")
        if isinstance(out.get("r"), BaseException):
            raise out["r"]
        stop_started = time.monotonic()
        pool.signal(signal.SIGTERM)
        assert pool.wait(60) == 0
        stopped_in = time.monotonic() - stop_started
        text = pool.text()
        assert "pool stopped (exit code 0)" in text
        assert text.count("worker stopped (exit code 0)") == WORKERS
    assert thread.is_alive(), "the load finished before the stop: make it longer"
    ready, consumer_count = queue_depth(queue)
    assert consumer_count == 0 and ready > 0, (ready, consumer_count)  # the rest waits in the queue
    with Pool(queue, workers=WORKERS) as pool:
        pool.wait_ready()
        thread.join(120)
        assert not thread.is_alive()
    _check(ns, out["r"])
    print(f"\nSIGTERM: pool stopped in {stopped_in:.1f} s with {ready} requests left in the queue; "
          f"a new pool answered them; {len(ns)} calls, 0 lost, {duplicates.count} duplicates dropped")
