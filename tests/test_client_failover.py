"""Client failover on one broker: several URLs, publisher confirms (nacks), stalled replies.

The same behaviours on a real 3-node cluster, with nodes killed under load,
are in tests/test_cluster.py.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pika
import pytest
from _client_helpers import URL, FixtureServer, conformant_handler, drop_first_handler, fib
from _net import TcpProxy

from fastfib.aio import AsyncFibonacciRpcClient
from fastfib.client import FibonacciRpcClient
from fastfib.errors import RpcTimeout

pytestmark = pytest.mark.broker

KINDS = ["blocking", "asyncio"]


def call_many(kind: str, urls, queue: str, ns, *, window: int = 64, timeout: float = 60, **kwargs):
    """call_many on a fresh client of ``kind``; returns (results, counters, endpoint at the end)."""
    if kind == "blocking":
        with FibonacciRpcClient(urls, queue, timeout=timeout, **kwargs) as client:
            return client.call_many(ns, window=window), client.counters, client.endpoint

    async def main():
        async with AsyncFibonacciRpcClient(urls, queue, timeout=timeout, **kwargs) as client:
            return await client.call_many(ns, window=window), client.counters, client.endpoint

    return asyncio.run(asyncio.wait_for(main(), 120))


def cut_when(proxy: TcpProxy, server: FixtureServer, count: int) -> threading.Thread:
    def cut():
        give_up = time.monotonic() + 60
        while len(server.requests) < count and time.monotonic() < give_up:
            time.sleep(0.005)
        proxy.stop()

    thread = threading.Thread(target=cut, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("kind", KINDS)
def test_losing_the_node_moves_to_the_next_url_and_resends(broker_url, queue, kind):
    ns = [i % 300 for i in range(3000)]
    with FixtureServer(queue, conformant_handler(), prefetch=1000) as server:
        proxy = TcpProxy().start()  # the first "node"; the broker itself is the second
        try:
            cutter = cut_when(proxy, server, 500)
            results, counters, endpoint = call_many(kind, [proxy.url, broker_url], queue, ns)
            cutter.join()
        finally:
            proxy.stop()
    assert results == [fib(n) for n in ns]
    assert endpoint == "127.0.0.1:5672" and counters.reconnects == 1
    assert counters.resent >= 1  # what was in flight when the proxy went
    assert len(server.requests) >= len(ns)


@pytest.mark.parametrize("kind", KINDS)
def test_url_none_reads_fastfib_url(broker_url, queue, kind, monkeypatch):
    with TcpProxy() as dead:
        pass
    monkeypatch.setenv("FASTFIB_URL", f"{dead.url}, {broker_url}")
    with FixtureServer(queue, conformant_handler()):
        results, counters, endpoint = call_many(kind, None, queue, range(10))
    assert results == [fib(n) for n in range(10)] and endpoint == "127.0.0.1:5672"


@pytest.mark.parametrize("kind", KINDS)
def test_lost_replies_are_resent_when_the_queue_is_empty(broker_url, queue, kind):
    """The server takes each first request and never answers it: after stall_timeout the client resends."""
    with FixtureServer(queue, drop_first_handler(conformant_handler())) as server:
        results, counters, _ = call_many(kind, broker_url, queue, range(20), stall_timeout=0.3)
    assert results == [fib(n) for n in range(20)]
    assert counters.reconnects >= 1 and counters.resent >= 20
    assert len(server.requests) >= 40


def declare_full_queue(queue: str) -> None:
    """A queue that holds 2 waiting messages and rejects (nacks) publishes beyond them."""
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        conn.channel().queue_declare(queue, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    finally:
        conn.close()


@pytest.mark.parametrize("kind", KINDS)
def test_nacked_requests_are_resent(broker_url, queue, kind):
    """A queue that rejects publishes beyond 2 waiting messages nacks them; each is sent again until taken."""
    declare_full_queue(queue)
    ns = list(range(20))
    with FixtureServer(queue, conformant_handler(), declare=False, prefetch=1, delay=0.005):
        results, counters, _ = call_many(kind, broker_url, queue, ns, window=20)
    assert results == [fib(n) for n in ns]
    assert counters.nacked > 0 and counters.resent >= counters.nacked
    assert counters.reconnects == 0


@pytest.mark.parametrize("kind", KINDS)
def test_without_confirms_a_dropped_request_is_only_noticed_at_its_timeout(broker_url, queue, kind):
    """The opposite of test_nacked_requests_are_resent: the same full queue, confirms=False."""
    declare_full_queue(queue)
    with FixtureServer(queue, conformant_handler(), declare=False, prefetch=1, delay=0.005):
        with pytest.raises(RpcTimeout):
            call_many(kind, broker_url, queue, range(20), window=20, timeout=3, confirms=False)
