"""Pool-wide metrics and health against the real broker: a 2-worker pool with ``--metrics-port``
serves known traffic; the scraped counts must add up, per worker and per outcome, across a worker
killed with -9; ``/healthz`` and ``fastfib health`` say healthy and unhealthy when they should.
"""

from __future__ import annotations

import os
import signal
import time

import gmpy2
import pytest
from _ops_helpers import (
    RefusingPort,
    ServePool,
    clean_env,
    healthz,
    run_health,
    scrape,
    value,
    wait_until,
)
from _server_helpers import URL, RpcClient

pytestmark = [pytest.mark.broker]

OUTCOMES = ("ok", "invalid_argument", "out_of_range", "unsupported_format", "internal", "expired", "no_reply_to")


def counts_match(base: str, expected: dict[str, int]):
    """The scrape, if every outcome has its expected count by now, else None."""
    samples = scrape(base)
    if all(value(samples, "fastfib_requests_total", outcome=o) == n for o, n in expected.items()):
        return samples
    return None


def assert_counts(base: str, expected: dict[str, int], timeout: float = 10.0) -> dict:
    samples = wait_until(lambda: counts_match(base, expected), timeout, interval=0.2)
    if samples is None:  # say what differs
        samples = scrape(base)
        got = {o: value(samples, "fastfib_requests_total", outcome=o) for o in expected}
        raise AssertionError(f"requests_total after {timeout} s: {got}, expected {expected}")
    return samples


@pytest.mark.timeout(120)
def test_metrics_add_up_across_workers_and_a_restart(queue):
    with ServePool.on(queue, "--metrics-port", "0", "--inline-max-n", "100", workers=2) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        base = pool.metrics_url()
        samples = scrape(base)
        assert all(value(samples, "fastfib_requests_total", outcome=o) == 0 for o in OUTCOMES)

        # 400 small requests, pipelined: the broker spreads them over both workers.
        started = time.perf_counter()
        cids = client.run([b"20"] * 400, window=32)
        assert all(client.replies[c][0][1] == b"6765" for c in cids)
        # Large n (above --inline-max-n 100: the compute thread and the cache), each 4 times, one at a time.
        for n in (150, 160, 170):
            for _ in range(4):
                assert client.call(str(n).encode())[1] == str(gmpy2.fib(n)).encode()
        errors = {"invalid_argument": [b"abc", b"1e3", b"", b"+5", b"30.0"],
                  "out_of_range": [b"-5", b"-1", b"-7", b"2000000", b"1000001"]}
        for kind, bodies in errors.items():
            for body in bodies:
                props, _ = client.call(body)
                assert props.headers["x-error"] == kind
        for _ in range(4):
            props, _ = client.call(b"7", headers={"accept": "text/html"})
            assert props.headers["x-error"] == "unsupported_format"
        for _ in range(3):
            client.publish(b"5", reply_to=None)
        for _ in range(2):
            client.publish(b"5", headers={"x-deadline-ms": 1})  # long past

        expected = {"ok": 412, "invalid_argument": 5, "out_of_range": 5, "unsupported_format": 4, "internal": 0,
                    "expired": 2, "no_reply_to": 3}
        samples = assert_counts(base, expected)
        per_worker = [value(samples, "fastfib_requests_total", outcome="ok", worker=str(i)) for i in (0, 1)]
        assert all(n > 0 for n in per_worker), f"both workers must have served: {per_worker}"
        assert sum(per_worker) == 412
        # Every reply (ok or error) is timed once; the unanswered ones are not.
        assert value(samples, "fastfib_request_duration_seconds_count") == 412 + 14
        assert value(samples, "fastfib_request_duration_seconds_bucket", le="+Inf") == 412 + 14
        # Each timed request lies within this test's span (the unit test checks the sum more tightly).
        assert 0 < value(samples, "fastfib_request_duration_seconds_sum") <= (412 + 14) * (time.perf_counter() - started)
        # 12 large requests, one cache lookup each: at most one miss per (n, worker), the rest hits.
        hits, misses = value(samples, "fastfib_cache_hits_total"), value(samples, "fastfib_cache_misses_total")
        assert hits + misses == 12 and 3 <= misses <= 6, (hits, misses)
        assert value(samples, "fastfib_cache_bytes") > 0
        assert value(samples, "fastfib_requests_in_flight") == 0
        assert value(samples, "fastfib_workers") == 2 and value(samples, "fastfib_workers_consuming") == 2
        assert value(samples, "fastfib_worker_restarts_total") == 0
        assert value(samples, "fastfib_broker_connections_total") == 2

        # Healthy, from the broker's view and from the pool's own.
        status, body = healthz(base)
        assert status == 200 and body["consuming"] == 2 and body["status"] == "ok"
        out = run_health("--url", URL, "--queue", queue, "--min-consumers", "2", "--metrics-url", base)
        assert out.returncode == 0, out
        # 2 workers: 3 consumers, worker 0's idle consumer included (docs/server.md)
        assert "broker: OK" in out.stdout and "3 consumer(s)" in out.stdout and "pool: OK" in out.stdout
        out = run_health("--url", URL, "--queue", queue, "--min-consumers", "4")
        assert out.returncode == 1 and "broker: FAIL" in out.stdout, out

        # A worker killed with -9: restarted and counted; the totals keep its counts.
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        pool.wait_for("all 2 workers consuming again", timeout=30)

        def restarted():
            s = scrape(base)
            done = (value(s, "fastfib_workers_consuming") == 2 and value(s, "fastfib_worker_restarts_total") == 1
                    and value(s, "fastfib_broker_connections_total") == 3)  # the new worker's, flushed 0.2 s late
            return s if done else None

        samples = wait_until(restarted, 10, interval=0.2)
        assert samples, scrape(base)
        assert value(samples, "fastfib_requests_total", outcome="ok") == 412

        cids = client.run([b"21"] * 100, window=16)
        assert len(cids) == 100 and all(client.replies[c][0][1] == b"10946" for c in cids)
        assert_counts(base, {**expected, "ok": 512})
        directory = pool.metrics_dir()
        assert os.path.isdir(directory)

        pool.signal(signal.SIGTERM)
        assert pool.wait(60) == 0
        assert not os.path.exists(directory), "the metrics directory must be removed at exit"


