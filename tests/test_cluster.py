"""A node of a real 3-node RabbitMQ cluster dies under load: no call fails, clients and workers fail over.

The cluster comes from scripts/cluster.sh (3 nodes of the installed
rabbitmq-server, AMQP 127.0.0.1:5681-5683); a ``fastfib serve`` pool of 3
workers serves a quorum queue with every node's URL in one ``--url``. Two
blocking clients, connected to two different nodes, each run pipelined
``call_many`` batches while one of these happens (client 1 is a
:class:`~fastfib.client.FibonacciRpcClient`, client 2 an
:class:`~fastfib.aio.AsyncFibonacciRpcClient` on a loop of its own):

- ``leader``: kill -9 the node that holds the quorum queue's leader;
- ``client-node``: kill -9 the node that one of the clients is connected to;
- ``stop-app``: ``rabbitmqctl stop_app`` then ``start_app`` on the other client's node.

Each client calls in chunks until the fault (and, for ``stop-app``, the
``start_app`` that follows it) has returned and at least CALLS calls are done,
so the calls span the whole fault however long the node takes. Each case checks
that every call returns the right value and none raises, that
a fresh call answers within 15 s of the fault, and that no worker was restarted
or went into a reconnect loop (the workers fail over in place). The figures of
each case (calls, failures, duplicates, resends, time to serve again) are
printed (``pytest -s``) and written to ``$TMPDIR/fastfib-cluster-report.json``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from _cluster import Cluster
from _server_helpers import Pool

from fastfib import fib
from fastfib.aio import AsyncFibonacciRpcClient
from fastfib.client import FibonacciRpcClient

pytestmark = [pytest.mark.broker, pytest.mark.slow]

CALLS = 10_000  # at least, per client and case
CHUNK = 1_000  # calls per call_many
WINDOW = 64
CALL_TIMEOUT = 120.0  # the budget of each batch: a failover must fit in it, not take it
SERVE_AGAIN_TIMEOUT = 15.0
FAULT_AFTER = 1.0  # seconds into the batches
MAX_RECONNECTS_PER_WORKER = 6  # per case: a few URLs tried, not a loop
REPORT = Path(tempfile.gettempdir()) / "fastfib-cluster-report.json"

_results: dict[str, dict] = {}


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.up()
        yield c
    finally:
        c.down()


@pytest.fixture(scope="module")
def pool(cluster):
    queue = f"fastfib-cluster-{uuid.uuid4().hex[:8]}"
    p = Pool(queue, "--queue-type", "quorum", workers=3, url=" ".join(cluster.urls))
    try:
        p.wait_ready(timeout=60)
        yield p
    finally:
        p.kill()
        if _results:
            REPORT.write_text(json.dumps(_results, indent=2) + "\n")


def _client_urls(urls: list[str], first: int) -> list[str]:
    """Every node's URL, node ``first`` first (the client connects to it, and fails over in order)."""
    i = first - 1
    return urls[i:] + urls[:i]


