"""fastfib.metrics without a broker: batched histogram updates equal prometheus_client's own,
a worker's flush maps its counters to the right series, the worker times exactly the requests it
answers, and the supervisor's endpoint serves /metrics and /healthz and cleans up.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request

import prometheus_client  # noqa: F401 - in the `test` extra: a missing one fails here, it does not skip
import pytest
from pika.spec import BasicProperties

from fastfib import metrics as fm
from fastfib.cache import ReplyCache
from fastfib.server.lifecycle import Worker
from fastfib.server.settings import WorkerConfig
from fastfib.server.stats import Stats


@pytest.fixture
def multiproc_dir(tmp_path, monkeypatch):
    """prometheus_client in multiprocess mode on ``tmp_path``, undone afterwards (it is process-global)."""
    from prometheus_client import values

    saved = values.ValueClass
    monkeypatch.setenv(fm.MULTIPROC_ENV, str(tmp_path))
    values.ValueClass = values.get_value_class()
    yield tmp_path
    values.ValueClass = saved


def collect(path) -> dict:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    out = {}
    for family in registry.collect():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_batched_histogram_equals_observe():
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    direct = Histogram("d_seconds", "d", buckets=fm.BUCKETS, registry=registry)
    batched = Histogram("b_seconds", "b", buckets=fm.BUCKETS, registry=registry)
    rng = random.Random(7)
    values = [*fm.BUCKETS, 0.0, 11.0, 1e-7] + [10 ** rng.uniform(-6, 1.3) for _ in range(500)]
    local = fm.LocalHistogram()
    for i, v in enumerate(values):
        direct.observe(v)
        local.observe(v)
        if i % 97 == 0:  # several flushes, as the worker does
            fm.add_to_histogram(batched, *local.take())
    fm.add_to_histogram(batched, *local.take())
    assert local.take() == ([0] * (len(fm.BUCKETS) + 1), 0.0)

    def samples(name):
        return {(s.name.replace(name, "X"), tuple(s.labels.items())): s.value
                for f in registry.collect() if f.name == name for s in f.samples if not s.name.endswith("_created")}

    got, want = samples("b_seconds"), samples("d_seconds")
    assert got.keys() == want.keys() and len(got) == len(fm.BUCKETS) + 1 + 2
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12), key


def test_worker_flush_maps_counters_to_series(multiproc_dir):
    wm = fm.WorkerMetrics(3)
    stats, cache = Stats(), ReplyCache(10_000)
    stats.replied, stats.expired, stats.no_reply_to = 10, 2, 1
    stats.errors["invalid_argument"], stats.errors["internal"] = 4, 1
    stats.connections, stats.requeued_on_stop = 1, 5
    cache.get((1, "decimal"))
    cache.put((1, "decimal"), b"x" * 100)
    cache.get((1, "decimal"))
    wm.durations.observe(0.0001)
    wm.durations.observe(3.0)
    wm.flush(stats, cache, in_flight=2)
    stats.replied += 5
    wm.durations.observe(0.02)
    wm.flush(stats, cache, in_flight=0)
    wm.flush(stats, cache, in_flight=1)  # nothing new: no double counting

    got = collect(multiproc_dir)

    def req(outcome):
        return got[("fastfib_requests_total", (("outcome", outcome), ("worker", "3")))]

    assert (req("ok"), req("expired"), req("no_reply_to"), req("invalid_argument"), req("internal")) == (15, 2, 1, 4, 1)
    assert req("out_of_range") == 0 and req("unsupported_format") == 0  # every series exists from the start
    assert got[("fastfib_cache_hits_total", ())] == 1 and got[("fastfib_cache_misses_total", ())] == 1
    assert got[("fastfib_cache_bytes", ())] == 100 + 200
    assert got[("fastfib_requests_in_flight", ())] == 1
    assert got[("fastfib_requests_requeued_total", ())] == 5 and got[("fastfib_broker_connections_total", ())] == 1
    assert got[("fastfib_request_duration_seconds_count", ())] == 3
    assert got[("fastfib_request_duration_seconds_bucket", (("le", "0.0001"),))] == 1
    assert got[("fastfib_request_duration_seconds_bucket", (("le", "0.025"),))] == 2
    assert got[("fastfib_request_duration_seconds_bucket", (("le", "2.5"),))] == 2
    assert got[("fastfib_request_duration_seconds_bucket", (("le", "5.0"),))] == 3
    assert got[("fastfib_request_duration_seconds_sum", ())] == pytest.approx(3.0201)

    # A dead worker's live gauges go, its counters stay.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(os.getpid(), str(multiproc_dir))
    got = collect(multiproc_dir)
    assert ("fastfib_requests_in_flight", ()) not in got and req("ok") == 15


class _Chan:
    is_open = True

    def __init__(self):
        self.published, self.acks = [], []

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False):
        self.published.append((routing_key, body, properties))

    def basic_ack(self, delivery_tag=0, multiple=False):
        self.acks.append(delivery_tag)


class _StubMetrics:
    def __init__(self):
        self.durations = fm.LocalHistogram()
        self.flushes = []

    def flush(self, stats, cache, in_flight):
        self.flushes.append((stats.replied, in_flight))


def test_worker_times_every_answered_request_and_only_those():
    metrics = _StubMetrics()
    worker = Worker(WorkerConfig(inline_max_n=100), compute=lambda n, fmt: str(n).encode(), metrics=metrics)
    chan = _Chan()
    worker._set_channel(chan)

    def deliver(tag, body, **props):
        props.setdefault("reply_to", "replies")
        worker.dispatcher.on_message(chan, type("M", (), {"delivery_tag": tag, "redelivered": False})(), BasicProperties(**props), body)

    started = time.perf_counter()
    deliver(1, b"20")  # inline: timed
    deliver(2, b"x")  # invalid_argument: timed
    deliver(3, b"5", reply_to=None)  # no reply_to: not timed
    deliver(4, b"5", headers={"x-deadline-ms": 1})  # expired: not timed
    deliver(5, b"500")  # offloaded to the compute thread: timed when its result comes back
    assert sum(metrics.durations.counts) == 2
    job = worker.computer.jobs.get_nowait()
    job.body = b"500"
    worker.dispatcher.on_computed(job)
    assert sum(metrics.durations.counts) == 3 and len(chan.published) == 3
    # In seconds, and each of the 3 within this test's own span (the worker times with perf_counter).
    assert 0 < metrics.durations.sum <= 3 * (time.perf_counter() - started)
    worker._flush_metrics()
    assert metrics.flushes == [(2, 0)]


def test_worker_without_metrics_times_nothing():
    worker = Worker(WorkerConfig())
    assert worker.dispatcher.durations is None
    worker._flush_metrics()  # a no-op


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read()


def test_pool_endpoint_serves_metrics_and_health_and_cleans_up(monkeypatch):
    from prometheus_client import values

    saved_class = values.ValueClass
    monkeypatch.delenv(fm.MULTIPROC_ENV, raising=False)
    state = {"ok": False, "body": {"status": "starting", "workers": 2, "consuming": 0}}
    pool = fm.PoolMetrics("127.0.0.1", 0, 2, lambda: (state["ok"], state["body"]))
    try:
        directory = pool.directory
        assert os.environ[fm.MULTIPROC_ENV] == directory and os.path.isdir(directory)
        pool.set_consuming(1)
        pool.worker_restarting(1)
        status, ctype, body = _get(pool.url + "/metrics")
        text = body.decode()
        assert status == 200 and ctype.startswith("text/plain")
        assert "fastfib_workers 2.0" in text and "fastfib_workers_consuming 1.0" in text
        assert 'fastfib_worker_restarts_total{worker="1"} 1.0' in text
        assert 'fastfib_worker_restarts_total{worker="0"} 0.0' in text
        status, _, body = _get(pool.url + "/healthz")
        assert status == 503 and json.loads(body)["status"] == "starting"
        state.update(ok=True, body={"status": "ok", "workers": 2, "consuming": 2})
        status, ctype, body = _get(pool.url + "/healthz")
        assert status == 200 and ctype == "application/json" and json.loads(body)["consuming"] == 2
        assert _get(pool.url + "/nope")[0] == 404
    finally:
        pool.close()
        values.ValueClass = saved_class
    assert not os.path.exists(directory) and fm.MULTIPROC_ENV not in os.environ
    with pytest.raises(OSError):
        urllib.request.urlopen(pool.url + "/healthz", timeout=2)


def test_missing_prometheus_client_is_reported(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kw):
        if name.startswith("prometheus_client"):
            raise ImportError("no module named prometheus_client")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(fm.MetricsUnavailable, match=r"\[metrics\] extra .*: pip install prometheus_client$"):
        fm.require_prometheus()