@pytest.mark.timeout(90)
def test_health_says_unhealthy(queue):
    # No such queue.
    out = run_health("--url", URL, "--queue", queue + "-missing")
    assert out.returncode == 1 and "does not exist" in out.stdout, out
    # Nothing to check is a usage error.
    out = run_health("--no-broker")
    assert out.returncode == 2, out

    with RefusingPort() as refusing:
        out = run_health("--url", refusing.url("s3cret"), "--queue", queue, "--timeout", "3")
        assert out.returncode == 1 and "cannot connect" in out.stdout and "s3cret" not in out.stdout, out

        # A pool that cannot reach its broker: up, but not consuming.
        args = ["--queue", queue, "--workers", "1", "--url", refusing.url(), "--metrics-port", "0"]
        with ServePool(args, clean_env(), workers=1) as pool:
            base = pool.metrics_url()
            pool.wait_for("cannot connect to", timeout=20)
            status, body = healthz(base)
            assert status == 503 and body == {**body, "status": "starting", "consuming": 0, "workers": 1}
            out = run_health("--no-broker", "--metrics-url", base)
            assert out.returncode == 1 and "pool: FAIL" in out.stdout and "0/1 workers" in out.stdout, out
            # The pool's address from the environment the pool itself is configured with.
            port = base.rsplit(":", 1)[1]
            out = run_health("--no-broker", env=clean_env(FASTFIB_METRICS_PORT=port))
            assert out.returncode == 1 and f"127.0.0.1:{port}/healthz: HTTP 503" in out.stdout, out
            samples = scrape(base)
            assert value(samples, "fastfib_workers_consuming") == 0
            # It still stops cleanly, and removes its metrics directory.
            directory = pool.metrics_dir()
            pool.signal(signal.SIGTERM)
            assert pool.wait(60) == 0
            assert not os.path.exists(directory)
        out = run_health("--no-broker", "--metrics-url", base, "--timeout", "2")
        assert out.returncode == 1 and "cannot reach" in out.stdout, out


@pytest.mark.timeout(60)
def test_busy_metrics_port_fails_fast(queue):
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        with ServePool.on(queue, "--metrics-port", str(port), workers=1) as pool:
            assert pool.wait(30) == 1
            assert f"cannot serve metrics on 127.0.0.1:{port}" in pool.text()
            assert "consuming" not in pool.text()  # no worker was started
    finally:
        holder.close()