class _AsyncClientThread:
    """An AsyncFibonacciRpcClient, connected, on an event loop in a thread of its own."""

    def __init__(self, urls: list[str], queue: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="aio-client", daemon=True)
        self.thread.start()
        self.client = AsyncFibonacciRpcClient(urls, queue, timeout=CALL_TIMEOUT)
        self.run(self.client.connect(), 60)

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.client.close(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _run_case(cluster: Cluster, pool: Pool, name: str, fault, restore, client_nodes: tuple[int, int]) -> dict:
    """Two clients on ``client_nodes`` call in chunks until ``fault()`` has returned; it hits during them."""
    ns = [(i * 7) % 1500 for i in range(CHUNK)]
    expected = [fib(n) for n in ns]
    log_start = len(pool.text())
    pids_before = sorted(pool.worker_pids())
    blocking = FibonacciRpcClient(_client_urls(cluster.urls, client_nodes[0]), pool.queue, timeout=CALL_TIMEOUT)
    aio = _AsyncClientThread(_client_urls(cluster.urls, client_nodes[1]), pool.queue)
    clients = [blocking, aio.client]
    probe = FibonacciRpcClient(_client_urls(cluster.urls, client_nodes[1]), pool.queue, timeout=SERVE_AGAIN_TIMEOUT)
    assert [cluster.node_of(c.endpoint) for c in clients] == list(client_nodes)
    fault_done = threading.Event()
    chunks: dict[int, int] = {0: 0, 1: 0}
    failures: list[str] = []
    wrong = 0

    def batch(k: int) -> None:
        nonlocal wrong
        try:
            while True:
                after = fault_done.is_set()  # a chunk that starts after the fault has returned ends the loop
                got = blocking.call_many(ns, window=WINDOW) if k == 0 else \
                    aio.run(aio.client.call_many(ns, window=WINDOW))
                chunks[k] += 1
                wrong += sum(1 for a, b in zip(got, expected, strict=True) if a != b)
                if after and chunks[k] * CHUNK >= CALLS:
                    break
        except Exception as exc:  # recorded, and failed below
            failures.append(repr(exc))

    threads = [threading.Thread(target=batch, args=(k,), name=f"client-{k}") for k in (0, 1)]
    for t in threads:
        t.start()
    try:
        time.sleep(FAULT_AFTER)
        assert all(t.is_alive() for t in threads), failures
        fault_at = time.monotonic()
        try:
            fault()
        finally:
            fault_done.set()
        # Served again: a call on a client that was connected before the fault answers within 15 s.
        probe.call(5, timeout=SERVE_AGAIN_TIMEOUT)
        serve_again = time.monotonic() - fault_at
        for t in threads:
            t.join(CALL_TIMEOUT + 30)
        assert not any(t.is_alive() for t in threads), "the calls did not end"
        restore()
    finally:
        fault_done.set()
        blocking.close()
        probe.close()
        aio.close()

    log = pool.text()[log_start:]
    reconnects = {w: len(re.findall(rf"worker-{w}\[\d+\]: .*; reconnecting to", log)) for w in range(3)}
    figures = {
        "calls": (chunks[0] + chunks[1]) * CHUNK,
        "failures": len(failures) + wrong,
        "duplicates_dropped": sum(c.counters.duplicates for c in clients),
        "resent": sum(c.counters.resent for c in clients),
        "nacked": sum(c.counters.nacked for c in clients),
        "client_reconnects": sum(c.counters.reconnects for c in clients),
        "per_client": {kind: dataclasses.asdict(c.counters) for kind, c in zip(("blocking", "asyncio"), clients,
                                                                                strict=True)},
        "served_again_after_s": round(serve_again, 3),
        "worker_reconnect_attempts": reconnects,
        "worker_restarts": log.count("restarting it"),
    }
    _results[name] = figures
    print(f"\n{name}: {json.dumps(figures)}")

    assert not failures, failures
    assert wrong == 0
    assert figures["worker_restarts"] == 0, log
    assert sorted(pool.worker_pids()) == pids_before  # same processes: failed over in place
    assert max(reconnects.values()) <= MAX_RECONNECTS_PER_WORKER, log
    _wait_every_worker_consuming(pool, log_start)
    return figures


def _wait_every_worker_consuming(pool: Pool, log_start: int, timeout: float = 30) -> None:
    """Until each worker's last line about its connection since ``log_start`` says it consumes."""
    deadline = time.monotonic() + timeout
    while True:
        log = pool.text()[log_start:]
        last = {}
        for m in re.finditer(r"worker-(\d)\[\d+\]: (?:consuming from queue|.*; reconnecting to)", log):
            last[m.group(1)] = "consuming" in m.group(0)
        if all(last.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"workers not consuming again after {timeout} s:\n{log}")
        time.sleep(0.2)


def test_kill_the_quorum_leader_node(cluster, pool):
    leader = cluster.leader(pool.queue)
    others = tuple(n for n in (1, 2, 3) if n != leader)
    _run_case(cluster, pool, "leader", lambda: cluster.kill(leader), lambda: cluster.start(leader), others)
    cluster.wait_all_online(pool.queue, ask=others[0])


def test_kill_the_node_a_client_is_connected_to(cluster, pool):
    leader = cluster.leader(pool.queue)
    others = tuple(n for n in (1, 2, 3) if n != leader)
    victim = others[0]  # client 0's node (not the leader's: that is the case above)
    figures = _run_case(cluster, pool, "client-node", lambda: cluster.kill(victim), lambda: cluster.start(victim),
                        others)
    assert figures["client_reconnects"] >= 1
    cluster.wait_all_online(pool.queue, ask=others[1])


def test_stop_app_then_start_app_on_a_client_node(cluster, pool):
    leader = cluster.leader(pool.queue)
    others = tuple(n for n in (1, 2, 3) if n != leader)
    target = others[1]  # client 1's node

    def fault():
        # Both steps inside the calls: they go on until fault() returns.
        cluster.ctl(target, "stop_app")
        cluster.ctl(target, "start_app")

    figures = _run_case(cluster, pool, "stop-app", fault, lambda: cluster.wait_all_online(pool.queue, ask=others[0]),
                        others)
    assert figures["client_reconnects"] >= 1
